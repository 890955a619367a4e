"""Held-out loss of a trained Ouro model at each exit step, and its mean exit distribution.

Uses the same held-out windows as `sipit.train.held_out_loss` (20 batches of 16 x 256 tokens),
so step T's loss is the training record's held-out loss.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/ouro_steps.py --model shakespeare-ouro

Writes benchmarks/results/ouro_steps.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from sipit import lm as lm_mod
from sipit.data import corpus_path, split_corpus
from sipit.train import TrainConfig, batch_at, encode_corpus

ROOT = Path(__file__).resolve().parents[1]


@torch.no_grad()
def by_step(model, stream: torch.Tensor, cfg: TrainConfig) -> dict:
    """Mean loss of each loop step and mean p(t) over the held-out windows."""
    n = len(stream) - cfg.seq_len - 1
    starts = torch.linspace(0, n - 1, cfg.eval_batches * cfg.batch_size).long()
    losses, probs = [], []
    for chunk in starts.split(cfg.batch_size):
        window = batch_at(stream, chunk, cfg.seq_len)[:, :-1]
        out = model(input_ids=window, labels=window)
        losses.append(out.loop_losses)
        probs.append(out.exit_probs.mean((0, 1)))
    return dict(loss_by_step=[round(float(x), 4) for x in torch.stack(losses).mean(0)],
                exit_probs=[round(float(x), 4) for x in torch.stack(probs).mean(0)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shakespeare-ouro")
    args = parser.parse_args()
    torch.set_num_threads(1)

    lm = lm_mod.load(args.model)
    _, held = split_corpus(corpus_path().read_text(encoding="utf-8"))
    result = dict(model=args.model, **by_step(lm.model, encode_corpus(lm.tokenizer, held),
                                              TrainConfig()))
    print("step  loss    mean p(t)")
    pairs = zip(result["loss_by_step"], result["exit_probs"], strict=True)
    for t, (loss, p) in enumerate(pairs, start=1):
        print(f"{t:>4}  {loss:.4f}  {p:.3f}")
    out = ROOT / "benchmarks" / "results" / "ouro_steps.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
