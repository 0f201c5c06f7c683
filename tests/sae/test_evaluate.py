from __future__ import annotations

import pytest
import torch

from sae.evaluate import ce_loss_recovered, lm_loss, reconstruction_metrics, splice
from sae.hooks import active_hooks
from sae.model import SAEConfig, SparseAutoencoder


class _Identity:
    """A perfect 'SAE': every dimension is a latent."""

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z


class _Mean:
    """Reconstructs every input as the same vector (explains no variance)."""

    def __init__(self, mean: torch.Tensor) -> None:
        self.mean = mean

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(x.shape[0], 4)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.mean.expand(z.shape[0], -1)


def test_reconstruction_metrics_bounds() -> None:
    torch.manual_seed(0)
    batches = [torch.randn(50, 8) + 3 for _ in range(3)]
    perfect = reconstruction_metrics(_Identity(), batches)
    assert perfect["explained_variance"] == pytest.approx(1.0) and perfect["mse"] == pytest.approx(0.0)
    assert perfect["tokens"] == 150 and perfect["dead_fraction"] == 0.0
    mean = torch.cat(batches).mean(0)
    none = reconstruction_metrics(_Mean(mean), batches)
    assert none["explained_variance"] == pytest.approx(0.0, abs=1e-9)
    assert none["l0"] == 0.0 and none["dead_fraction"] == 1.0
    sae = SparseAutoencoder(SAEConfig(d_in=8, d_sae=32, k=3))
    some = reconstruction_metrics(sae, batches)
    assert some["l0"] <= 3.0 and 0.0 <= some["dead_fraction"] < 1.0


def test_a_dominant_dimension_is_left_out_of_the_second_explained_variance() -> None:
    """One dimension with 400x the variance of the others (a huge-norm residual dimension): an SAE that
    reconstructs only it has a headline EV near 1 and an EV over the other dimensions of 0."""
    torch.manual_seed(0)
    x = torch.randn(600, 64)
    x[:, 5] *= 20.0

    class _OnlyDim5(_Identity):
        def decode(self, z: torch.Tensor) -> torch.Tensor:
            out = torch.zeros_like(z)
            out[:, 5] = z[:, 5]
            return out + torch.cat([x.mean(0)[:5], torch.zeros(1), x.mean(0)[6:]])

    m = reconstruction_metrics(_OnlyDim5(), [x[:300], x[300:]])
    assert m["dominant_dims"] == [5] and m["dominant_share"] > 0.8
    assert m["explained_variance"] > 0.8 and m["explained_variance_rest"] == pytest.approx(0.0, abs=1e-6)
    plain = reconstruction_metrics(_Identity(), [torch.randn(200, 64)])  # no dominant dimension: the same EV
    assert plain["dominant_dims"] == [] and plain["explained_variance_rest"] == plain["explained_variance"]


def test_ce_loss_recovered_is_one_for_a_perfect_sae_and_zero_for_ablation(tiny_llama) -> None:
    torch.manual_seed(0)
    ids = torch.randint(3, 256, (4, 12))
    perfect = ce_loss_recovered(tiny_llama, _Identity(), 1, ids, batch_size=2)
    assert perfect["ce_sae"] == pytest.approx(perfect["ce_clean"], abs=1e-5)
    assert perfect["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert perfect["ce_zero"] != pytest.approx(perfect["ce_clean"])

    class _Zero(_Identity):
        def decode(self, z: torch.Tensor) -> torch.Tensor:
            return torch.zeros_like(z)

    ablated = ce_loss_recovered(tiny_llama, _Zero(), 1, ids, batch_size=2, baseline=perfect)
    assert ablated["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-4)
    assert active_hooks(tiny_llama) == 0


def test_splice_keeps_position_zero_and_unhooks(tiny_llama) -> None:
    ids = torch.randint(3, 256, (2, 6))
    clean = tiny_llama(input_ids=ids).logits
    with splice(tiny_llama, 2, torch.zeros_like, from_position=1):
        edited = tiny_llama(input_ids=ids).logits
        assert active_hooks(tiny_llama) == 1
    torch.testing.assert_close(edited[:, 0], clean[:, 0])  # causal: position 0 sees no edit
    assert not torch.allclose(edited[:, 1:], clean[:, 1:])
    assert active_hooks(tiny_llama) == 0
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding is not scored
    loss, count = lm_loss(tiny_llama, ids, mask)
    assert count == ids.numel() - ids.shape[0] - 1 and loss > 0
