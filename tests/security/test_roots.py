"""The daemon's own file access (speedloaderd/roots.py), attacked as issue 9 found it.

Each attack is made by the test as the adversary would make it: a directory owned by a
member of the group, a symlink planted where the daemon writes, a cold-storage file swapped
after the scan. Each test asserts that the attack fails with a clear error AND that nothing
changed: the victim's content, mode and owner; no secret anywhere in a pool or the models
dir. Victims and secrets are files the test makes, never the host's.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import os
import pwd
import stat
import subprocess
from pathlib import Path

import pytest

from speedloader_lab.modelgen import make_gguf, make_ollama_model, tree_fingerprint
from speedloader_lab.sandbox import REPO
from speedloaderd.engine import Engine
from speedloaderd.errors import Failed
from speedloaderd.jobs import JobState
from speedloaderd.pools import TmpfsPool, mount_at
from speedloaderd.roots import UnsafePath, check_trusted_dir, write_atomically

from ..buslab import ADMIN, GUEST, ensure_users
from ..lab import MiB, run

SECRET = b"-----BEGIN TEST SECRET----- not for anyone but root\n"


@pytest.fixture(scope="module")
def users() -> dict[str, pwd.struct_passwd]:
    ensure_users()
    return {u: pwd.getpwnam(u) for u in (ADMIN, GUEST)}


def victim_file(base: Path, name: str = "victim") -> Path:
    """A root-only file outside every root: the attacker's target."""
    d = base / "victims"
    d.mkdir(mode=0o700, exist_ok=True)
    p = d / name
    p.write_bytes(SECRET)
    p.chmod(0o600)
    return p


def snapshot(p: Path) -> dict:
    """What must not change about a victim: for a dir, every entry's content and mode."""
    return (
        tree_fingerprint(p)
        if p.is_dir()
        else {
            "content": p.read_bytes(),
            "mode": p.stat().st_mode,
            "owner": (p.stat().st_uid, p.stat().st_gid),
        }
    )


def files_holding(root: Path, needle: bytes) -> list[str]:
    found = []
    for d, _, names in os.walk(root):
        for n in names:
            p = Path(d, n)
            if not p.is_symlink() and p.is_file() and needle in p.read_bytes():
                found.append(str(p))
    return found


def cat_as(user: str, path: Path) -> subprocess.CompletedProcess:
    pw = pwd.getpwnam(user)
    return subprocess.run(
        ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups", "cat",
         str(path)],
        capture_output=True,
    )  # fmt: skip


# --- finding 1: a models dir someone else can change -------------------------------------


def test_models_dir_owned_by_a_member_is_refused_and_its_link_target_untouched(lab, users):
    """A member's own dir with a planted marker and a symlink over a root file: the engine
    refuses to start on it (naming the component) and writes nothing through the link."""
    make_ollama_model(lab.cold, "tiny:1b", (4096, 100))
    lab.seal()
    victim = victim_file(lab.root)
    before = snapshot(victim)
    evil = lab.root / "member-models"
    evil.mkdir()
    (evil / ".speedloader-models-dir").write_text("planted\n")
    (evil / "manifests").symlink_to(victim.parent)  # where the manifests would be written
    uid = users[ADMIN].pw_uid
    for p in (evil, evil / ".speedloader-models-dir"):
        os.lchown(p, uid, uid)
    os.lchown(evil / "manifests", uid, uid)
    config = lab.config().model_copy(update={"models_dir": evil})

    with pytest.raises(UnsafePath, match=rf"{evil} is owned by uid {uid}"):
        run(Engine(config).start())
    assert snapshot(victim) == before
    assert sorted(os.listdir(victim.parent)) == ["victim"]


def test_models_dir_below_a_group_writable_dir_is_refused(lab):
    shared = lab.root / "shared"
    shared.mkdir()
    shared.chmod(0o775)
    config = lab.config().model_copy(update={"models_dir": shared / "models"})
    with pytest.raises(UnsafePath, match=rf"{shared} is writable by its group"):
        run(Engine(config).start())
    assert not (shared / "models").exists()


