"""``pluristeer collect``: a text corpus -> an activation store (DESIGN §3), on Ray Data.

The driver plans contexts deterministically (:mod:`pipelines.contexts`; shard ``i`` = contexts
``i*k .. i*k+k-1``), streams the shards that are not done yet through a pool of model actors
(:class:`pipelines.collect_worker.ResidualWorker` in ``map_batches``, one model per actor, ``num_gpus=1``
on GPU or fractional CPUs), and records each finished shard in the manifest (the single writer). Once
the shards ``0..K`` hold at least ``n_tokens`` rows, shard ``K`` is truncated so the store holds exactly
``n_tokens`` rows, statistics are merged from the shard footers, and the manifest is marked complete.

Store dtype: ``store_dtype: auto`` (the default) runs the first shard's contexts through the model once
before any shard is written (:func:`pipelines.collect_worker.probe_range`, a Ray task with an actor's
resources) and picks float16 when the max ``|value|`` times :data:`AUTO_HEADROOM` fits float16's range, else
float32 (Parquet has no bfloat16); the choice and the measured range are recorded in the manifest
(``dtype``, ``dtype_choice``) before the first shard, and a resumed run keeps it. Every shard is still checked
before it is written (non-finite values, values beyond the dtype's range: an error naming the layer and fix).

Resume: complete shards are listed in the manifest and never recomputed; anything else on disk (a shard
an actor wrote after the driver died, a temp file) is recomputed or removed. A dead actor is restarted
by Ray and its shard retried (``max_restarts`` / ``max_task_retries``).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
import ray
import ray.data
from pydantic import Field

from common.config import (
    DTYPE_NAMES,
    ActorPool,
    ComputeDtype,
    ConfigError,
    Count,
    NonNegInt,
    PathOrURI,
    RaySection,
    Resources,
    Retries,
    StageConfig,
    Tracking,
    check,
)
from common.raycluster import init_ray
from pipelines.collect_worker import ResidualWorker, WorkerSpec, probe_range
from pipelines.contexts import plan_contexts
from pipelines.corpus import SOURCES, iter_documents
from pipelines.datasets import data_dir
from pipelines.records import DataError
from pipelines.store import (
    MANIFEST,
    Manifest,
    RunningStats,
    ShardInfo,
    StoreError,
    StoreWriter,
    _to_numpy,
    dtype_max,
    layer_column,
    read_manifest,
    read_shard_metadata,
    read_shard_table,
    write_shard,
)
from pipelines.tracking import Tracker
from sae import storage
from sae.lm import _not_found, load_tokenizer, resolve_model

AUTO = "auto"
# store_dtype=auto picks float16 only when the probe's max |value| times this still fits (later text may
# reach further than the first shard's; a shard that does not fit fails with the fix rather than storing inf).
AUTO_HEADROOM = 4.0
PROBE_CONTEXTS = 64  # at most this many of the first shard's contexts are probed
# Config fields that decide what a shard holds: a resumed run must agree on them.
PLAN_FIELDS = (
    "model",
    "layers",
    "context_size",
    "contexts_per_shard",
    "dtype",
    "store_dtype",
    "corpus",
    "sources",
    "outlier_factor",
)


@dataclass
class CollectConfig(StageConfig, ActorPool, RaySection, Tracking):
    """Activation collection. ``dtype`` is the compute dtype, ``store_dtype`` what the shards hold."""

    RENAMED: ClassVar[dict[str, str]] = {"wandb": "track"}

    model: str = "embedded"  # "embedded", a local directory or a Hugging Face id
    layers: list[NonNegInt] = field(default_factory=lambda: [15])  # resid_post of these blocks, one pass
    context_size: Annotated[int, Field(ge=2, le=32767)] = 128  # tokens per context, BOS included
    n_tokens: Count = 1_000_000  # rows in the finished store (BOS and outliers do not count)
    batch_size: Count = 32  # contexts per forward
    contexts_per_shard: Count = 64  # a shard = this many consecutive contexts (the unit of resume)
    dtype: ComputeDtype = "float32"
    # what the shards hold; auto: float16 when the measured range fits (with AUTO_HEADROOM), else float32
    store_dtype: Annotated[Literal["auto", "float16", "float32"], DTYPE_NAMES] = "auto"
    out: PathOrURI = Path("runs/activations")  # or a URI: s3://bucket/prefix, gs://..., file://...
    corpus: PathOrURI | None = None  # default: <data>/corpus
    sources: list[str] = field(default_factory=lambda: list(SOURCES))  # for the built-in corpus layout
    outlier_factor: float = 10.0  # drop positions with norm > factor x the context's median; <= 0 keeps all
    actor_resources: Resources = field(default_factory=dict)  # custom Ray resources per actor
    max_restarts: Retries = 3  # restarts of a dead actor (Ray Core)
    max_task_retries: Retries = 3  # retries of a shard whose actor died
    compression: Literal["zstd", "lz4", "snappy", "none"] = "zstd"

    def validate(self) -> None:
        check(bool(self.layers), "layers: give at least one layer")
        check(len(set(self.layers)) == len(self.layers), f"layers has duplicates: {self.layers}")
        unknown = sorted(set(self.sources) - set(SOURCES))
        check(not unknown, f"sources: unknown {unknown}; known: {list(SOURCES)}")

    @property
    def rows_per_full_shard(self) -> int:
        return self.contexts_per_shard * (self.context_size - 1)


@dataclass
class CollectResult:
    """What a run did: the finished manifest and this session's work."""

    out: Path
    manifest: Manifest
    computed: list[int]  # shard indices computed by this run
    skipped: list[int]  # shard indices already complete when it started
    seconds: float
    tokens_computed: int  # input tokens (contexts x context_size) run through the model this session
    nodes: set[str]
    shard_times: list[dict[str, Any]]  # per computed shard: started, finished, forward_s, tokens, node, pid

    @property
    def bytes_per_token(self) -> float:
        total = sum(storage.size(storage.join(self.out, s.name)) for s in self.manifest.shards)
        return total / max(self.manifest.rows, 1)


