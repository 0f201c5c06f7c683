"""`pluristeer serve`: clear errors, and a real start (own local Ray, a VectorSet file published at start-up,
the fused backend) that answers and stops cleanly on Ctrl-C."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
import torch

from sae.lm import model_name
from sae.vectorset import VectorSet, VectorSetMeta, sae_fingerprint
from tests.conftest import REPO

CLI = [sys.executable, "-m", "pluristeer.cli", "serve"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PLURISTEER_API_KEYS", "RAY_ADDRESS")}
    return {**env, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0", "COLUMNS": "200", **extra}


def test_without_keys_or_vectors_it_says_what_to_set(tmp_path: Path) -> None:
    proc = subprocess.run([*CLI, "--set", "vectors=x"], capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.returncode == 2 and "set PLURISTEER_API_KEYS" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([*CLI, "--set", "port=8123"], capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.returncode == 2 and "vectors: a registry name is required" in proc.stderr


@pytest.mark.security
def test_serve_starts_answers_and_stops_on_ctrl_c(tmp_path: Path, embedded, embedded_sae) -> None:
    model, _ = embedded
    sae = embedded_sae.sae
    g = torch.Generator().manual_seed(0)
    v = torch.zeros(sae.d_sae)
    v[torch.randperm(sae.d_sae, generator=g)[:6]] = 6.0
    meta = VectorSetMeta(
        model=model_name(model), layer=15, mode="sae", granularity="fine", task="chat", n_samples={"calm": 1},
        readout="last", dim=sae.d_sae, sae_path=str(embedded_sae.path), sae_fingerprint=sae_fingerprint(sae),
    )  # fmt: skip
    path = VectorSet({"calm": v}, meta).save(tmp_path / "calm.safetensors")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [
        "--set", "vectors=cli-test", "--set", f"vectors_file={path}", "--set", f"registry_dir={tmp_path / 'reg'}",
        "--set", "backend=fused", "--set", f"port={port}", "--set", "replica_cpus=0.5",
    ]  # fmt: skip
    proc = subprocess.Popen(
        [*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(PLURISTEER_API_KEYS="k")
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)  # type: ignore[arg-type]
    reader.start()
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None and not any("pluristeer serving" in x for x in lines):
            time.sleep(0.5)  # the URL line: serve.run has returned and the command blocks now
        assert httpx.get(url + "/healthz", timeout=30).status_code == 200, "".join(lines)[-3000:]
        listening = {
            c.laddr.ip for c in psutil.net_connections("inet") if c.status == "LISTEN" and c.laddr.port == port
        }
        assert listening == {"127.0.0.1"}, f"the API must bind to loopback by default, not {listening}"
        r = httpx.post(url + "/v1/completions", headers={"Authorization": "Bearer k"}, timeout=120,
                       json={"prompt": "Hello", "max_tokens": 3, "temperature": 0})  # fmt: skip
        assert r.status_code == 200 and r.json()["pluristeer"]["perspectives"] == ["calm"]
        assert r.json()["pluristeer"]["vector_versions"] == {"calm": 1}
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
        reader.join(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = "".join(lines)
    assert proc.returncode == 0, out[-3000:]
    assert f"at http://127.0.0.1:{port}/v1" in out and "shutting down" in out and "\nstopped" in out
    assert (tmp_path / "reg" / "cli-test" / "v1.safetensors").is_file()  # the file was published first