def test_trust_follows_links_and_passes_through_sticky_dirs_only(lab, users):
    safe = lab.root / "safe"
    safe.mkdir()
    check_trusted_dir(safe, "stateDir")  # /tmp is sticky and root's: passed through
    with pytest.raises(UnsafePath, match="/tmp is writable by group and others"):
        check_trusted_dir(Path("/tmp"), "stateDir")  # but never ended at
    link = lab.root / "link"
    link.symlink_to(safe)
    check_trusted_dir(link, "stateDir")  # a root link in a root dir, to a safe dir
    os.lchown(link, users[GUEST].pw_uid, -1)
    with pytest.raises(UnsafePath, match=f"{link} is a symlink owned by uid"):
        check_trusted_dir(link, "stateDir")
    member_dir = lab.root / "member"
    member_dir.mkdir()
    os.chown(member_dir, users[ADMIN].pw_uid, -1)
    rootlink = lab.root / "rootlink"
    rootlink.symlink_to(member_dir)  # root's link, but into a dir a member can change
    with pytest.raises(UnsafePath, match=f"{member_dir} is owned by uid"):
        check_trusted_dir(rootlink, "stateDir")


# --- finding 2: a journal that is a link to a victim dir ---------------------------------


def test_state_dir_with_a_journal_link_never_empties_the_victim_dir(lab, users):
    victims = lab.root / "victim-dir"
    victims.mkdir()
    for name in ("keep.txt", "data.bin", "notes"):
        (victims / name).write_text(name)
    before = snapshot(victims)
    for owner in ("member", "root"):  # a member's state dir, or a root one with a planted link
        state = lab.root / f"state-{owner}"
        state.mkdir()
        (state / "journal").symlink_to(victims)
        if owner == "member":
            os.chown(state, users[ADMIN].pw_uid, -1)
            os.lchown(state / "journal", users[ADMIN].pw_uid, -1)
        else:
            os.lchown(state / "journal", users[ADMIN].pw_uid, -1)
        config = lab.config().model_copy(update={"state_dir": state})
        with pytest.raises(UnsafePath):
            run(Engine(config).start())
        assert snapshot(victims) == before, owner


def test_journal_leaves_names_it_did_not_make(lab, caplog):
    run(lab.engine())  # makes state/journal
    journal = lab.state / "journal"
    (journal / "README").write_text("an admin's note")
    (journal / "promote-1-abc.json").write_text("{not json")
    run(lab.engine())
    assert (journal / "README").read_text() == "an admin's note"
    assert not (journal / "promote-1-abc.json").exists()  # ours, unreadable: dropped
    assert "README is not a journal entry; left alone" in caplog.text


# --- finding 3: a cold file swapped after the scan ---------------------------------------


@pytest.mark.parametrize("swap", ["link-out", "link-in", "other-file", "fifo"])
def test_cold_file_swapped_after_the_scan_is_not_copied(lab, swap):
    """A cold-storage writer replaces a scanned .gguf after the scan: by a link to a
    root-only file outside, by a link to another file inside cold storage, by another
    regular file, by a FIFO. The promote fails with a sentence, the pool holds nothing of it,
    the link still points at cold storage."""
    gguf_file = make_gguf(lab.cold / "model.gguf", tensor_bytes=64 * 1024)
    make_gguf(lab.cold / "other.gguf", tensor_bytes=64 * 1024)
    secret = victim_file(lab.root)
    engine = run(lab.engine(lab.config(backend="llamacpp")))
    path = gguf_file.path
    path.unlink()
    if swap == "link-out":
        path.symlink_to(secret)
    elif swap == "link-in":
        path.symlink_to(lab.cold / "other.gguf")
    elif swap == "other-file":
        path.write_bytes((lab.cold / "other.gguf").read_bytes())
    else:
        os.mkfifo(path)
    lab.seal()

    async def promote():
        job = engine.promote("model")
        with contextlib.suppress(Exception):  # the job's own error; its state says which
            await asyncio.wait_for(job.wait(), 30)  # a FIFO must not wedge the copy
        return job

    job = run(promote())
    assert job.state is JobState.FAILED, job.message
    assert "model.gguf" in job.message and "\n" not in job.message
    assert lab.pool_files("local") == []
    assert lab.link("model.gguf") == str(lab.cold / "model.gguf")
    assert files_holding(lab.pool_path("local"), SECRET) == []
    assert files_holding(lab.models, SECRET) == []


