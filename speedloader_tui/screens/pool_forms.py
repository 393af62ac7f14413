"""The forms of the Tiers tab: resize a pool, add a tmpfs tier, add a remote tier.

Each checks what it can before anything is sent: a size with the daemon's own parser
(speedloaderd/sizes.py, the one its Resize and AddPool arguments go through; slctl
passes sizes to the daemon as typed), whole numbers as whole numbers. What only the
daemon can judge (a free name, a reachable host, a remote pool's size range) it judges,
and its answer is shown as a notification.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from speedloader_client.records import DEFAULT_SPEED
from speedloaderd.sizes import parse_size

from .dialogs import FormError, FormScreen


def checked_size(key: str, text: str) -> str:
    """``text`` if the daemon would take it as a pool size (more than 0 bytes)."""
    if not text:
        raise FormError(key, "Enter a size, e.g. 8G or 512M.")
    try:
        size = parse_size(text)
    except ValueError as err:
        raise FormError(key, f"Not sent: {err}.") from None
    if size <= 0:
        raise FormError(key, f"Not sent: size {text!r} must be more than 0 bytes.")
    return text


def whole_numbers(values: dict[str, str], keys: list[str]) -> dict[str, int]:
    """The filled-in ``keys`` as numbers. Empty fields are left out: the daemon's default
    applies."""
    numbers = {}
    for key in keys:
        text = values[key]
        if not text:
            continue
        if not text.isdigit():
            raise FormError(key, f"Not sent: {key} {text!r} is not a whole number.")
        numbers[key] = int(text)
    return numbers


def required(values: dict[str, str], key: str, what: str) -> str:
    if not values[key]:
        raise FormError(key, f"Enter {what}.")
    return values[key]


class ResizePoolScreen(FormScreen[str]):
    """Answers the new size, as typed (the daemon parses it the same way)."""

    def __init__(self, pool: str):
        super().__init__(f"Resize pool {pool}", [("size", "New size (e.g. 8G)", "")])

    def parse(self, values: dict[str, str]) -> str:
        return checked_size("size", values["size"])


@dataclass
class NewPool:
    name: str
    path: str  # empty: <poolsRoot>/name, the daemon's default
    size: str
    speed: int


class AddPoolScreen(FormScreen[NewPool]):
    def __init__(self) -> None:
        super().__init__(
            "Add a RAM tier (a local tmpfs pool)",
            [
                ("name", "Name", ""),
                ("path", "Mount path (empty: <poolsRoot>/name)", ""),
                ("size", "Size (e.g. 16G)", ""),
                ("speed", "Speed rating", str(DEFAULT_SPEED)),
            ],
        )

    def parse(self, values: dict[str, str]) -> NewPool:
        name = required(values, "name", "a name for the pool")
        size = checked_size("size", values["size"])
        speed = whole_numbers(values, ["speed"]).get("speed", DEFAULT_SPEED)
        return NewPool(name, values["path"], size, speed)


@dataclass
class NewRemotePool:
    name: str
    entry: dict[str, Any]  # the remoteTiers.hosts entry, as `slctl pool add --remote` makes


class AddRemotePoolScreen(FormScreen[NewRemotePool]):
    """RAM on another host over NVMe-oF: saved in remoteTiers through the daemon's
    validated SetConfig (the same edit as `slctl pool add --remote`); Connect follows."""

    def __init__(self) -> None:
        super().__init__(
            "Add a remote RAM tier (NVMe-oF; its SSH host key must be known)",
            [
                ("name", "Name", ""),
                ("ssh", "SSH (user@host[:port])", ""),
                ("address", "Fabric address (IP)", ""),
                ("size", "Size (e.g. 64G)", ""),
                ("transport", "Transport (rdma or tcp)", "rdma"),
                ("port", "NVMe-oF port", "4420"),
                ("path", "Mount path (empty: default)", ""),
                ("speed", "Speed rating (empty: default)", ""),
            ],
        )

    def parse(self, values: dict[str, str]) -> NewRemotePool:
        name = required(values, "name", "a name for the pool")
        entry: dict[str, Any] = {
            "ssh": values["ssh"],
            "rdmaIp": values["address"],
            "ramdiskSize": checked_size("size", values["size"]),
            "transport": values["transport"] or "rdma",
        }
        entry |= whole_numbers(values, ["port", "speed"])
        if values["path"]:
            entry["path"] = values["path"]
        return NewRemotePool(name, entry)
