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
    for sig in (signal.SIGTERM, signal.SIGINT):
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


def run_daemon(config_path: Path) -> int:
    """asyncio.run(serve()), less its unbounded waits: asyncio.run joins the default
    executor's threads, and one blocked in a read that never returns (a hung NFS or FUSE
    cold storage) would keep a stopping daemon alive forever."""
    loop = asyncio.new_event_loop()
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
        # half-way. remove_signal_handler restores the default action, so the signals are
        # blocked while SIG_IGN replaces it: one sent in between stays pending and is then
        # discarded, not acted on (a test's SIGTERM once landed there: exit status -15).
        stop_signals = {signal.SIGTERM, signal.SIGINT}
        signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
        for sig in stop_signals:
            loop.remove_signal_handler(sig)
            signal.signal(sig, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, stop_signals)
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
