"""Ratio ablation of the Kimi Linear hybrid: KDA : full-attention layers 0:1, 1:1, 3:1 and 7:1.

Every ratio trains the same 8-layer model (width 96, 3 KDA heads of 32, 3 MLA heads) with the
same tokenizer (shakespeare-llama), corpus, seed and token budget through `sipit.train.train`,
and reports the held-out loss of the fp16-stored weights. 7:1 needs 8 layers, hence the depth;
the width is halved to keep the cost near that of the shipped 4-layer model.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/kimi_ablation.py --tokens 98304

Prints a table and writes benchmarks/results/kimi_ablation.json; models go to runs/kimi/.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from sipit.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
ABLATION = dict(hidden_size=96, intermediate_size=256, num_hidden_layers=8,
                num_attention_heads=3, num_key_value_heads=3, linear_num_heads=3)


def run_ratio(ratio: int, tokens: int, warmup: int) -> dict:
    cfg = TrainConfig(arch="kimi", out=str(ROOT / f"runs/kimi/ablation-r{ratio}"),
                      tokenizer="shakespeare-llama", tokens=tokens, warmup=warmup,
                      eval_batches=8, overrides=dict(ratio=ratio, **ABLATION))
    record = train(cfg)
    types = record_layer_types(Path(cfg.out))
    return dict(ratio=f"{ratio}:1", kda_layers=types.count("linear_attention"),
                attention_layers=types.count("full_attention"), parameters=record["parameters"],
                tokens=record["tokens"], held_out_loss=record["held_out_loss"],
                train_seconds=record["train_seconds"])


def record_layer_types(folder: Path) -> list[str]:
    return json.loads((folder / "config.json").read_text())["layer_types"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=98_304)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--ratios", default="0,1,3,7")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/kimi_ablation.json"))
    args = parser.parse_args()

    torch.set_num_threads(1)
    rows = []
    for ratio in (int(r) for r in args.ratios.split(",")):
        rows.append(run_ratio(ratio, args.tokens, args.warmup))
        row = rows[-1]
        print(f"{row['ratio']:>4}  KDA {row['kda_layers']}  attn {row['attention_layers']}  "
              f"params {row['parameters']:>8}  held-out loss {row['held_out_loss']:.4f}  "
              f"({row['train_seconds']:.0f} s)", flush=True)
    result = dict(rows=rows, model=ABLATION, tokens=args.tokens, warmup=args.warmup)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