# --- finding 4: descriptors read twice -----------------------------------------------


@pytest.mark.parametrize("swap", ["link-out", "fifo", "dev-zero"])
def test_sync_writes_the_manifest_the_scan_read(lab, swap):
    """The models-dir sync never reads cold storage again: a manifest swapped after the scan
    (for a link to a root-only file, a FIFO, /dev/zero) changes nothing it writes, and
    cannot hang it."""
    model = make_ollama_model(lab.cold, "tiny:1b", (4096, 100))
    secret = victim_file(lab.root)
    engine = Engine(lab.config())
    engine._start_blocking()
    scanned = (lab.models / model.manifest_rel).read_bytes()
    (lab.models / model.manifest_rel).unlink()  # so the sync must write it again
    manifest = lab.cold / model.manifest_rel
    manifest.unlink()
    if swap == "link-out":
        manifest.symlink_to(secret)
    elif swap == "fifo":
        os.mkfifo(manifest)
    else:
        manifest.symlink_to("/dev/zero")
    lab.seal()

    async def sync():
        return await asyncio.wait_for(
            asyncio.to_thread(engine.models_dir.sync, engine.catalog, {"local"}), 30
        )

    run(sync())
    assert (lab.models / model.manifest_rel).read_bytes() == scanned
    assert files_holding(lab.models, SECRET) == []


# --- finding 6: copies never widen access ------------------------------------------------


def test_a_private_model_stays_private_when_hot(lab, users):
    """A 0600 GGUF of a service user in a 0700 dir: hot, the copy keeps the owner and at
    most the mode, the pool dirs give nobody else a way in; the owner still reads it
    through the models dir, another user cannot, hot or cold."""
    owner = users[GUEST]
    d = lab.cold / "private"
    make_gguf(d / "secret-model.gguf", tensor_bytes=16 * 1024)
    os.chown(d, owner.pw_uid, owner.pw_gid)
    d.chmod(0o700)
    f = d / "secret-model.gguf"
    os.chown(f, owner.pw_uid, owner.pw_gid)
    f.chmod(0o600)
    lab.seal()
    engine = run(lab.engine(lab.config(backend="llamacpp")))
    name = next(iter(engine.catalog.models))

    async def promote():
        job = engine.promote(name)
        await job.wait()
        return job

    job = run(promote())
    assert job.state is JobState.SUCCEEDED, job.message
    copy = lab.pool_path("local") / "private" / "secret-model.gguf"
    st = copy.stat()
    assert (st.st_uid, st.st_gid) == (owner.pw_uid, owner.pw_gid)
    assert stat.S_IMODE(st.st_mode) == 0o400
    pdir = copy.parent.stat()
    assert pdir.st_uid == 0 and stat.S_IMODE(pdir.st_mode) & 0o007 == 0  # nobody else in
    link = lab.models / "private" / "secret-model.gguf"
    assert os.readlink(link) == str(copy)
    assert cat_as(GUEST, link).returncode == 0  # the owner, through the ACL on the pool dir
    assert cat_as(ADMIN, link).returncode != 0  # anyone else: refused, as on cold storage
    assert cat_as(ADMIN, copy).returncode != 0


def test_descriptors_keep_their_owner_and_mode(lab, users):
    model = make_ollama_model(lab.cold, "tiny:1b", (4096, 100))
    manifest = lab.cold / model.manifest_rel
    os.chown(manifest, users[GUEST].pw_uid, users[GUEST].pw_gid)
    manifest.chmod(0o600)
    lab.seal()
    run(lab.engine())
    st = (lab.models / model.manifest_rel).stat()
    assert (st.st_uid, st.st_gid) == (users[GUEST].pw_uid, users[GUEST].pw_gid)
    assert stat.S_IMODE(st.st_mode) == 0o400


