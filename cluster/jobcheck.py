"""Submit ``pluristeer train`` as a Ray Job to a local head started for the purpose, and shut that head down.

``python -m cluster.jobcheck --store STORE --out DIR`` starts ``ray start --head --block`` in its own process
group (every port free-picked, its own ``--temp-dir``, so other Ray instances on the machine are untouched),
runs ``ray job submit --runtime-env-json '{"working_dir": <this checkout>, ...}' -- python -m <cli module>
train --address auto ...`` (the module of the console script in ``pyproject.toml``), waits for ``SUCCEEDED``
and stops the head by signalling its process group (never ``ray stop``, which stops every Ray on the machine).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from cluster.pins import REPO, project_pins

PORTS = (
    "port",
    "dashboard-port",
    "ray-client-server-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "runtime-env-agent-port",
    "metrics-export-port",
    "node-manager-port",
    "object-manager-port",
)


@dataclass
class LocalHead:
    gcs_address: str  # what `--address` / RAY_ADDRESS take
    dashboard: str  # what `ray job submit --address` takes
    temp_dir: Path
    process: subprocess.Popen
    env: dict[str, str]  # the environment to talk to it with (its own auth token)


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports nothing listens on right now."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _ray() -> str:
    exe = Path(sys.executable).parent / "ray"
    return str(exe) if exe.exists() else (shutil.which("ray") or "ray")


@contextmanager
def local_head(num_cpus: int = 2, *, timeout_s: float = 120.0) -> Iterator[LocalHead]:
    """A single-node Ray head with a dashboard (Ray Jobs needs it); stopped on exit by process group."""
    import httpx

    ports = dict(zip(PORTS, free_ports(len(PORTS)), strict=True))
    temp_dir = Path(tempfile.mkdtemp(prefix="psj-", dir="/tmp"))  # short: Ray's socket paths must stay < 108 chars
    cmd = [_ray(), "start", "--head", "--block", f"--num-cpus={num_cpus}", "--num-gpus=0", "--include-dashboard=true",
           "--dashboard-host=127.0.0.1", f"--temp-dir={temp_dir}", "--disable-usage-stats",
           *(f"--{name}={port}" for name, port in ports.items())]  # fmt: skip
    # token auth with a token of its own (not ~/.ray/auth_token): the head and every client below use it
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    env.pop("RAY_ADDRESS", None)
    log = open(temp_dir / "ray-start.log", "w")  # noqa: SIM115 (closed below)
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    dashboard = f"http://127.0.0.1:{ports['dashboard-port']}"
    head = LocalHead(f"127.0.0.1:{ports['port']}", dashboard, temp_dir, process, env)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(
                    f"ray start exited with {process.returncode}: {(temp_dir / 'ray-start.log').read_text()}"
                )
            try:  # any answer (401 without the token) means the dashboard is up
                if httpx.get(f"{head.dashboard}/api/version", timeout=2).status_code < 500:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Ray head's dashboard did not answer within {timeout_s:.0f} s")
            time.sleep(1)
        written = temp_dir / "ray_current_cluster"  # the GCS address as the head advertises it
        if written.is_file() and written.read_text().strip():
            head.gcs_address = written.read_text().strip()
        yield head
    finally:
        stop_head(head)
        log.close()


def stop_head(head: LocalHead, grace_s: float = 20.0) -> None:
    """SIGTERM the head's process group (``ray start --block`` takes its Ray processes down with it), then
    SIGKILL what is left of it, including Ray processes of this head that left the group (by temp dir)."""
    try:
        os.killpg(head.process.pid, signal.SIGTERM)
        head.process.wait(timeout=grace_s)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(head.process.pid, signal.SIGKILL)
        head.process.wait()
    try:
        _kill_leftovers(str(head.temp_dir), grace_s)
    finally:
        shutil.rmtree(head.temp_dir, ignore_errors=True)


def _kill_leftovers(marker: str, grace_s: float) -> None:
    import psutil

    deadline = time.monotonic() + grace_s
    while True:
        left = []
        for p in psutil.process_iter(["cmdline"]):
            try:
                if any(marker in part for part in p.info["cmdline"] or ()):
                    left.append(p)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        if not left:
            return
        if time.monotonic() > deadline:
            for p in left:
                with suppress(psutil.NoSuchProcess):
                    p.kill()
            return
        time.sleep(0.5)


def submit_train(head: LocalHead, train_args: Sequence[str], *, env: dict[str, str] | None = None) -> tuple[str, str]:
    """``ray job submit`` of ``python -m <cli module> train --address auto <train_args>`` with this checkout as
    the working_dir; returns (final status, the submit command's output)."""
    # RAY_ADDRESS for every process of the job: Ray Train's placement-group cleaner asks the State API with no
    # address, and on a machine running several Ray instances "auto" is ambiguous (it logs a ConnectionError)
    env_vars = {"WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": head.gcs_address, **(env or {})}
    runtime_env = {"working_dir": str(REPO), "env_vars": env_vars}
    cli = project_pins(REPO).script[1].partition(":")[0]
    job_id = f"pluristeer-train-{int(time.time())}"
    submit = [_ray(), "job", "submit", f"--address={head.dashboard}", f"--submission-id={job_id}",
              f"--runtime-env-json={json.dumps(runtime_env)}", "--",
              sys.executable, "-m", cli, "train", "--address", "auto", *train_args]  # fmt: skip
    proc = subprocess.run(submit, capture_output=True, text=True, timeout=600, env=head.env)
    status = subprocess.run(
        [_ray(), "job", "status", f"--address={head.dashboard}", job_id],
        capture_output=True,
        text=True,
        timeout=60,
        env=head.env,
    )
    text = status.stdout + status.stderr
    ends = {"succeeded": "SUCCEEDED", "failed": "FAILED", "was stopped": "STOPPED"}
    final = next((v for k, v in ends.items() if f"Job '{job_id}' {k}" in text), None)
    if final is None:
        match = re.search(rf"Status for job '{job_id}': (\w+)", text)
        final = match[1] if match else "UNKNOWN"
    return final, f"$ {shlex.join(submit)}\n{proc.stdout}{proc.stderr}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, required=True, help="activation store to train on")
    parser.add_argument("--out", type=Path, required=True, help="out of the training run")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="more train overrides: field=value")
    args = parser.parse_args(argv)
    train_args = ["--set", f"store={args.store.resolve()}", "--set", f"out={args.out.resolve()}"]
    for item in args.sets:
        train_args += ["--set", item]
    started = time.perf_counter()
    with local_head() as head:
        up = time.perf_counter() - started
        status, output = submit_train(head, train_args)
    print(output)
    print(f"job {status}; head up in {up:.1f} s, total {time.perf_counter() - started:.1f} s (head stopped)")
    return 0 if status == "SUCCEEDED" else 1


if __name__ == "__main__":
    sys.exit(main())
