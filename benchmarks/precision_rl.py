"""Benchmark: Dr. GRPO on digit sorting in fp32, bf16 and fp16, for each variant.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/precision_rl.py [--steps 300]

All runs share one starting policy and perfectible set (runs/precision-rl/start.safetensors).
Prints a table, writes benchmarks/results/precision_rl.json and docs/precision_rl.png.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from sipit.precision.plots import plot_rl
from sipit.precision.rl import VARIANTS, RLConfig, train

ROOT = Path(__file__).resolve().parents[1]


def summary(result: dict) -> dict:
    """Start and end solve rate, last-50-step means of reward and mismatch, skipped steps."""
    tail = result["history"][-50:]
    mean = lambda key: sum(row[key] for row in tail) / len(tail)  # noqa: E731
    return dict(dtype=result["config"]["dtype"], variant=result["config"]["variant"],
                start=result["evals"][0]["solve_rate"], end=result["evals"][-1]["solve_rate"],
                best=max(e["solve_rate"] for e in result["evals"]),
                reward_last50=mean("reward"), kl_mean=mean("kl"), dp_abs_mean=mean("dp_abs_mean"),
                grad_norm=mean("grad_norm"), loss_scale=result["history"][-1]["loss_scale"],
                skipped=result["skipped"], seconds=result["seconds"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--dtypes", nargs="*", default=["fp32", "bf16", "fp16"])
    parser.add_argument("--out", default=str(ROOT / "runs" / "precision-rl"))
    parser.add_argument("--name", default="precision_rl", help="name of the JSON and the plot")
    args = parser.parse_args()
    torch.set_num_threads(1)

    results = []
    for variant in args.variants:
        for dtype in args.dtypes:
            results.append(train(RLConfig(dtype=dtype, variant=variant, steps=args.steps,
                                          out=args.out)))
            print(json.dumps(summary(results[-1])))

    rows = [summary(r) for r in results]
    print("\n| variant | dtype | solve rate start | end | best | reward (last 50) "
          "| KL[mu||pi]/token | mean abs(pi - mu) | grad norm | loss scale | skipped | s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for s in rows:
        print(f"| {s['variant']} | {s['dtype']} | {s['start']:.3f} | {s['end']:.3f} "
              f"| {s['best']:.3f} | {s['reward_last50']:.3f} | {s['kl_mean']:.2e} "
              f"| {s['dp_abs_mean']:.2e} | {s['grad_norm']:.3f} | {s['loss_scale']:.0f} "
              f"| {s['skipped']} | {s['seconds']:.0f} |")
    out = ROOT / "benchmarks" / "results" / f"{args.name}.json"
    out.write_text(json.dumps(dict(summary=rows, runs=results)))
    plot_rl(results, ROOT / "docs" / f"{args.name}.png")


if __name__ == "__main__":
    main()
