"""A stopping daemon is never killed by a repeated SIGTERM or SIGINT (speedloaderd/__main__.py
StoppingLoop): from asyncio's handler the stop signals go straight to SIG_IGN, and nothing
(asyncio's own remove_signal_handler or close()) puts their default action back, for any
instant, in any thread. The end-to-end case is tests/test_bus_daemon.py
test_sigterm_mid_promote_cancels_and_leaves_nothing_to_repair (a second SIGTERM while it
stops); this one checks every disposition set on the way, so a window cannot hide."""

from __future__ import annotations

import os
import signal

import pytest

from speedloaderd.__main__ import STOP_SIGNALS, StoppingLoop


@pytest.fixture
def dispositions(monkeypatch):
    """Every (signal, handler) set through signal.signal, asyncio's calls included."""
    saved = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    seen: list[tuple[int, object]] = []
    real = signal.signal

    def recording(sig, handler):
        seen.append((sig, handler))
        return real(sig, handler)

    monkeypatch.setattr(signal, "signal", recording)
    yield seen
    for sig, handler in saved.items():
        real(sig, handler)


def test_the_stop_signals_never_return_to_their_default_action(dispositions):
    loop = StoppingLoop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, lambda: None)
    loop.ignore_stop_signals()
    for sig in STOP_SIGNALS:
        assert loop.remove_signal_handler(sig)
    loop.close()
    defaults = (signal.SIG_DFL, signal.default_int_handler)
    after_handlers = dispositions[len(STOP_SIGNALS) :]  # past the two add_signal_handler
    assert after_handlers, "nothing was set"
    assert not [(s, h) for s, h in after_handlers if h in defaults], after_handlers
    assert all(signal.getsignal(s) is signal.SIG_IGN for s in STOP_SIGNALS)
    os.kill(os.getpid(), signal.SIGTERM)  # dropped by the kernel: this process goes on


def test_before_stopping_the_loop_behaves_as_asyncio_does(dispositions):
    loop = StoppingLoop()
    loop.add_signal_handler(signal.SIGTERM, lambda: None)
    assert loop.remove_signal_handler(signal.SIGTERM)
    assert dispositions[-1] == (signal.SIGTERM, signal.SIG_DFL)  # not stopping: the default
    loop.close()
