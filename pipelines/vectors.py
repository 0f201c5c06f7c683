"""``pluristeer vectors``: feedback pairs -> readout activations -> per-perspective vectors -> VectorSet files,
published to the vector registry (DESIGN §1 steps 1-2, §2).

Per perspective, up to ``samples`` training records are drawn (seeded; records with a rationale first when
``feedback`` is ``auto``) and each gives a pair of prompts (:mod:`pipelines.prompts`): with and without the
perspective's feedback. Every pair of every perspective is tokenized, de-duplicated and read out at
``layer`` in length-sorted batches that stop after ``layer``; the token prefix a pair's two prompts share
runs once into a KV cache and only the two suffixes run on top (``share_prefix``,
:func:`sae.vectors.paired_readouts`). So a task costs a few forward passes, not one per sample. With
``workers > 0`` the perspectives are split across that many Ray tasks (for many perspectives on a cluster);
the coarse vector is pooled from the fine ones on the driver.
"""

from __future__ import annotations

import random
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
import ray
import torch
from pydantic import Field

from common.config import (
    ComputeDtype,
    Count,
    NonNegFloat,
    NonNegInt,
    PathOrURI,
    Positive,
    RaySection,
    StageConfig,
    TorchDevice,
    Tracking,
    check,
)
from common.raycluster import init_ray
from common.registry import RegistryClient
from pipelines.prompts import FeedbackSource, Prompt, PromptSpec, build_prompt, encode_prompts, feedback_text
from pipelines.records import RANK, DataError, PerspectiveRecord
from pipelines.tasks import Task, check_task_settings, get_task, task_name
from pipelines.tracking import Tracker
from sae import storage
from sae.lm import load_lm, load_tokenizer, resolve_device, resolve_model
from sae.model import SparseAutoencoder
from sae.vectors import differences, mean_by_group, paired_readouts, pool, readout_residuals, sparsify
from sae.vectorset import VectorSet, VectorSetMeta, sae_file_hash, sae_fingerprint


@dataclass
class VectorConfig(StageConfig, RaySection, Tracking):
    """Settings of ``pluristeer vectors`` (YAML + ``--set field=value``)."""

    RENAMED: ClassVar[dict[str, str]] = {"data": "task"}

    sae: PathOrURI | None = None  # SAE directory (sae-lens layout); not needed for mode caa
    model: str = "embedded"
    layer: int | None = None  # default: the SAE's hook_layer
    task: str = "mislc"  # a bundled task (globalopinionqa, crehate, mislc, crowd_truthfulness) or a .jsonl file
    templates: dict = field(default_factory=dict)  # JSONL task -> {question, feedback, persona} prompt templates
    test_fraction: float = 0.3  # JSONL tasks: share of each perspective's records held out as test
    split: Literal["train", "valid", "test", "all"] = "train"
    perspectives: list[str] = field(default_factory=list)  # default: the max_perspectives with most samples
    max_perspectives: Annotated[int, Field(ge=0, description="0: all")] = 5
    samples: Count = 50  # per perspective (at most)
    feedback: Literal["auto", "rationale", "answer"] = "auto"
    readout: Literal["last", "after_colon"] = "last"
    mode: Literal["sae", "residual", "caa"] = "sae"
    granularity: Literal["fine", "coarse", "both"] = "both"
    topk: Annotated[int, Field(ge=0, description="0: dense")] = 0  # keep each vector's topk largest entries
    batch_size: Count = 32
    share_prefix: bool = True  # run the prefix a pair's two prompts share once (KV cache), then both suffixes
    max_length: Annotated[int, Field(ge=8)] = 1024  # pairs with a longer prompt (tokens) are skipped
    dtype: ComputeDtype = "float32"
    device: TorchDevice = "auto"
    seed: int = 42
    out: PathOrURI = Path("runs/vectors")
    name: str | None = None  # registry name prefix; default "{task}-{mode}"
    publish: bool = True
    registry_dir: PathOrURI | None = None  # default: the running registry's, else $PLURISTEER_CACHE/registry
    workers: NonNegInt = 0  # > 0: split the perspectives across this many Ray tasks
    worker_cpus: Positive = 1.0
    worker_gpus: NonNegFloat = 0.0  # per Ray task (set with device=auto or cuda on a GPU cluster)

    def validate(self) -> None:
        check(self.mode == "caa" or self.sae is not None, "sae: an SAE directory is required unless mode is 'caa'")
        check_task_settings([self.task], self.templates, self.test_fraction)

    @property
    def task_name(self) -> str:
        return task_name(self.task)

    def resolve_task(self) -> Task:
        return get_task(self.task, templates=self.templates, test_fraction=self.test_fraction, seed=self.seed)

    @property
    def granularities(self) -> list[str]:
        return ["fine", "coarse"] if self.granularity == "both" else [self.granularity]

    def set_name(self, granularity: str) -> str:
        return f"{self.name or f'{self.task_name}-{self.mode}'}-{granularity}"


