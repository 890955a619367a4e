"""SipIt benchmark: every policy on real and random prompts at the first, middle and last layer.

Prompts: the first `--wiki` wiki20 segments (whole, under the built-in tokenizer) and `--random`
prompts of 20 uniformly random token ids. Each prompt is captured at each layer with one full
forward and inverted with each policy. The brute-force policies (random, exhaustive) see
`--slow-prompts` prompts and the gradient policy `--gradient-prompts` (each taken from both
kinds in proportion; gradient needs minutes per prompt on a CPU); every speed-up is computed on
the prompts both policies ran. One row per (dtype, policy, layer, prompt) is
appended to a JSONL file as it finishes, so an interrupted run resumes where it stopped.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/invert.py              # the README's figures
    .venv/bin/python benchmarks/invert.py --wiki 5 --random 2 --layers 2 # a quick look

Writes benchmarks/results/invert.json (summary) and invert.rows.jsonl (per prompt).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import sipit
from sipit import lm as lm_mod
from sipit.data import wiki20
from sipit.invert import DEFAULT

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BRUTE = ("random", "exhaustive")


def build_prompts(lm: lm_mod.LM, n_wiki: int, n_random: int, seed: int = 0) -> list[dict]:
    """Prompts as token ids, tagged with their kind and index."""
    prompts = [dict(kind="wiki20", index=i, ids=lm.encode(text))
               for i, text in enumerate(wiki20(n_wiki))]
    generator = torch.Generator().manual_seed(seed)
    for i in range(n_random):
        ids = torch.randint(0, lm.vocab_size, (20,), generator=generator).tolist()
        prompts.append(dict(kind="random", index=i, ids=ids))
    return prompts


def slow_subset(prompts: list[dict], n: int) -> set[tuple[str, int]]:
    """About n prompts for the slow policies, wiki20 and random in their overall proportion."""
    wiki = [p for p in prompts if p["kind"] == "wiki20"]
    rand = [p for p in prompts if p["kind"] == "random"]
    n_rand = min(len(rand), max(1, round(n * len(rand) / max(1, len(prompts))))) if rand else 0
    chosen = wiki[: max(0, n - n_rand)] + rand[:n_rand]
    return {(p["kind"], p["index"]) for p in chosen}


def plain_forward_seconds(lm: lm_mod.LM, ids: list[int], layer, repeats: int = 5) -> float:
    """Median time of one full forward of the prompt up to `layer` (what capture costs)."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        lm_mod.states(lm, ids, layer)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def run_one(lm: lm_mod.LM, prompt: dict, layer: str, policy: str) -> dict:
    """Capture one prompt at `layer`, invert it with `policy`, and describe the outcome."""
    ids = prompt["ids"]
    states = sipit.capture(lm, token_ids=ids, layer=layer)
    started = time.perf_counter()
    result = sipit.invert(states, model=lm, policy=policy)
    seconds = time.perf_counter() - started
    return dict(
        kind=prompt["kind"], index=prompt["index"], layer=layer, policy=policy,
        dtype=lm.dtype_name, tokens=len(ids), exact=result.token_ids == ids,
        seconds=seconds, search_seconds=result.seconds,
        forward_seconds=plain_forward_seconds(lm, ids, lm_mod.parse_layer(layer, lm.n_layers)),
        candidates=[p.candidates for p in result.positions],
        token_seconds=[p.seconds for p in result.positions],
        min_margin=min((p.margin for p in result.positions if p.margin is not None),
                       default=None),
    )


def key_of(row: dict) -> tuple:
    return row["dtype"], row["policy"], row["layer"], row["kind"], row["index"]