def corpus_dir(cfg: CollectConfig) -> Path:
    if cfg.corpus is not None:
        return cfg.corpus

    return data_dir(flag="--set corpus=DIR (a folder of .txt files)") / "corpus"


def _plan_key(config: dict[str, Any]) -> dict[str, Any]:
    return {k: config.get(k) for k in PLAN_FIELDS}


def _check_resumable(cfg: CollectConfig, plan: dict[str, Any]) -> None:
    """Refuse to resume a store whose shards were planned differently."""
    if not storage.exists(storage.join(cfg.out, "manifest.json")):
        return
    manifest = read_manifest(cfg.out)
    before, plan = _plan_key(manifest.config), dict(plan)
    for side in (before, plan):  # auto means the dtype the store holds: a store made either way resumes
        if side["store_dtype"] == AUTO:
            side["store_dtype"] = manifest.dtype
    diff = {k: (before[k], plan[k]) for k in PLAN_FIELDS if before[k] != plan[k]}
    if diff:
        detail = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
        raise StoreError(
            f"{cfg.out} holds shards collected with other settings ({detail}): "
            "use another output directory, delete it, or set the fields back"
        )


def _model_facts(model: str) -> tuple[str, str | None, int, int]:
    """``(name, revision, d_model, n_layers)`` of ``model`` without loading its weights."""
    from transformers import AutoConfig

    source = resolve_model(model)
    try:
        config = AutoConfig.from_pretrained(source.path)
    except OSError as err:
        raise _not_found(model, err) from err
    revision = getattr(config, "_commit_hash", None)
    return source.name, revision, int(config.hidden_size), int(config.num_hidden_layers)


def _prefix(done: dict[int, ShardInfo], n_tokens: int) -> int | None:
    """The index ``K`` such that complete shards ``0..K`` hold >= ``n_tokens`` rows, or None."""
    total, i = 0, 0
    while i in done:
        total += done[i].rows
        if total >= n_tokens:
            return i
        i += 1
    return None


def _schedule(done: dict[int, ShardInfo], cfg: CollectConfig) -> list[int]:
    """Shards to compute: the missing ones up to where the expected rows reach ``n_tokens``.

    Unknown shards are expected to hold the observed rows-per-shard of complete ones (or 99.5% of a
    full shard before any is done); the driver stops the stream early once the prefix is complete, and
    schedules another round if outliers left it short.
    """
    full = cfg.rows_per_full_shard
    keep_rate = sum(s.rows for s in done.values()) / (len(done) * full) if done else 0.995
    expected = max(1.0, keep_rate * full)
    todo, total, i = [], 0.0, 0
    while total < cfg.n_tokens:
        if i in done:
            total += done[i].rows
        else:
            todo.append(i)
            total += expected
        i += 1
    return todo


