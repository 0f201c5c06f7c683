"""SAE training on a GPU: tokens/s and MFU of pluristeer's trainer (plain, DeepSpeed, Ray Train + DeepSpeed).

Self-contained: synthetic sparse activations made on the GPU (no store, no model, no internet). Each part
runs only if its packages are importable and is skipped (with the reason) otherwise, so the script works
on a bare CUDA PyTorch image:

1. the device's measured bf16 and fp32 matmul peaks;
2. plain PyTorch: TopK 8x and 32x (and 8x+32x in one pass), encoder matmul in bf16, for the ``dense``
   and ``csr`` weight-gradient backends: tokens/s, MFU, and the final fraction of variance unexplained;
3. DeepSpeed ZeRO-``--zero-stage`` in this process (world size 1), if ``deepspeed`` imports;
4. ``pipelines.train.run_train`` (Ray Train ``TorchTrainer``, ``use_gpu``, DeepSpeed if it imports) on a
   small synthetic store, if ``ray`` imports (Ray start included);
5. sae-lens's own trainer on the same batches, if ``sae_lens`` imports.

    PYTHONPATH=. python3 benchmarks/train_gpu.py            # about 2-3 minutes on an H100
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sae.perf import flops_per_token, matmul_peak_flops
from sae.train import Normalizer, SAESpec, SAETrainer, TrainerConfig

START = time.perf_counter()


def have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def synthetic(n: int, d: int, features: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """``n`` rows: ~8 of ``features`` random unit directions with exponential weights, plus offset and noise."""
    g = torch.Generator(device=device).manual_seed(seed)
    atoms = torch.randn(features, d, device=device, generator=g)
    atoms /= atoms.norm(dim=-1, keepdim=True)
    out = torch.empty(n, d, device=device)
    for start in range(0, n, 8192):
        rows = min(8192, n - start)
        idx = torch.randint(0, features, (rows, 8), device=device, generator=g)
        w = torch.empty(rows, 8, device=device).exponential_(generator=g)
        out[start : start + rows] = torch.nn.functional.embedding_bag(idx, atoms, per_sample_weights=w, mode="sum")
    return out + 0.3 + 0.05 * torch.randn(n, d, device=device, generator=g)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_trainer(trainer: SAETrainer, data: torch.Tensor, batch: int, steps: int, warmup: int = 3) -> float:
    """tokens/s over ``steps`` steps after ``warmup`` (synchronised)."""
    n_batches = data.shape[0] // batch
    for i in range(warmup):
        trainer.train_step(data[(i % n_batches) * batch : (i % n_batches + 1) * batch])
    sync(data.device)
    start = time.perf_counter()
    for i in range(steps):
        j = (warmup + i) % n_batches
        trainer.train_step(data[j * batch : (j + 1) * batch])
    sync(data.device)
    return steps * batch / (time.perf_counter() - start)


def part(name: str, budget: float) -> Callable[[Callable[[], None]], Callable[[], None]]:
    """Decorator: run a part unless the time budget is spent; print its errors and carry on."""

    def wrap(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            if budget - (time.perf_counter() - START) < 20:
                print(f"[{name}] skipped: time budget spent", flush=True)
                return
            print(f"== {name}", flush=True)
            try:
                fn()
            except Exception as err:
                print(f"[{name}] FAILED: {type(err).__name__}: {err}", flush=True)
                traceback.print_exc(limit=4)

        return run

    return wrap


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d-in", type=int, default=576, help="576: SmolLM2-135M; try 2048 or 4096 too")
    parser.add_argument("--batch-size", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--zero-stage", type=int, default=1)
    parser.add_argument("--budget", type=float, default=270, help="seconds; later parts are skipped past it")
    parser.add_argument("--no-ray", action="store_true")
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of this script's logic")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: this script measures the GPU path (benchmarks/train.py is the CPU benchmark)")
    torch.backends.cuda.matmul.allow_tf32 = True
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (dry run)"
    print(
        f"torch {torch.__version__}, {name}, "
        f"deepspeed {'yes' if have('deepspeed') else 'no'}, ray {'yes' if have('ray') else 'no'}, "
        f"sae_lens {'yes' if have('sae_lens') else 'no'}",
        flush=True,
    )
    size = 8192 if device.type == "cuda" else 1024
    peak_bf16 = matmul_peak_flops(device, torch.bfloat16, size=size, seconds=1.0)
    peak_fp32 = matmul_peak_flops(device, torch.float32, size=size, seconds=1.0)
    print(f"measured matmul peak: bf16 {peak_bf16 / 1e12:.0f} TFLOP/s, fp32 (tf32) {peak_fp32 / 1e12:.0f} TFLOP/s")
    d, b = args.d_in, args.batch_size
    data = synthetic(b * 16, d, 16 * d, device)
    normalizer = Normalizer.from_sample(data[:65536])

    def trainer(expansions: list[float], backend: str, steps: int) -> SAETrainer:
        cfg = TrainerConfig(batch_size=b, total_tokens=b * (steps + 10), precision="bf16", backend=backend)
        specs = [SAESpec(expansion=e, k=args.k) for e in expansions]
        return SAETrainer(specs, d, cfg, normalizer=normalizer, device=device)

    def report(label: str, t: SAETrainer, tok_s: float) -> None:
        flops = sum(flops_per_token(s) for s in t.saes.values())
        with torch.no_grad():
            outs = t.model(normalizer(data[:b]))
        fvu = {n: round(v, 3) for n, v in t.metrics(outs).items() if n.endswith("fvu")}
        print(f"{label}: {tok_s:,.0f} tok/s, MFU {tok_s * flops / peak_bf16:.1%} (bf16 peak), fvu {fvu}", flush=True)

    @part("plain PyTorch", args.budget)
    def plain() -> None:
        for expansions in ([8.0], [32.0], [8.0, 32.0]):
            for backend in ("dense", "csr") if device.type == "cuda" else ("csr",):
                t = trainer(expansions, backend, args.steps)
                tok_s = time_trainer(t, data, b, args.steps)
                report(f"{'+'.join(f'{e:g}x' for e in expansions)} k={args.k} d={d} {backend}", t, tok_s)

    @part(f"DeepSpeed ZeRO-{args.zero_stage} (1 process)", args.budget)
    def with_deepspeed() -> None:
        if not have("deepspeed"):
            print("skipped: deepspeed is not installed")
            return
        import deepspeed

        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        backend = "dense" if device.type == "cuda" else "csr"
        t = trainer([8.0, 32.0], backend, args.steps)
        engine, optimizer, _, _ = deepspeed.initialize(
            model=t.model,
            optimizer=t.optimizer,
            config={
                "train_micro_batch_size_per_gpu": b,
                "zero_optimization": {"stage": args.zero_stage},
                "zero_allow_untested_optimizer": True,
                "steps_per_print": 1 << 30,
            },
        )
        t.wrap(engine, optimizer)
        report(f"DeepSpeed ZeRO-{args.zero_stage} 8x+32x {backend}", t, time_trainer(t, data, b, args.steps))

    @part("Ray Train TorchTrainer (use_gpu)", args.budget)
    def with_ray() -> None:
        if args.no_ray or not have("ray"):
            print("skipped: ray is not installed" if not args.no_ray else "skipped: --no-ray")
            return
        import numpy as np

        from pipelines.store import Manifest, RunningStats, StoreWriter, write_shard
        from pipelines.train import TrainConfig, run_train

        root = Path(tempfile.mkdtemp(prefix="sae-gpu-store-"))
        rows = b * 64
        x = synthetic(rows, d, 16 * d, device, seed=1).cpu().numpy()
        writer = StoreWriter(root / "store", Manifest("synthetic", [0], d, "float16", 128, n_tokens=rows))
        stats = RunningStats(d)
        for i, part_rows in enumerate(np.array_split(x, 4)):
            n = len(part_rows)
            extra = {
                "token_id": np.zeros(n, np.int32),
                "context": np.zeros(n, np.int64),
                "position": np.ones(n, np.int16),
            }
            writer.record(write_shard(root / "store", i, {0: part_rows}, extra, "float16"))
            stats.update(part_rows)
        writer.finalize({"0": stats.to_dict()}, {})
        cfg = TrainConfig.from_dict(
            {
                "store": str(root / "store"),
                "expansions": [8, 32],
                "k": args.k,
                "batch_size": b,
                "epochs": 2,
                "use_gpu": device.type == "cuda",
                "deepspeed": have("deepspeed"),
                "zero_stage": args.zero_stage,
                "checkpoint_every": 50,
                "log_every": 10,
                "out": str(root / "out"),
                "eval_tokens": 0,
                "track": have("wandb"),
                "cpus_per_worker": 4 if device.type == "cuda" else 1,
            }
        )
        start = time.perf_counter()
        result = run_train(cfg)
        r = result.report
        print(
            f"Ray Train run: {result.steps} steps in {time.perf_counter() - start:.0f} s (Ray start included); "
            f"last interval {r.get('tokens_per_s', 0):,.0f} tok/s, MFU {r.get('mfu', 0):.1%} "
            f"(peak measured by the worker: {r.get('peak_flops', 0) / 1e12:.0f} TFLOP/s); deepspeed={cfg.deepspeed}",
            flush=True,
        )

    @part("sae-lens TopK trainer (same batches)", args.budget)
    def with_sae_lens() -> None:
        if not have("sae_lens"):
            print("skipped: sae_lens is not installed")
            return
        from sae_lens.config import LoggingConfig, SAETrainerConfig
        from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
        from sae_lens.training.sae_trainer import SAETrainer as LensTrainer

        for e in (8, 32):
            sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d, d_sae=e * d, k=args.k, device=device.type))
            cfg = SAETrainerConfig(
                total_training_samples=b * 1000,
                train_batch_size_samples=b,
                lr=SAESpec(expansion=e).learning_rate(d),
                lr_end=1e-5,
                device=device.type,
                autocast=True,
                logger=LoggingConfig(log_to_wandb=False),
            )
            lens = LensTrainer(cfg, sae, data_provider=iter(()))
            lens.activation_scaler.scaling_factor = normalizer.scale
            n_batches = data.shape[0] // b
            for i in range(3 + args.steps):
                if i == 3:
                    sync(device)
                    start = time.perf_counter()
                lens.step(data[(i % n_batches) * b : (i % n_batches + 1) * b])
                lens.n_training_steps += 1
            sync(device)
            print(
                f"sae-lens {e}x k={args.k} (bf16 autocast): {args.steps * b / (time.perf_counter() - start):,.0f} tok/s"
            )

    plain()
    with_deepspeed()
    with_ray()
    with_sae_lens()
    print(f"done in {time.perf_counter() - START:.0f} s")


if __name__ == "__main__":
    main()
