"""The pool registry: the pool objects a config defines, by name, and where each one lives.

Built from the config (the local tmpfs pools, the legacy ``ramdisk`` first, then the remote
tiers), in that order: placement sees candidates in it, and ties go to the first. The only
module that knows which kinds of pool there are; everything else uses the Pool protocol.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

from .config import Config, PoolConfig, RemoteHostConfig, remote_pool_path
from .errors import ConfigError, InvalidArgument, NoSuchPool
from .paths import check_pool_name, overlapping
from .pools import Pool, PoolState, TmpfsPool
from .remote.pool import RemotePool


class PoolRegistry(Mapping[str, Pool]):
    """Pools by name (a read-only mapping; ``add_*`` and ``remove`` change it), and
    ``roots``: each pool's directory, a live mapping the models dir reads."""

    def __init__(self, config: Config):
        self._pools: dict[str, Pool] = {}
        self.roots: dict[str, Path] = {}
        for pc in config.local_pools():
            self.add_tmpfs(pc)
        for name, host in config.remote_tiers.hosts.items():
            self.add_remote(config, name, host)

    def __getitem__(self, name: str) -> Pool:
        return self._pools[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._pools)

    def __len__(self) -> int:
        return len(self._pools)

    def lookup(self, name: str) -> Pool:
        """The pool named ``name``, or NoSuchPool naming the pools there are."""
        check_pool_name(name)
        try:
            return self._pools[name]
        except KeyError:
            known = ", ".join(sorted(self._pools)) or "none"
            raise NoSuchPool(f"no pool named {name!r} (pools: {known})") from None

    def add_tmpfs(self, pc: PoolConfig) -> TmpfsPool:
        pool = TmpfsPool(pc.name, pc.path, pc.size, pc.speed)
        self._pools[pc.name] = pool
        self.roots[pc.name] = pc.path
        return pool

    def add_remote(self, config: Config, name: str, host: RemoteHostConfig) -> RemotePool:
        if host.path is None:  # the legacy format names no mount point: poolsRoot's
            host = host.model_copy(update={"path": remote_pool_path(config, name)})
        try:
            pool = RemotePool(name, host, config.ssh_key_path)
        except InvalidArgument as err:
            raise ConfigError(f"remote pool {name!r}: {err}") from None
        roots = {"modelsDir": config.models_dir, "storage.path": config.storage.path}
        roots |= {f"pool {n!r} path": r for n, r in self.roots.items()}
        for what, root in roots.items():
            if overlapping(pool.path, root):
                raise ConfigError(
                    f"remoteTiers.hosts.{name}.path ({pool.path}) and {what} ({root}) "
                    "overlap; they must be separate"
                )
        self._pools[name] = pool
        self.roots[name] = pool.path
        return pool

    def remove(self, name: str) -> None:
        del self._pools[name]
        del self.roots[name]

    def remote(self) -> list[RemotePool]:
        """The remote pools (NVMe-oF): the remote watch's, and the SSH key's users."""
        return [p for p in self._pools.values() if isinstance(p, RemotePool)]

    def tmpfs(self) -> list[TmpfsPool]:
        return [p for p in self._pools.values() if isinstance(p, TmpfsPool)]

    def mounted(self) -> set[str]:
        """Names of the pools mounted and usable now (cheap: mountinfo, sysfs)."""
        return {n for n, p in self._pools.items() if p.state() is PoolState.MOUNTED}