@dataclass(frozen=True)
class FeedbackPair:
    perspective: str
    record_id: str
    with_feedback: Prompt
    without: Prompt
    source: str  # "rationale" or "answer"


def select_samples(
    records: list[PerspectiveRecord],
    spec: PromptSpec,
    *,
    samples: int,
    seed: int,
    feedback: FeedbackSource = "auto",
    perspectives: Sequence[str] = (),
    max_perspectives: int = 0,
    where: str = "the records",
) -> dict[str, list[PerspectiveRecord]]:
    """Up to ``samples`` usable records per chosen perspective (seeded; rationales first for ``auto``):
    ``perspectives`` if given, else the ``max_perspectives`` (0: all) with the most usable records."""
    usable: dict[str, list[PerspectiveRecord]] = defaultdict(list)
    for r in records:
        if feedback_text(spec, r, feedback) is not None:
            usable[r.perspective].append(r)
    if perspectives:
        unknown = [p for p in perspectives if p not in usable]
        if unknown:
            known = ", ".join(sorted(usable)) or "none"
            raise DataError(f"perspectives {unknown} have no usable records in {where} (have: {known})")
        chosen = list(perspectives)
    else:
        chosen = sorted(usable, key=lambda p: (-len(usable[p]), p))
        chosen = chosen[:max_perspectives] if max_perspectives else chosen
    if not chosen:
        raise DataError(f"no records in {where} have feedback of kind {feedback!r}")
    out: dict[str, list[PerspectiveRecord]] = {}
    for p in chosen:
        rng = random.Random(f"{seed}:{p}")
        pool_ = sorted(usable[p], key=lambda r: r.id)
        rng.shuffle(pool_)
        if feedback == "auto":  # stable sort: records with a rationale first, each group still shuffled
            pool_.sort(key=lambda r: feedback_text(spec, r, "auto")[1] != "rationale")  # type: ignore[index]
        out[p] = pool_[:samples]
    return out


POOLED = "pooled"  # the reference's sampling: one vector from the first items, pooled over perspectives


def pooled_samples(records: Sequence[PerspectiveRecord], *, samples: int, seed: int) -> list[PerspectiveRecord]:
    """The reference code's GlobalOpinionQA rule for one vector pooled over perspectives: the first
    ``samples`` training records in the data set's seeded draw order (``meta["rank"]``: the order in which the
    200 training items were drawn; records without one follow in a seeded shuffle), each answered with one
    option sampled from its own perspective's distribution (seeded per record; a labelled record keeps its
    label). The prompts keep each record's own persona ("You are from the country of {c}")."""
    ranked = sorted(records, key=lambda r: r.id)
    random.Random(f"{seed}:{POOLED}").shuffle(ranked)
    ranked.sort(key=lambda r: r.meta.get(RANK, len(ranked)))  # stable: unranked records keep the shuffle
    out = []
    for r in ranked[:samples]:
        if r.distribution is not None:
            rng = random.Random(f"{seed}:{POOLED}:{r.id}")
            pick = rng.choices(range(len(r.options)), weights=r.distribution)[0]
            r = replace(r, label=pick, distribution=None)
        out.append(r)
    if not out:
        raise DataError("no training records to build a pooled vector from")
    return out


