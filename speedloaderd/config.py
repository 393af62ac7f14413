"""Configuration: the JSON file an admin edits, validated with pydantic.

Accepts, as is, the camelCase format of the tool Speedloader replaces (``modelsDir``,
``ramdisk``, ``storage``, ``backend``, ``remoteTiers``, ``modelPlacement``) and adds
``pools`` (several local tmpfs pools), ``sshKeyPath`` and ``stateDir``.

Unknown keys are errors that name the key, so a typo never silently does nothing. Keys
starting with ``x-`` or ``_`` (e.g. ``"_comment"``) are extension fields: accepted,
ignored and kept when the file is saved. Saving writes back only what the file set
(plus changes), never a wall of defaults.
"""

from __future__ import annotations

import ipaddress
import json
import os
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    field_validator,
    model_validator,
)

from speedloader_client.records import DEFAULT_SPEED

from .errors import Busy, ConfigError, InvalidArgument
from .paths import check_model_name, check_pool_name, overlapping
from .placement import Strategy
from .roots import replace_file
from .sizes import format_size_exact, parse_size
from .tiering.settings import Settings
from .tiers import check_not_reserved

SYSTEM_CONFIG = Path("/etc/speedloader/config.json")
LOCAL_POOL_NAME = "local"  # the pool the legacy ``ramdisk`` key describes
DEFAULT_LOCAL_SPEED = DEFAULT_SPEED  # one value for the config and every client's AddPool
DEFAULT_REMOTE_SPEED = 50
# Where AddPool may make new local pools: <poolsRoot>/<name>, nowhere else. /run is
# root-owned on every distribution and a tmpfs, so nothing there outlives a reboot, just
# as a RAM pool's contents do not; remote pools already mount under it by default.
DEFAULT_POOLS_ROOT = Path("/run/speedloader/pools")


def _size(value: Any) -> int:
    return parse_size(value)


Size = Annotated[
    int,
    BeforeValidator(_size),
    PlainSerializer(format_size_exact, return_type=str, when_used="json"),
]


def _abs_path(value: Any) -> Path:
    if not isinstance(value, (str, Path)):  # Path(5) is a TypeError: an internal error
        raise ValueError(f"must be a path (a string), not {type(value).__name__}")
    p = Path(value)
    if not p.is_absolute():
        raise ValueError(f"{value!r} is not an absolute path")
    if ".." in p.parts:
        raise ValueError(f"{value!r} contains '..'")
    return Path(os.path.normpath(p))


AbsPath = Annotated[Path, BeforeValidator(_abs_path)]


def _is_extension_key(key: str) -> bool:
    return key.startswith(("x-", "_"))


class _Model(BaseModel):
    """camelCase in the file, snake_case in code; unknown keys refused, extension keys kept."""

    model_config = ConfigDict(
        extra="allow",
        populate_by_name=True,
        alias_generator=lambda s: "".join(
            w if i == 0 else w.capitalize() for i, w in enumerate(s.split("_"))
        ),
    )

    @model_validator(mode="after")
    def _only_extension_extras(self) -> _Model:
        for key in self.model_extra or {}:
            if not _is_extension_key(key):
                raise ValueError(
                    f"unknown key {key!r} (extension keys must start with 'x-' or '_')"
                )
        return self


class StorageType(str, Enum):
    LOCAL = "local"
    NFS = "nfs"
    BEEGFS = "beegfs"


class BackendType(str, Enum):
    OLLAMA = "ollama"
    LLAMACPP = "llamacpp"
    VLLM = "vllm"
    HUGGINGFACE = "huggingface"


class RamdiskConfig(_Model):
    path: AbsPath
    size: Size


class StorageConfig(_Model):
    path: AbsPath
    type: StorageType = StorageType.LOCAL


class DemotePolicy(str, Enum):
    """What a demote does when a process still maps the pool copy after the backend was
    asked to unload it (speedloaderd/freeing.py)."""

    WAIT = "wait"  # up to demoteTimeout seconds; then Busy, nothing deleted
    REFUSE = "refuse"  # Busy at once, naming the process; nothing deleted
    FORCE = "force"  # delete now; the pool reports the RAM held until it is let go


# Seconds a `wait` demote waits for the last holder: a 2.7 GiB llama.cpp model unloads in
# well under a second (the router's child exits), a runner finishing a long answer may take
# tens of seconds; a minute, then the job says who holds it.
DEFAULT_DEMOTE_TIMEOUT = 60


