from __future__ import annotations

import math

import pytest
import torch

from sae.decoding import Decoding, combine, dvd_weights, topk_entropy


def _logits(k: int = 3, batch: int = 2, vocab: int = 50, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return scale * torch.randn(k, batch, vocab, generator=torch.Generator().manual_seed(seed))


def test_dvd_weights_match_a_hand_computed_example() -> None:
    # Perspective 1: logits (2, 1, 0); perspective 2: uniform. Entropy over the top-2 tokens, τ = 0.5.
    steered = torch.tensor([[[2.0, 1.0, 0.0]], [[0.0, 0.0, 0.0]]])
    z = math.e**2 + math.e + 1
    p = [math.e**2 / z, math.e / z]
    h1 = -(p[0] * math.log(p[0]) + p[1] * math.log(p[1]))  # 0.61564
    h2 = -2 * (1 / 3) * math.log(1 / 3)  # 0.73241
    w1 = math.exp(h1 / 0.5) / (math.exp(h1 / 0.5) + math.exp(h2 / 0.5))
    weights = dvd_weights(steered, Decoding("dvd", tau=0.5, top_k=2))
    assert weights.shape == (2, 1)
    assert weights[0, 0].item() == pytest.approx(w1, abs=1e-6)
    assert weights[0, 0].item() == pytest.approx(0.441879, abs=1e-6)  # the more uncertain perspective weighs more
    assert weights[:, 0].sum().item() == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(topk_entropy(steered.log_softmax(-1), 2)[:, 0], torch.tensor([h1, h2]))


def test_dvd_combination_is_the_weighted_contrastive_sum() -> None:
    steered, base = _logits(), _logits(k=1, seed=9)[0]
    d = Decoding("dvd", alpha=0.3, tau=0.4, top_k=5)
    w = dvd_weights(steered, d)
    logp, logp0 = steered.log_softmax(-1), base.log_softmax(-1)
    expected = (w[..., None] * ((1 + 0.3) * logp - 0.3 * logp0)).sum(0).log_softmax(-1)
    torch.testing.assert_close(combine(steered, base, d), expected)


def test_mean_and_cad_by_hand() -> None:
    steered, base = _logits(), _logits(k=1, seed=5)[0]
    logp, logp0 = steered.log_softmax(-1), base.log_softmax(-1)
    torch.testing.assert_close(combine(steered, None, Decoding("mean")), logp.mean(0).log_softmax(-1))
    cad = combine(steered, base, Decoding("cad", alpha=0.5))
    torch.testing.assert_close(cad, (1.5 * logp - 0.5 * logp0).mean(0).log_softmax(-1))


@pytest.mark.parametrize("mode", ["mean", "cad", "dvd"])
def test_identical_perspectives_equal_to_base_give_the_base(mode: str) -> None:
    base = _logits(k=1, seed=3)[0]
    steered = base.expand(4, -1, -1).clone()  # a zero steering vector: every row equals the unsteered logits
    out = combine(steered, base, Decoding(mode, alpha=0.2))
    torch.testing.assert_close(out, base.log_softmax(-1))


def test_masked_base_token_falls_back_to_the_steered_term() -> None:
    steered, base = _logits(k=2, batch=1), _logits(k=1, batch=1, seed=4)[0]
    base[0, 7] = float("-inf")
    out = combine(steered, base, Decoding("cad", alpha=0.2))
    assert torch.isfinite(out).all()
    logp = steered.log_softmax(-1)
    lp0 = base.log_softmax(-1)
    terms = torch.where(torch.isfinite(lp0), 1.2 * logp - 0.2 * lp0, logp)
    torch.testing.assert_close(out, terms.mean(0).log_softmax(-1))


def _reference_dvd_by_hand(cond: list[torch.Tensor], uncond: torch.Tensor, tau: float, topk: int, alpha: float):
    """The reference formula (SAE-PD ``dvd_decoding``) restated for one item, step by step."""
    entropies, merged = [], []
    for logit in cond:
        top = torch.topk(torch.softmax(logit / tau, dim=-1), topk).indices
        raw = logit[top]
        entropies.append(float(-(raw.exp() * raw.clamp(-100, 0)).sum()))
        merged.append(torch.where(uncond > -100, (1 + alpha) * logit - alpha * uncond, logit))
    weights = torch.softmax(torch.tensor(entropies, dtype=torch.float16), dim=0)
    combined = (weights @ torch.stack(merged).half()).unsqueeze(0)
    return torch.where(combined > -100, combined, uncond)[0]


@pytest.mark.parametrize("scale", [3.0, 0.2])  # 0.2: negative logits, where the clipped "entropy" is non-zero
def test_reference_flag_reproduces_the_reference_formula(scale: float) -> None:
    steered = _logits(k=3, batch=2, vocab=40, seed=1, scale=scale) - (2.0 if scale < 1 else 0.0)
    base = _logits(k=1, batch=2, vocab=40, seed=2, scale=scale)[0]
    d = Decoding("dvd", alpha=0.2, tau=0.4, top_k=10, reference=True)
    got = combine(steered, base, d)
    for b in range(2):
        want = _reference_dvd_by_hand([steered[i, b] for i in range(3)], base[b], 0.4, 10, 0.2)
        torch.testing.assert_close(got[b], want.to(got.dtype), atol=0, rtol=0)
    weights = dvd_weights(steered, d)
    assert weights.dtype == torch.float16
    if scale > 1:  # positive logits: the clipped term vanishes and the reference weights are uniform
        assert torch.allclose(weights.float(), torch.full_like(weights.float(), 1 / 3), atol=1e-3)
    else:
        assert (weights.float() - 1 / 3).abs().max() > 1e-2


def test_reference_cad_and_mean() -> None:
    steered, base = _logits(), _logits(k=1, seed=6)[0]
    cad = combine(steered, base, Decoding("cad", alpha=0.1, reference=True))
    torch.testing.assert_close(cad, (1.1 * steered - 0.1 * base).mean(0))
    mean = combine(steered, None, Decoding("mean", reference=True))
    torch.testing.assert_close(mean, steered.softmax(-1).mean(0).log())


def test_decoding_validates() -> None:
    with pytest.raises(ValueError, match="mode"):
        Decoding("vote")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tau"):
        Decoding(tau=0)
    with pytest.raises(ValueError, match="needs the unsteered"):
        combine(_logits(), None, Decoding("cad"))
    with pytest.raises(ValueError, match=r"\[K, batch, vocab\]"):
        combine(_logits()[0], None, Decoding("mean"))
