"""Print a markdown table of trained SAEs' held-out metrics (from their ``training.json``) with the sha256 of
their weights, e.g. ``python scripts/sae_table.py runs/protocol/train-L*/L*-topk-*`` > saes.md.

The SAEs themselves are not committed; the hash says which files a result was made with.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sae.model import WEIGHTS_FILE
from sae.storage import sha256

COLUMNS = ("explained_variance", "mse", "l0", "dead_fraction", "ce_loss_recovered")


def row(path: Path) -> str:
    info = json.loads((path / "training.json").read_text())
    ev = info["final_metrics"]["eval"]
    spec = info["spec"]
    missing = [c for c in COLUMNS if c not in ev]
    if missing:
        raise SystemExit(f"{path}: training.json has no held-out {missing} (trained with eval_tokens=0?)")
    cells = [
        str(info["layer"]),
        f"{spec['architecture']} {spec['expansion']:g}x",
        str(spec["k"]),
        f"{info['tokens']:,}",
        *(f"{ev[c]:.4g}" for c in COLUMNS),
        f"`{sha256(path / WEIGHTS_FILE)[:16]}`",
    ]
    return "| " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("saes", nargs="+", type=Path, help="SAE directories (pluristeer train's output)")
    args = parser.parse_args(argv)
    paths = sorted(args.saes, key=lambda p: (json.loads((p / "training.json").read_text())["layer"], p.name))
    print("| layer | SAE | k | tokens | held-out EV | MSE | L0 | dead fraction | CE loss recovered | weights sha256 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for p in paths:
        print(row(p))


if __name__ == "__main__":
    main(sys.argv[1:])