# --- finding 7: pools mounted where someone else chose -------------------------------------


@pytest.mark.parametrize("where", ["member-dir", "link-into-cold", "group-writable"])
def test_a_pool_is_never_mounted_where_others_can_change_the_path(lab, users, where):
    make_ollama_model(lab.cold, "tiny:1b", (4096, 100))
    lab.seal()
    if where == "member-dir":
        parent = lab.root / "member"
        parent.mkdir()
        os.chown(parent, users[ADMIN].pw_uid, -1)
        path = parent / "pool"
    elif where == "link-into-cold":
        (lab.root / "link").symlink_to(lab.cold)
        os.lchown(lab.root / "link", users[ADMIN].pw_uid, -1)
        path = lab.root / "link" / "pool"
    else:
        parent = lab.root / "shared"
        parent.mkdir()
        parent.chmod(0o777)
        path = parent / "pool"
    before = tree_fingerprint(lab.cold)
    with pytest.raises(UnsafePath):
        TmpfsPool("evil", path, 64 * MiB).mount()
    assert mount_at(path) is None
    assert not os.path.lexists(path)
    assert tree_fingerprint(lab.cold) == before


def test_a_pool_path_that_is_a_file_is_one_sentence(lab):
    (lab.root / "file").write_text("x")
    with pytest.raises(Failed, match=r"file is not a directory$"):
        TmpfsPool("f", lab.root / "file", MiB).mount()


# --- nothing else opens under the roots --------------------------------------------------

# Calls that reach the filesystem by path. Inside speedloaderd, only roots.py may make
# them on paths under cold storage, the models dir, a pool or the state dir.
_OS_CALLS = {
    "open", "unlink", "remove", "rename", "replace", "symlink", "link", "mkdir", "makedirs",
    "rmdir", "removedirs", "scandir", "walk", "fwalk", "listdir", "readlink", "chmod",
    "chown", "lchown", "truncate", "mkfifo", "mknod", "utime",
}  # fmt: skip
_PATH_METHODS = {
    "write_text", "write_bytes", "read_text", "read_bytes", "mkdir", "symlink_to",
    "hardlink_to", "touch", "iterdir", "glob", "rglob", "replace", "chmod", "lchmod",
    "open", "unlink", "rename", "rmdir", "is_file", "is_dir", "exists", "resolve",
    "readlink", "stat", "lstat",
}  # fmt: skip
# Receivers that are Root objects: their methods of the same names are the safe ones; and
# remote/runners.py's Runners, which read /proc, /sys and configfs, locally or over SSH.
_ROOT_RECEIVERS = ("tree", "cold", "dst_root", "src_root", "journal", "runner", "local", "remote")
# Each use outside the roots, with why it is not under one.
_ALLOWED = {
    ("speedloaderd/config.py", ".exists"): "is /etc/speedloader/config.json there",
    ("speedloaderd/config.py", ".read_text"): "the config file",
    ("speedloaderd/pools.py", ".read_bytes"): "/proc/self/mountinfo",
    ("speedloaderd/pools.py", "os.scandir"): "probing that a mounted pool answers",
    ("speedloaderd/remote/pool.py", "os.listdir"): "a remote pool's mount point, unmounted",
    ("speedloaderd/remote/pool.py", "os.path.isdir"): "a remote pool's mount point, unmounted",
    ("speedloaderd/remote/runners.py", ".stat"): "sftp on the remote host",
    ("speedloaderd/remote/runners.py", ".read_text"): "/sys and /proc, locally",
    ("speedloaderd/remote/runners.py", "os.listdir"): "/sys, locally",
    ("speedloaderd/remote/runners.py", ".is_file"): "/sys, locally",
    ("speedloaderd/remote/runners.py", ".open"): "sftp on the remote host",
    ("speedloaderd/remote/pool.py", ".read_text"): "runner.read_text of /proc, /etc/nvme",
    ("speedloaderd/remote/sysfs.py", ".read_text"): "runner.read_text of /sys",
    ("speedloaderd/remote/probe.py", ".read_text"): "runner.read_text of /proc, /sys",
    ("speedloaderd/bus/introspect.py", ".write_text"): "writes dbus/*.xml for the repo",
    ("speedloaderd/transfer.py", ".is_dir"): "copy_file's path wrapper for tests/bench",
    ("speedloaderd/catalog/__init__.py", "os.path.isdir"): "is the cold root there at all",
    ("speedloaderd/holders.py", "open"): "/proc/<pid>/maps and comm",
    ("speedloaderd/holders.py", "os.scandir"): "/proc",
    ("speedloaderd/holders.py", "os.listdir"): "/proc/<pid>/fd",
    ("speedloaderd/holders.py", "os.readlink"): "/proc/<pid>/fd/<n>",
    ("speedloaderd/hostmem.py", "open"): "/proc/meminfo",
    ("speedloaderd/opens.py", "open"): "/proc/<pid>/comm of a process that opened a file",
    ("speedloaderd/catalog/coldfs.py", ".is_dir"): "a DirEntry of that scandir",
    ("speedloaderd/catalog/coldfs.py", ".is_file"): "a DirEntry of that scandir",
    ("speedloaderd/catalog/coldfs.py", ".lstat"): "ColdRoot.root is a roots.Root",
    ("speedloaderd/catalog/coldfs.py", ".readlink"): "ColdRoot.root is a roots.Root",
    ("speedloaderd/catalog/coldfs.py", ".stat"): "ColdRoot.root is a roots.Root",
    ("speedloaderd/catalog/ollama.py", ".stat"): "the scan's blob cache over ColdRoot",
    ("speedloaderd/catalog/ollama.py", ".is_file"): "a DirEntry of a roots.Root.directory fd",
}
_EXEMPT = ("speedloaderd/roots.py",)


