"""``pluristeer explain``: what a steering vector is made of — its top SAE features, the corpus contexts that
activate each most, and the tokens each feature's decoder direction promotes (logit lens).

Contexts come from an activation store (:mod:`pipelines.store`: its ``token_id``/``context``/``position``
columns give each row's surrounding tokens) or from a small scan of corpus text. Output: rich tables in
the terminal and a Markdown report.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.config import ConfigError, Count, PathOrURI, RaySection, StageConfig, check
from common.registry import RegistryClient
from pipelines.corpus import iter_documents
from pipelines.datasets import data_dir
from pipelines.store import ActivationStore, read_manifest
from sae.atomic import atomic_write_text
from sae.hooks import residuals
from sae.lm import load_lm
from sae.model import SparseAutoencoder
from sae.vectors import encode, pool
from sae.vectorset import VectorSet


@dataclass
class Context:
    activation: float
    before: str
    token: str
    after: str


@dataclass
class FeatureReport:
    feature: int
    weight: float  # the vector's entry
    density: float  # fraction of scanned tokens on which the feature fires
    contexts: list[Context] = field(default_factory=list)
    promotes: list[str] = field(default_factory=list)


@dataclass
class Explanation:
    perspective: str
    features: list[FeatureReport]
    scanned_tokens: int
    source: str  # where the contexts came from


def top_features(vector: torch.Tensor, k: int = 10) -> list[tuple[int, float]]:
    """The ``k`` entries of largest magnitude, as ``(feature, weight)``, largest first (zeros left out)."""
    k = min(k, int((vector != 0).sum()))
    if k == 0:
        return []
    index = vector.abs().topk(k).indices
    return [(int(i), float(vector[i])) for i in index]


@dataclass
class TokenTable:
    """Rows of scanned tokens: ``token_id``, ``context``, ``position`` per row, and each context's tokens."""

    token_id: np.ndarray
    context: np.ndarray
    position: np.ndarray
    tokens: dict[int, dict[int, int]]  # context -> position -> token id

    @classmethod
    def from_columns(cls, token_id: np.ndarray, context: np.ndarray, position: np.ndarray) -> TokenTable:
        tokens: dict[int, dict[int, int]] = defaultdict(dict)
        for t, c, p in zip(token_id.tolist(), context.tolist(), position.tolist(), strict=True):
            tokens[c][p] = t
        return cls(token_id, context, position, dict(tokens))


class TopActivations:
    """Streaming top-``n`` activations (and their row numbers) of a few features."""

    def __init__(self, features: Sequence[int], n: int) -> None:
        self.features = list(features)
        self.n = n
        self.values = torch.full((0, len(self.features)), -1.0)
        self.rows = torch.zeros((0, len(self.features)), dtype=torch.long)
        self.active = torch.zeros(len(self.features), dtype=torch.long)
        self.seen = 0

    def update(self, feats: torch.Tensor) -> None:
        """``feats``: dense activations ``[rows, d_sae]`` of the next rows."""
        chosen = feats[:, self.features]
        rows = torch.arange(self.seen, self.seen + len(feats))[:, None].expand_as(chosen)
        self.active += (chosen > 0).sum(0)
        values = torch.cat([self.values, chosen])
        all_rows = torch.cat([self.rows, rows])
        top = values.topk(min(self.n, len(values)), dim=0)
        self.values, self.rows = top.values, all_rows.gather(0, top.indices)
        self.seen += len(feats)


def scan_store(store_dir: str | Path, layer: int, sae: Any, features: Sequence[int], *, max_tokens: int, n: int):
    """Top activations of ``features`` over the first ``max_tokens`` rows of an activation store."""

    store = ActivationStore(store_dir)
    x = store.read(layer, limit=max_tokens)
    top = TopActivations(features, n)
    for chunk in x.split(4096):
        top.update(encode(sae, chunk))
    columns = [store.read_column(c)[: len(x)] for c in ("token_id", "context", "position")]
    return top, TokenTable.from_columns(*columns)


