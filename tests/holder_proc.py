"""A plain process holding a file, for tests/test_holders.py: no server, no API.

``python holder_proc.py map|open PATH [COMM]``: names itself COMM (as any process may, through
/proc/self/comm), maps PATH read-only (``map``, as llama.cpp does a model) or only keeps it
open (``open``), prints ``ready`` and holds it until its stdin closes.
"""

from __future__ import annotations

import mmap
import sys


def main() -> None:
    how, path = sys.argv[1], sys.argv[2]
    if len(sys.argv) > 3:
        with open("/proc/self/comm", "wb") as f:
            f.write(sys.argv[3].encode())
    f = open(path, "rb")  # noqa: SIM115 - held until stdin closes
    held = None
    if how == "map":
        held = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        held.read(len(held))  # touch every page, as a loader does
        f.close()  # the mapping alone keeps the file, as a loaded model does
    print("ready", flush=True)
    sys.stdin.read()


if __name__ == "__main__":
    main()