def load_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by an interruption is redone
            break
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    """Per (dtype, layer, policy): exactness, time and candidates per token, speed-up."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["dtype"], row["layer"], row["policy"]), []).append(row)
    table = []
    for (dtype, layer, policy), members in sorted(groups.items()):
        per_token = [row["seconds"] / row["tokens"] for row in members]
        candidates = [c for row in members for c in row["candidates"]]
        table.append(dict(
            dtype=dtype, layer=layer, policy=policy, prompts=len(members),
            tokens=sum(row["tokens"] for row in members),
            exact=sum(row["exact"] for row in members),
            exact_rate=sum(row["exact"] for row in members) / len(members),
            mean_s_per_token=statistics.mean(per_token),
            median_s_per_token=statistics.median(per_token),
            median_candidates=statistics.median(candidates),
            mean_candidates=statistics.mean(candidates),
            max_candidates=max(candidates),
            forwards_per_prompt=statistics.median(
                row["seconds"] / row["forward_seconds"] for row in members),
            speedup_vs_gradient=speedup(rows, dtype, layer, policy),
        ))
    return table


def speedup(rows: list[dict], dtype: str, layer: str, policy: str) -> float | None:
    """Gradient's seconds per token over this policy's, on the prompts both ran in fp32."""
    def timing(name):
        return {(r["kind"], r["index"]): r for r in rows
                if (r["dtype"], r["layer"], r["policy"]) == (dtype, layer, name)}

    mine, reference = timing(policy), timing("gradient")
    shared = mine.keys() & reference.keys()
    if not shared:
        return None
    per_token = lambda runs: sum(runs[k]["seconds"] for k in shared) / sum(  # noqa: E731
        runs[k]["tokens"] for k in shared)
    return per_token(reference) / per_token(mine)


def print_table(table: list[dict]) -> None:
    """The summary as a markdown table (the README quotes it)."""
    print("| dtype | layer | policy | exact prompts | s/token (mean) | s/token (median) "
          "| candidates/token (median) | (mean) | x one forward | speed-up vs gradient |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in table:
        gain = "-" if r["speedup_vs_gradient"] is None else f"{r['speedup_vs_gradient']:.1f}x"
        print(f"| {r['dtype']} | {r['layer']} | {r['policy']} | {r['exact']}/{r['prompts']} "
              f"| {r['mean_s_per_token']:.4f} | {r['median_s_per_token']:.4f} "
              f"| {r['median_candidates']:.0f} | {r['mean_candidates']:.1f} "
              f"| {r['forwards_per_prompt']:.0f} | {gain} |")


def plan(args, prompts: list[dict]) -> list[tuple[str, str, str, dict]]:
    """Every (dtype, policy, layer, prompt) to run: all policies in fp32, the default in half."""
    subsets = {name: slow_subset(prompts, args.slow_prompts) for name in BRUTE}
    subsets["gradient"] = slow_subset(prompts, args.gradient_prompts)
    jobs = []
    for dtype in args.dtypes.split(","):
        chosen = args.policies.split(",") if dtype == "fp32" else [DEFAULT]
        for policy in chosen:
            for layer in args.layers.split(","):
                for p in prompts:
                    if policy in subsets and (p["kind"], p["index"]) not in subsets[policy]:
                        continue
                    jobs.append((dtype, policy, layer, p))
    return jobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shakespeare-llama")
    parser.add_argument("--wiki", type=int, default=50)
    parser.add_argument("--random", type=int, default=10)
    parser.add_argument("--layers", default="1,2,4", help="first, middle and last block")
    parser.add_argument("--policies", default="probe,gradient,random,exhaustive")
    parser.add_argument("--dtypes", default="fp32,bf16,fp16")
    parser.add_argument("--slow-prompts", type=int, default=20, help="for random, exhaustive")
    parser.add_argument("--gradient-prompts", type=int, default=4)
    parser.add_argument("--rows", type=Path, default=RESULTS / "invert.rows.jsonl")
    parser.add_argument("--summary", type=Path, default=RESULTS / "invert.json")
    args = parser.parse_args()

    models = {name: lm_mod.load(args.model, dtype=name) for name in args.dtypes.split(",")}
    prompts = build_prompts(models["fp32"] if "fp32" in models else next(iter(models.values())),
                            args.wiki, args.random)
    rows = load_rows(args.rows)
    done = {key_of(r) for r in rows}
    jobs = [j for j in plan(args, prompts) if (j[0], j[1], j[2], j[3]["kind"], j[3]["index"])
            not in done]
    print(f"{len(done)} rows already done, {len(jobs)} to run")

    args.rows.parent.mkdir(parents=True, exist_ok=True)
    with args.rows.open("a") as sink:
        for n, (dtype, policy, layer, prompt) in enumerate(jobs, 1):
            row = run_one(models[dtype], prompt, layer, policy)
            rows.append(row)
            sink.write(json.dumps(row) + "\n")
            sink.flush()
            print(f"[{n}/{len(jobs)}] {dtype} {policy} layer {layer} {prompt['kind']} "
                  f"{prompt['index']}: exact={row['exact']} {row['seconds']:.2f} s", flush=True)

    table = summarise(rows)
    print_table(table)
    summary = dict(model=args.model, torch_threads=torch.get_num_threads(),
                   prompts=dict(wiki20=args.wiki, random=args.random,
                                random_exhaustive=args.slow_prompts,
                                gradient=args.gradient_prompts), rows=table)
    args.summary.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
