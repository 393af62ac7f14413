"""wait_for() is woken by a real kernel uevent: a loop device appearing on this machine."""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path

from speedloaderd.remote.uevents import wait_for


def loop_device_of(backing: Path) -> str | None:
    for name in os.listdir("/sys/block"):
        f = Path(f"/sys/block/{name}/loop/backing_file")
        try:
            if f.read_text().strip() == str(backing):
                return f"/dev/{name}"
        except FileNotFoundError:
            continue
    return None


def test_a_block_uevent_wakes_the_wait(workdir):
    backing = workdir / "disk.img"
    with open(backing, "wb") as f:
        f.truncate(16 << 20)
    attached: list[str] = []
    checks: list[str | None] = []

    def attach() -> None:
        r = subprocess.run(["losetup", "--find", "--show", str(backing)],
                           capture_output=True, text=True, check=True)  # fmt: skip
        attached.append(r.stdout.strip())

    worker = threading.Thread(target=attach)

    def check() -> str | None:
        found = loop_device_of(backing)
        checks.append(found)
        if len(checks) == 1:
            worker.start()  # only after the first look found nothing
        return found

    try:
        # fallback=3600: no timer wakes the wait inside the timeout, only an event can
        dev = wait_for(check, timeout=120, fallback=3600)
    finally:
        if worker.is_alive() or attached:
            worker.join()
        for d in attached:
            subprocess.run(["losetup", "--detach", d], check=False)
    assert checks[0] is None
    assert dev is not None and dev == attached[0]


def test_nothing_found_within_the_timeout_is_none():
    assert wait_for(lambda: None, timeout=0) is None