def scan_texts(
    model: Any,
    tokenizer: Any,
    sae: Any,
    layer: int,
    texts: Iterable[str],
    features: Sequence[int],
    *,
    max_tokens: int,
    n: int,
    context_size: int = 128,
    per_document: int = 256,
    batch_size: int = 16,
    outlier: float = 10.0,
):
    """Top activations of ``features`` over about ``max_tokens`` tokens of ``texts`` (read at ``layer``; position
    0 and norm outliers dropped, as collection does), at most ``per_document`` tokens from each text."""

    contexts: list[list[int]] = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:per_document]
        contexts += [ids[i : i + context_size] for i in range(0, max(len(ids) - 8, 1), context_size)]
        if sum(len(c) for c in contexts) >= max_tokens:
            break
    top = TopActivations(features, n)
    cols: dict[str, list[np.ndarray]] = {"token_id": [], "context": [], "position": []}
    device = next(model.parameters()).device
    for start in range(0, len(contexts), batch_size):
        batch = contexts[start : start + batch_size]
        width = max(len(c) for c in batch)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, c in enumerate(batch):  # right padding: positions count from 0 in every row
            ids[i, : len(c)] = torch.tensor(c)
            mask[i, : len(c)] = 1
        hidden = residuals(model, [layer], ids.to(device), mask.to(device))[layer].float().cpu()
        norms = hidden.norm(dim=-1)
        keep = mask.bool() & (norms < outlier * norms[:, 1:].median())
        keep[:, 0] = False
        r, c = keep.nonzero(as_tuple=True)
        top.update(encode(sae, hidden[r, c]))
        cols["token_id"].append(ids[r, c].numpy())
        cols["context"].append((r + start).numpy())
        cols["position"].append(c.numpy())
    table = TokenTable.from_columns(*(np.concatenate(v) if v else np.zeros(0, dtype=np.int64) for v in cols.values()))
    return top, table


_SOURCE_DIRS = {"wikitext2": "wikitext2_raw", "enwiki": "enwiki_wikiextractor_sample", "ag_news": "ag_news_test"}
# (the folders pipelines.corpus.iter_documents reads for each source)


def mixed_documents(corpus: str | Path) -> Iterator[str]:
    """The corpus's documents, alternating between its sources (so a short scan sees all of them)."""

    present = [s for s, folder in _SOURCE_DIRS.items() if (Path(corpus) / folder).is_dir()]
    if not present:  # a plain folder of .txt files
        yield from iter_documents(corpus)
        return
    for docs in itertools.zip_longest(*(iter_documents(corpus, [s]) for s in present)):
        yield from (d for d in docs if d is not None)


def _context(tokenizer: Any, table: TokenTable, row: int, before: int, after: int) -> tuple[str, str, str]:
    ctx, pos = int(table.context[row]), int(table.position[row])
    tokens = table.tokens.get(ctx, {})
    left = [tokens[p] for p in range(pos - before, pos) if p in tokens]
    right = [tokens[p] for p in range(pos + 1, pos + 1 + after) if p in tokens]
    return tokenizer.decode(left), tokenizer.decode([int(table.token_id[row])]), tokenizer.decode(right)


def logit_lens(model: Any, tokenizer: Any, sae: Any, feature: int, k: int = 6) -> list[str]:
    """Tokens whose unembedding aligns most with the feature's decoder direction."""
    unembed = model.get_output_embeddings().weight
    scores = unembed @ sae.W_dec[feature].to(unembed)
    return [tokenizer.decode([int(i)]) for i in scores.topk(k).indices]


def explain_vector(
    vector: torch.Tensor,
    perspective: str,
    sae: Any,
    tokenizer: Any,
    *,
    features: Sequence[int],
    top: TopActivations,
    table: TokenTable,
    source: str,
    model: Any = None,
    before: int = 12,
    after: int = 4,
) -> Explanation:
    """Assemble the report for ``features`` of ``vector`` from a finished scan that covered them."""
    reports = []
    for f in features:
        j = top.features.index(f)
        contexts = []
        for value, row in zip(top.values[:, j].tolist(), top.rows[:, j].tolist(), strict=True):
            if value <= 0:
                break
            contexts.append(Context(value, *_context(tokenizer, table, row, before, after)))
        promotes = logit_lens(model, tokenizer, sae, f) if model is not None else []
        reports.append(FeatureReport(f, float(vector[f]), float(top.active[j]) / max(top.seen, 1), contexts, promotes))
    return Explanation(perspective, reports, top.seen, source)


