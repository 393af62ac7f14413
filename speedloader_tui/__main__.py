"""``speedloader-tui [--web [--host H] [--port P]]``: the dashboard in this terminal, or
served to browsers by textual-serve."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="speedloader-tui",
        description="Live dashboard of speedloaderd: models, RAM tiers, transfers, settings.",
    )
    ap.add_argument(
        "--bus",
        metavar="ADDRESS",
        default=None,
        help="D-Bus system bus address (default: $DBUS_SYSTEM_BUS_ADDRESS or the system bus)",
    )
    ap.add_argument(
        "--web",
        action="store_true",
        help="serve the dashboard to browsers instead of running it here; prints the URL "
        "to open, with its access token (never as root)",
    )
    ap.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on with --web (default: %(default)s, this machine only)",
    )
    ap.add_argument("--port", type=int, default=5050, help="port for --web (default: 5050)")
    ap.add_argument(
        "--public-url",
        default=None,
        help="with --web behind a reverse proxy: the URL browsers use, e.g. "
        "https://gpu1.example/speedloader",
    )
    args = ap.parse_args(argv)
    if args.web:
        from .web import serve

        return serve(args.host, args.port, args.bus, args.public_url)
    from .app import SpeedloaderApp

    SpeedloaderApp(args.bus).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
