"""``pluristeer demo``: the whole pipeline on the embedded model, small enough for 2 cores (≤ 15 min).

data sets -> collect residuals (Ray Data) -> train an 8x TopK SAE (Ray Train) -> steering vectors from 50
samples per perspective (published to the registry) -> evaluate a small slice (zero-/few-shot, SAE steering,
pluralistic decoding) -> the results table. Every stage is the real one with small settings; the outputs
land under ``out`` and a rerun resumes what is there.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.markdown import Markdown
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pipelines.collect import CollectConfig, collect
from pipelines.datasets import LOADERS, data_dir, perspectives
from pipelines.evaluate import EvalConfig, run_evaluate
from pipelines.train import TrainConfig, run_train
from pipelines.vectors import VectorConfig, run_vectors

console = Console()

# The progress lines the stages print; the demo turns them into bars.
_COLLECT = re.compile(r"^collect: ([\d,]+)/([\d,]+) tokens")
_UNITS = re.compile(r"^evaluate: unit (\d+)/(\d+)")


@dataclass
class DemoSettings:
    """The demo's small settings (``pluristeer demo --tokens ... --limit ...``)."""

    tokens: int = 200_000  # activation rows collected for the SAE
    epochs: float = 2.0  # SAE training passes over them
    layer: int = 15
    tasks: tuple[str, ...] = ("crowd_truthfulness", "globalopinionqa")
    perspectives: int = 3  # per task
    limit: int = 20  # test records per perspective
    samples: int = 50  # feedback samples per perspective for the vectors
    conditions: tuple[str, ...] = (
        "zero-shot",
        "few-shot",
        "steer-8x-fine",
        "steer-8x-coarse",
        "pd-dvd",
        "pd-dvd+steer",
    )
    # the sweep's picks on the train split (results/smollm2-135m/sweep.json)
    coeffs: tuple[tuple[str, float], ...] = (("crowd_truthfulness", 2.0), ("globalopinionqa", 0.5))


def data_table(data: str | Path | None) -> dict[str, dict[str, int]]:
    """Print (and return) record counts per data set and split."""
    root = data_dir(data)
    table = Table(title=f"data sets in {root}")
    for col in ("data set", "split", "records", "perspectives", "top perspectives"):
        table.add_column(col)
    counts: dict[str, dict[str, int]] = {}
    for name, loader in LOADERS.items():
        splits = ("train", "valid", "test") if name == "crehate" else ("train", "test")
        counts[name] = {}
        for split in splits:
            records = loader(root, split)
            persp = perspectives(records)
            counts[name][split] = len(records)
            top = ", ".join(f"{p} ({n})" for p, n in list(persp.items())[:3])
            table.add_row(name, split, str(len(records)), str(len(persp)), top)
    console.print(table)
    return counts


@contextmanager
def stage_bar(title: str, pattern: re.Pattern[str] | None = None) -> Iterator[Callable[[str], None]]:
    """A progress bar for one stage; yields the ``echo`` to hand the stage (its progress lines move the bar)."""
    columns = (TextColumn(f"[bold]{title}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(title, total=None)

        def echo(line: str) -> None:
            match = pattern.match(line) if pattern else None
            if match:
                done, total = (int(g.replace(",", "")) for g in match.groups())
                progress.update(task, completed=done, total=total)
            else:
                progress.console.print(line, markup=False, highlight=False)

        yield echo
        if progress.tasks[0].total is None:
            progress.update(task, total=1, completed=1)


def run_demo(
    *, data_dir: str | Path | None, model_id: str, out: Path, settings: DemoSettings | None = None
) -> dict[str, Path]:
    """Run the pipeline; returns the paths it wrote (store, SAE, vectors, results)."""

    s = settings or DemoSettings()
    started = time.perf_counter()
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if data_dir is not None:
        import os

        os.environ["PLURISTEER_DATA"] = str(Path(data_dir).resolve())  # the stages read it from there
    paths: dict[str, Path] = {}

    console.rule("[bold]1/5 data")
    data_table(data_dir)

    console.rule(f"[bold]2/5 collect {s.tokens:,} residual rows at layer {s.layer} (Ray Data)")
    cfg_c = CollectConfig.from_dict(
        {
            "model": model_id,
            "layers": [s.layer],
            "n_tokens": s.tokens,
            "contexts_per_shard": 16,
            "out": out / "store",
            "num_actors": 1,
        }
    )
    with stage_bar("collect", _COLLECT) as echo:
        res_c = collect(cfg_c, echo=echo)
    paths["store"] = res_c.out
    console.print(f"store {res_c.out}: {res_c.manifest.rows:,} rows, {res_c.bytes_per_token:,.0f} bytes/row")

    console.rule("[bold]3/5 train an 8x TopK SAE (Ray Train)")
    cfg_t = TrainConfig.from_dict(
        {
            "store": out / "store",
            "expansions": [8],
            "epochs": s.epochs,
            "batch_size": 1024,
            "eval_tokens": 4096,
            "dead_tokens": 50_000,
            "checkpoint_every": 50,
            "output_dir": out / "train",
            "cpus_per_worker": 1,
            "log_every": 25,
        }
    )
    with stage_bar("train"):
        res_t = run_train(cfg_t)
    sae_dir = next(iter(res_t.sae_dirs.values()))
    paths["sae"] = sae_dir
    ev = next(iter(res_t.metrics.values())).get("eval", {})
    console.print(
        f"{sae_dir.name}: {res_t.steps} steps, {res_t.tokens:,} tokens; held-out explained variance "
        f"{ev.get('explained_variance', float('nan')):.3f}, "
        f"CE loss recovered {ev.get('ce_loss_recovered', float('nan')):.3f}"
    )

    console.rule(f"[bold]4/5 steering vectors from {s.samples} samples per perspective (crowd truthfulness)")
    cfg_v = VectorConfig.from_dict(
        {
            "sae": sae_dir,
            "model": model_id,
            "data": "crowd_truthfulness",
            "samples": s.samples,
            "max_perspectives": s.perspectives,
            "out": out / "vectors",
            "name": "demo-truthfulness",
        }
    )
    with stage_bar("vectors"):
        run_vectors(cfg_v, console=console)
    paths["vectors"] = out / "vectors"

    console.rule(f"[bold]5/5 evaluate a slice: {', '.join(s.tasks)}, {s.limit} records × {s.perspectives} perspectives")
    cfg_e = EvalConfig.from_dict(
        {
            "model": model_id,
            "sae_8x": sae_dir,
            "tasks": list(s.tasks),
            "conditions": list(s.conditions),
            "limit": s.limit,
            "max_perspectives": s.perspectives,
            "samples": s.samples,
            "task_coeffs": dict(s.coeffs),
            "pd_k_distribution": s.perspectives,
            "out": out / "results",
            "work_dir": out / "eval-work",
            "name": "demo",
        }
    )
    with stage_bar("evaluate", _UNITS) as echo:
        res_e = run_evaluate(cfg_e, echo=echo)
    paths["results"] = res_e.out

    console.rule("[bold]results")
    table = res_e.out / "table.md"
    if table.exists():
        console.print(Markdown(table.read_text()))
    console.rule(f"[bold green]demo finished in {(time.perf_counter() - started) / 60:.1f} min; outputs in {out}")
    return paths
