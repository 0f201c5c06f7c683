"""Reading a model's answer off its next-token logits: which tokens spell each label, and the options'
probability mass. Shared by offline evaluation and the serving API (plain torch, no Ray).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import torch

NO_LABEL = -1  # what :func:`top1_label` gives for a top-1 token that spells none of the labels


class ReadoutError(ValueError):
    """Labels that cannot be read out apart (two share their first token)."""


def label_token_ids(tokenizer: Any, labels: Sequence[str]) -> list[list[int]]:
    """For each label, the first token of its spellings (``"Yes"``, ``" Yes"``, ``"yes"``, ``" yes"``; option
    letters only as ``"A"`` and ``" A"``).

    Raises :class:`ReadoutError` if two labels share a first token (the readout could not tell them
    apart): use option letters for such tasks.
    """
    return [list(ids) for ids in _label_token_ids(tokenizer, tuple(labels))]


@lru_cache(maxsize=256)
def _label_token_ids(tokenizer: Any, labels: tuple[str, ...]) -> tuple[tuple[int, ...], ...]:
    out: list[tuple[int, ...]] = []
    owner: dict[int, str] = {}
    for label in labels:
        ids: list[int] = []
        letter = len(label) == 1 and label.isupper()  # " a" is the article, not option A
        spellings = (label, " " + label) if letter else (label, " " + label, label.lower(), " " + label.lower())
        for spelling in dict.fromkeys(spellings):
            first = tokenizer.encode(spelling, add_special_tokens=False)[:1]
            if first and first[0] not in ids:
                ids.append(first[0])
        for i in ids:
            if owner.setdefault(i, label) != label:
                raise ReadoutError(
                    f"labels {owner[i]!r} and {label!r} start with the same token "
                    f"{tokenizer.decode([i])!r}: read out option letters instead"
                )
        out.append(tuple(ids))
    return tuple(out)


def option_probs(logits: torch.Tensor, token_ids: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(probs [B, n_options], coverage [B])`` from next-token logits (or log-probs) ``[B, vocab]``.

    Each option's mass sums its spellings' first tokens; ``probs`` is renormalised over the options and
    ``coverage`` is the total mass the options had before that (how much the model answered on-format).
    """
    p = logits.float().softmax(-1)
    mass = torch.stack([p[:, list(ids)].sum(-1) for ids in token_ids], dim=-1)
    coverage = mass.sum(-1)
    return mass / coverage.clamp_min(1e-30)[:, None], coverage


def top1_label(logits: torch.Tensor, token_ids: Sequence[Sequence[int]]) -> list[int]:
    """The reference code's readout: per row of ``logits [B, vocab]``, the index of the label whose spellings
    include the single most likely next token, or :data:`NO_LABEL` when that token spells no label."""
    owner = {t: i for i, ids in enumerate(token_ids) for t in ids}
    return [owner.get(int(t), NO_LABEL) for t in logits.argmax(-1).tolist()]


__all__ = ["NO_LABEL", "ReadoutError", "label_token_ids", "option_probs", "top1_label"]
