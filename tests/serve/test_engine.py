"""The replica's step engine (KV caches per session, replay, batching) on the embedded model with the TEST
FIXTURE SAE (tests/sae_fixture.py), against the offline fused path."""

from __future__ import annotations

import torch

from sae.decoding import Decoding, combine, plural_generate
from sae.lm import model_name
from sae.vectorset import VectorSet, VectorSetMeta, sae_fingerprint
from serve.engine import Row, SessionCache, Steering, StepEngine, kv_layer_kinds
from tests.conftest import tiny_model


def _sparse(d: int, seed: int, n: int = 6, value: float = 6.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    v = torch.zeros(d)
    v[torch.randperm(d, generator=g)[:n]] = value
    return v


def _set(model, sae, scale: float = 1.0) -> VectorSet:
    vectors = {p: scale * _sparse(sae.d_sae, seed) for p, seed in (("a", 1), ("b", 2), ("c", 3))}
    meta = VectorSetMeta(
        model=model_name(model), layer=15, mode="sae", granularity="fine", task="chat",
        n_samples=dict.fromkeys(vectors, 1), readout="last", dim=sae.d_sae, sae_fingerprint=sae_fingerprint(sae),
    )  # fmt: skip
    return VectorSet(vectors, meta)


def _ids(tok, text: str) -> list[int]:
    chat = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    return tok(chat, add_special_tokens=False)["input_ids"]


def test_cached_steps_equal_the_fused_offline_generation(embedded, embedded_sae, one_thread) -> None:
    model, tok = embedded
    sae = embedded_sae.sae
    vs = _set(model, sae)
    steering = Steering(vs, 1, sae)
    engine = StepEngine(model, steering=lambda: steering, pad_id=tok.pad_token_id)
    ids = _ids(tok, "Write one sentence about the sea.")
    decoding = Decoding("dvd")
    offline = plural_generate(model, tok, [tok.decode(ids)], vs, ["a", "b", "c"], decoding, sae, max_new_tokens=5,
                              return_scores=True)  # fmt: skip
    assert offline.scores is not None
    tokens: list[int] = []
    for step in range(5):
        outs = engine.step([Row(f"s/{p}", ids + tokens, p) for p in ("a", "b", "c", None)])
        assert [o.ran for o in outs] == [len(ids) if step == 0 else 1] * 4  # prefill once, then one token each
        assert all(o.hit == (step > 0) for o in outs)
        logits = torch.stack([torch.from_numpy(o.logits) for o in outs])
        scores = combine(logits[:3, None], logits[3][None], decoding)[0]
        torch.testing.assert_close(scores, offline.scores[0, step], atol=1e-4, rtol=1e-4)
        tokens.append(int(scores.argmax()))
    assert tokens == offline.tokens[0][:5]
    assert engine.counters["batch_reused"] == 4  # every decode step ran on the previous step's batched cache
    again = engine.step([Row("s/a", ids + tokens[:-1], "a")])[0]  # a retried step: answered from the cache
    assert again.ran == 0 and again.hit
    assert len(engine.cache) == 4 and engine.cache.nbytes() > 0


def test_a_lost_cache_replays_the_prefix_and_versions_invalidate(embedded, embedded_sae, one_thread) -> None:
    model, tok = embedded
    sae = embedded_sae.sae
    current = {"s": Steering(_set(model, sae), 1, sae)}
    engine = StepEngine(model, steering=lambda: current["s"], pad_id=tok.pad_token_id)
    ids = _ids(tok, "Name a color.")
    first = engine.step([Row("k", ids, "a")])[0]
    step = engine.step([Row("k", [*ids, 42], "a")])[0]
    assert step.ran == 1 and step.hit
    engine.cache.drop("k")  # as if the replica had restarted
    replayed = engine.step([Row("k", [*ids, 42], "a")])[0]
    assert replayed.ran == len(ids) + 1 and not replayed.hit
    torch.testing.assert_close(torch.from_numpy(replayed.logits), torch.from_numpy(step.logits), atol=1e-4, rtol=0)
    wrong = engine.step([Row("k", [*ids, 43], "a")])[0]  # not an extension of the cached ids: replay
    assert wrong.ran == len(ids) + 1
    current["s"] = Steering(_set(model, sae, scale=3.0), 2, sae)  # a new version of the set
    moved = engine.step([Row("k", [*ids, 43, 44], "a")])[0]
    assert moved.ran == len(ids) + 2 and not moved.hit
    fresh = StepEngine(model, steering=lambda: current["s"], pad_id=tok.pad_token_id).step([Row(None, ids, "a")])[0]
    assert (torch.from_numpy(fresh.logits) - torch.from_numpy(first.logits)).abs().max() > 0.1


def test_concurrent_sessions_of_different_lengths_share_one_forward(embedded, embedded_sae, one_thread) -> None:
    model, tok = embedded
    sae = embedded_sae.sae
    steering = Steering(_set(model, sae), 1, sae)
    engine = StepEngine(model, steering=lambda: steering, pad_id=tok.pad_token_id)
    short, long = _ids(tok, "Hi."), _ids(tok, "Tell me something surprising about octopuses and their arms.")
    alone = [engine.step([Row(None, ids, p)])[0].logits for ids, p in (([*short, 5], "a"), ([*long, 7], None))]
    engine.step([Row("x", short, "a"), Row("y", long, None)])  # two prefills of different lengths, one forward
    forwards = engine.counters["forwards"]
    outs = engine.step([Row("x", [*short, 5], "a"), Row("y", [*long, 7], None)])
    assert engine.counters["forwards"] == forwards + 1 and [o.ran for o in outs] == [1, 1]
    for out, want in zip(outs, alone, strict=True):
        torch.testing.assert_close(torch.from_numpy(out.logits), torch.from_numpy(want), atol=2e-4, rtol=0)


def test_a_batch_of_the_same_sessions_reuses_its_cache_and_any_other_batch_is_assembled(
    embedded, embedded_sae, one_thread
) -> None:
    """Padding inside a row (two cached sessions extended by 2 and 3 tokens in one forward), then decode steps
    on that padded batched cache as is, then one session alone and a new pair: every answer equals the row run
    alone, uncached."""
    model, tok = embedded
    sae = embedded_sae.sae
    steering = Steering(_set(model, sae), 1, sae)
    engine = StepEngine(model, steering=lambda: steering, pad_id=tok.pad_token_id)
    x, y = _ids(tok, "Hi."), _ids(tok, "Tell me something surprising about octopuses.")

    def alone(ids: list[int], p: str | None) -> torch.Tensor:
        return torch.from_numpy(engine_fresh.step([Row(None, ids, p)])[0].logits)

    engine_fresh = StepEngine(model, steering=lambda: steering, pad_id=tok.pad_token_id)
    engine.step([Row("x", x, "a"), Row("y", y, None)])
    x, y = [*x, 11, 12], [*y, 21, 22, 23]  # one forward, N = 3: x's two new tokens are padded inside its row
    steps = [[Row("x", x, "a"), Row("y", y, None)]]
    for t in range(3):  # the sessions come back in any order
        x, y = [*x, 30 + t], [*y, 40 + t]
        steps.append([Row("x", x, "a"), Row("y", y, None)][:: 1 if t % 2 else -1])
    for rows in steps:
        for out, row in zip(engine.step(rows), rows, strict=True):
            torch.testing.assert_close(torch.from_numpy(out.logits), alone(list(row.ids), row.perspective),
                                       atol=2e-4, rtol=0)  # fmt: skip
    assert engine.counters["batch_reused"] == 3
    (solo,) = engine.step([Row("x", [*x, 50], "a")])  # y finished: x alone, assembled from its entry
    assert solo.ran == 1 and solo.hit
    torch.testing.assert_close(torch.from_numpy(solo.logits), alone([*x, 50], "a"), atol=2e-4, rtol=0)
    z = _ids(tok, "Count to three.")
    engine.step([Row("z", z, "b")])
    pair = [Row("x", [*x, 50, 51], "a"), Row("z", [*z, 60], "b")]  # not the last batch's sessions: assembled
    for out, row in zip(engine.step(pair), pair, strict=True):
        assert out.ran == 1
        torch.testing.assert_close(torch.from_numpy(out.logits), alone(list(row.ids), row.perspective),
                                   atol=2e-4, rtol=0)  # fmt: skip
    assert engine.counters["batch_reused"] == 3


def test_a_sliding_window_model_keeps_sessions_within_the_window_and_replays_beyond(one_thread) -> None:
    """Gemma 3's sliding-window layers (window 16 here): a session is kept while it is at most 14 tokens
    long, then replays its whole prefix at every step; two sessions of different lengths share a padded forward. Every
    step has the logits of a plain forward of the whole sequence, within the window and past it."""
    plain, sliding = tiny_model("llama"), tiny_model("gemma3")
    assert kv_layer_kinds(plain) == [] and kv_layer_kinds(sliding) == ["DynamicSlidingWindowLayer"]
    engine = StepEngine(sliding)
    assert engine.window == 16

    def want(seq: list[int]) -> torch.Tensor:
        return sliding(input_ids=torch.tensor([seq])).logits[0, -1]

    a, b = list(range(3, 10)), list(range(30, 33))  # 7 and 3 tokens
    ran = []
    for step in range(12):
        seq_a, seq_b = a + list(range(40, 40 + step)), b + list(range(60, 60 + step))
        outs = engine.step([Row("a", seq_a, None), Row("b", seq_b, None)])
        ran.append([o.ran for o in outs])
        for out, seq in zip(outs, (seq_a, seq_b), strict=True):
            torch.testing.assert_close(torch.from_numpy(out.logits), want(seq), atol=1e-4, rtol=1e-4)
    # a: 7 tokens, kept up to 14, so steps 1-8 decode one token each (8: from the 14 kept to 15); from 16 on
    # (step 9) a step is a replay of the whole sequence
    assert [r[0] for r in ran] == [7, *[1] * 8, *(len(a) + s for s in range(9, 12))]
    assert [r[1] for r in ran] == [3, *[1] * 11]  # b stays within 14 tokens throughout
    (again,) = engine.step([Row("b", b + list(range(60, 72)), None)])  # beyond b's cache by 1: a decode
    assert again.ran == 1
    blind = StepEngine(sliding)
    blind.window = None  # as for a model whose config does not name its window: its sessions are never kept
    blind.step([Row("x", a, None)])
    (out,) = blind.step([Row("x", [*a, 40], None)])
    assert out.ran == len(a) + 1 and len(blind.cache) == 0


def test_session_cache_is_lru_and_expires() -> None:
    now = {"t": 0.0}
    cache = SessionCache(max_sessions=2, ttl_s=10, clock=lambda: now["t"])

    def entry():
        from serve.engine import _Entry

        return _Entry((1,), [torch.zeros(1, 1, 1)], [torch.zeros(1, 1, 1)], torch.zeros(3), 1, None, 0.0)

    cache.put("a", entry())
    cache.put("b", entry())
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("c", entry())
    assert "b" not in cache and "a" in cache and cache.evicted == 1
    now["t"] = 11.0
    assert cache.get("a") is None and cache.expired == 1
    assert cache.sweep() == 1 and len(cache) == 0 and cache.sessions == 0


def test_session_cache_counts_sessions_not_rows() -> None:
    """Keys ``session/row``: a session's rows (perspectives, the unsteered row, the fused trunk) take one place
    of ``max_sessions`` and leave together when their session is the least recently used."""
    from serve.engine import _Entry

    cache = SessionCache(max_sessions=2, ttl_s=10)

    def entry() -> _Entry:
        return _Entry((1,), [torch.zeros(1, 1, 1)], [torch.zeros(1, 1, 1)], torch.zeros(3), 1, None, 0.0)

    for session in ("s1", "s2"):
        for row in ("France", "Spain/Madrid", "-", "#fused"):  # a row name may hold a slash
            cache.put(f"{session}/{row}", entry())
    assert len(cache) == 8 and cache.sessions == 2 and cache.evicted == 0
    assert cache.get("s1/France") is not None  # s1's rows are touched again: s2 is now the oldest session
    cache.put("s1/Spain/Madrid", entry())
    cache.put("s3/-", entry())
    assert cache.sessions == 2 and cache.evicted == 1
    assert not any(k in cache for k in ("s2/France", "s2/Spain/Madrid", "s2/-", "s2/#fused"))
    assert all(k in cache for k in ("s1/France", "s1/Spain/Madrid", "s3/-"))
    assert cache.drop("s3/-") and cache.sessions == 1 and not cache.drop("s3/-")


def test_fused_engine_shares_the_blocks_below_the_steering_layer(embedded, embedded_sae, one_thread) -> None:
    from serve.fused import FusedEngine, self_check

    model, tok = embedded
    sae = embedded_sae.sae
    current = {"s": Steering(_set(model, sae), 1, sae)}
    assert self_check(model, lambda: current["s"], tok.pad_token_id) is None
    plain = StepEngine(model, steering=lambda: current["s"], pad_id=tok.pad_token_id)
    fused = FusedEngine(model, steering=lambda: current["s"], pad_id=tok.pad_token_id)
    one, two = _ids(tok, "Name a river."), _ids(tok, "What is the capital of Peru? Answer briefly.")

    def rows(extra: list[int], sessions=("x", "y")) -> list[Row]:
        seqs = {"x": one + extra, "y": two + extra}
        return [Row(f"{g}/{p}", seqs[g], p, g) for g in sessions for p in ("a", "b", "c", None)]

    for step, sessions in enumerate((("x",), ("x",), ("x", "y"), ("x", "y"))):
        extra = list(range(60, 60 + step))
        want, got = plain.step(rows(extra, sessions)), fused.step(rows(extra, sessions))
        for w, g in zip(want, got, strict=True):
            torch.testing.assert_close(torch.from_numpy(g.logits), torch.from_numpy(w.logits), atol=2e-4, rtol=0)
            assert g.ran == w.ran
    assert [o.ran for o in got] == [1] * 8 and fused.cache.nbytes() < plain.cache.nbytes()
    current["s"] = Steering(_set(model, sae, scale=2.0), 2, sae)  # a new version: the rows replay
    replayed = fused.step(rows(list(range(60, 64)), ("x",)))
    assert [o.ran for o in replayed] == [len(one) + 4] * 4
    uncached = fused.step([Row(None, one, "b", "z"), Row(None, one, None, "z")])
    assert [o.ran for o in uncached] == [len(one)] * 2 and len(fused.cache) == 2
