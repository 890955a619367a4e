"""Decode cost of the Kimi Linear hybrid against its full-attention control, by context length.

For each context length T, both models (the `shakespeare-kimi` sizes: 4 layers of width 192;
hybrid 3 KDA : 1 NoPE MLA, control 4 MLA) decode single tokens from a cache holding T tokens,
as generation does. Reported: median time per output token and the bytes the cache holds.

The attention latents in the cache are random numbers of the right shape (the cost of a decode
step does not depend on their values), so no O(T^2) prefill is run at long contexts; the KDA
layers' states are fixed-size whatever T is. Weights are random with the built-in config.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/kimi_decode.py

Prints a table, writes benchmarks/results/kimi_decode.json and docs/kimi_decode.png.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from sipit import lm as lm_mod
from sipit.models import kimi

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 4096


def make_cache(model, context: int):
    """A cache for `context` tokens: a real 8-token prefill, then attention latents grown to T."""
    cache = lm_mod.new_cache(lm_mod.wrap(model, None, "bench"))
    with torch.no_grad():
        model(input_ids=torch.randint(0, VOCAB, (1, 8)), cache=cache, use_cache=True)
    gen = torch.Generator().manual_seed(context)
    for layer in cache.layers:
        if getattr(layer, "keys", None) is not None:  # MLA latents (1, 1, T, rank), (1, 1, T, rope)
            layer.keys = torch.randn(1, 1, context, layer.keys.shape[-1], generator=gen)
            layer.values = torch.randn(1, 1, context, layer.values.shape[-1], generator=gen)
    return cache


def cache_bytes(cache) -> int:
    """Bytes held by the cache: attention latents plus KDA conv and recurrent states."""
    total = 0
    for layer in cache.layers:
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            total += tensor.nbytes if isinstance(tensor, torch.Tensor) else 0
        for states in (getattr(layer, "conv_states", {}), getattr(layer, "recurrent_states", {})):
            total += sum(s.nbytes for s in states.values() if s is not None)
    return total


@torch.no_grad()
def time_decode(model, context: int, steps: int) -> tuple[float, int]:
    """Median seconds per decoded token after one warm-up step, and the cache bytes at T."""
    cache = make_cache(model, context)
    size = cache_bytes(cache)
    token = torch.randint(0, VOCAB, (1, 1))
    times = []
    for step in range(steps + 1):
        position = torch.tensor([[context + step]])
        started = time.perf_counter()
        logits = model(input_ids=token, cache=cache, use_cache=True, position_ids=position).logits
        elapsed = time.perf_counter() - started
        token = logits[:, -1:].argmax(-1)
        if step > 0:
            times.append(elapsed)
    return statistics.median(times), size


def run(contexts: list[int], steps: int) -> dict:
    torch.manual_seed(0)
    models = {"hybrid 3:1": kimi.build_kimi(VOCAB, ratio=3).eval(),
              "full attention": kimi.build_kimi_full(VOCAB).eval()}
    rows = []
    for context in contexts:
        for name, model in models.items():
            seconds, size = time_decode(model, context, steps)
            rows.append(dict(model=name, context=context, ms_per_token=round(1e3 * seconds, 3),
                             cache_mb=round(size / 2**20, 4)))
            print(f"{name:>15}  T={context:>6}  {1e3 * seconds:9.2f} ms/token  "
                  f"cache {size / 2**20:8.3f} MB", flush=True)
    return dict(
        rows=rows,
        layer_types={name: m.config.layer_types for name, m in models.items()},
        kda_path=kimi.kda_path(), threads=torch.get_num_threads(), steps=steps,
        torch=torch.__version__, machine=platform.processor() or platform.machine(),
        cache_dtype="fp32",
    )


def summary(result: dict) -> dict:
    """Speed-up and cache saving of the hybrid at the longest context."""
    longest = max(r["context"] for r in result["rows"])
    at = {r["model"]: r for r in result["rows"] if r["context"] == longest}
    hybrid, full = at["hybrid 3:1"], at["full attention"]
    return dict(context=longest, speedup=round(full["ms_per_token"] / hybrid["ms_per_token"], 2),
                cache_saving=round(1 - hybrid["cache_mb"] / full["cache_mb"], 4))


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_c) = plt.subplots(1, 2, figsize=(10, 4))
    for name in ("hybrid 3:1", "full attention"):
        rows = [r for r in result["rows"] if r["model"] == name]
        x = [r["context"] for r in rows]
        ax_t.plot(x, [r["ms_per_token"] for r in rows], "o-", label=name)
        ax_c.plot(x, [r["cache_mb"] for r in rows], "o-", label=name)
    for ax, ylabel in ((ax_t, "ms per output token"), (ax_c, "cache (MB, fp32)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"Kimi Linear decode, batch 1, {result['threads']} CPU thread(s), "
                 f"KDA path: {result['kda_path']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", default="1024,2048,4096,8192,16384,32768,65536")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/kimi_decode.json"))
    parser.add_argument("--plot", default=str(ROOT / "docs/kimi_decode.png"))
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    result = run([int(c) for c in args.contexts.split(",")], args.steps)
    result["summary"] = summary(result)
    print(json.dumps(result["summary"]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    plot(result, Path(args.plot))
    print(f"wrote {args.out} and {args.plot}")


if __name__ == "__main__":
    main()
