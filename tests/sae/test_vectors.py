from __future__ import annotations

import pytest
import torch

from sae.hooks import capture, steer
from sae.model import SAEConfig, SparseAutoencoder
from sae.vectors import (
    derive,
    differences,
    mean_by_group,
    paired_readouts,
    pool,
    project,
    readout_residuals,
    sparsify,
)
from tests.conftest import tiny_model


def _sae(d_in: int = 64, d_sae: int = 256, k: int = 8) -> SparseAutoencoder:
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(d_in=d_in, d_sae=d_sae, k=k))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
    return sae


def test_readout_residuals_equal_one_unpadded_forward_per_sequence(tiny_llama) -> None:
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (5, 9, 3, 12, 7, 7)]
    positions = [-1, 4, 0, -3, 6, 2]
    got = readout_residuals(tiny_llama, 2, seqs, positions, batch_size=4, max_batch_tokens=30)
    assert got.shape == (6, 64)
    for i, (s, p) in enumerate(zip(seqs, positions, strict=True)):
        with capture(tiny_llama, [2]) as acts:
            tiny_llama(torch.tensor([s]))
        torch.testing.assert_close(got[i], acts[2][0, p], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_paired_readouts_share_prefixes_and_equal_separate_readouts(family: str) -> None:
    model = tiny_model(family)
    g = torch.Generator().manual_seed(5)
    pairs, positions = [], []
    for n_prefix, n_with, n_without in ((6, 4, 1), (11, 2, 3), (3, 7, 2), (9, 1, 1), (0, 3, 4)):
        prefix = torch.randint(3, 256, (n_prefix,), generator=g).tolist()
        with_ = prefix + torch.randint(3, 128, (n_with,), generator=g).tolist()
        without = prefix + torch.randint(128, 256, (n_without,), generator=g).tolist()  # differs from the first token
        pairs.append((with_, without))
        positions.append((-1, len(without) - 1 if n_prefix != 9 else 2))  # one readout inside the shared prefix
    h_with, h_without, tokens = paired_readouts(model, 1, pairs, positions, batch_size=4)
    seqs = [s for pair in pairs for s in pair]
    flat = readout_residuals(model, 1, seqs, [p for pos in positions for p in pos])
    torch.testing.assert_close(h_with, flat[0::2], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(h_without, flat[1::2], atol=1e-4, rtol=1e-4)
    assert tokens < sum(len(s) for s in seqs)  # the shared prefixes ran once


def test_readout_residuals_reject_a_position_outside_the_sequence(tiny_llama) -> None:
    with pytest.raises(ValueError, match="outside sequence 0"):
        readout_residuals(tiny_llama, 1, [[5, 6, 7]], [3])


def test_coarse_is_the_sample_weighted_mean_of_fine() -> None:
    diffs = torch.randn(10, 16, generator=torch.Generator().manual_seed(1))
    groups = ["a"] * 2 + ["b"] * 5 + ["c"] * 3
    fine, counts = mean_by_group(diffs, groups)
    assert counts == {"a": 2, "b": 5, "c": 3}
    torch.testing.assert_close(fine["b"], diffs[2:7].mean(0))
    coarse = pool(fine, counts)
    weighted = (2 * fine["a"] + 5 * fine["b"] + 3 * fine["c"]) / 10
    torch.testing.assert_close(coarse, weighted)
    torch.testing.assert_close(coarse, diffs.mean(0))  # = the mean over every pair of the task
    assert (coarse - (fine["a"] + fine["b"] + fine["c"]) / 3).abs().max() > 1e-3  # not the unweighted mean


def test_derive_fine_and_coarse_with_an_sae() -> None:
    sae = _sae()
    g = torch.Generator().manual_seed(2)
    h_with, h_without = torch.randn(6, 64, generator=g), torch.randn(6, 64, generator=g)
    groups = ["x", "x", "y", "y", "y", "z"]
    fine, counts = derive(h_with, h_without, groups, mode="sae", sae=sae)
    want = sae.encode(h_with[2:5]).mean(0) - sae.encode(h_without[2:5]).mean(0)
    torch.testing.assert_close(fine["y"], want, atol=1e-5, rtol=1e-5)
    coarse, _ = derive(h_with, h_without, groups, mode="sae", sae=sae, granularity="coarse")
    assert all(torch.equal(coarse["x"], v) for v in coarse.values())
    torch.testing.assert_close(coarse["x"], pool(fine, counts))
    sparse, _ = derive(h_with, h_without, groups, mode="sae", sae=sae, topk=5)
    assert all(int((v != 0).sum()) <= 5 for v in sparse.values())


def test_caa_differences_live_in_the_residual_stream() -> None:
    h_with, h_without = torch.ones(3, 64), torch.zeros(3, 64)
    torch.testing.assert_close(differences(h_with, h_without, mode="caa"), torch.ones(3, 64))
    with pytest.raises(ValueError, match="needs an SAE"):
        differences(h_with, h_without, mode="sae")
    with pytest.raises(ValueError, match="differ in shape"):
        differences(h_with, h_without[:2], mode="caa")


def test_sparsify_keeps_the_largest_magnitudes() -> None:
    v = torch.tensor([0.1, -3.0, 2.0, 0.0, -0.5])
    torch.testing.assert_close(sparsify(v, 2), torch.tensor([0.0, -3.0, 2.0, 0.0, 0.0]))
    torch.testing.assert_close(sparsify(v, 0), v)


def test_project_is_the_shift_residual_steering_adds() -> None:
    model = tiny_model("llama")
    sae = _sae()
    v = torch.randn(256, generator=torch.Generator().manual_seed(3))
    ids = torch.randint(3, 256, (2, 6), generator=torch.Generator().manual_seed(4))
    with capture(model, [1]) as base:
        model(ids)
    with steer(model, 1, v, mode="residual", sae=sae, coeff=2.0), capture(model, [1]) as steered:
        model(ids)
    torch.testing.assert_close(steered[1] - base[1], (2.0 * project(v, sae)).expand_as(base[1]), atol=1e-5, rtol=1e-5)
