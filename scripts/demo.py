"""The whole product on one machine, touching nothing of the host's: a private system bus,
a real polkitd with speedloader's policy, speedloaderd as root with a tmpfs pool, sample
models of every format on a "cold storage" directory, then the dashboard (or, without a
terminal or with --scripted, a scripted tour with slctl). Everything is removed at exit
(with --keep, once you stop it).

Run it through scripts/demo, which installs what it needs first and puts the checkout on
the module path.
"""

from __future__ import annotations

import argparse
import os
import pwd
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from speedloader_lab.modelgen import (
    MiB,
    make_gguf,
    make_hf_hub_repo,
    make_ollama_model,
    make_safetensors_dir,
    make_split_gguf,
)
from speedloader_lab.sandbox import REPO, Sandbox
from speedloaderd.config import parse_config, save_config
from speedloaderd.pools import mounts_below

DEMO_RULE = """// Demo only: the user serving the dashboard may do what a group member may.
polkit.addRule(function(action, subject) {{
    var member = ["promote", "demote", "pin", "manage-pools", "configure"];
    if (subject.user == "{user}" &&
        member.indexOf(action.id.replace("org.speedloader.", "")) >= 0) {{
        return polkit.Result.YES;
    }}
}});
"""

BIN = Path(sys.executable).parent
ENV_FILE = "env"  # in the demo's work dir: `. <it>` in another terminal reaches the daemon
SAMPLES = {
    "ollama": ["llama3:8b", "qwen2:7b", "team/coder:7b"],
    "llamacpp": ["llama-3-8b-q4", "mixtral-8x7b-q4", "phi-3-mini"],
    "huggingface": ["meta-llama/Llama-3-8B", "mistralai/Mistral-7B", "Qwen/Qwen2-7B"],
}


def make_samples(cold: Path) -> None:
    """A few small models in every layout the catalog knows, each under its backend's dir."""
    o = cold / "ollama"
    llama = make_ollama_model(o, "llama3:8b", (24 * MiB, 400, 200))
    make_ollama_model(o, "qwen2:7b", (16 * MiB, llama.layers[1]))  # shares the template
    make_ollama_model(o, "team/coder:7b", (8 * MiB,))
    g = cold / "llamacpp"
    g.mkdir(parents=True)
    make_gguf(g / "llama-3-8b-q4.gguf", n_tensors=4, tensor_bytes=4 * MiB)
    make_split_gguf(g, "mixtral-8x7b-q4", parts=3, tensor_bytes=4 * MiB)
    make_gguf(g / "phi-3-mini.gguf", n_tensors=2, tensor_bytes=2 * MiB)
    h = cold / "huggingface"
    make_safetensors_dir(h, "meta-llama/Llama-3-8B", shards=2, shard_bytes=8 * MiB)
    make_safetensors_dir(h, "mistralai/Mistral-7B", shards=1, shard_bytes=8 * MiB)
    make_hf_hub_repo(h, "Qwen/Qwen2-7B", shards=2, shard_bytes=4 * MiB)


def slctl(env: dict[str, str], *args: str) -> int:
    print(f"\n$ slctl {shlex.join(args)}", flush=True)
    return subprocess.run([str(BIN / "slctl"), *args], env=env).returncode


def scripted_tour(env: dict[str, str], backend: str) -> int:
    first, second = SAMPLES[backend][0], SAMPLES[backend][1]
    steps = [
        ("status",),
        ("promote", first, second),
        ("status",),
        ("pool", "resize", "local", "768M"),
        ("demote", first),
        ("health",),
        ("status", "--json"),
        ("demote", second),
    ]
    for step in steps:
        rc = slctl(env, *step)
        if rc != 0:
            print(f"demo: `slctl {' '.join(step)}` failed with exit code {rc}", file=sys.stderr)
            return rc
    return 0


def another_terminal(env_file: Path, models_dir: Path, backend: str) -> str:
    return (
        f"demo: in another terminal, reach this daemon with:\n"
        f"  . {env_file}    # DBUS_SYSTEM_BUS_ADDRESS and PATH for slctl\n"
        f"  slctl status\n"
        f"  models dir (point {backend} here): {models_dir}"
    )


def run_dashboard(address: str, env_file: Path) -> int:
    """The dashboard in this terminal, its subtitle saying how another terminal gets here
    (the lines printed before it starts are hidden while it runs)."""
    from speedloader_tui.app import SpeedloaderApp

    app = SpeedloaderApp(address)
    app.sub_title = f"demo · another terminal: . {env_file}"
    app.run()
    return app.return_code or 0