def _plan(tokenizer, corpus: Path, cfg: CollectConfig, todo: list[int]) -> np.ndarray:
    """The contexts of shards ``0..max(todo)``; :class:`DataError` when the corpus has too few."""
    need = (max(todo) + 1) * cfg.contexts_per_shard if todo else 0
    contexts = plan_contexts(tokenizer, iter_documents(corpus, cfg.sources), cfg.context_size, need)
    if len(contexts) < need:
        raise DataError(
            f"the corpus in {corpus} yields {len(contexts):,} contexts of {cfg.context_size} tokens, "
            f"fewer than n_tokens={cfg.n_tokens:,} needs: lower n_tokens or add text"
        )
    return contexts


def _truncate(
    root: storage.Location, info: ShardInfo, rows: int, layers: list[int], dtype: str, compression: str
) -> ShardInfo:
    """Rewrite shard ``info`` with its first ``rows`` rows; statistics and drop counts recomputed."""
    path = storage.join(root, info.name)
    meta = read_shard_metadata(path)
    table = read_shard_table(path).slice(0, rows)
    d = table.column(layer_column(layers[0])).type.list_size
    acts = {layer: _to_numpy(table.column(layer_column(layer)), d) for layer in layers}
    extra = {name: table.column(name).to_numpy() for name in ("token_id", "context", "position")}
    ctx = int(meta["context_size"])
    last_context = int(extra["context"][-1]) - int(meta["first_context"])
    covered = last_context * ctx + int(extra["position"][-1]) + 1  # positions up to the last kept row
    bos = last_context + 1
    stats = {}
    for layer, a in acts.items():
        s = RunningStats(d)
        s.update(a)
        stats[str(layer)] = s.state()
    meta.update(
        {"bos": bos, "outlier": covered - bos - rows, "stats": stats, "truncated_from": info.rows, "rows": rows}
    )
    return write_shard(root, info.index, acts, extra, dtype, metadata=meta, compression=compression)


def _merge(root: storage.Location, shards: list[ShardInfo], layers: list[int]) -> tuple[dict[str, Any], dict[str, int]]:
    """Per-layer statistics and drop counts over ``shards``, from their footers."""
    stats: dict[str, RunningStats] = {}
    dropped = {"bos": 0, "outlier": 0}
    for s in shards:
        meta = read_shard_metadata(storage.join(root, s.name))
        if "stats" not in meta:
            raise StoreError(f"{storage.join(root, s.name)}: no statistics in its footer (not written by collect?)")
        for layer in layers:
            part = RunningStats.from_state(meta["stats"][str(layer)])
            if str(layer) in stats:
                stats[str(layer)].merge(part)
            else:
                stats[str(layer)] = part
        dropped["bos"] += int(meta["bos"])
        dropped["outlier"] += int(meta["outlier"])
    return {k: v.to_dict() for k, v in stats.items()}, dropped


class Progress:
    """Tokens/s and ETA on the terminal (one line per recorded shard, at most every ``every`` s)."""

    def __init__(self, n_tokens: int, done_rows: int, every: float = 2.0, echo: Callable[[str], None] = print):
        self.n_tokens, self.start_rows, self.rows = n_tokens, done_rows, done_rows
        self.started = time.perf_counter()
        self.every, self.last, self.echo = every, 0.0, echo

    @property
    def rate(self) -> float:
        return (self.rows - self.start_rows) / max(time.perf_counter() - self.started, 1e-9)

    def update(self, rows: int, *, force: bool = False) -> None:
        self.rows = rows
        now = time.perf_counter()
        if not force and now - self.last < self.every:
            return
        self.last = now
        rate = self.rate
        left = max(self.n_tokens - rows, 0)
        eta = _duration(left / rate) if rate > 0 else "?"
        pct = 100 * min(rows, self.n_tokens) / self.n_tokens
        done = min(rows, self.n_tokens)
        self.echo(f"collect: {done:,}/{self.n_tokens:,} tokens ({pct:.1f}%)  {rate:,.0f} tok/s  ETA {eta}")


def _duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _stream(
    cfg: CollectConfig, spec: WorkerSpec, todo: list[int], contexts: np.ndarray, use_gpu: bool
) -> Iterator[dict[str, Any]]:
    """Run shards ``todo`` through the actor pool; yield one result row per shard as it finishes."""

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    k = cfg.contexts_per_shard
    items = [{"shard": i, "input_ids": contexts[i * k : (i + 1) * k]} for i in todo]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    with warnings.catch_warnings():
        # max_restarts / max_task_retries still travel as ray_remote_args in Ray 2.60 (deprecated name only).
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*")
        ds = ds.map_batches(
            ResidualWorker,
            batch_size=1,  # one shard per call
            compute=ray.data.ActorPoolStrategy(size=min(cfg.num_actors, len(todo)), max_tasks_in_flight_per_actor=2),
            fn_constructor_kwargs={"spec": spec.to_dict()},
            num_cpus=cfg.actor_cpus,
            num_gpus=cfg.actor_gpus if use_gpu else None,
            resources=dict(cfg.actor_resources) or None,
            max_restarts=cfg.max_restarts,
            max_task_retries=cfg.max_task_retries,
        )
    for row in ds.iter_rows():
        yield {k: (v.item() if isinstance(v, np.generic) else v) for k, v in row.items()}


