from __future__ import annotations

import pytest
import torch

from sae.hooks import active_hooks, capture, decoder_layers, residuals, resolve_layer, steer
from sae.model import SAEConfig, SparseAutoencoder
from tests.conftest import tiny_model


def _hook_count(model) -> int:
    return active_hooks(model)


def _ids(batch: int = 3, seq: int = 7, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 256, (batch, seq), generator=g)


@pytest.mark.parametrize(
    ("family", "n_layers"),
    [("llama", 4), ("qwen2", 3), ("gemma", 3), ("gpt2", 3), ("gpt_neox", 3), ("opt", 3)],
)
def test_decoder_layers_found_across_families(family: str, n_layers: int) -> None:
    model = tiny_model(family)
    layers = decoder_layers(model)
    assert len(layers) == n_layers
    ids = _ids()
    with capture(model, [0, -1]) as acts:
        out = model(ids, output_hidden_states=True)
    assert set(acts) == {0, -1}
    assert acts[0].shape == (3, 7, 64)
    # hidden_states[i + 1] is block i's output, except the last (the final norm is applied there).
    torch.testing.assert_close(acts[0], out.hidden_states[1])
    assert _hook_count(model) == 0


def test_capture_shapes_and_values(tiny_llama) -> None:
    ids = _ids()
    with capture(tiny_llama, [0, 2]) as acts:
        out = tiny_llama(ids, output_hidden_states=True)
    for layer in (0, 2):
        assert acts[layer].shape == (3, 7, 64)
        torch.testing.assert_close(acts[layer], out.hidden_states[layer + 1])
    assert _hook_count(tiny_llama) == 0


def test_capture_removes_hooks_when_body_raises(tiny_llama) -> None:
    with pytest.raises(RuntimeError, match="boom"), capture(tiny_llama, [1]):
        tiny_llama(_ids())
        raise RuntimeError("boom")
    assert _hook_count(tiny_llama) == 0


def test_resolve_layer_rejects_out_of_range(tiny_llama) -> None:
    assert resolve_layer(tiny_llama, -1) == 3
    with pytest.raises(ValueError, match="out of range"):
        resolve_layer(tiny_llama, 4)


def test_residuals_stops_after_deepest_layer(tiny_llama) -> None:
    ids = _ids()
    ran: list[int] = []
    blocks = decoder_layers(tiny_llama)
    handles = [b.register_forward_hook(lambda *_a, i=i: ran.append(i)) for i, b in enumerate(blocks)]
    try:
        acts = residuals(tiny_llama, [1, 0], ids)
    finally:
        for h in handles:
            h.remove()
    assert ran == [0, 1]  # blocks 2 and 3 never ran
    with capture(tiny_llama, [0, 1]) as full:
        tiny_llama(ids)
    torch.testing.assert_close(acts[1], full[1])
    torch.testing.assert_close(acts[0], full[0])
    assert _hook_count(tiny_llama) == 0


def _sae(d_in: int = 64, d_sae: int = 256, k: int = 8) -> SparseAutoencoder:
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(d_in=d_in, d_sae=d_sae, k=k))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
    return sae


def _vec(d: int, seed: int) -> torch.Tensor:
    return torch.randn(d, generator=torch.Generator().manual_seed(seed))


def _generate(model, ids: torch.Tensor, n: int = 5) -> torch.Tensor:
    """Greedy decode with the KV cache; returns the logits of every step ``[batch, n, vocab]``."""
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    return torch.stack(out.logits, dim=1)