def wait_until_stopped() -> None:
    print(
        f"\ndemo: still running (--keep); Ctrl-C here or `kill {os.getpid()}` stops it and "
        "cleans up",
        flush=True,
    )
    stop = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)
    signal.sigwait(stop)


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # through the finally blocks: unmounted, removed


def main(argv: list[str] | None = None) -> int:
    description = " ".join(__doc__.split("\n\n")[0].split())
    ap = argparse.ArgumentParser(prog="scripts/demo", description=description)
    ap.add_argument(
        "--backend",
        choices=sorted(SAMPLES),
        default="ollama",
        help="which sample library the daemon serves (default: ollama)",
    )
    ap.add_argument(
        "--scripted",
        action="store_true",
        help="run a scripted promote/demote tour with slctl instead of the dashboard",
    )
    ap.add_argument(
        "--web",
        action="store_true",
        help="serve the dashboard to a browser (as the user who ran sudo, else nobody) "
        "instead of running it in this terminal",
    )
    ap.add_argument(
        "--keep",
        action="store_true",
        help="after the tour or once the dashboard quits, keep the daemon and the bus running "
        "until Ctrl-C",
    )
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print(
            "error: run the demo as root: it mounts a tmpfs pool and starts a bus", file=sys.stderr
        )
        return 2

    # A closed terminal (SIGHUP) or a kill (SIGTERM) cleans up as Ctrl-C does.
    for sig in (signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, _exit_on_signal)
    work = Path(tempfile.mkdtemp(prefix="sl-demo-", dir="/tmp"))
    work.chmod(0o755)
    try:
        cold = work / "cold"
        print(f"demo: writing sample models to {cold} ...", flush=True)
        make_samples(cold)
        config = parse_config(
            {
                "modelsDir": str(work / "models"),
                "storage": {"path": str(cold / args.backend), "type": "local"},
                "backend": {"type": args.backend},
                "stateDir": str(work / "state"),
                "ramdisk": {"path": str(work / "pools" / "local"), "size": "512M"},
                "pools": [
                    {
                        "name": "fast",
                        "path": str(work / "pools" / "fast"),
                        "size": "256M",
                        "speed": 200,
                    }
                ],
            }
        )
        config_path = work / "config.json"
        save_config(config, config_path)
        rules = sorted((REPO / "polkit").glob("*.rules"))
        web_user = None
        if args.web:
            # The served dashboard refuses to run as root (it would hand root's rights to
            # whoever reaches the port): it runs as the user who ran sudo, else nobody, and a
            # demo-only polkit rule gives that user what a group member may do.
            web_user = pwd.getpwnam(os.environ.get("SUDO_USER") or "nobody")
            rule = work / "90-demo-web-user.rules"
            rule.write_text(DEMO_RULE.format(user=web_user.pw_name))
            rules.append(rule)
        with Sandbox(rules=rules) as sb:
            print("demo: private system bus, polkitd and speedloaderd starting ...", flush=True)
            sb.start_daemon(config_path)
            env = sb.env
            env_file = work / ENV_FILE
            env_file.write_text(
                f"export DBUS_SYSTEM_BUS_ADDRESS={shlex.quote(sb.address)}\n"
                f'export PATH={shlex.quote(str(BIN))}:"$PATH"\n'
            )
            env_file.chmod(0o644)
            here = another_terminal(env_file, config.models_dir, args.backend)
            print(f"demo: speedloaderd is up.\n{here}", flush=True)
            tui = BIN / "speedloader-tui"
            interactive = sys.stdin.isatty() and sys.stdout.isatty()
            if args.scripted or not interactive or not tui.exists():
                if not args.scripted and not tui.exists():
                    print("demo: the dashboard is not installed; running the scripted tour")
                rc = scripted_tour(env, args.backend)
            elif web_user is not None:
                print(f"demo: serving the dashboard as {web_user.pw_name}", flush=True)
                rc = subprocess.run(
                    [
                        "setpriv",
                        f"--reuid={web_user.pw_uid}",
                        f"--regid={web_user.pw_gid}",
                        "--init-groups",
                        "--",
                        str(tui),
                        "--web",
                    ],
                    env={**env, "HOME": str(work)},
                ).returncode
            else:
                rc = run_dashboard(sb.address, env_file)
            if args.keep and rc == 0:
                print(f"\n{here}", flush=True)
                wait_until_stopped()
            print("\ndemo: stopping and cleaning up ...", flush=True)
        return rc
    finally:
        for info in mounts_below(work):
            subprocess.run(["umount", "-l", info.mount_point], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
