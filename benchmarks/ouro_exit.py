"""Q-exit on the built-in looped model: decode speed, loop steps per token and held-out loss vs q.

Every held-out token is decoded one at a time through the KV cache (teacher forcing), so the
loss is that of real cached decoding with the exit policy, and a token that leaves at step k
really runs k loop steps. Rows: Q-exit at each q, fixed exits k = 1..T, and the last-step cache.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/ouro_exit.py

Writes benchmarks/results/ouro_exit.json and docs/ouro_exit.png.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from sipit import lm as lm_mod
from sipit.data import corpus_path, split_corpus

ROOT = Path(__file__).resolve().parents[1]
QS = [0.1, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0]


def held_out_windows(tokenizer, n: int, length: int) -> torch.Tensor:
    """n evenly spaced windows of `length` held-out tokens: (n, length)."""
    _, held = split_corpus(corpus_path().read_text(encoding="utf-8"))
    stream = torch.tensor(tokenizer(held, add_special_tokens=False)["input_ids"])
    starts = torch.linspace(0, len(stream) - length - 1, n).long()
    return stream[starts[:, None] + torch.arange(length)[None]]


@torch.no_grad()
def decode_pass(model, windows: torch.Tensor, **options) -> dict:
    """Teacher-forced token-by-token decoding of each window (batch 1) with `options`."""
    losses, steps, seconds, tokens = [], [], 0.0, 0
    for window in windows:
        cache = DynamicCache(config=model.config)
        started = time.perf_counter()
        for t in range(len(window) - 1):
            out = model(window[None, t:t + 1], cache=cache, use_cache=True, **options)
            losses.append(torch.nn.functional.cross_entropy(out.logits[0, -1], window[t + 1]))
            steps.append(int(out.exit_steps[0, -1]))
        seconds += time.perf_counter() - started
        tokens += len(window) - 1
    return dict(loss=float(torch.stack(losses).mean()), steps=sum(steps) / len(steps),
                tokens_per_s=tokens / seconds)


def run(model_name: str, n: int, length: int) -> list[dict]:
    lm = lm_mod.load(model_name)
    model, n_loops = lm.model, lm.n_loops
    windows = held_out_windows(lm.tokenizer, n, length)
    rows = []
    for q in QS:
        rows.append(dict(mode="q-exit", q=q, cache="full",
                         **decode_pass(model, windows, exit_threshold=q)))
    for k in range(1, n_loops + 1):
        rows.append(dict(mode="fixed", q=None, exit_step=k, cache="full",
                         **decode_pass(model, windows, exit_step=k)))
    rows.append(dict(mode="q-exit", q=1.0, cache="last-step",
                     **decode_pass(model, windows, exit_threshold=1.0, cache_strategy="last-step")))
    return rows


def best_saving(rows: list[dict], n_loops: int, tolerance: float = 0.02) -> dict:
    """The Q-exit row with the fewest loop steps whose loss is within `tolerance` of q = 1."""
    qrows = [r for r in rows if r["mode"] == "q-exit" and r["cache"] == "full"]
    base = next(r for r in qrows if r["q"] == 1.0)
    ok = [r for r in qrows if r["loss"] <= base["loss"] * (1 + tolerance)]
    best = min(ok, key=lambda r: r["steps"])
    return dict(q=best["q"], steps=best["steps"], saved=1 - best["steps"] / n_loops,
                loss_increase=best["loss"] / base["loss"] - 1,
                speedup=best["tokens_per_s"] / base["tokens_per_s"])


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    qrows = [r for r in rows if r["mode"] == "q-exit" and r["cache"] == "full"]
    fixed = [r for r in rows if r["mode"] == "fixed"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot([r["steps"] for r in qrows], [r["loss"] for r in qrows], "o-", label="Q-exit")
    for r in qrows:
        left.annotate(f"q={r['q']}", (r["steps"], r["loss"]), fontsize=7)
    left.plot([r["steps"] for r in fixed], [r["loss"] for r in fixed], "s--", label="fixed exit")
    left.set(xlabel="average loop steps per token", ylabel="held-out loss (nats)",
             title="loss vs compute")
    left.legend()
    right.plot([r["q"] for r in qrows], [r["tokens_per_s"] for r in qrows], "o-", label="tok/s")
    right.set(xlabel="q", ylabel="decode tokens / s (batch 1, CPU)", title="decode speed vs q")
    twin = right.twinx()
    twin.plot([r["q"] for r in qrows], [r["steps"] for r in qrows], "r^:", label="steps")
    twin.set_ylabel("average loop steps per token", color="r")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shakespeare-ouro")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--length", type=int, default=129)
    args = parser.parse_args()
    torch.set_num_threads(1)

    rows = run(args.model, args.windows, args.length)
    n_loops = max(r.get("exit_step") or 0 for r in rows)
    summary = best_saving(rows, n_loops)
    print(f"{'mode':8} {'q':>5} {'k':>3} {'cache':10} {'loss':>7} {'steps':>6} {'tok/s':>7}")
    for r in rows:
        q = "" if r["q"] is None else f"{r['q']:.2f}"
        print(f"{r['mode']:8} {q:>5} {r.get('exit_step', ''):>3} {r['cache']:10} "
              f"{r['loss']:7.4f} {r['steps']:6.2f} {r['tokens_per_s']:7.1f}")
    print(f"best within 2% loss: q={summary['q']}, {summary['steps']:.2f} steps/token "
          f"({summary['saved']:.0%} of the loop compute saved, loss "
          f"+{summary['loss_increase']:.2%}, decode {summary['speedup']:.2f}x)")

    out = ROOT / "benchmarks" / "results" / "ouro_exit.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(model=args.model, windows=args.windows, length=args.length,
                                   rows=rows, summary=summary), indent=2) + "\n")
    plot(rows, ROOT / "docs" / "ouro_exit.png")


if __name__ == "__main__":
    main()