def _one_line(text: str) -> str:
    return text.replace("\n", "⏎").replace("\r", "")


def render(explanation: Explanation, console: Any = None) -> None:
    """Print an explanation as a rich table."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    e = explanation
    table = Table(title=f"{e.perspective}: top SAE features ({e.scanned_tokens} tokens of {e.source})", show_lines=True)
    for col in ("feature", "weight", "density", "promotes", "top contexts (activation)"):
        table.add_column(col, overflow="fold")
    for f in explanation.features:
        lines = [
            f"[dim]{c.activation:5.1f}[/] {escape(_one_line(c.before)[-60:])}"
            f"[bold reverse]⟦{escape(_one_line(c.token))}⟧[/]{escape(_one_line(c.after))}"
            for c in f.contexts[:3]
        ]
        table.add_row(
            str(f.feature),
            f"{f.weight:+.3f}",
            f"{100 * f.density:.2f}%",
            escape(" ".join(repr(t) for t in f.promotes[:5])),
            "\n".join(lines) or "[dim](never active in the scan)[/]",
        )
    console.print(table)


def to_markdown(explanations: Sequence[Explanation], title: str) -> str:
    """A Markdown report of one or more explanations."""
    out = [f"# {title}", ""]
    for e in explanations:
        out += [f"## {e.perspective}", "", f"Contexts from {e.scanned_tokens} tokens of {e.source}.", ""]
        out += ["| feature | weight | density | promotes |", "|---:|---:|---:|---|"]
        for f in e.features:
            promotes = ", ".join(f"`{t.strip() or repr(t)}`" for t in f.promotes[:5])
            out.append(f"| {f.feature} | {f.weight:+.3f} | {100 * f.density:.2f}% | {promotes} |")
        out.append("")
        for f in e.features:
            out += [f"### feature {f.feature} (weight {f.weight:+.3f})", ""]
            if not f.contexts:
                out += ["(never active in the scan)", ""]
            for c in f.contexts:
                text = f"{_one_line(c.before)}**⟦{_one_line(c.token)}⟧**{_one_line(c.after)}".replace("|", r"\|")
                out.append(f"- `{c.activation:.1f}` {text}")
            out.append("")
    return "\n".join(out)


def run_explain(
    vector_set: Any,
    sae: Any,
    tokenizer: Any,
    *,
    perspectives: Sequence[str] = (),
    store: str | Path | None = None,
    corpus: str | Path | None = None,
    model: Any = None,
    k: int = 10,
    contexts: int = 5,
    max_tokens: int = 20_000,
    relative: bool = False,
) -> list[Explanation]:
    """Explain ``perspectives`` (default: all) of a vector set: one scan (store or corpus) for the union of
    their top features. ``relative``: explain what sets each perspective apart, ``v_p`` minus the
    sample-weighted mean of the set's vectors. Needs ``model`` for a corpus scan and for the logit lens."""

    if vector_set.meta.mode == "caa":
        raise ConfigError("a caa vector set lives in the residual stream, not in SAE features: nothing to explain")
    names = list(perspectives) or vector_set.perspectives
    unknown = [p for p in names if p not in vector_set.vectors]
    if unknown:
        raise ConfigError(f"no perspective {unknown} in this set; it has {vector_set.perspectives}")
    vectors = {p: vector_set[p] for p in names}
    if relative:
        counts = {p: vector_set.meta.n_samples.get(p, 1) for p in vector_set.perspectives}
        mean = pool(vector_set.vectors, counts)
        vectors = {p: v - mean for p, v in vectors.items()}
    chosen = {p: [f for f, _ in top_features(vectors[p], k)] for p in names}
    union = sorted({f for fs in chosen.values() for f in fs})
    layer = vector_set.meta.layer
    if store is not None:
        top, table = scan_store(store, layer, sae, union, max_tokens=max_tokens, n=contexts)
        source = f"the activation store {store}"
    elif corpus is not None:
        if model is None:
            raise ValueError("a corpus scan needs the model")
        texts = mixed_documents(corpus)
        top, table = scan_texts(model, tokenizer, sae, layer, texts, union, max_tokens=max_tokens, n=contexts)
        source = f"the corpus {corpus}"
    else:
        raise ConfigError("give an activation store or a corpus directory to find contexts in")
    label = "{} (relative to the mean of the set)" if relative else "{}"
    return [
        explain_vector(
            vectors[p],
            label.format(p),
            sae,
            tokenizer,
            features=chosen[p],
            top=top,
            table=table,
            source=source,
            model=model,
        )
        for p in names
    ]


