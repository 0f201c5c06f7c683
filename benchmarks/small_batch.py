"""Decoding steps of a few rows with ``F.linear`` against the transposed path (sae/small_batch.py), in this
process, one torch thread: the unsteered step engine at 1, 2, 4, 8 and 16 rows, and the fused engine's
PD K=3 step (3 steered rows + the unsteered one, sharing the blocks below the steering layer), with its
ratio to the 1-row unsteered step — the ratio issue 18 asks to bring to 1.3x. The two ways alternate in
rounds and each figure is the median, so load from other processes hits both alike.

    PYTHONPATH=. python benchmarks/small_batch.py --sae DIR [--steps 16 --rounds 6]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE] + [str(_HERE.parent)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sae", type=Path, required=True, help="derive a 3-perspective VectorSet with this SAE")
    ap.add_argument("--steps", type=int, default=16, help="decoding steps timed per measurement")
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args()

    import torch

    from benchmarks.serve import PROMPTS, _chat, _derive
    from sae import small_batch
    from sae.lm import load_lm
    from sae.model import SparseAutoencoder
    from serve.engine import Row, SessionCache, Steering, StepEngine
    from serve.fused import FusedEngine

    torch.set_num_threads(1)
    model, tok = load_lm("embedded")
    steering = Steering(_derive(args.sae, 3, 4), 1, SparseAutoencoder.load(args.sae))
    chosen = steering.vector_set.perspectives[:3]
    prompt = tok(_chat(tok, PROMPTS[0]), add_special_tokens=False)["input_ids"]
    plain = StepEngine(model)
    fused = FusedEngine(model, steering=lambda: steering, cache=SessionCache())
    runs = 0

    def timed(engine, rows) -> float:
        """ms per decoding step of ``rows(ids, session)`` over ``args.steps`` steps of a fresh session."""
        nonlocal runs
        runs += 1
        ids = list(prompt)
        engine.step(rows(ids, f"s{runs}"))  # the prefill
        started = time.perf_counter()
        for _ in range(args.steps):
            out = engine.step(rows(ids, f"s{runs}"))
            ids.append(int(out[-1].logits.argmax()))
        return 1000 * (time.perf_counter() - started) / args.steps

    def unsteered(n: int):
        return plain, lambda ids, s: [Row(f"{s}-{j}/-", ids, None) for j in range(n)]

    scenarios = {f"unsteered, {n} row" + ("s" if n > 1 else ""): unsteered(n) for n in (1, 2, 4, 8, 16)}
    scenarios["fused PD K=3 (4 rows)"] = (
        fused, lambda ids, s: [Row(f"{s}/{p}", ids, p, s) for p in [*chosen, None]]
    )  # fmt: skip
    ms: dict[tuple[str, bool], list[float]] = {(s, on): [] for s in scenarios for on in (False, True)}
    for _ in range(args.rounds):
        for on in (False, True):
            if on:
                small_batch.patch(model)
            for s, (engine, rows) in scenarios.items():
                ms[(s, on)].append(timed(engine, rows))
            small_batch.unpatch(model)
    med = {k: statistics.median(v) for k, v in ms.items()}
    print(f"ms per decoding step, median of {args.rounds} rounds x {args.steps} steps, 1 torch thread")
    print(f"  {'scenario':24s} {'F.linear':>9s} {'transposed':>10s} {'speed-up':>8s}")
    for s in scenarios:
        print(f"  {s:24s} {med[(s, False)]:9.1f} {med[(s, True)]:10.1f} {med[(s, False)] / med[(s, True)]:7.2f}x")
    one = "unsteered, 1 row"
    for on, label in ((False, "F.linear"), (True, "transposed")):
        print(f"  fused PD K=3 / unsteered 1 row, {label}: {med[('fused PD K=3 (4 rows)', on)] / med[(one, on)]:.2f}x")
    print(f"  tune(): {small_batch.tune(model).describe()}")


if __name__ == "__main__":
    main()
