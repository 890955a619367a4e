"""Training the built-in models: a byte-level BPE tokenizer and a small decoder on tiny Shakespeare.

One loop serves every architecture in `sipit.models.archs`: the model's own loss (`out.loss`)
is minimised, so an architecture with a special objective computes it in its forward.
The last 10% of the corpus is held out; the reported held-out loss is that of the shipped
(fp16-stored) weights.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from sipit.data import corpus_path, split_corpus
from sipit.errors import SipitError
from sipit.models import archs

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Settings of one training run; the defaults make the built-in Llama model."""

    arch: str = "llama"
    out: str = "runs/shakespeare-llama"
    vocab_size: int = 4096  # BPE vocabulary, including the byte alphabet
    tokenizer: str | None = None  # reuse this model's tokenizer instead of training one
    tokens: int = 1_500_000  # training token budget (batch * seq_len * steps)
    seq_len: int = 256
    batch_size: int = 16
    lr: float = 3e-3
    warmup: int = 30
    weight_decay: float = 0.1
    seed: int = 0
    eval_batches: int = 20
    overrides: dict = field(default_factory=dict)  # architecture overrides (width, layers, ...)


def train_tokenizer(text: str, vocab_size: int):
    """A byte-level BPE tokenizer trained on `text`, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text.splitlines(keepends=True), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
        unk_token="<|endoftext|>", pad_token="<|endoftext|>",
    )


def load_tokenizer(name: str):
    """The tokenizer of a built-in model or a local folder."""
    from transformers import AutoTokenizer

    from sipit.models import builtin

    return AutoTokenizer.from_pretrained(builtin.path_of(name) or name)


def encode_corpus(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one stream of token ids: (N,)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def batch_at(stream: torch.Tensor, starts: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Windows of seq_len + 1 tokens starting at `starts`: (B, seq_len + 1)."""
    offsets = torch.arange(seq_len + 1)
    return stream[starts[:, None] + offsets[None, :]]


def lr_at(step: int, cfg: TrainConfig, total: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, total - cfg.warmup)
    return cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def held_out_loss(model, stream: torch.Tensor, cfg: TrainConfig) -> float:
    """Mean next-token loss (nats) over evenly spaced held-out windows."""
    model.eval()
    n = len(stream) - cfg.seq_len - 1
    starts = torch.linspace(0, n - 1, cfg.eval_batches * cfg.batch_size).long()
    losses = []
    for chunk in starts.split(cfg.batch_size):
        window = batch_at(stream, chunk, cfg.seq_len)
        out = model(input_ids=window[:, :-1].contiguous(), labels=window[:, :-1].contiguous())
        losses.append(float(out.loss))
    model.train()
    return sum(losses) / len(losses)


def train(cfg: TrainConfig, progress=None) -> dict:
    """Train one model and save it as a Hugging Face folder in cfg.out; returns the record.

    `progress`, if given, is called as progress(step, total, loss) after every step.
    """
    torch.manual_seed(cfg.seed)
    text = corpus_path().read_text(encoding="utf-8")
    train_text, held_text = split_corpus(text)

    started = time.perf_counter()
    tokenizer = (load_tokenizer(cfg.tokenizer) if cfg.tokenizer
                 else train_tokenizer(train_text, cfg.vocab_size))
    train_ids, held_ids = encode_corpus(tokenizer, train_text), encode_corpus(tokenizer, held_text)
    log.info("corpus: %d training tokens, %d held out", len(train_ids), len(held_ids))

    model = archs.build(cfg.arch, len(tokenizer), **cfg.overrides)
    n_params = sum(p.numel() for p in model.parameters())
    steps = max(1, cfg.tokens // (cfg.batch_size * cfg.seq_len))
    log.info("%s: %d parameters, %d steps", cfg.arch, n_params, steps)

    losses = run_steps(model, train_ids, cfg, steps, progress)
    train_seconds = time.perf_counter() - started

    model.to(torch.float16).to(torch.float32)  # the shipped weights are fp16: measure those
    record = dict(
        arch=cfg.arch, parameters=n_params, steps=steps,
        tokens=steps * cfg.batch_size * cfg.seq_len,
        train_seconds=round(train_seconds, 1), final_train_loss=round(losses[-1], 4),
        held_out_loss=round(held_out_loss(model, held_ids, cfg), 4),
        threads=torch.get_num_threads(), config=asdict(cfg),
    )
    save(model, tokenizer, Path(cfg.out), record)
    return record


def run_steps(model, stream: torch.Tensor, cfg: TrainConfig, steps: int, progress) -> list[float]:
    """The optimisation loop: AdamW on random windows of the training stream."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(cfg.seed)
    model.train()
    losses = []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg, steps)
        starts = torch.randint(0, len(stream) - cfg.seq_len - 1, (cfg.batch_size,),
                               generator=generator)
        window = batch_at(stream, starts, cfg.seq_len)
        loss = model(input_ids=window[:, :-1].contiguous(), labels=window[:, :-1].contiguous()).loss
        if not torch.isfinite(loss):
            raise SipitError(f"training diverged at step {step}: loss is {float(loss)}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if progress is not None:
            progress(step + 1, steps, losses[-1])
    return losses


def save(model, tokenizer, out: Path, record: dict) -> None:
    """Write config, fp16 safetensors weights, tokenizer and the training record."""
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "train_record.json").write_text(json.dumps(record, indent=2) + "\n")
    log.info("saved %s (held-out loss %.4f)", out, record["held_out_loss"])
