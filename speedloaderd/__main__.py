"""speedloaderd: the root daemon. ``speedloaderd [--config PATH] [--debug]``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from . import __version__
from .config import default_config_path, load_config
from .errors import SpeedloaderError

log = logging.getLogger("speedloaderd")


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
        return asyncio.run(serve(config_path))
    except SpeedloaderError as err:
        log.error("%s", err)
        return 1


if __name__ == "__main__":
    sys.exit(main())