def feedback_pairs(
    cfg: VectorConfig, tokenizer: Any, samples: dict[str, list[PerspectiveRecord]], spec: PromptSpec
) -> list[FeedbackPair]:
    """For each sample, the prompt with the perspective's feedback and the same prompt without it."""
    pairs = []
    for p, records in samples.items():
        for r in records:
            text, source = feedback_text(spec, r, cfg.feedback)  # type: ignore[misc]
            with_fb = build_prompt(tokenizer, spec, r, "with-feedback", feedback=text, readout=cfg.readout)
            without = build_prompt(tokenizer, spec, r, "zero-shot", readout=cfg.readout)
            pairs.append(FeedbackPair(p, r.id, with_fb, without, source))
    return pairs


def config_pairs(cfg: VectorConfig, tokenizer: Any, task: Task | None = None) -> list[FeedbackPair]:
    """The feedback pairs ``cfg`` asks for: its task's ``split`` records, ≤ ``samples`` per chosen perspective."""
    task = task or cfg.resolve_task()
    samples = select_samples(
        task.records(cfg.split), task.prompt, samples=cfg.samples, seed=cfg.seed, feedback=cfg.feedback,
        perspectives=cfg.perspectives, max_perspectives=cfg.max_perspectives,
        where=f"the {cfg.split} split of {cfg.task}",
    )  # fmt: skip
    return feedback_pairs(cfg, tokenizer, samples, task.prompt)


@dataclass
class Readouts:
    fine: dict[str, torch.Tensor]  # unsparsified per-perspective mean differences
    counts: dict[str, int]
    tokens: int  # tokens run through the model (after de-duplication and prefix sharing)
    prompts: int  # distinct prompts run
    skipped: int  # pairs dropped for exceeding max_length


def derive_fine(cfg: VectorConfig, model: Any, tokenizer: Any, sae: Any, layer: int, pairs: list[FeedbackPair]):
    """Fine vectors for ``pairs`` in length-sorted batches: with ``share_prefix``, each distinct pair runs its
    shared prefix once (:func:`sae.vectors.paired_readouts`); otherwise each distinct prompt runs once."""
    texts = list(dict.fromkeys(t for pair in pairs for t in (pair.with_feedback, pair.without)))  # distinct prompts
    ids, positions = encode_prompts(tokenizer, texts)
    row = {t: i for i, t in enumerate(texts)}
    kept = [p for p in pairs if max(len(ids[row[p.with_feedback]]), len(ids[row[p.without]])) <= cfg.max_length]
    if not kept:
        raise DataError(f"every feedback pair is longer than max_length={cfg.max_length} tokens")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if cfg.share_prefix:
        distinct = list(dict.fromkeys((row[p.with_feedback], row[p.without]) for p in kept))
        h_w, h_o, tokens = paired_readouts(
            model, layer, [(ids[w], ids[o]) for w, o in distinct], [(positions[w], positions[o]) for w, o in distinct],
            pad_id=pad_id, batch_size=cfg.batch_size,
        )  # fmt: skip
        at_pair = {pair: j for j, pair in enumerate(distinct)}
        index = [at_pair[(row[p.with_feedback], row[p.without])] for p in kept]
        diffs = differences(h_w[index], h_o[index], mode=cfg.mode, sae=sae)
        fine, counts = mean_by_group(diffs, [p.perspective for p in kept])
        prompts = len({i for pair in distinct for i in pair})
        return Readouts(fine, counts, tokens, prompts, len(pairs) - len(kept))
    used = sorted({row[t] for p in kept for t in (p.with_feedback, p.without)})
    h = readout_residuals(
        model,
        layer,
        [ids[i] for i in used],
        [positions[i] for i in used],
        pad_id=pad_id,
        batch_size=cfg.batch_size,
    )
    at = {i: j for j, i in enumerate(used)}
    h_with = h[[at[row[p.with_feedback]] for p in kept]]
    h_without = h[[at[row[p.without]] for p in kept]]
    fine, counts = mean_by_group(differences(h_with, h_without, mode=cfg.mode, sae=sae), [p.perspective for p in kept])
    return Readouts(fine, counts, sum(len(ids[i]) for i in used), len(used), len(pairs) - len(kept))


def _load_sae(cfg: VectorConfig, device: str):

    if cfg.mode == "caa" and cfg.sae is None:
        return None
    assert cfg.sae is not None
    return SparseAutoencoder.load(cfg.sae, device=device)


