"""``pluristeer demo``: the main job on the embedded model, as far as the stages exist.

Now: data sets -> load the embedded model -> per-country answers to an opinion question (zero-shot
option probabilities) -> residual-stream statistics at a middle layer. Later stages join as they land.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from pipelines.datasets import LOADERS, data_dir, perspectives

console = Console()


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


def option_probabilities(model, tokenizer, prompts: list[str], options: list[str]) -> torch.Tensor:
    """Next-token probability of each option letter (A, B, ...) at the end of each chat prompt."""
    letters = [chr(ord("A") + i) for i in range(len(options))]
    ids = [tokenizer.encode(" " + letter, add_special_tokens=False)[-1] for letter in letters]
    ids_plain = [tokenizer.encode(letter, add_special_tokens=False)[-1] for letter in letters]
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.inference_mode():
        probs = model(**batch).logits[:, -1].float().softmax(-1)
    mass = probs[:, ids] + probs[:, ids_plain]
    return mass / mass.sum(-1, keepdim=True)


def run_demo(*, data_dir: str | Path | None, model_id: str, out: Path) -> None:
    from pipelines.datasets import load_globalopinionqa
    from sae.hooks import num_layers, residuals
    from sae.lm import load_lm

    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    console.rule("[bold]1. data")
    data_table(data_dir)

    console.rule("[bold]2. model")
    with console.status(f"loading {model_id} (the first load converts the GGUF once, ~15 s)"):
        t0 = time.perf_counter()
        model, tokenizer = load_lm(model_id)
        load_s = time.perf_counter() - t0
    n_layers = num_layers(model)
    console.print(
        f"{model_id}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, "
        f"{n_layers} layers, d_model={model.config.hidden_size}, loaded in {load_s:.2f} s"
    )

    console.rule("[bold]3. zero-shot opinions per country")
    records = load_globalopinionqa(data_dir_path(data_dir), "test")
    question = records[0].text
    same = [r for r in records if r.text == question][:4]
    prompts = [f"You are from the country of {r.perspective}. {r.text}" for r in same]
    probs = option_probabilities(model, tokenizer, prompts, list(same[0].options))
    console.print(question)
    table = Table()
    table.add_column("country")
    table.add_column("model (zero-shot)")
    table.add_column("survey")
    for r, p in zip(same, probs, strict=True):
        table.add_row(
            r.perspective, " ".join(f"{x:.2f}" for x in p.tolist()), " ".join(f"{x:.2f}" for x in r.distribution or ())
        )
    console.print(table)

    console.rule("[bold]4. residual stream")
    layer = n_layers // 2
    text = "The survey asked people in many countries what they think about their political leaders."
    batch = tokenizer([text], return_tensors="pt")
    acts = residuals(model, [layer], batch["input_ids"], batch["attention_mask"])[layer][0]
    norms = acts.norm(dim=-1)
    console.print(
        f"layer {layer}: {acts.shape[0]} positions, position-0 norm {norms[0]:.1f} vs median "
        f"{norms[1:].median():.1f} ({norms[0] / norms[1:].median():.0f}x): collection drops it"
    )
    console.rule(f"[bold green]demo finished in {time.perf_counter() - started:.1f} s")


def data_dir_path(data: str | Path | None) -> Path:
    return data_dir(data)
