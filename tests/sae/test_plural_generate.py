"""The fused pluralistic path on the embedded model with the TEST FIXTURE SAE (tests/sae_fixture.py)."""

from __future__ import annotations

import torch

from sae.decoding import Decoding, combine, last_logits, plural_generate, plural_next_token
from sae.lm import model_name
from sae.vectorset import VectorSet, VectorSetMeta, sae_fingerprint

PROMPTS = ["Write one sentence about the sea.", "Name a famous painter and say why."]


def _chat(tok, text: str) -> str:
    return tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)


def _sparse(d: int, seed: int, n: int = 6, value: float = 6.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    v = torch.zeros(d)
    v[torch.randperm(d, generator=g)[:n]] = value
    return v


def _set(model, sae, vectors: dict[str, torch.Tensor]) -> VectorSet:
    meta = VectorSetMeta(
        model=model_name(model), layer=15, mode="sae", granularity="fine", task="chat",
        n_samples=dict.fromkeys(vectors, 1), readout="last", dim=sae.d_sae, sae_fingerprint=sae_fingerprint(sae),
    )  # fmt: skip
    return VectorSet(vectors, meta)


def test_k_identical_vectors_equal_single_steered_generation(embedded, embedded_sae) -> None:
    model, tok = embedded
    sae = embedded_sae.sae
    v = _sparse(sae.d_sae, seed=1)
    vs = _set(model, sae, {"a": v, "b": v.clone(), "c": v.clone()})
    prompts = [_chat(tok, p) for p in PROMPTS]
    out = plural_generate(
        model, tok, prompts, vs, ["a", "b", "c"], Decoding("mean"), sae, max_new_tokens=6, return_scores=True
    )
    batch = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.inference_mode(), vs.steer(model, "a", sae=sae):
        ref = model.generate(
            **batch, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
    with torch.inference_mode():
        unsteered = last_logits(model, **batch).logits[:, -1].float().log_softmax(-1)
    width = batch["input_ids"].shape[1]
    for i, tokens in enumerate(out.tokens):
        want = ref.sequences[i, width:].tolist()
        assert tokens == want[: len(tokens)] and len(tokens) == min(len(want), [*want, 2].index(2) + 1)
    assert out.scores is not None
    torch.testing.assert_close(out.scores[:, 0], ref.logits[0].float().log_softmax(-1), atol=2e-3, rtol=1e-4)
    assert (out.scores[:, 0] - unsteered).abs().max() > 0.1  # and the vector does steer


def test_fused_batch_equals_separate_forwards_per_perspective(embedded, embedded_sae) -> None:
    model, tok = embedded
    sae = embedded_sae.sae
    vs = _set(model, sae, {"x": _sparse(sae.d_sae, 2), "y": _sparse(sae.d_sae, 3), "z": _sparse(sae.d_sae, 4)})
    batch = tok([_chat(tok, p) for p in PROMPTS], return_tensors="pt", padding=True, add_special_tokens=False)
    decoding = Decoding("dvd", alpha=0.2, tau=0.4, top_k=20)
    fused = plural_next_token(model, batch["input_ids"], batch["attention_mask"], vs, ["x", "y", "z"], decoding, sae)
    with torch.inference_mode():
        base = last_logits(model, **batch).logits[:, -1]
        steered = []
        for p in ("x", "y", "z"):
            with vs.steer(model, p, sae=sae):
                steered.append(last_logits(model, **batch).logits[:, -1])
    torch.testing.assert_close(fused, combine(torch.stack(steered), base, decoding), atol=2e-3, rtol=1e-4)
    assert (fused - base.log_softmax(-1)).abs().max() > 0.1
    # dvd with α = 0 and K identical vectors is the single steered model, too
    same = plural_next_token(
        model, batch["input_ids"], batch["attention_mask"], vs, ["x", "x"], Decoding("dvd", alpha=0.0), sae
    )
    torch.testing.assert_close(same, steered[0].float().log_softmax(-1), atol=2e-3, rtol=1e-4)
