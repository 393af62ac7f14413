"""Validated values for remote pools: the only things that ever reach a remote command line.

Every function returns a normalised value or raises InvalidArgument with one sentence that
names the bad value. Plans are built from these results only, never from raw config text.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from enum import Enum

from ..errors import InvalidArgument

__all__ = [
    "MAX_RAM_SIZE",
    "MIN_RAM_SIZE",
    "FabricAddress",
    "SshTarget",
    "Transport",
    "check_nqn",
    "check_ram_size",
    "fabric_address",
    "parse_ssh_target",
]

# NVMe base spec: "nqn.yyyy-mm.<reverse domain>:<anything>", at most 223 bytes. We accept a
# strict subset: lower-case domain labels, then ':'-separated parts of [A-Za-z0-9._-].
# That covers "nqn.2014-08.org.nvmexpress:uuid:<uuid>" (hostnqn files) and our own names.
_NQN_RE = re.compile(
    r"^nqn\.(19|20)\d\d-(0[1-9]|1[0-2])"
    r"\.[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*"
    r"(:[A-Za-z0-9][A-Za-z0-9._-]*)+$"
)
NQN_MAX = 223

MIN_RAM_SIZE = 16 << 20  # ext4 plus a journal needs some room; smaller is a typo
# A hard cap that catches typos and absurd values before any host is asked: more than the
# largest single servers hold today. The real limit is the remote host's MemAvailable,
# checked at connect and resize (capacity.py).
MAX_RAM_SIZE = 16 << 40
_ALIGN = 1 << 20  # whole MiB: tmpfs pages, loop sectors and nvme LBAs all divide it

_USER_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
_HOSTNAME_RE = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)


class Transport(str, Enum):
    TCP = "tcp"
    RDMA = "rdma"


def check_transport(value: str) -> Transport:
    try:
        return Transport(value)
    except ValueError:
        raise InvalidArgument(f"{value!r} is not a transport; use 'rdma' or 'tcp'") from None


def check_nqn(value: str) -> str:
    """An NVMe qualified name we are willing to put in a path or on a command line."""
    if not isinstance(value, str) or len(value) > NQN_MAX or not _NQN_RE.match(value):
        raise InvalidArgument(
            f"{value!r} is not an NQN we accept (nqn.YYYY-MM.domain:name, at most "
            f"{NQN_MAX} characters of letters, digits and . _ - :)"
        )
    return value


def check_ram_size(value: int) -> int:
    """Bytes of remote RAM for one pool: a whole number of MiB, 16 MiB to 16 TiB."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"{value!r} is not a size in bytes")
    if value < MIN_RAM_SIZE or value > MAX_RAM_SIZE:
        raise InvalidArgument(
            f"ramdiskSize {value} bytes is out of range (16M to 16T) for a remote pool"
        )
    if value % _ALIGN:
        raise InvalidArgument(f"ramdiskSize {value} bytes is not a whole number of MiB")
    return value


def check_port(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise InvalidArgument(f"{value!r} is not a TCP/RDMA port number (1-65535)")
    return value


@dataclass(frozen=True)
class FabricAddress:
    """Where the remote host's nvmet port listens: configfs ``addr_*`` values."""

    transport: Transport
    traddr: str  # normalised by ipaddress, never the raw config text
    adrfam: str  # "ipv4" | "ipv6"
    trsvcid: int


def fabric_address(transport: str, ip: str, port: int) -> FabricAddress:
    if not isinstance(ip, str) or "%" in ip:
        raise InvalidArgument(f"{ip!r} is not an IP address (scoped addresses are not supported)")
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        raise InvalidArgument(f"{ip!r} is not an IP address") from None
    if addr.is_unspecified or addr.is_multicast:
        raise InvalidArgument(f"{ip!r} cannot be a fabric address (unspecified or multicast)")
    return FabricAddress(
        transport=check_transport(transport),
        traddr=str(addr),
        adrfam="ipv4" if addr.version == 4 else "ipv6",
        trsvcid=check_port(port),
    )


@dataclass(frozen=True)
class SshTarget:
    user: str
    host: str
    port: int = 22

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.user}@{host}:{self.port}"


def parse_ssh_target(value: str) -> SshTarget:
    """``user@host[:port]``; host is a DNS name, an IPv4 address or ``[IPv6]``."""
    bad = InvalidArgument(
        f"{value!r} is not an SSH target; use user@host or user@host:port "
        "(IPv6 in brackets: root@[fd00::1]:22)"
    )
    if not isinstance(value, str) or value.count("@") != 1:
        raise bad
    user, rest = value.split("@")
    if not _USER_RE.match(user):
        raise bad
    port = 22
    if rest.startswith("["):
        host, sep, tail = rest[1:].partition("]")
        if not sep:
            raise bad
        if tail:
            if not tail.startswith(":") or not tail[1:].isdigit():
                raise bad
            port = int(tail[1:])
        try:
            host = str(ipaddress.IPv6Address(host))
        except ValueError:
            raise bad from None
    else:
        host, sep, port_s = rest.partition(":")
        if sep:
            if not port_s.isdigit():
                raise bad
            port = int(port_s)
        if not _HOSTNAME_RE.match(host):
            raise bad
    try:
        check_port(port)
    except InvalidArgument:
        raise bad from None
    return SshTarget(user=user, host=host, port=port)