def resolve_layer(cfg: VectorConfig, sae: Any) -> int:
    """``cfg.layer``, else the SAE's ``hook_layer``; the two must agree when both are known."""
    hook_layer = None if sae is None else sae.cfg.metadata.get("hook_layer")
    if cfg.layer is not None and hook_layer is not None and int(hook_layer) != cfg.layer:
        raise DataError(f"layer: {cfg.layer} was asked for, but the SAE at {cfg.sae} was trained on layer {hook_layer}")
    layer = cfg.layer if cfg.layer is not None else hook_layer
    if layer is None:
        raise DataError("layer: not set and the SAE records no hook_layer; pass --set layer=N")
    return int(layer)


def _remote_fine(cfg_dict: dict[str, Any], layer: int, pairs: list[FeedbackPair]) -> dict[str, Any]:
    """A Ray task's work: load the model (and SAE), read out ``pairs``; numpy out (no torch pickling)."""

    cfg = VectorConfig.from_dict(cfg_dict)
    device = str(resolve_device(cfg.device))
    model, tokenizer = load_lm(cfg.model, dtype=cfg.dtype, device=device)
    result = derive_fine(cfg, model, tokenizer, _load_sae(cfg, device), layer, pairs)
    return {
        "fine": {p: v.numpy() for p, v in result.fine.items()},
        "counts": result.counts,
        "tokens": result.tokens,
        "prompts": result.prompts,
        "skipped": result.skipped,
    }


def derive_parallel(cfg: VectorConfig, layer: int, pairs: list[FeedbackPair]) -> Readouts:
    """Split the perspectives across ``cfg.workers`` Ray tasks (balanced by pair count); gather fine vectors."""

    init_ray(cfg.ray_address)
    by_persp: dict[str, list[FeedbackPair]] = defaultdict(list)
    for p in pairs:
        by_persp[p.perspective].append(p)
    chunks: list[list[FeedbackPair]] = [[] for _ in range(min(cfg.workers, len(by_persp)))]
    for _, group in sorted(by_persp.items(), key=lambda kv: -len(kv[1])):
        min(chunks, key=len).extend(group)
    task = ray.remote(_remote_fine).options(num_cpus=cfg.worker_cpus, num_gpus=cfg.worker_gpus)
    results = ray.get([task.remote(cfg.to_dict(), layer, chunk) for chunk in chunks if chunk])
    fine: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    for res in results:
        fine.update({p: torch.from_numpy(np.array(v)) for p, v in res["fine"].items()})
        counts.update(res["counts"])
    order = [p for p in dict.fromkeys(pair.perspective for pair in pairs) if p in fine]
    return Readouts(
        {p: fine[p] for p in order},
        {p: counts[p] for p in order},
        sum(r["tokens"] for r in results),
        sum(r["prompts"] for r in results),
        sum(r["skipped"] for r in results),
    )


def vector_sets(cfg: VectorConfig, readouts: Readouts, *, model: str, layer: int, sae: Any, extra: dict[str, Any]):
    """``{granularity: VectorSet}`` from fine readouts (coarse = sample-weighted pool; then top-k)."""

    out = {}
    for granularity in cfg.granularities:
        if granularity == "coarse":
            pooled = pool(readouts.fine, readouts.counts)
            vectors = {p: sparsify(pooled, cfg.topk) for p in readouts.fine}
        else:
            vectors = {p: sparsify(v, cfg.topk) for p, v in readouts.fine.items()}
        meta = VectorSetMeta(
            model=model,
            layer=layer,
            mode=cfg.mode,
            granularity=granularity,
            task=cfg.task_name,
            n_samples=dict(readouts.counts),
            readout=cfg.readout,
            dim=next(iter(vectors.values())).shape[0],
            sae_path=None if sae is None else str(storage.absolute(cfg.sae)),  # type: ignore[arg-type]
            sae_sha256=None if sae is None else sae_file_hash(cfg.sae),  # type: ignore[arg-type]
            sae_fingerprint=None if sae is None else sae_fingerprint(sae),
            extra=extra,
        )
        out[granularity] = VectorSet(vectors, meta)
    return out