@pytest.mark.parametrize(("mode", "dim"), [("sae", 256), ("residual", 256), ("caa", 64)])
def test_zero_vector_leaves_logits_unchanged_at_prefill_and_decode(tiny_llama, mode: str, dim: int) -> None:
    ids = _ids()
    sae = _sae()
    base_prefill = tiny_llama(ids).logits
    base_decode = _generate(tiny_llama, ids)
    with steer(tiny_llama, 2, torch.zeros(dim), mode=mode, sae=sae, coeff=3.0):  # type: ignore[arg-type]
        prefill = tiny_llama(ids).logits
        decode = _generate(tiny_llama, ids)
    torch.testing.assert_close(prefill, base_prefill, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(decode, base_decode, atol=1e-4, rtol=1e-4)
    assert _hook_count(tiny_llama) == 0


@pytest.mark.parametrize(("mode", "dim"), [("sae", 256), ("residual", 256), ("caa", 64)])
def test_vector_changes_only_the_rows_that_carry_it(tiny_llama, mode: str, dim: int) -> None:
    ids = _ids(batch=3)
    sae = _sae()
    base_prefill = tiny_llama(ids).logits
    base_decode = _generate(tiny_llama, ids)
    rows = [None, 5 * _vec(dim, 3), None]
    with steer(tiny_llama, 1, rows, mode=mode, sae=sae, coeff=2.0):  # type: ignore[arg-type]
        prefill = tiny_llama(ids).logits
        decode = _generate(tiny_llama, ids)
    for got, base in ((prefill, base_prefill), (decode, base_decode)):
        torch.testing.assert_close(got[[0, 2]], base[[0, 2]], atol=1e-5, rtol=1e-5)
        assert (got[1] - base[1]).abs().max() > 1e-2


def test_each_row_gets_its_own_vector(tiny_llama) -> None:
    ids = _ids(batch=1).repeat(2, 1)
    v1, v2 = _vec(64, 1), _vec(64, 2)
    with steer(tiny_llama, 1, torch.stack([v1, v2]), mode="caa"):
        both = tiny_llama(ids).logits
    with steer(tiny_llama, 1, v2, mode="caa"):
        only2 = tiny_llama(ids).logits
    torch.testing.assert_close(both[1], only2[1])
    assert (both[0] - both[1]).abs().max() > 1e-3


def test_steer_decode_false_skips_single_token_steps(tiny_llama) -> None:
    ids = _ids(batch=2)
    v = 10 * _vec(64, 4)
    with steer(tiny_llama, 1, v, mode="caa", steer_decode=False):
        skipped = _generate(tiny_llama, ids, n=3)
    with steer(tiny_llama, 1, v, mode="caa"):
        steered = _generate(tiny_llama, ids, n=3)
    # The first generated token comes from the prefill, which both steer.
    torch.testing.assert_close(skipped[:, 0], steered[:, 0])
    assert (skipped[:, 1:] - steered[:, 1:]).abs().max() > 1e-3


def test_sae_mode_with_error_term_equals_residual_mode(tiny_llama) -> None:
    """steer() runs ``sae`` mode with the error term as ``residual`` mode on a SparseAutoencoder, which holds
    because its decoder is affine: the SAE's encode and both decodes, computed the long way on the hidden
    states the hook sees, give the same steered states as adding c·(v @ W_dec)."""
    ids = _ids()
    sae = _sae()
    v = _vec(256, 5)
    with capture(tiny_llama, [2]) as acts:
        tiny_llama(ids)
    h = acts[2]
    feats = sae.encode(h)
    long_way = sae.decode(feats + 1.5 * v) + (h - sae.decode(feats))
    torch.testing.assert_close(long_way, h + 1.5 * (v @ sae.W_dec), atol=1e-4, rtol=1e-4)
    with steer(tiny_llama, 2, v, mode="sae", sae=sae, coeff=1.5), capture(tiny_llama, [2]) as steered:
        via_sae = tiny_llama(ids).logits
    torch.testing.assert_close(steered[2], long_way, atol=1e-4, rtol=1e-4)
    with steer(tiny_llama, 2, v, mode="residual", sae=sae, coeff=1.5):
        via_residual = tiny_llama(ids).logits
    torch.testing.assert_close(via_sae, via_residual, atol=1e-4, rtol=1e-4)
    with steer(tiny_llama, 2, v, mode="sae", sae=sae, coeff=1.5, keep_error=False):
        dropped = tiny_llama(ids).logits
    assert (dropped - via_sae).abs().max() > 1e-3  # dropping the SAE error changes the output


def test_from_position_leaves_earlier_positions_alone(tiny_llama) -> None:
    ids = _ids(batch=2, seq=8)
    v = 10 * _vec(64, 6)
    with capture(tiny_llama, [1]) as base:
        tiny_llama(ids)
    with steer(tiny_llama, 1, v, mode="caa", from_position=5), capture(tiny_llama, [1]) as acts:
        tiny_llama(ids)
    torch.testing.assert_close(acts[1][:, :5], base[1][:, :5])
    torch.testing.assert_close(acts[1][:, 5:], base[1][:, 5:] + v)


def test_steer_validates_its_input(tiny_llama) -> None:
    with pytest.raises(ValueError, match="mode"), steer(tiny_llama, 0, torch.zeros(64), mode="nope"):  # type: ignore[arg-type]
        pass
    with pytest.raises(ValueError, match="needs an SAE"), steer(tiny_llama, 0, torch.zeros(256), mode="sae"):
        pass
    with pytest.raises(ValueError, match="d_model=64"), steer(tiny_llama, 0, torch.zeros(65), mode="caa"):
        pass
    with pytest.raises(ValueError, match="batch of 3"), steer(tiny_llama, 0, torch.zeros(2, 64), mode="caa"):
        tiny_llama(_ids(batch=3))
    assert _hook_count(tiny_llama) == 0