class BackendConfig(_Model):
    type: BackendType
    api_url: str | None = None
    demote_policy: DemotePolicy = DemotePolicy.WAIT
    demote_timeout: int = Field(default=DEFAULT_DEMOTE_TIMEOUT, ge=0, le=86_400)
    # After a promote, a model the server had loaded from the cold files keeps reading
    # them: unload and load it again (when it is idle) so it is served from the pool.
    reload_after_promote: bool = False


class PoolConfig(_Model):
    name: str
    path: AbsPath
    size: Size
    speed: int = Field(default=DEFAULT_LOCAL_SPEED, ge=0, le=10_000)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_not_reserved(check_pool_name(v))


class RemoteHostConfig(_Model):
    ssh: str
    rdma_ip: str | None = None
    ramdisk_size: Size
    transport: str = "rdma"
    port: int = Field(default=4420, ge=1, le=65535)
    path: AbsPath | None = None
    speed: int = Field(default=DEFAULT_REMOTE_SPEED, ge=0, le=10_000)

    @field_validator("transport")
    @classmethod
    def _transport(cls, v: str) -> str:
        if v not in ("rdma", "tcp"):
            raise ValueError(f"{v!r} is not a transport; use 'rdma' or 'tcp'")
        return v


class RemoteTiersConfig(_Model):
    hosts: dict[str, RemoteHostConfig] = Field(default_factory=dict)

    @field_validator("hosts")
    @classmethod
    def _names(cls, v: dict[str, RemoteHostConfig]) -> dict[str, RemoteHostConfig]:
        for name in v:
            check_not_reserved(check_pool_name(name))
        return v


class PlacementConfig(_Model):
    default_strategy: Strategy = Strategy.FASTEST_FIT
    pinned: dict[str, str] = Field(default_factory=dict)

    @field_validator("pinned")
    @classmethod
    def _pins(cls, v: dict[str, str]) -> dict[str, str]:
        for model, pool in v.items():
            check_model_name(model)
            check_pool_name(pool)
        return v


# Seconds between two writes of the node_exporter textfile: node_exporter's own scrape is
# typically every 15 s, and a write is a render (~ms) plus a rename.
DEFAULT_TEXTFILE_INTERVAL = 15


class MetricsConfig(_Model):
    """Prometheus exposition (speedloaderd/metrics_export.py); off unless a key is set.

    ``listen``: ``"127.0.0.1:9477"`` (an IP address and a port: HTTP, GET /metrics only;
    an address that is not loopback is logged as a warning) or ``"unix:/run/..."`` (HTTP on
    a unix socket, mode 0660, group ``speedloader``). ``textfileDir``: node_exporter's
    textfile directory, where ``speedloader.prom`` is replaced atomically every
    ``textfileInterval`` seconds."""

    listen: str | None = None
    textfile_dir: AbsPath | None = None
    textfile_interval: int = Field(default=DEFAULT_TEXTFILE_INTERVAL, ge=1, le=3600)

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str | None) -> str | None:
        if v is not None:
            parse_listen(v)
        return v


# Seconds between two plans of automatic tiering when nothing happens; opens seen plan
# sooner (autotiering.py). A plan is a look at the pools (a statvfs each) and the models the
# policy knows: ~ms for hundreds of models.
DEFAULT_TIERING_INTERVAL = 30.0


class AutoTieringConfig(_Model):
    """Automatic tiering (speedloaderd/autotiering.py, policy in speedloaderd/tiering/):
    off unless ``enabled``. The other keys are the policy's settings (tiering/settings.py
    says why each default is what it is); ``interval`` the seconds between plans when no
    use is seen."""

    enabled: bool = False
    policy: str = "gdsf"
    high_watermark: float = 0.95
    low_watermark: float = 0.85
    min_residency: float = 600.0
    half_life: float = 12 * 3600.0
    admit_accesses: int = 2
    coalesce: float = 60.0
    interval: float = Field(default=DEFAULT_TIERING_INTERVAL, ge=1.0, le=3600.0)

    @model_validator(mode="after")
    def _valid_policy(self) -> AutoTieringConfig:
        try:
            self.settings()
        except InvalidArgument as err:
            raise ValueError(str(err)) from None
        return self

    def settings(self) -> Settings:
        return Settings(
            enabled=self.enabled,
            policy=self.policy,
            high_watermark=self.high_watermark,
            low_watermark=self.low_watermark,
            min_residency=self.min_residency,
            half_life=self.half_life,
            admit_accesses=self.admit_accesses,
            coalesce=self.coalesce,
        )


