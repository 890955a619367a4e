"""Stage II on a trained Ouro model: train only the exit gate, save the model beside it.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/ouro_stage2.py \
        --model runs/ouro/ouro --out runs/ouro/ouro-stage2

The LM weights are unchanged (checked); the gate learns from the improvement of the per-token
loss between loop steps (`sipit.models.ouro_train`). The training record gains a "stage2" entry.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from sipit import lm as lm_mod
from sipit.data import corpus_path, split_corpus
from sipit.models import ouro_train
from sipit.train import encode_corpus, save


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/ouro/ouro")
    parser.add_argument("--out", default="runs/ouro/ouro-stage2")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()
    torch.set_num_threads(1)

    lm = lm_mod.load(args.model)
    model = lm.model
    train_text, _ = split_corpus(corpus_path().read_text(encoding="utf-8"))
    stream = encode_corpus(lm.tokenizer, train_text)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "early_exit_gate" not in k}

    started = time.perf_counter()
    losses = ouro_train.train_gate(model, stream, steps=args.steps, batch_size=args.batch_size,
                                   lr=args.lr)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in frozen.items())
    print(f"stage II gate loss {losses[0]:.4f} -> {losses[-1]:.4f} "
          f"({time.perf_counter() - started:.0f} s)")

    record_path = Path(args.model) / "train_record.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    record["stage2"] = dict(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                            seq_len=256, first_loss=round(losses[0], 4),
                            last_loss=round(losses[-1], 4))
    save(model, lm.tokenizer, Path(args.out), record)


if __name__ == "__main__":
    main()
