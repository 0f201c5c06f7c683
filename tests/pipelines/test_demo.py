from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def test_demo_runs_the_whole_pipeline(data_root: Path, tmp_path: Path) -> None:
    """`pluristeer demo` at its smallest: every stage writes its output. (Each stage's resume is tested with the
    stage: test_collect's killed driver, test_train's killed driver, test_evaluate's rerun reusing every unit;
    a second demo run here cost 90 s of the suite's budget.)"""
    env = {**os.environ, "PLURISTEER_DATA": str(data_root), "COLUMNS": "160"}
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "pluristeer.cli", "demo", "--out", str(out), "--tokens", "4096", "--limit", "1",
           "--samples", "8"]  # fmt: skip
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    manifest = json.loads((out / "store" / "manifest.json").read_text())
    assert manifest["complete"] and sum(s["rows"] for s in manifest["shards"]) == manifest["n_tokens"] == 4096
    sae_dirs = [p for p in (out / "train").iterdir() if (p / "sae_weights.safetensors").exists()]
    assert len(sae_dirs) == 1 and "8x" in sae_dirs[0].name
    assert list((out / "vectors").glob("*.safetensors")), "no VectorSet file written"
    rows = [json.loads(line) for line in (out / "results" / "rows.jsonl").read_text().splitlines()]
    conditions = {r["condition"] for r in rows}
    assert {"zero-shot", "steer-8x-fine", "pd-dvd+steer"} <= conditions
    assert {r["task"] for r in rows} == {"crowd_truthfulness", "globalopinionqa"}
    assert "demo finished" in first.stdout and "zero-shot" in first.stdout  # the results table was printed
