"""The ``pluristeer`` command line: one sub-command per stage, plus ``demo`` and ``data``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    help="Align a language model to many perspectives: SAE steering vectors + pluralistic decoding on Ray.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

DataOpt = Annotated[Path | None, typer.Option("--data-dir", help="data directory (default: $PLURISTEER_DATA)")]
ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config for this stage")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="override a config field: --set field=value")]


def _check_address(address: str | None) -> str | None:
    from common.raycluster import RayAddressError, check_address

    try:
        return check_address(address)
    except RayAddressError as err:
        raise typer.BadParameter(str(err)) from None


AddressOpt = Annotated[
    str | None,
    typer.Option(
        "--address",
        help="Ray cluster to run on: auto, ray://host:10001 or host:6379 (sets ray_address; default: a local Ray)",
        callback=_check_address,
    ),
]


def _overrides(set_: list[str] | None, address: str | None) -> list[str]:
    """``--set`` overrides plus ``ray_address`` from ``--address`` (quoted: YAML would read some as numbers)."""
    overrides = list(set_ or [])
    if address is not None:
        overrides.append(f"ray_address={json.dumps(address)}")
    return overrides


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _user_errors() -> tuple[type[Exception], ...]:
    """The errors that mean "fix your input" (printed as one line, exit 2), from every layer; imported here
    because the stage modules are heavy (torch, Ray) and ``pluristeer --help`` should stay fast."""
    from common.config import ConfigError
    from common.registry import RegistryError
    from pipelines.prompts import PromptError
    from pipelines.records import DataError
    from pipelines.store import StoreError
    from sae.lm import ModelNotFoundError
    from sae.model import SAEFormatError
    from sae.readout import ReadoutError
    from sae.storage import StorageError
    from sae.vectorset import VectorSetError

    return (
        ConfigError, DataError, PromptError, ReadoutError, RegistryError, StoreError, ModelNotFoundError,
        SAEFormatError, StorageError, VectorSetError,
    )  # fmt: skip


@app.command()
def collect(config: ConfigOpt = None, set_: SetOpt = None, address: AddressOpt = None) -> None:
    """Collect residual-stream activations from a corpus into a sharded store (Ray Data); reruns resume."""
    from pipelines.collect import CollectConfig
    from pipelines.collect import collect as run_collect

    try:
        cfg = CollectConfig.load(config, _overrides(set_, address))
        result = run_collect(cfg)
    except _user_errors() as err:
        _fail(str(err))
    except KeyboardInterrupt:
        _fail("interrupted: complete shards are kept; rerun the same command to resume", code=130)
    m = result.manifest
    typer.echo(
        f"{m.rows:,} tokens x layers {m.layers} ({m.dtype}) in {result.out}: {len(m.shards)} shards, "
        f"{len(result.computed)} computed now, {len(result.skipped)} reused, {result.seconds:.1f} s, "
        f"{result.bytes_per_token:.0f} bytes/token"
    )


@app.command()
def train(config: ConfigOpt = None, set_: SetOpt = None, address: AddressOpt = None) -> None:
    """Train sparse autoencoders (8x, 32x, ...) on an activation store (Ray Train)."""
    from pipelines.train import TrainConfig, run_train
    from sae.train import TrainingDivergedError

    try:
        cfg = TrainConfig.load(config, _overrides(set_, address))
        result = run_train(cfg)
    except _user_errors() as err:
        _fail(str(err))
        return
    except TrainingDivergedError as err:
        _fail(str(err), code=1)
        return
    typer.echo(f"trained {result.steps} steps, {result.tokens} tokens; checkpoint {result.checkpoint}")
    for name, path in result.sae_dirs.items():
        m = {**result.metrics[name]["train"], **result.metrics[name]["eval"]}
        shown = ", ".join(
            f"{key} {m[key]:.4g}"
            for key in (
                "explained_variance",
                "explained_variance_rest",
                "mse",
                "l0",
                "dead_fraction",
                "ce_loss_recovered",
            )
            if key in m
        )
        typer.echo(f"{name}: {path} ({shown})")
        for warning in result.warnings.get(name, []):
            typer.secho(f"warning: {name}: {warning}", fg=typer.colors.YELLOW, err=True)


@app.command()
def vectors(config: ConfigOpt = None, set_: SetOpt = None, address: AddressOpt = None) -> None:
    """Derive per-perspective steering vectors from ≤50 samples and publish them."""
    from pipelines.vectors import VectorConfig, run_vectors

    try:
        run_vectors(VectorConfig.load(config, _overrides(set_, address)))
    except _user_errors() as err:
        _fail(str(err))


@app.command()
def explain(
    vectors: Annotated[str, typer.Argument(help="a VectorSet file, or a registry key name[@version]")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    address: AddressOpt = None,
) -> None:
    """Show a steering vector's top SAE features and the corpus contexts that activate them (fields: see
    ExplainConfig: perspectives, store, corpus, sae, top, contexts, max_tokens, out, relative)."""
    from pipelines.explain import ExplainConfig, explain_command

    try:
        explain_command(ExplainConfig.load(config, [f"vectors={json.dumps(vectors)}", *_overrides(set_, address)]))
    except _user_errors() as err:
        _fail(str(err))


@app.command()
def evaluate(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    address: AddressOpt = None,
    limit: Annotated[int | None, typer.Option(help="test records per perspective (a smoke run); 0: all")] = None,
    sweep: Annotated[bool, typer.Option("--sweep", help="sweep layer and coefficient on the train split")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="plan and count tokens, run nothing")] = False,
) -> None:
    """Run the paper's experiment protocol and write tables, plots and W&B runs."""
    from pipelines.evaluate import EvalConfig, run_evaluate

    overrides = _overrides(set_, address)
    if limit is not None:
        overrides.append(f"limit={limit}")
    if dry_run:
        overrides.append("dry_run=true")
    try:
        cfg = EvalConfig.load(config, overrides)
        if sweep:
            from pipelines.sweep import run_sweep

            run_sweep(cfg)
        else:
            run_evaluate(cfg)
    except _user_errors() as err:
        _fail(str(err))
    except KeyboardInterrupt:
        _fail("interrupted: finished units are kept in the work directory; rerun the same command to resume", 130)