@dataclass
class ExplainConfig(StageConfig, RaySection):
    """Settings of ``pluristeer explain VECTORS`` (YAML + ``--set field=value``)."""

    vectors: str = ""  # a VectorSet file, or a registry key name[@version] (the CLI's argument)
    perspectives: list[str] = field(default_factory=list)  # default: every perspective of the set
    store: PathOrURI | None = None  # an activation store to find the contexts in (made with the set's model)
    corpus: PathOrURI | None = None  # a corpus to scan instead; default (no store): <data dir>/corpus
    sae: PathOrURI | None = None  # default: the SAE the set records
    top: Count = 10  # features per perspective
    contexts: Count = 5  # contexts per feature
    max_tokens: Count = 20_000  # tokens scanned
    out: PathOrURI | None = None  # also write a Markdown report here
    relative: bool = False  # explain v_p minus the set's mean: what sets p apart

    def validate(self) -> None:
        check(bool(self.vectors.strip()), "vectors: give a VectorSet file or a registry key")


def explain_command(cfg: ExplainConfig, *, console: Any = None) -> list[Explanation]:
    """``pluristeer explain``: load the set (file or registry key), its SAE and model, scan, print, write."""
    from rich.console import Console

    console = console or Console()
    source = cfg.vectors
    vector_set = (
        VectorSet.load(source) if Path(source).is_file() else RegistryClient(address=cfg.ray_address).get(source)
    )
    meta = vector_set.meta
    sae_path = cfg.sae or (Path(meta.sae_path) if meta.sae_path else None)
    if sae_path is None:
        raise ConfigError(f"sae: {source} records no SAE; pass --set sae=DIR")
    sae = SparseAutoencoder.load(sae_path)
    model, tokenizer = load_lm(model_id(meta.model))
    vector_set.check(model, sae=sae)
    store, corpus = cfg.store, cfg.corpus
    if store is None and corpus is None:
        corpus = data_dir() / "corpus"
    if store is not None:
        made_with = read_manifest(store).model
        if made_with != meta.model:
            raise ConfigError(f"store: {store} holds activations of {made_with!r}, the set is for {meta.model!r}")
    explanations = run_explain(
        vector_set, sae, tokenizer, perspectives=cfg.perspectives, store=store, corpus=corpus, model=model,
        k=cfg.top, contexts=cfg.contexts, max_tokens=cfg.max_tokens, relative=cfg.relative,
    )  # fmt: skip
    for e in explanations:
        render(e, console)
    if cfg.out is not None:
        title = f"{meta.task} {meta.mode} vectors ({meta.granularity}, layer {meta.layer}): {source}"
        atomic_write_text(cfg.out, to_markdown(explanations, title))
        console.print(f"wrote {cfg.out}")
    return explanations


def model_id(recorded: str) -> str:
    """The :func:`sae.lm.load_lm` id for a model name recorded in an artifact (``embedded:...`` -> ``embedded``)."""
    return "embedded" if recorded.startswith("embedded:") else recorded


__all__ = [
    "Context",
    "ExplainConfig",
    "Explanation",
    "FeatureReport",
    "TokenTable",
    "TopActivations",
    "explain_command",
    "explain_vector",
    "logit_lens",
    "model_id",
    "render",
    "run_explain",
    "scan_store",
    "scan_texts",
    "to_markdown",
    "top_features",
]
