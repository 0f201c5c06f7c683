from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipelines.explain import TopActivations, mixed_documents, run_explain, scan_texts, to_markdown, top_features
from pipelines.store import ActivationStore
from sae.hooks import residuals
from sae.lm import model_name
from sae.vectors import encode
from sae.vectorset import VectorSet, VectorSetMeta, sae_fingerprint
from tests.conftest import REPO


def test_streaming_top_activations_equal_a_full_sort() -> None:
    acts = torch.randn(300, 20, generator=torch.Generator().manual_seed(0)).relu()
    top = TopActivations([3, 7, 11], n=4)
    for chunk in acts.split(64):
        top.update(chunk)
    want = acts[:, [3, 7, 11]].topk(4, dim=0)
    torch.testing.assert_close(top.values, want.values)
    assert torch.equal(top.rows, want.indices)
    assert top.seen == 300 and top.active.tolist() == (acts[:, [3, 7, 11]] > 0).sum(0).tolist()
    assert top_features(torch.tensor([0.0, -2.0, 1.0, 0.5]), 5) == [(1, -2.0), (2, 1.0), (3, 0.5)]


def _vector_set(model, sae, features: dict[int, float]) -> VectorSet:
    v = torch.zeros(sae.d_sae)
    for f, w in features.items():
        v[f] = w
    meta = VectorSetMeta(
        model=model_name(model), layer=15, mode="sae", granularity="fine", task="mislc", n_samples={"p": 1},
        readout="last", dim=sae.d_sae, sae_fingerprint=sae_fingerprint(sae),
    )  # fmt: skip
    return VectorSet({"p": v}, meta)


def test_explain_finds_each_features_strongest_store_contexts(embedded, embedded_sae) -> None:
    model, tok = embedded
    sae = embedded_sae.sae
    x = ActivationStore(embedded_sae.store).read(15)
    feats = encode(sae, x)
    busy = feats.gt(0).sum(0).topk(3).indices.tolist()  # three features that fire often in the store
    vs = _vector_set(model, sae, {busy[0]: 2.0, busy[1]: -1.0, busy[2]: 0.5})
    (e,) = run_explain(vs, sae, tok, store=embedded_sae.store, model=model, k=3, contexts=4, max_tokens=len(x))
    assert [f.feature for f in e.features] == busy and e.features[1].weight == -1.0
    tokens = ActivationStore(embedded_sae.store).read_column("token_id")
    for report in e.features:
        best = feats[:, report.feature].topk(4)
        assert [c.activation for c in report.contexts] == best.values.tolist()
        assert [c.token for c in report.contexts] == [tok.decode([int(tokens[i])]) for i in best.indices]
        assert report.density == pytest.approx(feats[:, report.feature].gt(0).float().mean().item())
        assert len(report.promotes) == 6
    md = to_markdown([e], "report")
    assert f"### feature {busy[0]} (weight +2.000)" in md and md.count("**⟦") == 12

    two = VectorSet({"p": vs["p"], "q": torch.zeros(sae.d_sae)}, vs.meta)
    two.meta.n_samples = {"p": 1, "q": 3}
    (rel,) = run_explain(two, sae, tok, perspectives=["p"], store=embedded_sae.store, k=3, relative=True)
    assert rel.features[0].weight == 2.0 * 3 / 4  # v_p minus the sample-weighted mean (v_p / 4)


def test_explain_command_prints_and_writes_a_report(tmp_path: Path, embedded, embedded_sae) -> None:
    model, _ = embedded
    path = _vector_set(model, embedded_sae.sae, {10: 1.0, 20: 0.5}).save(tmp_path / "set.safetensors")
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    cmd = [sys.executable, "-m", "pluristeer.cli", "explain", str(path), "--set", f"sae={embedded_sae.path}"]
    cmd += ["--set", f"store={embedded_sae.store}", "--set", "top=2", "--set", "contexts=2",
            "--set", f"out={tmp_path / 'r.md'}"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "top SAE features" in proc.stdout
    assert "### feature 10 (weight +1.000)" in (tmp_path / "r.md").read_text()
    bad = subprocess.run(
        [*cmd[:5], "--set", f"sae={tmp_path}", "--set", f"store={embedded_sae.store}"],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert bad.returncode == 2 and "not an SAE directory" in bad.stderr and "Traceback" not in bad.stderr
    renamed = subprocess.run([*cmd[:5], "--set", "topk=3"], capture_output=True, text=True, env=env, cwd=REPO,
                             timeout=300)  # fmt: skip
    assert renamed.returncode == 2 and "unknown field(s) ['topk']" in renamed.stderr


def test_corpus_scan_reads_each_texts_tokens_after_position_0(embedded, embedded_sae, tmp_path: Path) -> None:
    model, tok = embedded
    sae = embedded_sae.sae
    texts = ["The river flows into the sea near the old harbour town.", "Stock markets fell sharply on Monday."]
    feats = list(range(sae.d_sae))
    top, table = scan_texts(model, tok, sae, 15, texts, feats, max_tokens=1000, n=1)
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert top.seen == sum(len(i) - 1 for i in ids) and 0 not in table.position.tolist()
    h = torch.cat([residuals(model, [15], torch.tensor([i]))[15][0, 1:] for i in ids])  # one text at a time
    torch.testing.assert_close(top.values[0], encode(sae, h).max(0).values, atol=1e-3, rtol=1e-4)

    (tmp_path / "a.txt").write_text("first doc\n\nsecond doc")
    assert list(mixed_documents(tmp_path)) == ["first doc", "second doc"]