@app.command()
def recommend(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    address: AddressOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="plan and count tokens, run nothing")] = False,
) -> None:
    """Rank zero-/few-shot, CAA, SAE steering (layers x coefficients x fine/coarse) and PD on held-out
    training records; write recommend.md/.json and a serve config for the winner (the test split is not read)."""
    from pipelines.evaluate import EvalConfig
    from pipelines.recommend import run_recommend

    try:
        run_recommend(EvalConfig.load(config, _overrides(set_, address) + (["dry_run=true"] if dry_run else [])))
    except _user_errors() as err:
        _fail(str(err))
    except KeyboardInterrupt:
        _fail("interrupted: finished units are kept in the work directory; rerun the same command to resume", 130)


@app.command()
def serve(config: ConfigOpt = None, set_: SetOpt = None, address: AddressOpt = None) -> None:
    """Serve steered perspectives and pluralistic decoding over HTTP (Ray Serve); Ctrl-C stops it."""
    from serve.app import run_serve
    from serve.config import ServeConfig

    try:
        run_serve(ServeConfig.load(config, _overrides(set_, address)), echo=typer.echo)
    except (*_user_errors(), RuntimeError) as err:
        _fail(str(err))  # RuntimeError: no API keys (serve.auth.AuthError), or Serve could not deploy


@app.command()
def data(data_dir: DataOpt = None) -> None:
    """List the data sets, their splits, record and perspective counts."""
    from pipelines.demo import data_table

    try:
        data_table(data_dir)
    except _user_errors() as err:
        _fail(str(err))


@app.command()
def demo(
    data_dir: DataOpt = None,
    model: Annotated[str, typer.Option(help="'embedded', a local path or a Hugging Face id")] = "embedded",
    out: Annotated[Path, typer.Option(help="where the demo writes its outputs (a rerun resumes)")] = Path("runs/demo"),
    tokens: Annotated[int, typer.Option(help="activation rows to collect for the SAE")] = 200_000,
    limit: Annotated[int, typer.Option(help="test records per perspective in the evaluation slice")] = 20,
    samples: Annotated[int, typer.Option(help="feedback samples per perspective for the vectors")] = 50,
    data: Annotated[
        Path | None, typer.Option("--data", help="your perspective JSONL: vectors, recommend and evaluate on it")
    ] = None,
) -> None:
    """The whole pipeline on a small scale: collect -> train an 8x SAE -> vectors -> evaluate -> results table
    (with --data: collect -> train -> vectors -> recommend -> evaluate on the file's test split)."""
    from pipelines.demo import DemoSettings, run_demo

    if tokens < 4096 or limit < 1 or samples < 1:
        _fail("--tokens must be >= 4096, --limit and --samples >= 1")
    try:
        run_demo(
            data_dir=data_dir,
            model_id=model,
            out=out,
            settings=DemoSettings(tokens=tokens, limit=limit, samples=samples),
            data=data,
        )
    except _user_errors() as err:
        _fail(str(err))
    except KeyboardInterrupt:
        _fail("interrupted: rerun the same command to resume", 130)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
