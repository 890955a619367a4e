"""SipIt on the built-in looped model: exact inversion of wiki20 prompts from several loop steps.

The prompts are those of benchmarks/invert.py: the first 50 wiki20 segments, whole (35-45
tokens; `--tokens N` cuts them to their first N). Each is captured at the last block of loop
step u ("u.-1", before the final norm) and inverted with the default policy.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/ouro_invert.py

Writes benchmarks/results/ouro_invert.json.
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

ROOT = Path(__file__).resolve().parents[1]


def invert_at(lm: lm_mod.LM, prompts: list[list[int]], layer: str) -> dict:
    """Capture each prompt at `layer` and invert it; count exact recoveries."""
    exact, positions, started = 0, 0, time.perf_counter()
    for ids in prompts:
        states = sipit.capture(lm, token_ids=ids, layer=layer)
        result = sipit.invert(states, model=lm)
        exact += int(result.token_ids == ids)
        positions += len(ids)
    seconds = time.perf_counter() - started
    return dict(layer=layer, prompts=len(prompts), exact=exact, positions=positions,
                seconds=round(seconds, 1), tokens_per_s=round(positions / seconds, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shakespeare-ouro")
    parser.add_argument("--prompts", type=int, default=50)
    parser.add_argument("--tokens", type=int, default=0, help="cut prompts to N tokens (0: whole)")
    parser.add_argument("--loops", default="1,2,4")
    args = parser.parse_args()
    torch.set_num_threads(1)

    lm = lm_mod.load(args.model)
    prompts = [lm.encode(text)[:args.tokens or None] for text in wiki20(args.prompts)]
    rows = [invert_at(lm, prompts, f"{u}.-1") for u in args.loops.split(",")]
    print(f"{'layer':6} {'exact':>7} {'positions':>9} {'seconds':>8} {'tok/s':>6}")
    for r in rows:
        print(f"{r['layer']:6} {r['exact']:>3}/{r['prompts']:<3} {r['positions']:>9} "
              f"{r['seconds']:>8} {r['tokens_per_s']:>6}")
    out = ROOT / "benchmarks" / "results" / "ouro_invert.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = dict(model=args.model, prompts=args.prompts, tokens=args.tokens or "whole",
                   rows=rows)
    out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
