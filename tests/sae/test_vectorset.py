from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sae.model import SAEConfig, SparseAutoencoder
from sae.vectorset import VectorSet, VectorSetError, VectorSetMeta, VectorSetMismatch, sae_fingerprint
from tests.conftest import tiny_model


def _sae(seed: int = 0) -> SparseAutoencoder:
    torch.manual_seed(seed)
    return SparseAutoencoder(SAEConfig(d_in=64, d_sae=256, k=8))


def _model(name: str = "tiny-llama"):
    model = tiny_model("llama")
    model.config.pluristeer_source = name
    return model


def _set(sae: SparseAutoencoder, *, mode: str = "sae", dim: int = 256, zero: bool = False) -> VectorSet:
    g = torch.Generator().manual_seed(7)
    vectors = {p: torch.zeros(dim) if zero else torch.randn(dim, generator=g) for p in ("Kenya", "Chile", "Austria")}
    meta = VectorSetMeta(
        model="tiny-llama",
        layer=2,
        mode=mode,
        granularity="fine",
        task="globalopinionqa",
        n_samples={"Kenya": 50, "Chile": 48, "Austria": 3},
        readout="last",
        dim=dim,
        sae_path=None if mode == "caa" else "/sae/dir",
        sae_sha256=None if mode == "caa" else "ab" * 32,
        sae_fingerprint=None if mode == "caa" else sae_fingerprint(sae),
    )
    return VectorSet(vectors, meta)


def test_round_trip_keeps_vectors_and_metadata(tmp_path: Path) -> None:
    vs = _set(_sae())
    path = vs.save(tmp_path / "set.safetensors")
    back = VectorSet.load(path)
    assert back.perspectives == ["Kenya", "Chile", "Austria"]  # the order is kept
    torch.testing.assert_close(back["Chile"], vs["Chile"])
    m = back.meta
    assert (m.model, m.layer, m.mode, m.granularity, m.task, m.readout) == (
        "tiny-llama", 2, "sae", "fine", "globalopinionqa", "last"
    )  # fmt: skip
    assert m.n_samples == {"Kenya": 50, "Chile": 48, "Austria": 3} and m.sae_path == "/sae/dir" and m.created
    assert back.rows(["Chile", None])[1] is None


def test_refuses_another_model_layer_or_sae() -> None:
    sae = _sae()
    vs = _set(sae)
    vs.check(_model(), sae=sae)  # the right ones pass
    with pytest.raises(VectorSetMismatch, match="made for model 'tiny-llama', not 'other'"):
        vs.check(_model("other"), sae=sae)
    with pytest.raises(VectorSetMismatch, match="layer 2, not 1"):
        vs.check(_model(), layer=1, sae=sae)
    with pytest.raises(VectorSetMismatch, match="different one"):
        vs.check(_model(), sae=_sae(seed=1))
    with pytest.raises(VectorSetMismatch, match="needs its SAE"):
        vs.check(_model())
    with (
        pytest.raises(VectorSetMismatch, match="cannot be applied in mode 'caa'"),
        vs.steer(_model(), "Kenya", sae=sae, mode="caa"),
    ):
        pass


def test_unreadable_files_are_clear_errors(tmp_path: Path) -> None:
    good = _set(_sae()).save(tmp_path / "set.safetensors")
    (tmp_path / "cut.safetensors").write_bytes(good.read_bytes()[:50])
    with pytest.raises(VectorSetError, match="not a readable safetensors"):
        VectorSet.load(tmp_path / "cut.safetensors")
    with pytest.raises(VectorSetError, match="does not exist"):
        VectorSet.load(tmp_path / "none.safetensors")
    with pytest.raises(VectorSetError, match=r"shape \(3,\), expected \[256\]"):
        VectorSet({"a": torch.zeros(3)}, _set(_sae()).meta)


@pytest.mark.parametrize("mode", ["sae", "residual", "caa"])
def test_zero_vectors_leave_the_model_unchanged(mode: str) -> None:
    model, sae = _model(), _sae()
    vs = _set(sae, mode=mode, dim=64 if mode == "caa" else 256, zero=True)
    ids = torch.randint(3, 256, (2, 7), generator=torch.Generator().manual_seed(0))
    base = model(ids).logits
    with vs.steer(model, ["Kenya", "Chile"], sae=sae, coeff=4.0):
        steered = model(ids).logits
    torch.testing.assert_close(steered, base, atol=1e-4, rtol=1e-4)
    vs.vectors["Kenya"] += 1.0
    with vs.steer(model, ["Kenya", None], sae=sae, coeff=4.0):
        moved = model(ids).logits
    assert (moved[0] - base[0]).abs().max() > 1e-3
    torch.testing.assert_close(moved[1], base[1], atol=1e-4, rtol=1e-4)


def test_round_trip_on_s3_and_a_missing_file_names_the_uri(s3_bucket: str) -> None:
    vs = _set(_sae())
    uri = vs.save(f"{s3_bucket}/vectors/set.safetensors")
    back = VectorSet.load(uri)
    assert back.perspectives == vs.perspectives and back.meta == vs.meta
    torch.testing.assert_close(back["Kenya"], vs["Kenya"])
    with pytest.raises(VectorSetError, match=f"vector set {s3_bucket}/vectors/none.safetensors does not exist"):
        VectorSet.load(f"{s3_bucket}/vectors/none.safetensors")
