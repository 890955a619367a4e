"""Collision audit across the loop steps of the built-in looped model.

Last-token states of a mixed prompt set (`sipit.audit.pairs.paper_prompts`: wiki20 segments,
random tokens, held-out Shakespeare windows) at every block and final norm of every loop step
of `shakespeare-ouro`, all pairs compared exactly where it matters. Does looping the same
blocks again bring prompts closer together, or push them apart?

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ouro_audit.py --n 20000

Prints a table and writes benchmarks/results/ouro_audit.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sipit import lm as lm_mod
from sipit.audit.pairs import audit_pairs, paper_prompts

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shakespeare-ouro")
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/ouro_audit.json")
    args = parser.parse_args()

    lm = lm_mod.load(args.model)
    report = audit_pairs(lm, paper_prompts(lm, args.n), layers="all")
    rows = []
    print(f"{report.n_prompts} distinct prompts ({report.n_merged} repeats merged)")
    print(f"{'layer':8} {'pairs':>10} {'min':>10} {'median':>8} {'under 1e-6':>10} {'floor':>6}")
    for layer in report.layers:
        row = dict(layer=layer["layer"], pairs=layer["pairs"], min=layer["min_distance"],
                   median=layer["percentiles"]["p50"], under_threshold=layer["under_threshold"],
                   under_floor=layer["under_floor"], closest=layer["closest"][:3])
        rows.append(row)
        print(f"{row['layer']:8} {row['pairs']:>10.3g} {row['min']:>10.4g} {row['median']:>8.3g}"
              f" {row['under_threshold']:>10} {row['under_floor']:>6}")
    summary = dict(model=args.model, n_prompts=report.n_prompts, seconds=report.seconds,
                   rows=rows)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