def parse_listen(value: str) -> tuple[str, int] | Path:
    """``"host:port"`` -> (ip, port), ``"[::1]:port"`` -> ("::1", port), ``"unix:/p"`` ->
    Path; ValueError naming what is wrong. Only IP addresses: a host name would be looked
    up in DNS at every start, and what it resolves to is not the admin's to see here."""
    if value.startswith("unix:"):
        path = _abs_path(value.removeprefix("unix:"))
        if len(str(path).encode()) > 100:  # sun_path holds 108 bytes, with its NUL
            raise ValueError(f"{value!r}: a unix socket path is at most 100 bytes")
        return path
    host, sep, port_text = value.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(
            f"{value!r} is not an address; use '127.0.0.1:9477', '[::1]:9477' or "
            "'unix:/run/speedloader/metrics.sock'"
        )
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(
            f"{value!r}: {host!r} is not an IP address (write 127.0.0.1, not localhost)"
        ) from None
    return host, int(port_text)


class Config(_Model):
    models_dir: AbsPath
    storage: StorageConfig
    backend: BackendConfig
    ramdisk: RamdiskConfig | None = None
    pools: list[PoolConfig] = Field(default_factory=list)
    remote_tiers: RemoteTiersConfig = Field(default_factory=RemoteTiersConfig)
    model_placement: PlacementConfig = Field(default_factory=PlacementConfig)
    ssh_key_path: AbsPath | None = None
    state_dir: AbsPath = Path("/var/lib/speedloader")
    pools_root: AbsPath = DEFAULT_POOLS_ROOT
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    auto_tiering: AutoTieringConfig = Field(default_factory=AutoTieringConfig)

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        names: list[str] = [p.name for p in self.local_pools()]
        names += list(self.remote_tiers.hosts)
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"pool name {dupes[0]!r} is defined twice")
        roots = {"modelsDir": self.models_dir, "storage.path": self.storage.path}
        roots |= {f"pool {p.name!r} path": p.path for p in self.local_pools()}
        items = list(roots.items())
        for key in ("modelsDir", "storage.path"):  # pools live in poolsRoot, nothing else
            if overlapping(self.pools_root, roots[key]):
                raise ValueError(
                    f"poolsRoot ({self.pools_root}) and {key} ({roots[key]}) overlap; "
                    "they must be separate"
                )
        for i, (ka, a) in enumerate(items):
            for kb, b in items[i + 1 :]:
                if overlapping(a, b):
                    raise ValueError(f"{ka} ({a}) and {kb} ({b}) overlap; they must be separate")
        for model, pool in self.model_placement.pinned.items():
            if pool not in names:
                raise ValueError(
                    f"model {model!r} is pinned to pool {pool!r}, which is not defined"
                )
        return self

    def local_pools(self) -> list[PoolConfig]:
        """The tmpfs pools: the legacy ``ramdisk`` (named 'local') first, then ``pools``."""
        pools = []
        if self.ramdisk is not None:
            pools.append(
                PoolConfig(name=LOCAL_POOL_NAME, path=self.ramdisk.path, size=self.ramdisk.size)
            )
        pools.extend(self.pools)
        return pools

    @property
    def journal_dir(self) -> Path:
        return self.state_dir / "journal"


def _explain(err: ValidationError) -> str:
    """One line per problem, naming the key path (camelCase, as in the file) and the value."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if not loc:
            lines.append(msg)
        elif e["type"] == "missing":
            lines.append(f"{loc}: required key is missing")
        elif e["type"] == "extra_forbidden" or "unknown key" in msg:
            lines.append(f"{loc}: {msg}")
        else:
            lines.append(f"{loc} = {e.get('input')!r}: {msg}")
    return "; ".join(lines)


def parse_config(data: Any, source: str = "config") -> Config:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a JSON object")
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"{source}: {_explain(err)}") from None
    except ValueError as err:  # raised by a validator outside pydantic's wrapping
        raise ConfigError(f"{source}: {err}") from None


def default_config_path() -> Path:
    if SYSTEM_CONFIG.exists():
        return SYSTEM_CONFIG
    return Path.home() / ".config" / "speedloader" / "config.json"


def load_config(path: Path | None = None) -> tuple[Config, Path]:
    path = path or default_config_path()
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"no configuration at {path}; create one or pass --config") from None
    except OSError as err:
        raise ConfigError(f"cannot read {path}: {err.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON: {err.msg} at line {err.lineno}") from None
    return parse_config(data, str(path)), path


def dump_config(config: Config) -> dict[str, Any]:
    """What the file should contain: only keys that were set, in the file's own spelling."""
    return config.model_dump(mode="json", by_alias=True, exclude_unset=True)


