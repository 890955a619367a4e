"""Benchmark: sampler/trainer mismatch of every built-in model in fp32, bf16 and fp16.

    nice -n 10 python benchmarks/precision_mismatch.py [--sequences 32] [--max-new 256]

Prints a table, writes benchmarks/results/precision_mismatch.json and docs/precision_mismatch.png.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from sipit.models import builtin
from sipit.precision.mismatch import MismatchConfig, measure
from sipit.precision.plots import plot_mismatch

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ("kl", "k1", "k3", "dp_abs_mean", "dp_max", "dp_min", "seq_kl", "seq_slope_per_1k",
           "above_cap")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=32)
    parser.add_argument("--max-new", type=int, default=256)
    parser.add_argument("--models", nargs="*", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)

    reports = []
    for model in args.models or builtin.names():
        for dtype in ("fp32", "bf16", "fp16"):
            cfg = MismatchConfig(model=model, dtype=dtype, sequences=args.sequences,
                                 max_new_tokens=args.max_new)
            reports.append(measure(cfg))
            print(model, dtype, " ".join(f"{c}={reports[-1][c]:.3g}" for c in COLUMNS))

    ratios = {m: ratio(reports, m) for m in sorted({r["model"] for r in reports})}
    print_table(reports, ratios)
    out = ROOT / "benchmarks" / "results" / "precision_mismatch.json"
    out.write_text(json.dumps(dict(reports=reports, bf16_over_fp16=ratios), indent=1))
    plot_mismatch(reports, ROOT / "docs" / "precision_mismatch.png")


def ratio(reports: list[dict], model: str) -> dict:
    """bf16 / fp16 for the mismatch metrics of one model."""
    by = {r["dtype"]: r for r in reports if r["model"] == model}
    return {key: by["bf16"][key] / by["fp16"][key] if by["fp16"][key] else float("inf")
            for key in ("kl", "k3", "dp_abs_mean", "seq_kl")}


def print_table(reports: list[dict], ratios: dict) -> None:
    print("\n| model | dtype | " + " | ".join(COLUMNS) + " |")
    print("|---|---|" + "---|" * len(COLUMNS))
    for r in reports:
        print(f"| {r['model']} | {r['dtype']} | " + " | ".join(f"{r[c]:.2e}" for c in COLUMNS)
              + " |")
    print("\n| model | bf16/fp16 KL per token | k3 | mean abs(pi - mu) | sequence KL |")
    print("|---|---|---|---|---|")
    for model, q in ratios.items():
        print(f"| {model} | {q['kl']:.0f}x | {q['k3']:.0f}x | {q['dp_abs_mean']:.1f}x "
              f"| {q['seq_kl']:.0f}x |")


if __name__ == "__main__":
    main()