def _calls(path: Path) -> list[tuple[str, int]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Name) and f.id == "open":
            out.append(("open", node.lineno))
        elif isinstance(f, ast.Attribute):
            recv = ast.unparse(f.value)
            by_fd = [ast.unparse(a) for a in node.args] == ["fd"]
            if f.attr == "scandir" and by_fd:
                continue  # listing a directory fd, which only roots.Root hands out
            if recv in ("os", "shutil") and (f.attr in _OS_CALLS or recv == "shutil"):
                out.append((f"{recv}.{f.attr}", node.lineno))
            elif recv == "os.path" and f.attr in ("exists", "isfile", "isdir", "lexists"):
                out.append((f"os.path.{f.attr}", node.lineno))
            elif f.attr == "replace" and (len(node.args) != 1 or recv == "dataclasses"):
                continue  # str.replace(old, new), dataclasses.replace(obj, ...)
            elif (
                f.attr in _PATH_METHODS
                and not recv.endswith(_ROOT_RECEIVERS)
                and recv not in ("os", "os.path", "self", "super()")
            ):
                out.append((f".{f.attr}", node.lineno))
    return out


def test_nothing_but_roots_opens_files_under_the_roots():
    found = []
    for path in sorted((REPO / "speedloaderd").rglob("*.py")):
        rel = str(path.relative_to(REPO))
        if rel.startswith(_EXEMPT):
            continue
        for call, line in _calls(path):
            if (rel, call) not in _ALLOWED:
                found.append(f"{rel}:{line}: {call}")
    assert found == [], "file access outside speedloaderd/roots.py:\n" + "\n".join(found)


