"""Names on the bus: a contract with every client; change them only with the major version."""

from __future__ import annotations

from ..errors import ERROR_PREFIX as ERROR_PREFIX  # with the errors: a job keeps its name

BUS_NAME = "org.speedloader.Speedloader1"
ROOT = "/org/speedloader/Speedloader1"
MANAGER_IFACE = "org.speedloader.Speedloader1.Manager"
POOL_IFACE = "org.speedloader.Speedloader1.Pool"
MODEL_IFACE = "org.speedloader.Speedloader1.Model"
JOB_IFACE = "org.speedloader.Speedloader1.Job"
NO_OBJECT = "/"  # UDisks2's convention for "no object" in an 'o' value

ACTION_PROMOTE = "org.speedloader.promote"
ACTION_DEMOTE = "org.speedloader.demote"
ACTION_PIN = "org.speedloader.pin"
ACTION_MANAGE_POOLS = "org.speedloader.manage-pools"
ACTION_CONFIGURE = "org.speedloader.configure"
# Only an admin: anything that names a path, a host, a key or a size of remote RAM, and
# cancelling another user's job. The shipped group rule does not grant it.
ACTION_ADMINISTER = "org.speedloader.administer"


def escape(name: str) -> str:
    """A name as one object path element: [A-Za-z0-9] kept, every other byte as _xx."""
    if not name:
        return "_"
    return "".join(
        ch if ch.isascii() and ch.isalnum() else "".join(f"_{b:02x}" for b in ch.encode())
        for ch in name
    )


def model_path(name: str) -> str:
    return f"{ROOT}/models/{escape(name)}"


def pool_path(name: str) -> str:
    return f"{ROOT}/pools/{escape(name)}"


def job_path(job_id: int) -> str:
    return f"{ROOT}/jobs/{job_id}"
