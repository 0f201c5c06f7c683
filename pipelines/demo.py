"""``pluristeer demo``: the whole pipeline on the embedded model, small enough for 2 cores (≤ 15 min).

data sets -> collect residuals (Ray Data) -> train an 8x TopK SAE (Ray Train) -> steering vectors from 50
samples per perspective (published to the registry) -> evaluate a small slice (zero-/few-shot, SAE steering,
pluralistic decoding) -> the results table. Every stage is the real one with small settings; the outputs
land under ``out`` and a rerun resumes what is there.

``pluristeer demo --data my.jsonl`` runs it on the user's perspective file instead: its splits ->
collect -> train -> vectors -> ``recommend`` on the training records -> evaluate the recommendation (and
the usual conditions, at its coefficient) on the test split -> both tables.
"""

from __future__ import annotations

import os
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
from pipelines.datasets import data_dir, perspectives
from pipelines.eval_plan import ALL_CONDITIONS
from pipelines.evaluate import EvalConfig, run_evaluate
from pipelines.recommend import run_recommend
from pipelines.tasks import BUNDLED, Task, get_task
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
    # --data: what recommend compares, and the user's perspectives evaluated (0: all)
    recommend_coeffs: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)
    data_perspectives: int = 10
    data_conditions: tuple[str, ...] = (
        "zero-shot",
        "few-shot",
        "steer-8x-fine",
        "steer-8x-coarse",
        "caa-fine",
        "pd-dvd",
        "pd-dvd+steer",
    )


def data_table(data: str | Path | None) -> dict[str, dict[str, int]]:
    """Print (and return) record counts per data set and split."""
    root = data_dir(data)
    table = Table(title=f"data sets in {root}")
    for col in ("data set", "split", "records", "perspectives", "top perspectives"):
        table.add_column(col)
    counts: dict[str, dict[str, int]] = {}
    for name, task in BUNDLED.items():
        counts[name] = {}
        for split in task.splits:
            records = task.records(split, root)
            persp = perspectives(records)
            counts[name][split] = len(records)
            top = ", ".join(f"{p} ({n})" for p, n in list(persp.items())[:3])
            table.add_row(name, split, str(len(records)), str(len(persp)), top)
    console.print(table)
    return counts


def task_table(task: Task) -> None:
    """Print a user task's records per split and perspective."""
    table = Table(title=f"{task.name} ({task.kind}; {task.source}; split: {task.split_rule.get('rule', '?')})")
    for col in ("split", "records", "perspectives", "records per perspective"):
        table.add_column(col)
    for split in task.splits:
        persp = perspectives(task.records(split))
        shown = ", ".join(f"{p} ({n})" for p, n in list(persp.items())[:6]) + (" ..." if len(persp) > 6 else "")
        table.add_row(split, str(sum(persp.values())), str(len(persp)), shown)
    console.print(table)


def evaluated_conditions(s: DemoSettings, winner: dict | None) -> tuple[list[str], dict[str, float]]:
    """``(conditions, EvalConfig overrides)`` evaluating the recommendation on the test split: the demo's
    conditions plus the winner's own, at the winner's coefficient (or the best steered candidate's)."""
    names = list(s.data_conditions)
    overrides: dict[str, float] = {}
    if winner is None:
        return names, overrides
    method, g, m = winner["method"], winner["granularity"], winner["decoding"]
    own = {"few-shot": "few-shot", "pd": f"pd-{m}", "caa": "caa-fine", "sae": f"steer-{winner['sae']}-{g}",
           "pd+steer": f"pd-{m}+steer"}.get(method)  # fmt: skip
    if own in ALL_CONDITIONS and own not in names:
        names.append(own)
    if method == "caa":
        overrides["caa_coeff"] = winner["coeff"]
    elif winner["coeff"] is not None:
        overrides["coeff"] = winner["coeff"]
    return names, overrides


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
    *,
    data_dir: str | Path | None,
    model_id: str,
    out: Path,
    settings: DemoSettings | None = None,
    data: Path | None = None,
) -> dict[str, Path]:
    """Run the pipeline (on the user's JSONL ``data`` if given); returns the paths it wrote."""

    s = settings or DemoSettings()
    started = time.perf_counter()
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if data_dir is not None:
        os.environ["PLURISTEER_DATA"] = str(Path(data_dir).resolve())  # the stages read it from there
    user = get_task(str(data), seed=42) if data is not None else None  # bad files fail here, before any work
    n = 6 if user is not None else 5
    paths: dict[str, Path] = {}

    console.rule(f"[bold]1/{n} data")
    if user is not None:
        task_table(user)
    else:
        data_table(data_dir)
    paths["sae"] = sae_dir = collect_and_train(s, model_id, out, n)
    if user is not None:
        paths |= user_pipeline(s, model_id, out, sae_dir, user, str(data))
    else:
        paths |= bundled_pipeline(s, model_id, out, sae_dir)
    console.rule(f"[bold green]demo finished in {(time.perf_counter() - started) / 60:.1f} min; outputs in {out}")
    return paths