@dataclass
class VectorRun:
    paths: dict[str, Path]
    keys: dict[str, str]  # granularity -> name@version (when published)
    sets: dict[str, Any]
    seconds: float  # readout + vector math (model loading excluded)
    tokens: int
    pairs: int


def run_vectors(cfg: VectorConfig, *, console: Any = None) -> VectorRun:
    """The whole stage: records -> pairs -> vectors -> files (+ registry, + W&B)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    task = cfg.resolve_task()
    device = str(resolve_device(cfg.device))
    model = None
    if cfg.workers > 0:  # the Ray tasks load the model; the driver needs the tokenizer and the SAE
        tokenizer = load_tokenizer(cfg.model)
        sae = _load_sae(cfg, "cpu")
    else:
        model, tokenizer = load_lm(cfg.model, dtype=cfg.dtype, device=device)
        sae = _load_sae(cfg, device)
    layer = resolve_layer(cfg, sae)
    pairs = config_pairs(cfg, tokenizer, task)
    started = time.perf_counter()
    if model is None:
        readouts = derive_parallel(cfg, layer, pairs)
    else:
        readouts = derive_fine(cfg, model, tokenizer, sae, layer, pairs)
    seconds = time.perf_counter() - started
    sources = {p: dict(Counter(x.source for x in pairs if x.perspective == p)) for p in readouts.fine}
    extra = {
        "config": cfg.to_dict(),
        "split": task.split_rule,
        "feedback_sources": sources,
        "topk": cfg.topk,
        "pairs": len(pairs) - readouts.skipped,
        "skipped_too_long": readouts.skipped,
        "distinct_prompts": readouts.prompts,
        "tokens": readouts.tokens,
        "seconds": round(seconds, 3),
    }
    sets = vector_sets(cfg, readouts, model=resolve_model(cfg.model).name, layer=layer, sae=sae, extra=extra)

    table = Table(title=f"{cfg.task_name}: {cfg.mode} vectors at layer {layer}")
    for col in ("perspective", "pairs", "rationale / answer", "‖v‖ fine", "L0 fine"):
        table.add_column(col, justify="left" if col == "perspective" else "right")
    for p, v in readouts.fine.items():
        src = sources.get(p, {})
        table.add_row(
            p, str(readouts.counts[p]), f"{src.get('rationale', 0)} / {src.get('answer', 0)}",
            f"{v.norm():.2f}", str(int((v != 0).sum())),
        )  # fmt: skip
    console.print(table)
    console.print(
        f"{len(pairs)} pairs, {readouts.prompts} distinct prompts, {readouts.tokens} tokens in {seconds:.2f} s "
        f"({readouts.tokens / max(seconds, 1e-9):.0f} tokens/s, "
        f"{f'{cfg.workers} Ray tasks' if cfg.workers else 'in-process'})"
    )

    paths: dict[str, Path] = {}
    keys: dict[str, str] = {}
    client = None
    if cfg.publish:
        client = RegistryClient(cfg.registry_dir, address=cfg.ray_address)
    with Tracker("vectors", cfg.to_dict(), cfg.out, mode=None if cfg.track else "disabled") as tracker:
        for granularity, vs in sets.items():
            name = cfg.set_name(granularity)
            paths[granularity] = vs.save(storage.join(cfg.out, f"{name}.safetensors"))
            console.print(f"wrote {paths[granularity]}")
            if client is not None:
                keys[granularity] = client.publish(vs, name)
                console.print(f"published {keys[granularity]} to the registry at {client.root}")
            tracker.log_artifact(paths[granularity], name=name, type="vectors", metadata={"granularity": granularity})
        tracker.summary({"seconds": seconds, "tokens": readouts.tokens, "pairs": len(pairs)})
    return VectorRun(paths, keys, sets, seconds, readouts.tokens, len(pairs))


__all__ = [
    "POOLED",
    "FeedbackPair",
    "Readouts",
    "VectorConfig",
    "VectorRun",
    "config_pairs",
    "derive_fine",
    "derive_parallel",
    "feedback_pairs",
    "pooled_samples",
    "resolve_layer",
    "run_vectors",
    "select_samples",
    "vector_sets",
]
