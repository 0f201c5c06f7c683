"""TEST FIXTURE ONLY: a small, honestly trained TopK SAE for the embedded model (not the product trainer).

Residuals of ~8k corpus tokens at one layer are captured with :func:`sae.hooks.residuals` (position 0
and norm outliers dropped, as collection does) and written as a real activation store
(:mod:`pipelines.store`); a TopK SAE (8x, k=32) is fitted to them with Adam for a few hundred steps and
saved in the sae-lens layout. Both are cached under ``$PLURISTEER_CACHE/test-fixtures/`` (keyed by the
settings), so only the first run pays the ~30 s.

To test against a real SAE instead (e.g. from ``pluristeer train``), set ``PLURISTEER_TEST_SAE`` to its
directory; the store is still built here.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipelines.corpus import iter_documents
from pipelines.store import Manifest, RunningStats, StoreWriter, write_shard
from sae.hooks import residuals
from sae.lm import cache_dir, model_name
from sae.model import SAEConfig, SparseAutoencoder

FIXTURE_VERSION = 1


@dataclass(frozen=True)
class SAEFixture:
    sae: SparseAutoencoder
    path: Path  # the SAE directory
    store: Path  # the activation store it was fitted on
    layer: int


def _contexts(tokenizer, corpus: Path, n_tokens: int, ctx: int) -> torch.Tensor:
    rows: list[list[int]] = []
    for doc in itertools.islice(iter_documents(corpus), 2000):
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        rows += [ids[i : i + ctx] for i in range(0, len(ids) - ctx + 1, ctx)]
        if len(rows) * ctx >= n_tokens:
            break
    return torch.tensor(rows[: -(-n_tokens // ctx)])


def _write_store(root: Path, model, ids: torch.Tensor, layer: int, outlier: float) -> torch.Tensor:
    """Capture ``layer`` for ``ids``, drop position 0 and norm outliers, write one shard; returns the rows."""
    acts, extra = [], {"token_id": [], "context": [], "position": []}
    for start in range(0, len(ids), 16):
        batch = ids[start : start + 16]
        hidden = residuals(model, [layer], batch)[layer].float()
        norms = hidden.norm(dim=-1)
        keep = norms < outlier * norms[:, 1:].median()
        keep[:, 0] = False
        rows, cols = keep.nonzero(as_tuple=True)
        acts.append(hidden[rows, cols])
        extra["token_id"].append(batch[rows, cols].numpy().astype(np.int32))
        extra["context"].append((rows + start).numpy().astype(np.int64))
        extra["position"].append(cols.numpy().astype(np.int16))
    x = torch.cat(acts)
    manifest = Manifest(
        model=model_name(model),
        layers=[layer],
        d_model=x.shape[1],
        dtype="float32",
        context_size=ids.shape[1],
        n_tokens=len(x),
        config={"fixture": "tests/sae_fixture.py"},
    )
    writer = StoreWriter(root, manifest)
    writer.record(write_shard(root, 0, {layer: x.numpy()}, {k: np.concatenate(v) for k, v in extra.items()}, "float32"))
    stats = RunningStats(x.shape[1])
    stats.update(x.numpy())
    writer.finalize({str(layer): stats.to_dict()}, {"bos": "position 0", "norm_outlier_factor": outlier})
    return x


def _fit(x: torch.Tensor, *, expansion: int, k: int, steps: int, batch: int, lr: float, seed: int) -> SparseAutoencoder:
    """Plain TopK SAE training: MSE, Adam, unit-norm decoder rows, ``b_dec`` initialised at the data mean."""
    g = torch.Generator().manual_seed(seed)
    sae = SparseAutoencoder(SAEConfig(d_in=x.shape[1], d_sae=expansion * x.shape[1], k=k))
    sae.reset_parameters(g)
    with torch.no_grad():
        sae.b_dec.copy_(x.mean(0))
    opt = torch.optim.Adam([sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec], lr=lr)
    for _ in range(steps):
        xb = x[torch.randint(0, len(x), (batch,), generator=g)]
        loss = (sae(xb) - xb).pow(2).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            sae.W_dec /= sae.W_dec.norm(dim=-1, keepdim=True)
    return sae.eval().requires_grad_(False)


def fixture_sae(
    model,
    tokenizer,
    corpus: Path,
    *,
    layer: int = 15,
    n_tokens: int = 8192,
    ctx: int = 128,
    expansion: int = 8,
    k: int = 32,
    steps: int = 300,
    batch: int = 256,
    lr: float = 1e-3,
    seed: int = 0,
) -> SAEFixture:
    """Build (or reuse from the cache) the fixture store and SAE; see the module docstring."""
    settings = dict(
        v=FIXTURE_VERSION, model=model_name(model), layer=layer, n_tokens=n_tokens, ctx=ctx,
        expansion=expansion, k=k, steps=steps, batch=batch, lr=lr, seed=seed,
    )  # fmt: skip
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    root = cache_dir() / "test-fixtures" / f"topk-sae-L{layer}-{key}"
    if not (root / "done").exists():
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=root.name + ".tmp-", dir=root.parent))
        try:
            torch.manual_seed(seed)
            x = _write_store(tmp / "store", model, _contexts(tokenizer, corpus, n_tokens, ctx), layer, 10.0)
            sae = _fit(x, expansion=expansion, k=k, steps=steps, batch=batch, lr=lr, seed=seed)
            with torch.no_grad():
                err = (sae(x) - x).pow(2).sum(-1).mean() / (x - x.mean(0)).pow(2).sum(-1).mean()
            sae.cfg.metadata.update(
                model_name=model_name(model), hook_name=f"blocks.{layer}.hook_resid_post", hook_layer=layer
            )
            sae.save(tmp / "sae")
            (tmp / "sae" / "training.json").write_text(
                json.dumps({"fixture": settings, "fvu": float(err), "rows": len(x)}, indent=2)
            )
            (tmp / "done").write_text("ok\n")
            try:
                tmp.rename(root)
            except OSError:  # another process built it first
                shutil.rmtree(tmp, ignore_errors=True)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    sae_dir = Path(os.environ.get("PLURISTEER_TEST_SAE", root / "sae"))
    return SAEFixture(SparseAutoencoder.load(sae_dir), sae_dir, root / "store", layer)
