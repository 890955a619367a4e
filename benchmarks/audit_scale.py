"""The collision study at the paper's scale on the built-in model, with the docs' plots.

Runs, on `shakespeare-llama` at every block and the final norm:
  1. the pairwise test over N mixed prompts (wiki20, held-out Shakespeare windows, random
     tokens; default 100,000 = about 5e9 pairs per layer), printing pairs per second beside
     this machine's measured fp32 matrix-multiply rate;
  2. the exhaustive continuation test on the closest prompts (whole vocabulary);
  3. per-position margins of a few wiki20 prompts against fp32/fp16/bf16 resolution.
Writes benchmarks/results/audit_scale.{json,md} and docs/audit_*.png.

    OMP_NUM_THREADS=2 nice -n 10 .venv/bin/python benchmarks/audit_scale.py --n 100000
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch

from sipit import data
from sipit import lm as lm_mod
from sipit.audit import continuations, margins, pairs, report

ROOT = Path(__file__).resolve().parents[1]


def gemm_rate(d: int, rows: int = 2048, cols: int = 8192, repeats: int = 5) -> float:
    """Measured fp32 GEMM rate (FLOP/s) at the audit's shape (rows x d) @ (d x cols)."""
    a, b = torch.randn(rows, d), torch.randn(d, cols)
    a @ b
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * rows * cols * d * repeats / (time.perf_counter() - t0)


def progress_printer(every: float = 20.0):
    last = [0.0]

    def tick(done, total, label=""):
        now = time.perf_counter()
        if now - last[0] >= every or done == total:
            last[0] = now
            print(f"  {label}: {done:,}/{total:,}", file=sys.stderr, flush=True)

    return tick


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="prompts in the pairwise test")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prefixes", type=int, default=10, help="continuation prefixes")
    parser.add_argument("--margin-prompts", type=int, default=2)
    parser.add_argument("--checkpoint", help="folder (default: benchmarks/results/ckpt_N)")
    parser.add_argument("--plots", default=str(ROOT / "docs"))
    parser.add_argument("--results", default=str(ROOT / "benchmarks/results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    lm = lm_mod.load("shakespeare-llama")
    rate = gemm_rate(lm.hidden_size)
    prompts = pairs.paper_prompts(lm, args.n)
    checkpoint = Path(args.checkpoint or ROOT / f"benchmarks/results/ckpt_{args.n}")
    t0 = time.perf_counter()
    pr = pairs.audit_pairs(lm, prompts, checkpoint=checkpoint,
                           progress=progress_printer())
    wall = time.perf_counter() - t0
    pd = pr.to_dict()

    print(f"\npairwise: {pr.n_prompts:,} prompts ({pr.n_merged} repeats merged), "
          f"{args.threads} threads, {wall:.0f} s wall (states {pr.seconds['states']:.0f} s, "
          f"scan {pr.seconds['scan']:.0f} s)")
    print(f"{'layer':>6} {'pairs':>10} {'min (exact)':>12} {'p0.1':>8} {'p50':>8} "
          f"{'under 1e-6':>10} {'under floor':>11} {'s':>6}")
    for layer in pd["layers"]:
        p = layer["percentiles"]
        print(f"{layer['layer']:>6} {layer['pairs']:>10.3g} {layer['min_distance']:>12.4g} "
              f"{p['p0.1']:>8.3g} {p['p50']:>8.3g} {layer['under_threshold']:>10} "
              f"{layer['under_floor']:>11} "
              f"{pr.seconds['layers'][layer['layer']]:>6.1f}")
    gemm_pairs = rate / (2 * lm.hidden_size)
    print(f"scan: {pr.pairs_per_second / 1e6:.1f} M pairs/s; fp32 GEMM {rate / 1e9:.1f} GFLOP/s "
          f"= {gemm_pairs / 1e6:.1f} M pairs/s at d={lm.hidden_size} "
          f"(scan reaches {pr.pairs_per_second / gemm_pairs:.0%} of it)")

    prefixes = continuations.closest_prompts(pd, k=args.prefixes)
    cr = continuations.audit_continuations(lm, prefixes, progress=progress_printer())
    print(f"\ncontinuations: {len(prefixes)} prefixes x {cr.candidates} tokens, "
          f"{cr.pairs:.3g} pairs, {cr.collisions} collisions, {cr.seconds:.0f} s")
    for layer in cr.layers:
        print(f"  layer {layer['layer']:>5}: min {layer['min_distance']:.4g}")

    mr = margins.audit_margins(lm, data.wiki20(args.margin_prompts))
    print(f"\nmargins: {len(mr.rows)} (position, layer) rows, {mr.seconds:.0f} s")
    for layer, s in mr.summary().items():
        print(f"  layer {layer:>5}: min margin {s['min_margin']:.3g}, safe fp16 "
              f"{s['safe_fp16']:.0%}, bf16 {s['safe_bf16']:.0%}")

    out = Path(args.results)
    result = dict(command=" ".join(sys.argv), threads=args.threads, wall_seconds=wall,
                  gemm_flops=rate, gemm_pairs_per_second=gemm_pairs, pairs=pd,
                  continuations=cr.to_dict(), margins=mr.to_dict())
    report.write_json(result, out / "audit_scale.json")
    md = "\n\n".join([report.pairs_markdown(pd), report.continuations_markdown(cr.to_dict()),
                      report.margins_markdown(mr.to_dict())])
    (out / "audit_scale.md").write_text(md, encoding="utf-8")
    for path in report.plot_all(pd, args.plots, continuations=cr.to_dict(),
                                margins=mr.to_dict()):
        print(f"wrote {path}")
    shutil.rmtree(checkpoint, ignore_errors=True)


if __name__ == "__main__":
    main()
