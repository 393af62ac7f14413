"""Wait for a block device condition, woken by kernel uevents (pyudev), not by a timer.

The monitor listens to the *kernel* netlink source, so it works without udevd (the
guests, minimal hosts). Each uevent of the subsystem re-runs ``check``; ``fallback``
bounds the time between checks in case an event is missed (the sysfs fallback).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import pyudev

T = TypeVar("T")


def wait_for(
    check: Callable[[], T | None],
    timeout: float,
    subsystem: str = "block",
    fallback: float = 1.0,
    on_listening: Callable[[], None] | None = None,
) -> T | None:
    """``check()``'s first non-None result, or None after ``timeout`` seconds."""
    monitor = pyudev.Monitor.from_netlink(pyudev.Context(), source="kernel")
    monitor.filter_by(subsystem)
    monitor.start()  # the socket closes when the monitor is garbage collected
    if on_listening is not None:
        on_listening()
    deadline = time.monotonic() + timeout
    while True:
        found = check()  # after start(): an event between check and poll is not lost
        if found is not None:
            return found
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        device = monitor.poll(timeout=min(remaining, fallback))
        if device is None and time.monotonic() >= deadline:
            return None  # timed out with no event since the last check
        while device is not None:  # drain what is queued, then check once
            device = monitor.poll(timeout=0)
