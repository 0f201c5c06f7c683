"""Deterministic context planning for activation collection: documents -> token stream -> fixed windows.

Documents are tokenized in order (no special tokens), joined with EOS, and cut into windows of
``context_size - 1`` tokens, each prefixed with BOS. The plan is prefix-stable: the first ``n``
contexts are the same whatever is asked for later, so shard ``i`` (contexts ``i*k .. i*k+k-1``) always
holds the same text, which is what lets an interrupted collection resume. A trailing partial window
is never used.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator

import numpy as np

from pipelines.records import DataError

TOKENIZE_CHUNK = 64  # documents per tokenizer call


def special_ids(tokenizer) -> tuple[int, int]:
    """``(bos, eos)`` ids of ``tokenizer``; BOS falls back to EOS for tokenizers without one (GPT-2)."""
    eos = tokenizer.eos_token_id
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    if bos is None or eos is None:
        raise DataError(f"tokenizer {type(tokenizer).__name__} has neither a BOS nor an EOS token to pack with")
    return int(bos), int(eos)


def iter_contexts(tokenizer, documents: Iterable[str], context_size: int) -> Iterator[np.ndarray]:
    """Yield contexts ``[context_size]`` (int32, BOS first) packed from ``documents`` in order."""
    if context_size < 2:
        raise DataError(f"context_size must be at least 2 (BOS + one token), got {context_size}")
    bos, eos = special_ids(tokenizer)
    width = context_size - 1
    pending: list[np.ndarray] = []
    pending_len = 0
    docs = iter(documents)
    while True:
        chunk = [d for _, d in zip(range(TOKENIZE_CHUNK), docs, strict=False)]
        if not chunk:
            return
        for ids in tokenizer(chunk, add_special_tokens=False)["input_ids"]:
            pending.append(np.asarray([*ids, eos], dtype=np.int32))
            pending_len += len(ids) + 1
        if pending_len < width:
            continue
        stream = np.concatenate(pending)
        n = len(stream) // width
        for row in stream[: n * width].reshape(n, width):
            yield np.concatenate([np.array([bos], dtype=np.int32), row])
        pending = [stream[n * width :]]
        pending_len = len(pending[0])


def plan_contexts(tokenizer, documents: Iterable[str], context_size: int, n_contexts: int) -> np.ndarray:
    """The first ``n_contexts`` contexts ``[n, context_size]`` (int32); fewer if the corpus runs out."""
    rows = list(itertools.islice(iter_contexts(tokenizer, documents, context_size), n_contexts))
    return np.stack(rows) if rows else np.zeros((0, context_size), dtype=np.int32)


__all__ = ["iter_contexts", "plan_contexts", "special_ids"]
