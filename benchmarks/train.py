"""SAE training throughput: pluristeer's trainer vs sae-lens's own trainer, same activations, same run.

Both train a TopK SAE (same d_sae, k, batch size, learning rate, warm-up / constant / linear-decay
schedule, Adam) on the same batches of the same store, stepped **interleaved** (one batch ours, the same
batch theirs) so both see the same load on a shared machine. sae-lens runs through its ``SAETrainer``
(``TopKTrainingSAE``; ``expected_average_only_in`` scaling, set from the same data; its AuxK and
dead-feature window matched to ours), driven step by step exactly as its ``fit()`` does. Printed: tokens/s
of each, the ratio, and both SAEs' explained variance and L0 on held-out rows of the store. Then the
8x+32x-in-one-pass time vs two separate runs (reading the batches from the store each time).

    PYTHONPATH=. python benchmarks/train.py --store /tmp/store-L15 --expansions 8,32 --tokens 200000

``--ours-precision fp32`` compares float32 to float32; the default ``auto`` runs our encoder matmul in
bfloat16 where the CPU has AMX/AVX512-BF16 (``--lens-autocast`` gives sae-lens bf16 autocast too).
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

import torch

from pipelines.store import ActivationStore
from sae.evaluate import reconstruction_metrics
from sae.train import Normalizer, SAESpec, SAETrainer, TrainerConfig


def _batches(x: torch.Tensor, batch_size: int, seed: int) -> list[torch.Tensor]:
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    n = x.shape[0] // batch_size
    return [x[order[i * batch_size : (i + 1) * batch_size]].contiguous() for i in range(n)]


class LensRunner:
    """sae-lens's ``SAETrainer`` with a ``TopKTrainingSAE``, stepped one batch at a time like its ``fit``."""

    def __init__(self, d_in: int, d_sae: int, k: int, args: argparse.Namespace, steps: int, scale: float) -> None:
        from sae_lens.config import LoggingConfig, SAETrainerConfig
        from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
        from sae_lens.training.sae_trainer import SAETrainer as LensTrainer

        torch.manual_seed(args.seed)
        cfg = TopKTrainingSAEConfig(
            d_in=d_in,
            d_sae=d_sae,
            k=k,
            dtype="float32",
            device="cpu",
            normalize_activations="expected_average_only_in",
            use_sparse_activations=args.lens_sparse,
        )
        warm, decay = _schedule(steps, args)
        tcfg = SAETrainerConfig(
            total_training_samples=steps * args.batch_size,
            train_batch_size_samples=args.batch_size,
            lr=args.lr_for(d_sae),
            lr_end=args.lr_for(d_sae) / 10,
            lr_scheduler_name="constant",
            lr_warm_up_steps=warm,
            lr_decay_steps=decay,
            device="cpu",
            autocast=args.lens_autocast,
            dead_feature_window=max(1, args.dead_tokens // args.batch_size),
            feature_sampling_window=max(1, args.dead_tokens // args.batch_size),
            logger=LoggingConfig(log_to_wandb=False),
        )
        self.trainer = LensTrainer(tcfg, TopKTrainingSAE(cfg), data_provider=iter(()))
        self.trainer.activation_scaler.scaling_factor = scale  # what its estimate_scaling_factor computes
        self.scale = scale

    def step(self, batch: torch.Tensor) -> None:
        self.trainer.maybe_reset_sparsity()
        self.trainer.step(batch)
        self.trainer.n_training_steps += 1

    def finish(self) -> Any:
        sae = self.trainer.sae
        sae.fold_activation_norm_scaling_factor(self.scale)  # as fit() does at the end
        self.trainer.activation_scaler.scaling_factor = None
        return sae.eval()


def _schedule(steps: int, args: argparse.Namespace) -> tuple[int, int]:
    return max(1, int(args.warmup * steps)), int(args.decay * steps)


def _ours(specs: list[SAESpec], d_in: int, steps: int, args: argparse.Namespace, normalizer: Normalizer) -> SAETrainer:
    cfg = TrainerConfig(
        batch_size=args.batch_size,
        total_tokens=steps * args.batch_size,
        warmup=args.warmup,
        decay=args.decay,
        dead_tokens=args.dead_tokens,
        precision=args.ours_precision,
        seed=args.seed,
    )
    return SAETrainer(specs, d_in, cfg, normalizer=normalizer)


def compare(
    expansion: float,
    train: list[torch.Tensor],
    heldout: list[torch.Tensor],
    args: argparse.Namespace,
    normalizer: Normalizer,
    lens_scale: float,
) -> dict[str, float]:
    d_in = train[0].shape[1]
    d_sae = int(expansion * d_in)
    spec = SAESpec(expansion=expansion, k=args.k, lr=args.lr_for(d_sae))
    ours = _ours([spec], d_in, len(train), args, normalizer)
    theirs = LensRunner(d_in, d_sae, args.k, args, len(train), lens_scale)
    t_ours = t_lens = 0.0
    for i, batch in enumerate(train):
        first = (ours, theirs) if i % 2 == 0 else (theirs, ours)  # alternate who goes first
        for runner in first:
            start = time.perf_counter()
            if runner is ours:
                ours.train_step(batch)
                t_ours += time.perf_counter() - start
            else:
                theirs.step(batch)
                t_lens += time.perf_counter() - start
    tokens = len(train) * args.batch_size
    ours_sae = next(iter(ours.export().values()))
    m_ours = reconstruction_metrics(ours_sae, heldout)
    with torch.no_grad():
        m_lens = reconstruction_metrics(theirs.finish(), heldout)
    return {
        "expansion": expansion,
        "tokens": tokens,
        "ours_tok_s": tokens / t_ours,
        "lens_tok_s": tokens / t_lens,
        "ratio": t_lens / t_ours,
        "ours_ev": m_ours["explained_variance"],
        "lens_ev": m_lens["explained_variance"],
        "ours_l0": m_ours["l0"],
        "lens_l0": m_lens["l0"],
    }


def one_pass_vs_separate(
    store: ActivationStore, layer: int, expansions: list[float], args: argparse.Namespace, normalizer: Normalizer
) -> dict[str, float]:
    """Wall time of one trainer fitting all SAEs from one read of the store vs one run per SAE."""
    tokens = min(args.tokens, len(store))
    steps = tokens // args.batch_size

    def run(specs: list[SAESpec]) -> float:
        trainer = _ours(specs, store.d_model, steps, args, normalizer)
        start = time.perf_counter()
        for batch in store.iter_batches(layer, args.batch_size, shuffle_window=65536, seed=args.seed):
            if trainer.step >= steps:
                break
            trainer.train_step(batch)
        return time.perf_counter() - start

    specs = [SAESpec(expansion=e, k=args.k, lr=args.lr_for(int(e * store.d_model))) for e in expansions]
    together = run(specs)
    separate = sum(run([s]) for s in specs)
    return {"tokens": steps * args.batch_size, "one_pass_s": together, "separate_s": separate}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--layer", type=int, default=None)
    parser.add_argument("--expansions", default="8,32")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=200_000, help="training tokens per SAE")
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--lr", type=float, default=None, help="default: our width-scaled learning rate")
    parser.add_argument("--warmup", type=float, default=0.02)
    parser.add_argument("--decay", type=float, default=0.2)
    parser.add_argument("--dead-tokens", type=int, default=250_000)
    parser.add_argument("--ours-precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--lens-autocast", action="store_true", help="sae-lens with bf16 autocast")
    parser.add_argument("--lens-sparse", action="store_true", help="sae-lens use_sparse_activations")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave)")
    parser.add_argument("--skip-one-pass", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.lr_for = lambda d_sae: args.lr if args.lr is not None else SAESpec(d_sae=d_sae).learning_rate(1)

    store = ActivationStore(args.store)
    layer = args.layer if args.layer is not None else store.layers[0]
    x = store.read(layer, limit=min(len(store), args.tokens + args.eval_tokens))
    n_eval = min(args.eval_tokens, x.shape[0] // 5)
    heldout = list(x[-n_eval:].split(4096))
    train = _batches(x[:-n_eval], args.batch_size, args.seed)
    normalizer = Normalizer.from_stats(store.stats(layer))
    lens_scale = math.sqrt(x.shape[1]) / float(x[:-n_eval].norm(dim=-1).mean())
    expansions = [float(e) for e in args.expansions.split(",")]
    print(
        f"store {args.store} layer {layer}: {len(train)} batches of {args.batch_size} "
        f"({len(train) * args.batch_size} tokens) per SAE, {n_eval} held-out rows, k={args.k}, "
        f"torch threads {torch.get_num_threads()}, ours precision {args.ours_precision}, "
        f"sae-lens autocast {args.lens_autocast} sparse {args.lens_sparse}",
        flush=True,
    )
    for e in expansions:
        r = compare(e, train, heldout, args, normalizer, lens_scale)
        print(
            f"{e:g}x k={args.k}: ours {r['ours_tok_s']:.0f} tok/s, sae-lens {r['lens_tok_s']:.0f} tok/s, "
            f"ratio {r['ratio']:.2f}x | explained variance ours {r['ours_ev']:.4f} vs sae-lens {r['lens_ev']:.4f} "
            f"| L0 ours {r['ours_l0']:.1f} vs sae-lens {r['lens_l0']:.1f}",
            flush=True,
        )
    if not args.skip_one_pass and len(expansions) > 1:
        r = one_pass_vs_separate(store, layer, expansions, args, normalizer)
        print(
            f"{'+'.join(f'{e:g}x' for e in expansions)} on {r['tokens']} tokens read from the store: one pass "
            f"{r['one_pass_s']:.1f} s vs separate runs {r['separate_s']:.1f} s "
            f"(ratio {r['separate_s'] / r['one_pass_s']:.2f}x)",
            flush=True,
        )


if __name__ == "__main__":
    main()
