"""Resuming from a cached residual equals a full forward, steered or not, and falls back where it cannot."""

from __future__ import annotations

import pytest
import torch

from sae.hooks import active_hooks, decoder_layers, steer
from sae.model import SAEConfig, SparseAutoencoder
from sae.resume import forward_capture, pad_left, position_ids, resume_logits, resume_supported, skipping
from tests.conftest import tiny_model


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([[0, 0, 5, 9, 17, 33, 41], [3, 8, 12, 19, 27, 54, 60]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    return ids, mask


def test_resumed_logits_equal_the_full_forward_with_and_without_steering(tiny_llama) -> None:
    model = tiny_llama
    ids, mask = _batch()
    hidden, full = forward_capture(model, 1, ids, mask)
    with skipping(model, 1):
        resumed = resume_logits(model, hidden, mask)
    torch.testing.assert_close(resumed, full, atol=1e-5, rtol=1e-5)

    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(d_in=64, d_sae=256, k=8))
    vectors = [torch.rand(256), None]  # row 0 steered, row 1 untouched
    for kwargs in ({"keep_error": True}, {"keep_error": False, "from_position": 3}):
        with steer(model, 1, vectors, sae=sae, coeff=3.0, **kwargs):
            steered_full = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits[:, -1]
        with skipping(model, 1), steer(model, 1, vectors, sae=sae, coeff=3.0, **kwargs):
            steered = resume_logits(model, hidden, mask)
        torch.testing.assert_close(steered, steered_full, atol=1e-4, rtol=1e-4)
        assert (steered[0] - full[0]).abs().max() > 1e-2  # the steering changed row 0
        torch.testing.assert_close(steered[1], full[1], atol=1e-5, rtol=1e-5)
    assert active_hooks(model) == 0


def test_padding_does_not_change_the_result(tiny_llama) -> None:
    ids, mask = _batch()
    _, alone = forward_capture(tiny_llama, 2, ids[:1, 2:], mask[:1, 2:])
    _, padded = forward_capture(tiny_llama, 2, ids, mask)
    torch.testing.assert_close(padded[:1], alone, atol=1e-5, rtol=1e-5)
    rows, m = pad_left([torch.ones(2, 4), torch.ones(3, 4)])
    assert m.tolist() == [[0, 1, 1], [1, 1, 1]] and rows[0, 0].abs().sum() == 0


def test_blocks_are_restored_and_unsupported_models_are_detected() -> None:
    model = tiny_model("llama")
    blocks = list(decoder_layers(model))
    with pytest.raises(RuntimeError, match="boom"), skipping(model, 2):
        assert type(decoder_layers(model)[0]).__name__ == "_Passthrough"
        raise RuntimeError("boom")
    assert list(decoder_layers(model)) == blocks
    assert resume_supported(model, 2)
    gpt2 = tiny_model("gpt2")  # adds position embeddings after inputs_embeds: resuming cannot be exact
    assert not resume_supported(gpt2, 1)
    assert all(type(b).__name__ != "_Passthrough" for b in decoder_layers(gpt2))
