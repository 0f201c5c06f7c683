"""``ray job submit`` of ``pluristeer train --address auto`` with a runtime env against a local head started
for the test (own ports and temp dir, stopped by process group: no ``ray stop``)."""

from __future__ import annotations

import json
from pathlib import Path

import psutil

from cluster.jobcheck import local_head, submit_train


def test_train_stage_runs_as_a_ray_job_on_a_local_head(tiny_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "train"
    args = ["--set", f"store={tiny_store}", "--set", f"out={out}", "--set", "expansions=4", "--set", "k=4",
            "--set", "batch_size=512", "--set", "workers=2", "--set", "cpus_per_worker=0.5", "--set", "eval_tokens=0",
            "--set", "track=false", "--set", "dead_tokens=2048"]  # fmt: skip
    with local_head(num_cpus=2) as head:
        status, output = submit_train(head, args)
        pgid = head.process.pid
    print(output)
    assert status == "SUCCEEDED", output
    assert "trained 16 steps, 8192 tokens" in output  # the CLI's own summary, from the job's log
    training = json.loads((out / "L3-topk-4x-k4" / "training.json").read_text())
    assert training["steps"] == 16 and len(training["worker_nodes"]) == 2
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(head.temp_dir) in " ".join(p.info["cmdline"] or [])]
    assert head.process.poll() is not None and pgid > 0  # the head is gone
