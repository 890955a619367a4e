"""SipIt on the Kimi Linear hybrid: exact inversion at a KDA layer and at the attention layer,
and a simple collision audit (last-token pairwise L2) of the hybrid against its control.

Inversion runs on the prompts of benchmarks/invert.py (the first 50 wiki20 segments, whole);
the audit on the first 20 tokens of up to 200 segments. The hybrid is the built-in
`shakespeare-kimi` (layers 1-3 KDA, layer 4 NoPE attention); the control is the full-attention
model trained with the same recipe (a folder given by --control). Without the control folder
the audit rows already in the output file are kept.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/kimi_invert.py

Prints a table and writes benchmarks/results/kimi_invert.json.
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
LENGTH = 20


def prompts(lm: lm_mod.LM, n: int) -> list[list[int]]:
    """The first LENGTH token ids of the first wiki20 segments that have that many."""
    out = []
    for text in wiki20(4 * n + 50):
        ids = lm.encode(text)
        if len(ids) >= LENGTH:
            out.append(ids[:LENGTH])
        if len(out) == n:
            break
    return out


def invert_all(lm: lm_mod.LM, layer: str, token_lists: list[list[int]], policy: str) -> dict:
    """Capture each prompt at `layer`, invert it, count exact recoveries."""
    exact, seconds, counts = 0, 0.0, []
    for ids in token_lists:
        states = sipit.capture(lm, token_ids=ids, layer=layer)
        started = time.perf_counter()
        result = sipit.invert(states, model=lm, policy=policy)
        seconds += time.perf_counter() - started
        exact += int(result.token_ids == ids)
        counts += [p.candidates for p in result.positions]
    n, tokens = len(token_lists), len(counts)
    return dict(layer=layer, prompts=n, tokens=tokens, exact=exact,
                seconds_per_prompt=round(seconds / n, 2),
                seconds_per_token=round(seconds / tokens, 3),
                candidates_per_token=round(sum(counts) / tokens, 1),
                median_candidates=sorted(counts)[tokens // 2])


@torch.no_grad()
def audit(lm: lm_mod.LM, layer: str, token_lists: list[list[int]]) -> dict:
    """Pairwise L2 distances between last-token states of distinct prompts at `layer`."""
    where = lm_mod.parse_layer(layer, lm.n_layers)
    last = torch.stack([lm_mod.states(lm, ids, where)[-1] for ids in token_lists])  # (N, d)
    dist = torch.cdist(last.double(), last.double())
    pairs = dist[torch.triu(torch.ones_like(dist, dtype=torch.bool), diagonal=1)]
    scale = float(last.norm(dim=-1).median())
    return dict(layer=layer, prompts=len(token_lists), min_l2=float(pairs.min()),
                median_l2=float(pairs.median()), median_norm=scale,
                min_relative=float(pairs.min()) / scale)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hybrid", default="shakespeare-kimi")
    parser.add_argument("--control", default=str(ROOT / "runs/kimi/shakespeare-kimi-full"))
    parser.add_argument("--prompts", type=int, default=50)
    parser.add_argument("--audit-prompts", type=int, default=200)
    parser.add_argument("--layers", default="1,4")
    parser.add_argument("--policy", default="probe")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/kimi_invert.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)

    hybrid = lm_mod.load(args.hybrid)
    token_lists = prompts(hybrid, args.audit_prompts)
    whole = [hybrid.encode(text) for text in wiki20(args.prompts)]
    result = dict(inversion=[], audit=[], audit_length=LENGTH, policy=args.policy)
    for layer in args.layers.split(","):
        row = invert_all(hybrid, layer, whole, args.policy)
        row["kind"] = hybrid.model.config.layer_types[int(layer) - 1]
        result["inversion"].append(row)
        print(f"invert layer {layer} ({row['kind']}): {row['exact']}/{row['prompts']} exact, "
              f"{row['seconds_per_prompt']} s/prompt, {row['candidates_per_token']} cand/token",
              flush=True)

    models = {"hybrid": hybrid}
    if Path(args.control).is_dir():
        models["control"] = lm_mod.load(args.control)
    elif Path(args.out).is_file():
        print(f"no control at {args.control}: keeping the audit rows of {args.out}")
        result["audit"] = json.loads(Path(args.out).read_text())["audit"]
        models = {}
    for name, lm in models.items():
        for layer in args.layers.split(","):
            row = dict(model=name, **audit(lm, layer, token_lists))
            result["audit"].append(row)
            print(f"audit {name:>8} layer {layer}: min L2 {row['min_l2']:.4g} "
                  f"(median {row['median_l2']:.4g}, min/norm {row['min_relative']:.3g})",
                  flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