def _manifest(
    cfg: CollectConfig,
    name: str,
    revision: str | None,
    d_model: int,
    store_dtype: str,
    choice: dict[str, Any],
    config: dict[str, Any],
) -> Manifest:
    return Manifest(
        model=name,
        revision=revision,
        layers=list(cfg.layers),
        d_model=d_model,
        dtype=store_dtype,
        context_size=cfg.context_size,
        n_tokens=cfg.n_tokens,
        config=config,
        dtype_choice=choice,
    )


def _probe(cfg: CollectConfig, spec: WorkerSpec, input_ids: np.ndarray, use_gpu: bool) -> dict[str, Any]:
    """:func:`probe_range` as a Ray task with a model actor's resources (where the actors would run)."""
    task = ray.remote(probe_range).options(
        num_cpus=cfg.actor_cpus,
        num_gpus=cfg.actor_gpus if use_gpu else 0,
        resources=dict(cfg.actor_resources) or None,
        max_retries=0,
    )
    return ray.get(task.remote(spec.to_dict(), input_ids))


def choose_store_dtype(probe: dict[str, Any], compute_dtype: str = "float32") -> tuple[str, dict[str, Any]]:
    """``(dtype, record)`` for ``store_dtype: auto`` from :func:`probe_range`'s measurement: float16 when
    ``max |value| · AUTO_HEADROOM`` fits its range, else float32; non-finite residuals are an error."""
    bad = {layer: n for layer, n in probe["nonfinite"].items() if n}
    if bad:
        raise StoreError(
            f"the model's residuals hold non-finite values (inf/NaN) at layers {sorted(bad)} in the first "
            f"{probe['contexts']} contexts with dtype={compute_dtype}: collect with --set dtype=float32"
        )
    peak = max(probe["max_abs"].values(), default=0.0)
    dtype = "float16" if peak * AUTO_HEADROOM <= dtype_max("float16") else "float32"
    record = {
        "requested": AUTO,
        "chosen": dtype,
        "probe_contexts": probe["contexts"],
        "max_abs": probe["max_abs"],
        "max_abs_all": peak,
        "headroom": AUTO_HEADROOM,
        "float16_max": dtype_max("float16"),
    }
    return dtype, record


