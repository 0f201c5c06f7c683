"""The model actor of evaluation: one model (+ SAEs + vector sets) per actor, one unit per call.

``EvalWorker`` is the callable class handed to Ray Data's ``map_batches`` (as collection's
``ResidualWorker`` is). For a unit (:class:`pipelines.eval_plan.Unit`) it runs every distinct prompt
once, in length-sorted batches, keeping the next-token logits and the residual after the steering layer;
every steered row then resumes from that residual (:mod:`sae.resume`: only the blocks after L run),
batched per steering setting with one vector per row. Answers are read out of single rows or combined
over K rows by pluralistic decoding (:func:`sae.decoding.combine`). It also works without Ray (call
:meth:`EvalWorker.run_unit` directly).
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from pipelines.collect_worker import actor_threads
from pipelines.eval_plan import Unit
from sae.decoding import Decoding, combine
from sae.hooks import steer
from sae.lm import load_lm
from sae.model import SparseAutoencoder
from sae.readout import label_token_ids, option_probs, top1_label
from sae.resume import forward_capture, pad_left, position_ids, resume_logits, resume_supported, skipping
from sae.vectorset import VectorSet


@dataclass
class WorkerSpec:
    """What an actor needs (plain values: it travels to the actor when the pool starts)."""

    model: str
    layer: int
    saes: dict[str, str]  # "8x" -> SAE directory
    vectors: dict[str, bytes]  # "{task}/{key}" -> VectorSet file bytes
    dtype: str = "float32"
    device: str = "cpu"
    batch_size: int = 16
    max_batch_tokens: int = 4096
    threads: int = 0  # intra-op threads on CPU; 0: this node's cores / actors_per_node
    actors_per_node: int = 1
    resume: bool = True  # resume steered rows from the cached residual (when the model supports it)

    def cpu_threads(self) -> int:
        return actor_threads(self.threads, self.actors_per_node)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class UnitStats:
    prompts: int = 0
    rows: int = 0
    tokens_full: int = 0  # tokens of full forwards
    tokens_resumed: int = 0  # tokens of steered rows run from the cached residual
    seconds: float = 0.0
    by_phase: dict[str, float] = field(default_factory=dict)


def _batches(order: list[int], lengths: list[int], batch_size: int, max_tokens: int) -> list[list[int]]:
    """Consecutive chunks of ``order`` (sorted by length) within ``batch_size`` rows and ``max_tokens``."""
    out: list[list[int]] = []
    for i in order:
        if out and len(out[-1]) < batch_size and (len(out[-1]) + 1) * lengths[i] <= max_tokens:
            out[-1].append(i)
        else:
            out.append([i])
    return out


class EvalWorker:
    """Ray Data UDF: ``{"unit": [i], "payload": [unit JSON]}`` -> ``{"unit": [i], "result": [JSON]}``."""

    def __init__(self, spec: dict[str, Any]) -> None:

        self.spec = WorkerSpec(**spec)
        if self.spec.device == "cpu":
            torch.set_num_threads(self.spec.cpu_threads())
        self.model, self.tokenizer = load_lm(self.spec.model, dtype=self.spec.dtype, device=self.spec.device)
        self.saes = {k: SparseAutoencoder.load(p, device=self.spec.device) for k, p in self.spec.saes.items()}
        self.sets = {k: VectorSet.from_bytes(v, where=k) for k, v in self.spec.vectors.items()}
        for key, vs in self.sets.items():
            name = key.split("/")[1]
            vs.check(
                self.model,
                layer=self.spec.layer,
                sae=None if name.startswith("caa") else self.saes[name.rsplit("-", 1)[0]],
            )
        self.resume = self.spec.resume and resume_supported(self.model, self.spec.layer)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = [json.dumps(self.run_unit(Unit.from_json(str(p)))) for p in batch["payload"]]
        return {"unit": np.asarray(batch["unit"]), "result": np.asarray(results, dtype=object)}

    # -- forwards ---------------------------------------------------------------------------------------
    def _pad(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, width - len(s) :] = torch.tensor(s)
            mask[i, width - len(s) :] = 1
        dev = self.spec.device
        return ids.to(dev), mask.to(dev)

    def _steer(self, task: str, spec: dict[str, Any], perspectives: list[str]):
        vs = self.sets[f"{task}/{spec['vectors']}"]
        sae = None if spec["mode"] == "caa" else self.saes[spec["vectors"].rsplit("-", 1)[0]]
        return steer(
            self.model, self.spec.layer, [vs[p] for p in perspectives], mode=spec["mode"], sae=sae,
            coeff=spec["coeff"], keep_error=spec["keep_error"], steer_decode=spec["steer_decode"],
            from_position=spec["from_position"],
        )  # fmt: skip

    @torch.inference_mode()
    def run_unit(self, unit: Unit) -> dict[str, Any]:
        """Every output of ``unit``: ``{"outputs": {id: {"probs", "coverage", "top1"}}, "stats": {...}}``."""
        started = time.perf_counter()
        stats = UnitStats(prompts=len(unit.prompts), rows=len(unit.rows))
        ids = [self.tokenizer(t, add_special_tokens=not unit.templated)["input_ids"] for t in unit.prompts]
        lengths = [len(i) for i in ids]
        steered = [r for r, (_, s, _) in enumerate(unit.rows) if s is not None]
        plain = {r: p for r, (p, s, _) in enumerate(unit.rows) if s is None}
        need_hidden = {unit.rows[r][0] for r in steered} if self.resume else set()
        base = sorted(set(plain.values()) | need_hidden, key=lambda p: lengths[p])
        logits: dict[int, torch.Tensor] = {}
        prompt_logits: dict[int, torch.Tensor] = {}
        hidden: dict[int, torch.Tensor] = {}
        for chunk in _batches(base, lengths, self.spec.batch_size, self.spec.max_batch_tokens):
            input_ids, mask = self._pad([ids[p] for p in chunk])
            h, out = forward_capture(self.model, self.spec.layer, input_ids, mask)
            width = input_ids.shape[1]
            for j, p in enumerate(chunk):
                prompt_logits[p] = out[j]
                if p in need_hidden:
                    hidden[p] = h[j, width - lengths[p] :].clone()
            stats.tokens_full += sum(lengths[p] for p in chunk)
        stats.by_phase["prompts"] = time.perf_counter() - started
        for r, p in plain.items():
            logits[r] = prompt_logits[p]
        groups: dict[str, list[int]] = defaultdict(list)
        for r in steered:
            groups[unit.rows[r][1]].append(r)  # type: ignore[index]
        for name, rows in groups.items():
            spec = unit.steers[name]
            rows.sort(key=lambda r: lengths[unit.rows[r][0]])
            row_len = [lengths[unit.rows[r][0]] for r in rows]
            order = list(range(len(rows)))
            for chunk in _batches(order, row_len, self.spec.batch_size, self.spec.max_batch_tokens):
                batch_rows = [rows[i] for i in chunk]
                perspectives = [unit.rows[r][2] for r in batch_rows]
                if self.resume:
                    h, mask = pad_left([hidden[unit.rows[r][0]] for r in batch_rows])
                    with skipping(self.model, self.spec.layer), self._steer(unit.task, spec, perspectives):
                        out = resume_logits(self.model, h, mask)
                    stats.tokens_resumed += sum(row_len[i] for i in chunk)
                else:
                    input_ids, mask = self._pad([ids[unit.rows[r][0]] for r in batch_rows])
                    with self._steer(unit.task, spec, perspectives):
                        out = (
                            self.model(
                                input_ids=input_ids,
                                attention_mask=mask,
                                position_ids=position_ids(mask),
                                use_cache=False,
                            )
                            .logits[:, -1]
                            .float()
                        )
                    stats.tokens_full += sum(row_len[i] for i in chunk)
                for j, r in enumerate(batch_rows):
                    logits[r] = out[j]
        stats.by_phase["steered"] = time.perf_counter() - started - stats.by_phase["prompts"]
        outputs = {o["id"]: self._answer(o, logits) for o in unit.outputs}
        stats.seconds = time.perf_counter() - started
        return {"unit": unit.index, "task": unit.task, "outputs": outputs, "stats": asdict(stats)}

    def _answer(self, output: dict[str, Any], logits: dict[int, torch.Tensor]) -> dict[str, Any]:

        token_ids = label_token_ids(self.tokenizer, tuple(output["labels"]))
        if output["decoding"] is None:
            scores = logits[output["rows"][0]][None]
        else:
            d = Decoding(**output["decoding"])
            stacked = torch.stack([logits[r] for r in output["rows"]])[:, None]
            base = logits[output["base"]][None] if output["base"] is not None else None
            scores = combine(stacked, base, d)
        probs, coverage = option_probs(scores, token_ids)
        return {"probs": [round(float(x), 6) for x in probs[0]], "coverage": round(float(coverage[0]), 6),
                "top1": top1_label(scores, token_ids)[0]}  # fmt: skip


__all__ = ["EvalWorker", "UnitStats", "WorkerSpec"]