def collect_and_train(s: DemoSettings, model_id: str, out: Path, n: int) -> Path:
    """Stages 2 and 3: the activation store and an 8x SAE trained on it; returns the SAE directory."""
    console.rule(f"[bold]2/{n} collect {s.tokens:,} residual rows at layer {s.layer} (Ray Data)")
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
    console.print(f"store {res_c.out}: {res_c.manifest.rows:,} rows, {res_c.bytes_per_token:,.0f} bytes/row")

    console.rule(f"[bold]3/{n} train an 8x TopK SAE (Ray Train)")
    cfg_t = TrainConfig.from_dict(
        {
            "store": out / "store",
            "expansions": [8],
            "epochs": s.epochs,
            "batch_size": 1024,
            "eval_tokens": min(4096, max(512, s.tokens // 8)),  # held out: an eighth of the training rows
            "dead_tokens": 50_000,
            "checkpoint_every": 50,
            "out": out / "train",
            "cpus_per_worker": 1,
            "log_every": 25,
        }
    )
    with stage_bar("train"):
        res_t = run_train(cfg_t)
    sae_dir = next(iter(res_t.sae_dirs.values()))
    ev = next(iter(res_t.metrics.values())).get("eval", {})
    console.print(
        f"{sae_dir.name}: {res_t.steps} steps, {res_t.tokens:,} tokens; held-out explained variance "
        f"{ev.get('explained_variance', float('nan')):.3f}, "
        f"CE loss recovered {ev.get('ce_loss_recovered', float('nan')):.3f}"
    )
    return sae_dir


def bundled_pipeline(s: DemoSettings, model_id: str, out: Path, sae_dir: Path) -> dict[str, Path]:
    """Stages 4 and 5 on the bundled data sets: vectors (crowd truthfulness) and the evaluation slice."""
    console.rule(f"[bold]4/5 steering vectors from {s.samples} samples per perspective (crowd truthfulness)")
    cfg_v = VectorConfig.from_dict(
        {
            "sae": sae_dir,
            "model": model_id,
            "task": "crowd_truthfulness",
            "samples": s.samples,
            "max_perspectives": s.perspectives,
            "out": out / "vectors",
            "name": "demo-truthfulness",
        }
    )
    with stage_bar("vectors"):
        run_vectors(cfg_v, console=console)

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
    _show(res_e.out / "table.md", "results")
    return {"vectors": out / "vectors", "results": res_e.out}


def user_pipeline(s: DemoSettings, model_id: str, out: Path, sae_dir: Path, task: Task, data: str) -> dict[str, Path]:
    """Stages 4-6 on the user's JSONL: vectors, recommend (train split), the evaluation of its pick (test split)."""
    console.rule(f"[bold]4/6 steering vectors from ≤{s.samples} training records per perspective ({task.name})")
    cfg_v = VectorConfig.from_dict(
        {
            "sae": sae_dir,
            "model": model_id,
            "task": data,
            "samples": s.samples,
            "max_perspectives": s.data_perspectives,
            "out": out / "vectors",
            "name": task.name,
        }
    )
    with stage_bar("vectors"):
        run_vectors(cfg_v, console=console)

    shared = {
        "model": model_id,
        "sae_8x": sae_dir,
        "tasks": [data],
        "max_perspectives": s.data_perspectives,
        "samples": s.samples,
        "work_dir": out / "eval-work",
    }
    console.rule(f"[bold]5/6 recommend on held-out training records (c ∈ {list(s.recommend_coeffs)})")
    cfg_r = EvalConfig.from_dict(
        {
            **shared,
            "sweep_coeffs": list(s.recommend_coeffs),
            "sweep_limit": 0,
            "out": out / "recommend",
            "name": "demo-recommend",
        }
    )
    with stage_bar("recommend", _UNITS) as echo:
        report = run_recommend(cfg_r, echo=echo)
    entry = report["tasks"][task.name]
    _show(out / "recommend" / "recommend.md", "recommendation (train split)")
    winner = next((r for r in entry["ranking"] if r["candidate"] == entry["winner"]), None)
    if winner is None:  # evaluate the best-ranked steering anyway, so the test split shows what it does
        winner = next((r for r in entry["ranking"] if r["coeff"] is not None), None)
    conditions, coeffs = evaluated_conditions(s, winner)

    console.rule(f"[bold]6/6 evaluate on the test split: {', '.join(conditions)}")
    cfg_e = EvalConfig.from_dict(
        {
            **shared,
            **coeffs,
            "conditions": conditions,
            "pd_k_distribution": min(6, s.data_perspectives),
            "out": out / "results",
            "name": "demo-data",
        }
    )
    with stage_bar("evaluate", _UNITS) as echo:
        res_e = run_evaluate(cfg_e, echo=echo)
    _show(res_e.out / "table.md", "results (test split)")
    paths = {"vectors": out / "vectors", "recommend": out / "recommend", "results": res_e.out}
    if "serve_config" in entry:
        paths["serve_config"] = Path(entry["serve_config"])
        console.print(
            f"serve the recommendation: PLURISTEER_API_KEYS=<key> pluristeer serve -c {entry['serve_config']}"
        )
    return paths


def _show(path: Path, title: str) -> None:
    console.rule(f"[bold]{title}")
    if path.exists():
        console.print(Markdown(path.read_text()))