def test_the_one_atomic_write_never_follows_its_temp_name_and_leaves_nothing(tmp_path):
    """roots.write_atomically, behind the state files, the config file and slctl install:
    a link planted at the temp name is refused (O_EXCL), not written through; a write
    replaces the whole file with the mode asked, and no temp file stays."""
    d = tmp_path / "d"
    d.mkdir()
    (d / "f").write_bytes(b"old")
    victim = tmp_path / "victim"
    victim.write_bytes(SECRET)
    os.symlink(victim, d / ".f.tmp")
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(FileExistsError):
            write_atomically(dfd, "f", b"new", ".f.tmp", owner=None)
        assert victim.read_bytes() == SECRET and (d / "f").read_bytes() == b"old"
        os.unlink(d / ".f.tmp")
        big = os.urandom(3 << 20)
        write_atomically(dfd, "f", big, ".f.tmp", mode=0o640)
    finally:
        os.close(dfd)
    assert (d / "f").read_bytes() == big
    assert stat.S_IMODE((d / "f").stat().st_mode) == 0o640
    assert os.listdir(d) == ["f"]


def test_the_file_access_check_can_fail(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import os\nos.unlink(p)\nopen(p)\nPath(p).write_text('x')\nself.tree.unlink(r)\n"
    )
    assert [c for c, _ in _calls(bad)] == ["os.unlink", "open", ".write_text"]


# --- on the bus: even root's SetConfig cannot point the daemon at an unsafe dir -----------


def test_set_config_to_an_unsafe_dir_is_refused_before_saving(daemon, users):
    import json

    from ..test_bus_auth import manager

    evil = daemon.lab.root / "member-state"
    evil.mkdir()
    os.chown(evil, users[ADMIN].pw_uid, -1)
    saved = daemon.lab.config_path.read_bytes()
    data = json.loads(daemon.state()["config"])
    data["stateDir"] = str(evil)
    [result] = daemon.run_as(None, [manager("SetConfig", "s", json.dumps(data))])
    assert result["error"] == "InvalidArgument", result
    assert f"{evil} is owned by uid {users[ADMIN].pw_uid}" in result["message"]
    assert daemon.lab.config_path.read_bytes() == saved
    assert os.listdir(evil) == []
    assert json.loads(daemon.state()["config"])["stateDir"] == str(daemon.lab.state)


def test_a_cold_storage_writer_cannot_have_a_root_file_copied_on_the_bus(daemon_factory, users):
    """End to end: a writer of cold storage (its own uid, its own directory there) swaps a
    scanned GGUF for a link to a root-only secret; a member then promotes it through the
    daemon. The promote fails with a sentence, nothing secret lands in a pool or the models
    dir, and the writer's directory keeps serving from cold storage."""
    from speedloaderd.config import save_config

    from ..buslab import as_user
    from ..test_bus_auth import manager

    writer = users[GUEST]
    dl = daemon_factory()
    team = dl.lab.cold / "team"
    team.mkdir()
    make_gguf(team / "m.gguf", tensor_bytes=64 * 1024)
    for p in (team, team / "m.gguf"):
        os.chown(p, writer.pw_uid, writer.pw_gid)
    secret = victim_file(dl.lab.root)
    secret.parent.chmod(0o755)  # the writer can name it, not read it
    save_config(dl.lab.config(backend="llamacpp", pools=(("local", 64 * MiB, 100),)),
                dl.lab.config_path)  # fmt: skip
    dl.start()
    swap = subprocess.run(
        as_user(GUEST, ["sh", "-c", 'rm "$1" && ln -s "$2" "$1"', "sh",
                        str(team / "m.gguf"), str(secret)], dl.address),
        capture_output=True, text=True,
    )  # fmt: skip
    assert swap.returncode == 0, swap.stderr
    assert cat_as(GUEST, secret).returncode != 0  # the writer cannot read it itself
    dl.lab.seal()
    before = snapshot(secret)

    [result] = dl.run_as(ADMIN, [manager("Promote", "ss", "team/m", "", follow=True)])
    assert result["job"]["success"] is False, result
    assert "team/m.gguf" in result["job"]["message"]
    assert "\n" not in result["job"]["message"]
    assert snapshot(secret) == before
    assert files_holding(dl.lab.pool_path("local"), SECRET) == []
    assert files_holding(dl.lab.models, SECRET) == []
    assert dl.lab.link("team/m.gguf") == str(team / "m.gguf")
