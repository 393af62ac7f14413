"""NVMe in-band authentication (DH-HMAC-CHAP) for a remote pool's fabric connection.

Without it the target admits any initiator that *says* it is our host NQN: anyone on the
fabric network can spoof the NQN (and the IP) and read or overwrite the RAM disk. With it
the target's host entry holds a host key and a controller key; the connect must prove it
knows the host key (and the target, asked for it, proves it knows the controller key).

Where the keys live, and why nowhere else:
- in the target's configfs host entry (``hosts/<host NQN>/dhchap_key``, ``dhchap_ctrl_key``):
  nvmet needs them there; they are written over the SSH session (host key checked), on
  stdin, never on a command line;
- in this machine's kernel, for the life of the controller (it re-authenticates on every
  reconnect with them); they reach ``nvme connect`` as a JSON config on its stdin;
- nowhere at rest. Disconnect and a later connect need no key (a new connect of the only
  pool of this host on that target makes new keys), so there is no key file to protect,
  back up or leak. nvmet has one host entry per host NQN, shared by the pools this machine
  has on that target: a connect while another is live reuses the keys the entry holds
  (read back from configfs), because changing them would break the live pool's reconnects.

Keys: 32 random bytes, ``DHHC-1:00:<base64(key + crc32)>:`` (untransformed), hash
hmac(sha256), DH group ffdhe2048 (the exchange is then not replayable from a capture).

Support is checked on both kernels before a connect: this machine's nvme-fabrics lists
``dhchap_ctrl_secret`` in /dev/nvme-fabrics (CONFIG_NVME_HOST_AUTH), the target's nvmet
uses nvme-auth or has ``nvmet_auth_set_key`` (CONFIG_NVME_TARGET_AUTH). Debian 12's 6.1
kernel has neither, Debian's 6.12 has both. Without support on both sides the pool connects
unauthenticated and the daemon logs a warning naming the side that lacks it.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import secrets
import zlib
from dataclasses import dataclass, field

from ..errors import Failed
from .command import Runner

log = logging.getLogger(__name__)

DHCHAP_HASH = "hmac(sha256)"
DHCHAP_DHGROUP = "ffdhe2048"
KEY_BYTES = 32
FABRICS_DEV = "/dev/nvme-fabrics"
HOSTID_FILE = "/etc/nvme/hostid"
# A symbol of nvmet's auth code: present in /proc/kallsyms once nvmet is loaded, if built in.
TARGET_AUTH_SYMBOL = "nvmet_auth_set_key"
AUTH_MODULE_HOLDER = "/sys/module/nvme_auth/holders/nvmet"

# DHHC-1:<transform 00-03>:<base64 of a 32, 48 or 64 byte key and its crc32>:
_KEY_RE = re.compile(r"^DHHC-1:0[0-3]:([A-Za-z0-9+/]{48}|[A-Za-z0-9+/]{70}==|[A-Za-z0-9+/]{91}=):$")
_UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def new_key() -> str:
    """A fresh DH-HMAC-CHAP secret in the form nvme-cli and the kernel read."""
    raw = secrets.token_bytes(KEY_BYTES)
    crc = zlib.crc32(raw).to_bytes(4, "little")
    return f"DHHC-1:00:{base64.b64encode(raw + crc).decode()}:"


def check_key(value: str, where: str) -> str:
    """A key read back from a target, before it goes anywhere: the format and its crc32."""
    bad = Failed(f"{where} holds a DH-HMAC-CHAP key that is not valid; remove that host entry")
    if not _KEY_RE.match(value):
        raise bad
    try:
        data = base64.b64decode(value.split(":")[2], validate=True)
    except binascii.Error:
        raise bad from None
    if zlib.crc32(data[:-4]).to_bytes(4, "little") != data[-4:]:
        raise bad
    return value


@dataclass(frozen=True)
class FabricAuth:
    """The DH-HMAC-CHAP keys of one connect; ``repr`` never shows them."""

    host_key: str = field(repr=False)
    ctrl_key: str = field(repr=False)
    # This machine's /etc/nvme/hostid, if any: nvme connect sends it and only takes the
    # keys from a config whose host entry has the same one.
    host_id: str | None = None

    def connect_config(
        self, host_nqn: str, subsystem_nqn: str, transport: str, traddr: str, trsvcid: int
    ) -> str:
        """The JSON config ``nvme connect --config /proc/self/fd/0`` reads (libnvme's format)."""
        host: dict[str, object] = {"hostnqn": host_nqn}
        if self.host_id is not None:
            host["hostid"] = self.host_id
        host["dhchap_key"] = self.host_key
        port = {
            "transport": transport,
            "traddr": traddr,
            "trsvcid": str(trsvcid),
            "dhchap_ctrl_key": self.ctrl_key,
        }
        host["subsystems"] = [{"nqn": subsystem_nqn, "ports": [port]}]
        return json.dumps([host])


def host_supports_auth(local: Runner) -> bool:
    """This machine's nvme-fabrics takes DH-HMAC-CHAP secrets (nvme-fabrics is loaded)."""
    # Reading it lists the options the kernel takes: "...,dhchap_ctrl_secret=%s,...". With
    # cat, not read_text: SFTP cannot read this device (it reads at offsets).
    r = local.run(("cat", FABRICS_DEV))
    options = (r.stdout if r.returncode == 0 else "").replace("\n", ",").split(",")
    return "dhchap_ctrl_secret" in {o.partition("=")[0] for o in options}


def target_supports_auth(remote: Runner) -> bool:
    """The remote host's nvmet has DH-HMAC-CHAP (nvmet is loaded)."""
    # Fast: a modular nvme-auth lists nvmet among its users only if nvmet was built with
    # auth. Else ask /proc/kallsyms (seconds on a slow host: it lists every kernel symbol).
    if remote.run(("test", "-e", AUTH_MODULE_HOLDER)).returncode == 0:
        return True
    r = remote.run(("grep", "-q", "-w", TARGET_AUTH_SYMBOL, "/proc/kallsyms"))
    return r.returncode == 0


def local_host_id(local: Runner) -> str | None:
    text = local.read_text(HOSTID_FILE)
    if text is None:
        return None
    value = text.strip().lower()
    if not _UUID_RE.match(value):
        raise Failed(f"{local.name}: {HOSTID_FILE} is not a UUID; fix or remove it")
    return value


def keys_for(remote: Runner, local: Runner, host_entry: str) -> FabricAuth | None:
    """The keys a connect uses, or None when it cannot authenticate (and why is logged).

    ``host_entry`` is the target's configfs ``hosts/<host NQN>`` directory. If it exists (a
    pool of ours on that target is live) its keys are kept, or none if it has none.
    Needs nvmet loaded there and nvme-fabrics here (the caller loads them).
    """
    if not host_supports_auth(local):
        log.warning(
            "%s: this kernel's nvme-fabrics has no DH-HMAC-CHAP (CONFIG_NVME_HOST_AUTH): the "
            "pool on %s connects unauthenticated; a 6.x kernel built with it (Debian's 6.12) "
            "closes that",
            local.name,
            remote.name,
        )
        return None
    if not target_supports_auth(remote):
        log.warning(
            "%s: its nvmet has no DH-HMAC-CHAP (CONFIG_NVME_TARGET_AUTH): the pool connects "
            "unauthenticated; anyone on the fabric who spoofs this host's NQN can reach it",
            remote.name,
        )
        return None
    host_id = local_host_id(local)
    existing = remote.read_text(f"{host_entry}/dhchap_key")
    if existing is None:  # no entry yet: this connect creates it, with new keys
        return FabricAuth(new_key(), new_key(), host_id)
    host_key = existing.strip()
    ctrl_key = (remote.read_text(f"{host_entry}/dhchap_ctrl_key") or "").strip()
    if not host_key:
        log.warning(
            "%s: host entry %s is in use without DH-HMAC-CHAP keys (a pool connected by an "
            "older speedloaderd?); this pool connects unauthenticated too; disconnect every "
            "pool of this host there and connect again to authenticate",
            remote.name,
            host_entry,
        )
        return None
    where = f"{remote.name}: {host_entry}"
    check_key(host_key, where)
    if not ctrl_key:
        ctrl_key = new_key()  # only the target uses it (to prove itself); setting it is safe
    check_key(ctrl_key, where)
    return FabricAuth(host_key, ctrl_key, host_id)


__all__ = [
    "DHCHAP_DHGROUP",
    "DHCHAP_HASH",
    "FabricAuth",
    "check_key",
    "host_supports_auth",
    "keys_for",
    "local_host_id",
    "new_key",
    "target_supports_auth",
]
