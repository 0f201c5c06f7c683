"""The serving parts that need no model: continuous batching, the decoding loop, text streaming, session
routing, API keys."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from sae.decoding import Decoding, combine
from serve.auth import AuthError, KeyRing
from serve.batcher import ContinuousBatcher
from serve.generation import GenParams, StepLogits, TextStream, plural_decode
from serve.routing import rendezvous


def test_continuous_batching_takes_what_queued_while_busy() -> None:
    seen: list[list[int]] = []
    gate = threading.Event()

    def run(items: list[int]) -> list[int]:
        if not seen:
            gate.wait(5)  # the first batch is slow: the rest queue up meanwhile
        seen.append(items)
        if -1 in items:
            raise ValueError("bad item")
        return [i * 10 for i in items]

    async def main() -> list:
        batcher = ContinuousBatcher(run, max_rows=3)
        first = asyncio.create_task(batcher.submit(0))
        await asyncio.sleep(0.05)
        rest = [asyncio.create_task(batcher.submit(i)) for i in (1, 2, -1, 4)]
        await asyncio.sleep(0.05)
        gate.set()
        return await asyncio.gather(first, *rest, return_exceptions=True)

    results = asyncio.run(main())
    assert results[:3] == [0, 10, 20] and isinstance(results[3], ValueError) and results[4] == 40
    assert seen[0] == [0] and seen[1] == [1, 2, -1]  # no wait for a lone request; the queue forms one batch
    assert [1] in seen and [2] in seen and [4] in seen[-1:]  # a failing batch reruns item by item


@pytest.mark.parametrize("gather_s", [0.0, 0.2])
def test_sessions_returning_a_round_trip_apart_share_one_forward_with_gathering(gather_s: float) -> None:
    """4 sessions whose next steps come back 0-12 ms apart (a round trip through Serve): without gathering they
    split into groups that alternate and never merge; with it every decoding batch after the first holds
    all 4 (and a lone session never waits: its batches start at once)."""
    import random
    import time

    sizes: list[int] = []

    def run(items: list[int]) -> list[int]:
        time.sleep(0.03)  # a forward
        sizes.append(len(items))
        return items

    async def main() -> float:
        batcher = ContinuousBatcher(run, max_rows=8, gather_s=gather_s)
        rng = random.Random(0)

        async def session(i: int) -> None:
            await asyncio.sleep(0.012 * i)  # they start apart
            for _ in range(12):
                await batcher.submit(i)
                await asyncio.sleep(rng.uniform(0, 0.012))  # the answer's way back and the next step's way in

        await asyncio.gather(*(session(i) for i in range(4)))
        alone = time.perf_counter()
        for _ in range(3):
            await batcher.submit(9)
        return time.perf_counter() - alone

    lone = asyncio.run(main())
    shared = sizes[4:-3]
    if gather_s:
        assert sum(shared) / len(shared) > 3.5, sizes
        assert lone < 3 * 0.03 + 0.2  # one wait at most (for the 4 that did not come back), then none
    else:
        assert sum(shared) / len(shared) < 3.0, sizes  # what gathering fixes
    assert sizes[-3:] == [1, 1, 1]


class _Tok:
    """Characters as tokens: id = code point; EOS = 0."""

    eos_token_id = 0

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids if i != 0)


def _steps(table: list[list[float]], calls: list[list[int]]):
    async def step(ids: list[int], first: bool) -> StepLogits:
        calls.append(list(ids))
        row = torch.tensor(table[len(calls) - 1])
        return StepLogits(torch.stack([row, row + torch.arange(len(row)) * 0.01]), row.clone(), {"replays": 0})

    return step


def _collect(gen) -> list:
    async def main() -> list:
        return [e async for e in gen]

    return asyncio.run(main())


def test_decoding_loop_greedy_eos_and_length() -> None:
    vocab = 128
    table = [[0.0] * vocab for _ in range(4)]
    for step, token in enumerate((72, 105, 0, 33)):  # "H", "i", EOS
        table[step][token] = 10.0
    calls: list[list[int]] = []
    params = GenParams(ids=[1, 2], perspectives=["a", "b"], decoding=Decoding("dvd"), max_tokens=4, temperature=0,
                       eos=0, top_n=2)  # fmt: skip
    events = _collect(plural_decode(_steps(table, calls), params))
    assert [e.token for e in events] == [72, 105, 0] and events[-1].finish_reason == "stop"
    assert calls == [[1, 2], [1, 2, 72], [1, 2, 72, 105]]
    assert set(events[0].per_perspective) == {"a", "b"} and len(events[0].top) == 2
    assert abs(sum(events[0].weights.values()) - 1) < 1e-6
    steered = torch.stack([torch.tensor(table[0]), torch.tensor(table[0]) + torch.arange(vocab) * 0.01])
    want = combine(steered[:, None], torch.tensor(table[0])[None], Decoding("dvd"))[0]
    assert abs(events[0].logprob - want[72].item()) < 1e-5
    calls.clear()
    longer = GenParams(**{**params.__dict__, "ignore_eos": True, "max_tokens": 4})
    events = _collect(plural_decode(_steps(table, calls), longer))
    assert len(events) == 4 and 0 not in [e.token for e in events] and events[-1].finish_reason == "length"


def test_seeded_sampling_repeats() -> None:
    table = [[float(i % 7) for i in range(50)] for _ in range(6)]
    params = GenParams(ids=[1], perspectives=["a", "b"], decoding=Decoding("mean", top_k=5), max_tokens=6,
                       temperature=1.0, seed=3)  # fmt: skip
    runs = [[e.token for e in _collect(plural_decode(_steps(table, []), params))] for _ in range(2)]
    assert runs[0] == runs[1] and len(set(runs[0])) > 1
    nucleus = GenParams(**{**params.__dict__, "top_p": 0.01})  # the smallest nucleus: the top token only
    assert {e.token for e in _collect(plural_decode(_steps(table, []), nucleus))} <= {6, 13, 20, 27, 34, 41, 48}


def test_text_stream_holds_back_what_may_start_a_stop_sequence() -> None:
    stream = TextStream(_Tok(), stops=["END"])
    out = "".join(stream.add(ord(c)) for c in "abcEN")
    assert out == "abc"  # "EN" might start "END"
    assert stream.add(ord("D")) == "" and stream.stopped and stream.text == "abcEN"[:3]
    plain = TextStream(_Tok())
    assert "".join(plain.add(ord(c)) for c in "héllo") + plain.flush() == "héllo"
    partial = TextStream(_Tok())
    assert partial.add(ord("x")) == "x" and partial.add(0xFFFD) == ""  # an incomplete UTF-8 sequence waits


def test_rendezvous_moves_only_the_lost_replicas_sessions() -> None:
    replicas = ["r1", "r2", "r3", "r4"]
    sessions = [f"s{i}" for i in range(200)]
    before = {s: rendezvous(s, replicas)[0] for s in sessions}
    assert len(set(before.values())) == 4 and rendezvous("s1", replicas) == rendezvous("s1", replicas[::-1])
    after = {s: rendezvous(s, ["r1", "r2", "r4"])[0] for s in sessions}
    assert all(after[s] == before[s] for s in sessions if before[s] != "r3")


def test_keys_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_KEYS", " k1 ,k2,, ")
    ring = KeyRing.from_env("MY_KEYS")
    assert ring is not None and len(ring) == 2
    assert ring.allows("Bearer k2") and ring.allows("bearer k1")
    for header in (None, "", "k1", "Bearer", "Bearer k3", "Basic k1", "Bearer k1x"):
        assert not ring.allows(header)
    monkeypatch.setenv("MY_KEYS", "")
    with pytest.raises(AuthError, match="set MY_KEYS"):
        KeyRing.from_env("MY_KEYS")
    assert KeyRing.from_env("MY_KEYS", required=False) is None
