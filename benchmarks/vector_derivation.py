"""Vector derivation: pluristeer's batched readout against a per-sample baseline, measured in the same run.

The baseline does what the reference code does per sample: one full forward per prompt (all layers and the
LM head), then reads the layer. pluristeer de-duplicates prompts, sorts them by length, runs batches that
stop after the readout layer, and encodes with the SAE once; with ``share_prefix`` each pair's shared
prefix runs once into a KV cache and only the two suffixes run after it. All produce the same vectors
(checked by cosine similarity).

    PYTHONPATH=. python benchmarks/vector_derivation.py --sae DIR [--task crehate] [--samples 50] [--baseline 10]
"""

from __future__ import annotations

import argparse
import time

import torch

from pipelines.vectors import VectorConfig, config_pairs, derive_fine
from sae.hooks import capture
from sae.lm import load_lm
from sae.model import SparseAutoencoder
from sae.vectors import differences, mean_by_group


def per_sample(model, tokenizer, sae, layer: int, pairs) -> tuple[dict[str, torch.Tensor], int]:
    rows_with, rows_without, tokens = [], [], 0
    with torch.inference_mode():
        for pair in pairs:
            for prompt, rows in ((pair.with_feedback, rows_with), (pair.without, rows_without)):
                ids = torch.tensor([prompt.token_ids(tokenizer)])
                tokens += ids.shape[1]
                with capture(model, [layer]) as acts:
                    model(ids)
                rows.append(acts[layer][0, -1].float())
    diffs = differences(torch.stack(rows_with), torch.stack(rows_without), mode="sae", sae=sae)
    return mean_by_group(diffs, [p.perspective for p in pairs])[0], tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sae", required=True)
    ap.add_argument("--task", default="crehate")
    ap.add_argument("--samples", type=int, default=50, help="per perspective, for the timed pluristeer run")
    ap.add_argument("--perspectives", type=int, default=5)
    ap.add_argument("--baseline", type=int, default=10, help="samples per perspective for the side-by-side")
    args = ap.parse_args()

    model, tok = load_lm("embedded")
    sae = SparseAutoencoder.load(args.sae)
    layer = int(sae.cfg.metadata.get("hook_layer", 15))
    print(f"torch threads: {torch.get_num_threads()}")

    def cfg(samples: int, share: bool = True) -> VectorConfig:
        return VectorConfig(
            sae=args.sae, task=args.task, samples=samples, max_perspectives=args.perspectives, share_prefix=share
        )

    small = cfg(args.baseline)
    pairs = config_pairs(small, tok)
    derive_fine(small, model, tok, sae, layer, pairs[:4])  # warm-up
    t0 = time.perf_counter()
    base, base_tokens = per_sample(model, tok, sae, layer, pairs)
    t_base = time.perf_counter() - t0
    print(f"{len(pairs)} pairs, per-sample baseline: {t_base:.2f} s ({base_tokens} tokens)")
    for share in (False, True):
        t0 = time.perf_counter()
        ours = derive_fine(cfg(args.baseline, share), model, tok, sae, layer, pairs)
        t_ours = time.perf_counter() - t0
        cos = min(float(torch.cosine_similarity(ours.fine[p], base[p], dim=0)) for p in base)
        print(
            f"  pluristeer share_prefix={share}: {t_ours:.2f} s ({ours.tokens} tokens) -> "
            f"{t_base / t_ours:.1f}x faster than per-sample; min cosine to per-sample = {cos:.4f}"
        )

    full = cfg(args.samples)
    pairs = config_pairs(full, tok)
    t0 = time.perf_counter()
    result = derive_fine(full, model, tok, sae, layer, pairs)
    elapsed = time.perf_counter() - t0
    print(
        f"{args.task}: {len(result.counts)} perspectives x <= {args.samples} samples = {len(pairs)} pairs, "
        f"{result.prompts} distinct prompts, {result.tokens} tokens: {elapsed:.2f} s "
        f"({result.tokens / elapsed:.0f} tokens/s)"
    )


if __name__ == "__main__":
    main()
