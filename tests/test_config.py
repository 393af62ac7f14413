"""Config: the legacy camelCase format as is, clear errors naming key and value, atomic save."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from speedloaderd.config import (
    BackendType,
    PoolConfig,
    Strategy,
    dump_config,
    load_config,
    parse_config,
    save_config,
    with_changes,
    with_pin,
    with_pins,
    with_pool,
    with_pool_size,
    without_pin,
    without_pool,
)
from speedloaderd.daemon import LIVE_KEYS, changed_keys
from speedloaderd.errors import Busy, ConfigError, InvalidArgument
from speedloaderd.sizes import format_size, parse_size

# The format of the tool Speedloader replaces, key for key.
LEGACY = {
    "modelsDir": "/var/lib/ollama/models",
    "ramdisk": {"path": "/mnt/ramdisk", "size": "200G"},
    "storage": {"path": "/mnt/nfs/models", "type": "nfs"},
    "backend": {"type": "ollama", "apiUrl": "http://localhost:11434"},
    "remoteTiers": {
        "hosts": {
            "gpu-node-2": {"ssh": "root@10.0.0.2", "rdmaIp": "10.0.1.2", "ramdiskSize": "512G"}
        }
    },
    "modelPlacement": {"defaultStrategy": "fastest-fit", "pinned": {"llama3:70b": "local"}},
}


def minimal(**extra):
    return {
        "modelsDir": "/m",
        "storage": {"path": "/cold"},
        "backend": {"type": "llamacpp"},
    } | extra


def test_legacy_format_accepted_as_is():
    c = parse_config(LEGACY)
    assert c.backend.type is BackendType.OLLAMA
    assert c.backend.api_url == "http://localhost:11434"
    [local] = c.local_pools()
    assert (local.name, str(local.path), local.size) == ("local", "/mnt/ramdisk", 200 << 30)
    host = c.remote_tiers.hosts["gpu-node-2"]
    assert (host.ssh, host.rdma_ip, host.ramdisk_size) == ("root@10.0.0.2", "10.0.1.2", 512 << 30)
    assert host.transport == "rdma" and host.port == 4420
    assert c.model_placement.default_strategy is Strategy.FASTEST_FIT
    assert c.model_placement.pinned == {"llama3:70b": "local"}


def test_several_pools_and_ssh_key():
    c = parse_config(
        minimal(
            ramdisk={"path": "/r0", "size": "1G"},
            pools=[{"name": "fast", "path": "/r1", "size": "512M", "speed": 200}],
            sshKeyPath="/root/.ssh/id_ed25519",
        )
    )
    assert [(p.name, p.size, p.speed) for p in c.local_pools()] == [
        ("local", 1 << 30, 100),
        ("fast", 512 << 20, 200),
    ]
    assert str(c.ssh_key_path) == "/root/.ssh/id_ed25519"


@pytest.mark.parametrize(
    "text,expected",
    [
        ("200G", 200 << 30),
        ("512M", 512 << 20),
        ("1.5T", 3 << 39),
        ("4096", 4096),
        ("1GiB", 1 << 30),
    ],
)
def test_sizes_parse(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["12Q", "-1G", "", "G", "1..5G", "one"])
def test_bad_sizes_name_key_and_value(bad):
    with pytest.raises(ConfigError) as exc:
        parse_config(minimal(ramdisk={"path": "/r", "size": bad}))
    assert "ramdisk.size" in str(exc.value)
    assert repr(bad) in str(exc.value)


def test_unknown_keys_named():
    with pytest.raises(ConfigError, match=r"unknown key 'modelDir'"):
        parse_config(minimal(modelDir="/typo"))
    with pytest.raises(ConfigError, match=r"ramdisk: unknown key 'sise'"):
        parse_config(minimal(ramdisk={"path": "/r", "size": "1G", "sise": "2G"}))


@pytest.mark.parametrize(
    "patch,needle",
    [
        ({"backend": {"type": "tgi"}}, "backend.type = 'tgi'"),
        ({"storage": {"path": "relative/dir"}}, "storage.path = 'relative/dir'"),
        ({"ramdisk": {"path": "/cold/inside", "size": "1G"}}, "overlap"),
        ({"modelsDir": "/cold"}, "overlap"),
        (
            {"modelPlacement": {"pinned": {"m:1": "nowhere"}}},
            "pool 'nowhere', which is not defined",
        ),
        ({"modelPlacement": {"defaultStrategy": "random"}}, "defaultStrategy = 'random'"),
        (
            {"backend": {"type": "ollama", "demotePolicy": "kill"}},
            "backend.demotePolicy = 'kill'",
        ),
        ({"backend": {"type": "ollama", "demoteTimeout": -1}}, "backend.demoteTimeout = -1"),
        ({"pools": [{"name": "../x", "path": "/p", "size": "1G"}]}, "not a valid pool name"),
        (
            {
                "pools": [
                    {"name": "a", "path": "/p", "size": "1G"},
                    {"name": "a", "path": "/q", "size": "1G"},
                ]
            },
            "pool name 'a' is defined twice",
        ),
        (
            {
                "remoteTiers": {
                    "hosts": {"h": {"ssh": "u@h", "ramdiskSize": "1G", "transport": "udp"}}
                }
            },
            "'udp'",
        ),
    ],
)
def test_invalid_values_explained(patch, needle):
    with pytest.raises(ConfigError) as exc:
        parse_config(minimal() | patch)
    assert needle in str(exc.value)


def test_missing_required_key():
    with pytest.raises(ConfigError, match="backend: required key is missing"):
        parse_config({"modelsDir": "/m", "storage": {"path": "/c"}})


def test_load_errors(tmp_path):
    with pytest.raises(ConfigError, match="no configuration at"):
        load_config(tmp_path / "absent.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(bad)


def test_save_roundtrip_keeps_extension_keys_and_only_what_was_set(tmp_path):
    path = tmp_path / "config.json"
    original = LEGACY | {"_comment": "managed by ops", "x-site": {"rack": 4}}
    path.write_text(json.dumps(original))
    c, _ = load_config(path)
    save_config(c, path)
    assert json.loads(path.read_text()) == original
    # A change keeps everything else as the admin wrote it.
    c2 = with_changes(c, ssh_key_path="/root/.ssh/k")
    save_config(c2, path)
    saved = json.loads(path.read_text())
    assert saved == original | {"sshKeyPath": "/root/.ssh/k"}
    assert load_config(path)[0] == c2


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "config.json"
    c = parse_config(minimal(ramdisk={"path": "/r", "size": "1395864371"}))
    save_config(c, path)
    assert sorted(os.listdir(tmp_path)) == ["config.json"]
    # Sizes are written exactly, never rounded.
    assert dump_config(load_config(path)[0])["ramdisk"]["size"] == "1395864371"
    assert parse_size(json.loads(path.read_text())["ramdisk"]["size"]) == 1395864371


def test_save_failure_keeps_old_file(tmp_path):
    path = tmp_path / "config.json"
    c = parse_config(minimal())
    save_config(c, path)
    before = path.read_bytes()
    # Tests run as root, which ignores modes: make the rename fail with a directory instead.
    blocker = Path(str(path) + ".d")
    blocker.mkdir()
    with pytest.raises(OSError):
        save_config(c, blocker)  # renaming a file over a directory fails
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["config.json", "config.json.d"]


def test_format_size():
    assert format_size(200 << 30) == "200G"
    assert format_size(1536 << 20) == "1.5G"
    assert format_size(10) == "10B"


# --- config surgery: pure functions, the argument never changed -----------------------------


def surgery_base():
    return parse_config(
        {
            **LEGACY,
            "poolsRoot": "/run/speedloader/pools",
            "pools": [{"name": "fast", "path": "/run/speedloader/pools/fast", "size": "8G"}],
            "_comment": "kept through every change",
        }
    )


def test_pin_and_unpin_change_only_the_pins():
    base = surgery_base()
    before = dump_config(base)
    pinned = with_pin(base, "qwen:7b", "gpu-node-2")
    assert pinned.model_placement.pinned == {"llama3:70b": "local", "qwen:7b": "gpu-node-2"}
    unpinned = without_pin(pinned, "llama3:70b")
    assert unpinned.model_placement.pinned == {"qwen:7b": "gpu-node-2"}
    rest = {k: v for k, v in dump_config(unpinned).items() if k != "modelPlacement"}
    assert rest == {k: v for k, v in before.items() if k != "modelPlacement"}
    assert dump_config(unpinned)["modelPlacement"]["defaultStrategy"] == "fastest-fit"
    assert dump_config(base) == before  # the argument is left alone
    with pytest.raises(InvalidArgument, match="'nope:1' is not pinned"):
        without_pin(base, "nope:1")
    with pytest.raises(ConfigError, match="not defined"):
        with_pin(base, "qwen:7b", "nowhere")
    assert with_pins(base, {}).model_placement.pinned == {}


def test_with_pool_adds_a_pool_only_under_pools_root():
    base = surgery_base()
    before = dump_config(base)
    where = Path("/run/speedloader/pools/extra")
    added = with_pool(base, PoolConfig(name="extra", path=where, size=1 << 30))
    assert [p.name for p in added.local_pools()] == ["local", "fast", "extra"]
    assert dump_config(added)["pools"][-1] == {"name": "extra", "path": str(where), "size": "1G"}
    assert dump_config(added)["_comment"] == "kept through every change"
    assert dump_config(base) == before
    for pc, needle in [
        (PoolConfig(name="fast", path=where, size=1 << 30), "already exists"),
        (PoolConfig(name="gpu-node-2", path=where, size=1 << 30), "already exists"),
        (PoolConfig(name="x", path=Path("/srv/x"), size=1 << 30), "must be at"),
        (PoolConfig(name="gpu", path=Path("/run/speedloader/pools/gpu-node-2/in"), size=1),
         "overlaps remote pool 'gpu-node-2'"),
    ]:  # fmt: skip
        with pytest.raises(InvalidArgument, match=needle):
            with_pool(base, pc)


def test_without_pool_removes_each_kind_and_refuses_a_pinned_one():
    base = surgery_base()
    before = dump_config(base)
    with pytest.raises(Busy, match="pinned to pool 'local' \\(llama3:70b\\)"):
        without_pool(base, "local")
    unpinned = without_pin(base, "llama3:70b")
    assert "ramdisk" not in dump_config(without_pool(unpinned, "local"))
    assert without_pool(base, "gpu-node-2").remote_tiers.hosts == {}
    assert [p.name for p in without_pool(base, "fast").local_pools()] == ["local"]
    assert dump_config(base) == before


def test_with_pool_size_sizes_each_kind():
    base = surgery_base()
    before = dump_config(base)
    assert with_pool_size(base, "local", 1 << 30).ramdisk.size == 1 << 30
    assert with_pool_size(base, "fast", 2 << 30).pools[0].size == 2 << 30
    remote = with_pool_size(base, "gpu-node-2", 64 << 30)
    assert remote.remote_tiers.hosts["gpu-node-2"].ramdisk_size == 64 << 30
    assert with_pool_size(base, "nowhere", 1) is base  # nothing of it to change
    assert dump_config(base) == before


def test_backend_demote_keys_default_round_trip_and_change_live(tmp_path):
    c = parse_config(minimal())
    assert c.backend.demote_policy.value == "wait" and c.backend.demote_timeout == 60
    assert c.backend.reload_after_promote is False
    assert "demotePolicy" not in dump_config(c)["backend"]  # defaults are not written
    d = minimal(backend={"type": "llamacpp", "demotePolicy": "force", "demoteTimeout": 5})
    assert dump_config(parse_config(d))["backend"] == d["backend"]
    # Read at each demote: a change of them (or of apiUrl) is live; of the type, it is not.
    old, new = dump_config(c), dump_config(parse_config(d))
    assert changed_keys(old, new) == {"backend.demotePolicy", "backend.demoteTimeout"}
    assert changed_keys(old, new) <= LIVE_KEYS
    other = dump_config(parse_config(minimal(backend={"type": "ollama"})))
    assert changed_keys(old, other) == {"backend"}


def test_storage_copy_streams_is_validated_defaulted_and_live():
    from speedloaderd.config import DEFAULT_COPY_STREAMS, MAX_COPY_STREAMS

    c = parse_config(minimal())
    assert c.storage.copy_streams == DEFAULT_COPY_STREAMS
    assert "copyStreams" not in dump_config(c)["storage"]  # a default is not written
    for bad in (0, -1, MAX_COPY_STREAMS + 1, "two", 1.5):
        with pytest.raises(ConfigError, match=r"storage\.copyStreams") as refused:
            parse_config(minimal(storage={"path": "/cold", "copyStreams": bad}))
        assert repr(bad) in str(refused.value)
    four = minimal(storage={"path": "/cold", "copyStreams": 4})
    assert parse_config(four).storage.copy_streams == 4
    assert dump_config(parse_config(four))["storage"] == four["storage"]
    # Read at each copy's admission: a change of it alone is live; of the path, it is not.
    old, new = dump_config(c), dump_config(parse_config(four))
    assert changed_keys(old, new) == {"storage.copyStreams"}
    assert changed_keys(old, new) <= LIVE_KEYS
    moved = dump_config(parse_config(minimal(storage={"path": "/elsewhere", "copyStreams": 4})))
    assert changed_keys(old, moved) == {"storage"}
