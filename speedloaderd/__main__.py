"""speedloaderd: the root daemon. ``speedloaderd [--config PATH] [--debug]``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from . import __version__
from .config import default_config_path, load_config
from .errors import SpeedloaderError

log = logging.getLogger("speedloaderd")

# Seconds worker threads get to end once the daemon has left the bus. The unit's
# TimeoutStopSec (30 s) must cover Engine.shutdown's wait for jobs plus this.
THREAD_GRACE = 3.0


class _JournalFormatter(logging.Formatter):
    """Under systemd (JOURNAL_STREAM set) prefix lines with <N> syslog priorities and leave
    timestamps to journald; on a terminal, print time and level."""

    _PRIO = {
        logging.DEBUG: 7,
        logging.INFO: 6,
        logging.WARNING: 4,
        logging.ERROR: 3,
        logging.CRITICAL: 2,
    }

    def __init__(self, journal: bool):
        fmt = "%(message)s" if journal else "%(asctime)s %(levelname)s %(name)s: %(message)s"
        super().__init__(fmt)
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if self.journal:
            prio = self._PRIO.get(record.levelno, 6)
            return "\n".join(f"<{prio}>{line}" for line in text.splitlines())
        return text


def setup_logging(debug: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JournalFormatter(journal="JOURNAL_STREAM" in os.environ))
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, handlers=[handler])
    if not debug:
        logging.getLogger("dbus_fast").setLevel(logging.WARNING)


async def serve(config_path: Path) -> int:
    from .bus.server import Server

    try:
        config, _ = load_config(config_path)
        server = Server(config, config_path)
    except SpeedloaderError as err:
        # Stay on the bus without an engine so clients can see the problem and fix it.
        log.error("configuration not usable: %s", err)
        server = Server(None, config_path, str(err))
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stopping.set)
    await server.start()
    waiter = loop.create_task(server.wait())
    stopper = loop.create_task(stopping.wait())
    done, _ = await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if stopper in done:
        log.info("stopping on signal")
        await server.shutdown()
        return 0
    log.error("lost the connection to the system bus")
    return 1


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StoppingLoop(asyncio.SelectorEventLoop):
    """The daemon's event loop. asyncio restores a signal's default action when its handler
    is removed (``close()`` removes them all), and a SIGTERM reaching any thread then kills a
    daemon that is already stopping: seen twice as exit status -15 in
    test_sigterm_mid_promote, once with the stop signals blocked in the main thread only
    (a worker thread took the signal). After ``ignore_stop_signals()`` SIGTERM and SIGINT
    go straight from asyncio's handler to SIG_IGN and stay there: there is no instant at
    which their default action is in force, in any thread."""

    _ignoring = False

    def ignore_stop_signals(self) -> None:
        self._ignoring = True
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)  # replaces asyncio's handler in one step

    def remove_signal_handler(self, sig: int) -> bool:
        if not (self._ignoring and sig in STOP_SIGNALS):
            return super().remove_signal_handler(sig)
        # What the base class does, less restoring the default action (its own attribute:
        # this loop is the base class's subclass, not a wrapper of it).
        removed = self._signal_handlers.pop(sig, None) is not None  # type: ignore[attr-defined]
        if not self._signal_handlers:  # type: ignore[attr-defined]
            signal.set_wakeup_fd(-1)
        return removed


def run_daemon(config_path: Path) -> int:
    """asyncio.run(serve()), less its unbounded waits: asyncio.run joins the default
    executor's threads, and one blocked in a read that never returns (a hung NFS or FUSE
    cold storage) would keep a stopping daemon alive forever."""
    loop = StoppingLoop()
    asyncio.set_event_loop(loop)
    try:
        rc = loop.run_until_complete(serve(config_path))
        tasks = asyncio.all_tasks(loop)
        for task in tasks:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        return rc
    finally:
        # Already stopping: a repeated SIGTERM (systemd's, a test's) must not kill the exit
        # half-way, nor the thread joins after it.
        loop.ignore_stop_signals()
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)
        asyncio.set_event_loop(None)
        loop.close()  # asks the executors to shut down; does not wait for their threads


def exit_past_blocked_threads(rc: int, grace: float = THREAD_GRACE) -> None:
    """Give worker threads ``grace`` seconds to end; if some are still blocked (in the
    kernel, on cold storage that does not answer), end the process without joining them:
    the interpreter's exit would wait for them forever. The bus was left cleanly before."""
    deadline = time.monotonic() + grace
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join(max(deadline - time.monotonic(), 0))
    stuck = [
        t.name
        for t in threading.enumerate()
        if t is not threading.main_thread() and not t.daemon and t.is_alive()
    ]
    if stuck:
        log.warning(
            "exiting with %d worker thread(s) still blocked (%s), most likely reading cold "
            "storage that does not answer; the next start removes their partial copies",
            len(stuck),
            ", ".join(sorted(stuck)),
        )
        logging.shutdown()
        sys.stderr.flush()
        os._exit(rc)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="speedloaderd",
        description="Keep hot LLM models in RAM pools; serve them on the D-Bus system bus.",
    )
    ap.add_argument("--config", type=Path, help="config file (default: %(default)s)", default=None)
    ap.add_argument("--debug", action="store_true", help="log debug messages")
    ap.add_argument("--version", action="version", version=f"speedloaderd {__version__}")
    args = ap.parse_args(argv)
    setup_logging(args.debug)
    if os.geteuid() != 0:
        log.error("speedloaderd must run as root: it mounts RAM pools")
        return 1
    config_path = args.config or default_config_path()
    log.info("speedloaderd %s starting with %s", __version__, config_path)
    try:
        rc = run_daemon(config_path)
    except SpeedloaderError as err:
        log.error("%s", err)
        rc = 1
    exit_past_blocked_threads(rc)
    return rc


if __name__ == "__main__":
    sys.exit(main())
