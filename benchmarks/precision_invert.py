"""Benchmark: inversion of states captured in one dtype with the model run in another.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/precision_invert.py [--prompts 50]

The prompts of benchmarks/invert.py (the first 50 wiki20 segments, whole; `--tokens N` cuts
them to N tokens), layer -1 of each built-in model. For every capture
dtype (fp32, bf16, fp16) and run dtype (fp32, bf16, fp16): exact-match rate, acceptance, and the
margins (over the exactly inverted prompts) in units of the unit roundoff u of the coarser of
the two dtypes:
    dist/u     worst accepted distance / ||h|| / u   (how far the true token's state drifted)
    sep/u      smallest runner-up distance / ||h|| / u (how far the nearest wrong token was)
    tol/u      the acceptance rule's rel_tol / u
A failed prompt is diagnosed (first wrong position, distances) and inverted again with the
exhaustive policy (nearest of the whole vocabulary).
Prints tables, writes benchmarks/results/precision_invert.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import sipit
from sipit import lm as lm_mod
from sipit.data import wiki20
from sipit.invert.verify import UNIT_ROUNDOFF
from sipit.models import builtin

ROOT = Path(__file__).resolve().parents[1]
DTYPES = ("fp32", "bf16", "fp16")


def margins(result, states: torch.Tensor, u: float) -> dict:
    """Relative distances of the accepted and runner-up candidates, in units of u."""
    norms = states.float().norm(dim=-1)  # (T,)
    dist = [p.distance / float(norms[p.position]) for p in result.positions]
    sep = [p.runner_up / float(norms[p.position]) for p in result.positions
           if p.runner_up is not None]
    return dict(dist_u=max(dist) / u, sep_u=min(sep) / u if sep else None,
                tol_u=result.acceptance["rel_tol"] / u)


def diagnose(result, states, ids: list[int], lm: lm_mod.LM) -> dict:
    """Where a failed inversion went wrong, and whether nearest-of-all (exhaustive) recovers it."""
    bad = next(i for i, (a, b) in enumerate(zip(result.token_ids, ids, strict=True)) if a != b)
    stat, norm = result.positions[bad], float(states.states[bad].float().norm())
    again = sipit.invert(states, model=lm, force=True, policy="exhaustive")
    true = again.positions[bad]
    return dict(position=bad, wrong_token=stat.token, true_token=lm.decode([ids[bad]]),
                wrong_rel=stat.distance / norm, tol_rel=stat.tolerance / norm,
                true_rel=true.distance / norm if again.token_ids[bad] == ids[bad] else None,
                exhaustive_exact=again.token_ids == ids)


def run_model(model: str, n: int, tokens: int, layer: str, pairs: list[tuple[str, str]]
              ) -> list[dict]:
    lms = {d: lm_mod.load(model, "cpu", d) for d in DTYPES}
    prompts = [lms["fp32"].encode(t)[:tokens or None] for t in wiki20(n)]
    rows = []
    for capture_dtype in dict.fromkeys(c for c, _ in pairs):
        captured = [sipit.capture(lms[capture_dtype], token_ids=ids, layer=layer)
                    for ids in prompts]
        for run_dtype in (r for c, r in pairs if c == capture_dtype):
            u = max(UNIT_ROUNDOFF[lm_mod.DTYPES[capture_dtype]],
                    UNIT_ROUNDOFF[lm_mod.DTYPES[run_dtype]])
            started, per = time.perf_counter(), []
            for ids, states in zip(prompts, captured, strict=True):
                # weights rounded to another dtype have another fingerprint: force
                result = sipit.invert(states, model=lms[run_dtype], force=True)
                per.append(dict(exact=result.token_ids == ids, accepted=result.all_accepted,
                                tokens=len(ids),
                                **margins(result, states.states, u)))
                if not per[-1]["exact"]:
                    per[-1]["failure"] = diagnose(result, states, ids, lms[run_dtype])
            rows.append(summarise(model, capture_dtype, run_dtype, per, u,
                                  time.perf_counter() - started))
            print(json.dumps(rows[-1]))
    return rows


def summarise(model, capture_dtype, run_dtype, per, u, seconds) -> dict:
    exact = [p for p in per if p["exact"]] or per  # margins of failed prompts hold cascades
    seps = [p["sep_u"] for p in exact if p["sep_u"] is not None]
    return dict(model=model, capture=capture_dtype, run=run_dtype, prompts=len(per),
                tokens=per[0]["tokens"] if len({p["tokens"] for p in per}) == 1 else "whole",
                exact=sum(p["exact"] for p in per) / len(per),
                accepted=sum(p["accepted"] for p in per) / len(per),
                u=u, worst_dist_u=max(p["dist_u"] for p in exact),
                min_sep_u=min(seps) if seps else None,
                tol_u=max(p["tol_u"] for p in per), seconds=seconds,
                failed=[i for i, p in enumerate(per) if not p["exact"]],
                failures=[p["failure"] for p in per if "failure" in p])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=50)
    parser.add_argument("--tokens", type=int, default=0, help="cut prompts to N tokens (0: whole)")
    parser.add_argument("--layer", default="-1")
    parser.add_argument("--models", nargs="*", default=None)
    parser.add_argument("--pairs", nargs="*", default=None,
                        help="capture:run dtype pairs, e.g. bf16:bf16 (default: all 9)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    out = ROOT / "benchmarks" / "results" / "precision_invert.json"
    models = args.models or builtin.names()
    pairs = [tuple(p.split(":")) for p in args.pairs] if args.pairs else [
        (c, r) for c in DTYPES for r in DTYPES]
    rows = []  # rows of other models from an earlier run are kept
    if args.models and out.is_file():
        rows = [r for r in json.loads(out.read_text())["rows"] if r["model"] not in models]
    for model in models:
        rows += run_model(model, args.prompts, args.tokens, args.layer, pairs)
    out.write_text(json.dumps(dict(layer=args.layer, rows=rows), indent=1))
    print("\n| model | capture | run | prompts | exact | accepted | u | worst dist/u | min sep/u "
          "| tol/u |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        size = f"{r['prompts']} x {r.get('tokens', 20)}"
        print(f"| {r['model']} | {r['capture']} | {r['run']} | {size} | {r['exact']:.2f} "
              f"| {r['accepted']:.2f} | {r['u']:.1e} | {r['worst_dist_u']:.2f} "
              f"| {r['min_sep_u'] or 0:.0f} | {r['tol_u']:.1f} |")
    print("\n| model | capture | run | prompt | position | accepted (wrong) | true token "
          "| wrong dist/norm | true dist/norm | tol/norm | exhaustive exact |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        for index, f in zip(r["failed"], r["failures"], strict=True):
            true = "-" if f["true_rel"] is None else f"{f['true_rel']:.4f}"
            print(f"| {r['model']} | {r['capture']} | {r['run']} | {index} | {f['position']} "
                  f"| {f['wrong_token']!r} | {f['true_token']!r} | {f['wrong_rel']:.4f} | {true} "
                  f"| {f['tol_rel']:.4f} | {f['exhaustive_exact']} |")


if __name__ == "__main__":
    main()