def save_config(config: Config, path: Path) -> None:
    """Atomically replace ``path`` (temp file in the same dir, fsync, rename, fsync the dir)."""
    text = json.dumps(dump_config(config), indent=2) + "\n"
    replace_file(path, text.encode(), mode=0o644)


def with_changes(config: Config, **changes: Any) -> Config:
    """A re-validated copy; ``changes`` use snake_case field names. Keeps 'set' tracking."""
    data = dump_config(config)
    for key, value in changes.items():
        field = Config.model_fields[key]
        alias = field.alias or key
        data[alias] = (
            value.model_dump(mode="json", by_alias=True, exclude_unset=True)
            if isinstance(value, BaseModel)
            else value
        )
    return parse_config(data)


# --- config surgery: what pin, unpin and the pool methods change, as pure functions --------
# Each returns a new, validated Config (ConfigError if the result does not validate) and
# leaves its argument alone; the engine saves and adopts the result.


def _dump(model: BaseModel) -> dict[str, Any]:
    return model.model_dump(mode="json", by_alias=True, exclude_unset=True)


def with_pins(config: Config, pins: dict[str, str]) -> Config:
    """``config`` with exactly ``pins`` (model -> pool) as its pinned models."""
    placement = config.model_placement.model_copy(update={"pinned": pins})
    placement.model_fields_set.add("pinned")
    return with_changes(config, model_placement=placement)


def with_pin(config: Config, model: str, pool: str) -> Config:
    return with_pins(config, {**config.model_placement.pinned, model: pool})


def without_pin(config: Config, model: str) -> Config:
    pins = dict(config.model_placement.pinned)
    if model not in pins:
        raise InvalidArgument(f"model {model!r} is not pinned")
    del pins[model]
    return with_pins(config, pins)


def remote_pool_path(config: Config, name: str) -> Path:
    """Where remote pool ``name`` mounts: its ``path``, or poolsRoot/<name> (the legacy
    format names no mount point)."""
    host = config.remote_tiers.hosts[name]
    return host.path or config.pools_root / name


def with_pool(config: Config, pc: PoolConfig) -> Config:
    """``config`` with a new local pool, which must be at poolsRoot/<name>: no root-only
    directory, no directory someone else made, no link elsewhere can be named for it."""
    if pc.name in {p.name for p in config.local_pools()} | set(config.remote_tiers.hosts):
        raise InvalidArgument(f"a pool named {pc.name!r} already exists")
    for remote in config.remote_tiers.hosts:
        path = remote_pool_path(config, remote)
        if overlapping(pc.path, path):
            raise InvalidArgument(
                f"pool {pc.name!r} path {pc.path} overlaps remote pool {remote!r} "
                f"at {path}; they must be separate"
            )
    expected = config.pools_root / pc.name
    if pc.path != expected:
        raise InvalidArgument(
            f"pool {pc.name!r} must be at {expected} (poolsRoot/<name>), not {pc.path}; "
            "leave the path empty, or have an admin change poolsRoot in the configuration"
        )
    return with_changes(config, pools=[*(_dump(p) for p in config.pools), _dump(pc)])


def without_pool(config: Config, name: str) -> Config:
    """``config`` without pool ``name`` (a remote tier, the legacy ramdisk, or a pool);
    refused while models are pinned to it."""
    pinned = sorted(m for m, p in config.model_placement.pinned.items() if p == name)
    if pinned:
        raise Busy(f"models are pinned to pool {name!r} ({', '.join(pinned)}); unpin first")
    if name in config.remote_tiers.hosts:
        tiers = _dump(config.remote_tiers)
        del tiers["hosts"][name]
        return with_changes(config, remote_tiers=tiers)
    if name == LOCAL_POOL_NAME and config.ramdisk is not None:
        return parse_config({k: v for k, v in dump_config(config).items() if k != "ramdisk"})
    return with_changes(config, pools=[_dump(p) for p in config.pools if p.name != name])


def with_pool_size(config: Config, name: str, size: int) -> Config:
    """``config`` with pool ``name`` sized ``size`` bytes (a remote tier's ramdiskSize)."""
    if name in config.remote_tiers.hosts:
        tiers = _dump(config.remote_tiers)
        tiers["hosts"][name]["ramdiskSize"] = size
        return with_changes(config, remote_tiers=tiers)
    if name == LOCAL_POOL_NAME and config.ramdisk is not None:
        return with_changes(config, ramdisk=config.ramdisk.model_copy(update={"size": size}))
    if not any(p.name == name for p in config.pools):
        return config
    pools = [p if p.name != name else p.model_copy(update={"size": size}) for p in config.pools]
    return with_changes(config, pools=[_dump(p) for p in pools])