def collect(cfg: CollectConfig, *, echo: Callable[[str], None] = print) -> CollectResult:
    """Collect ``cfg.n_tokens`` rows of residuals into ``cfg.out`` (resuming what is there)."""

    started = time.perf_counter()
    corpus = corpus_dir(cfg)
    name, revision, d_model, n_layers = _model_facts(cfg.model)
    bad = [layer for layer in cfg.layers if layer >= n_layers]
    if bad:
        raise ConfigError(f"layers: {bad} out of range; {name} has {n_layers} blocks (0..{n_layers - 1})")
    config = {**cfg.to_dict(), "corpus": str(corpus)}
    _check_resumable(cfg, _plan_key(config))
    store_dtype, choice = cfg.store_dtype, {}
    # a resumed run keeps the dtype chosen before shard 0
    if store_dtype == AUTO and storage.exists(storage.join(cfg.out, MANIFEST)):
        existing = read_manifest(cfg.out)
        store_dtype, choice = existing.dtype, existing.dtype_choice
    writer = None  # with auto on a new store: created once the probe chose the dtype, before any shard
    if store_dtype != AUTO:
        writer = StoreWriter(cfg.out, _manifest(cfg, name, revision, d_model, store_dtype, choice, config))
        if writer.manifest.complete:
            echo(f"collect: {cfg.out} is already complete ({writer.manifest.rows:,} tokens)")
            seconds = time.perf_counter() - started
            return CollectResult(cfg.out, writer.manifest, [], sorted(writer.done()), seconds, 0, set(), [])

    tokenizer = load_tokenizer(cfg.model)
    done = writer.done() if writer is not None else {}
    # Plan the first round before Ray starts, so that a corpus too small fails fast.
    todo = _schedule(done, cfg) if _prefix(done, cfg.n_tokens) is None else []
    contexts = _plan(tokenizer, corpus, cfg, todo)
    init_ray(cfg.ray_address)

    resources = ray.cluster_resources()
    use_gpu = cfg.device == "cuda" or (cfg.device == "auto" and resources.get("GPU", 0) > 0)
    nodes = max(1, sum(1 for n in ray.nodes() if n.get("Alive")))
    per_node = math.ceil(cfg.num_actors / nodes)
    spec = WorkerSpec(
        model=cfg.model,
        layers=list(cfg.layers),
        dtype=cfg.dtype,
        store_dtype="float32" if store_dtype == AUTO else store_dtype,
        out=str(storage.absolute(cfg.out)),
        batch_size=cfg.batch_size,
        contexts_per_shard=cfg.contexts_per_shard,
        outlier_factor=cfg.outlier_factor,
        compression=cfg.compression,
        device="cuda" if use_gpu else "cpu",
        threads=cfg.torch_threads,
        actors_per_node=per_node,
    )
    if store_dtype == AUTO:
        probe = _probe(cfg, spec, contexts[: min(cfg.contexts_per_shard, PROBE_CONTEXTS)], use_gpu)
        store_dtype, choice = choose_store_dtype(probe, cfg.dtype)
        spec.store_dtype = store_dtype
        echo(
            f"collect: store_dtype auto -> {store_dtype} "
            f"(max |value| {choice['max_abs_all']:,.1f} in {probe['contexts']} contexts)"
        )
        writer = StoreWriter(cfg.out, _manifest(cfg, name, revision, d_model, store_dtype, choice, config))
    assert writer is not None
    skipped = sorted(done)
    result = CollectResult(cfg.out, writer.manifest, [], skipped, 0.0, 0, set(), [])
    progress = Progress(cfg.n_tokens, sum(s.rows for s in done.values()), echo=echo)
    echo(
        f"collect: {name} layers {cfg.layers} -> {cfg.out} ({len(done)} shards done), {cfg.num_actors} actor(s) "
        f"on {'GPU' if use_gpu else f'CPU ({spec.cpu_threads()} threads each)'}, Ray {ray.__version__}"
    )
    with Tracker("collect", config, storage.local_parent(cfg.out), mode=None if cfg.track else "disabled") as tracker:
        while (last := _prefix(done, cfg.n_tokens)) is None:
            if not todo:  # a later round: outliers left the first one short
                todo = _schedule(done, cfg)
                contexts = _plan(tokenizer, corpus, cfg, todo)
            before = len(done)
            for row in _stream(cfg, spec, todo, contexts, use_gpu):
                if row["error"]:  # the actor refused the shard's values (see write_shard): nothing was written
                    raise StoreError(f"{cfg.out}: {row['error']}")
                info = ShardInfo(index=row["shard"], name=row["name"], rows=row["rows"], sha256=row["sha256"])
                writer.record(info)
                done[info.index] = info
                result.computed.append(info.index)
                result.tokens_computed += row["tokens"]
                result.nodes.add(row["node"])
                result.shard_times.append(
                    {k: row[k] for k in ("shard", "started", "finished", "forward_s", "tokens", "node", "pid")}
                )
                rows = sum(s.rows for s in done.values())
                progress.update(rows)
                tracker.log({"tokens": rows, "tokens_per_s": progress.rate, "shards": len(done)})
                if _prefix(done, cfg.n_tokens) is not None:
                    break  # enough rows: the rest of the stream is cancelled
            if len(done) == before:
                raise StoreError(f"no shard of {todo} finished: see the Ray errors above")
            todo = []
        final = [done[i] for i in range(last + 1)]
        need = cfg.n_tokens - sum(s.rows for s in final[:-1])
        writer.forget([i for i in done if i >= last])  # the last shard is rewritten below
        if final[-1].rows > need:
            final[-1] = _truncate(cfg.out, final[-1], need, cfg.layers, store_dtype, cfg.compression)
        stats, dropped = _merge(cfg.out, final, cfg.layers)
        writer.record(final[-1], save=False)
        manifest = writer.finalize(stats, {**dropped, "outlier_factor": cfg.outlier_factor})
        writer.remove_leftovers()
        progress.update(manifest.rows, force=True)
        result.manifest = manifest
        result.seconds = time.perf_counter() - started
        tracker.summary(
            {
                "tokens": manifest.rows,
                "seconds": result.seconds,
                "bytes_per_token": result.bytes_per_token,
                "tokens_per_s_session": result.tokens_computed / max(result.seconds, 1e-9),
            }
        )
        return result


__all__ = ["CollectConfig", "CollectResult", "Progress", "choose_store_dtype", "collect"]
