"""The mismatch meter: how far the trainer's probabilities pi drift from the sampler's mu.

The sampler (`engines.sample`) generates continuations of held-out Shakespeare prompts with a
KV cache in the chosen dtype; the trainer (`engines.teacher_forced`) recomputes them in one
padded batch forward in the same dtype. Each sequence keeps a different response length, so the
sequence log-ratio can be set against length. Run with fp32 to get the noise floor.

Metrics (t runs over response tokens, sampled from mu):
    kl        exact per-token KL[mu || pi] over the vocabulary
    k1/k2/k3  the usual sample estimates of KL[mu || pi]: log(mu/pi), (log r)^2 / 2, r - 1 - log r
              with r = pi / mu at the sampled token
    dp_*      pi - mu of the sampled token (mean, mean of |.|, max, min)
    seq_*     per sequence: sum_t log(pi/mu) and the fitted slope against length (per 1K tokens)
    above_cap fraction of tokens with r > cap
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass

import torch

from sipit import lm as lm_mod
from sipit.data import corpus_path, split_corpus
from sipit.errors import SipitError
from sipit.precision import engines

log = logging.getLogger(__name__)


@dataclass
class MismatchConfig:
    """One measurement: a model, a dtype for both engines, and the sampled sequences."""

    model: str = "shakespeare-llama"
    dtype: str = "bf16"
    sequences: int = 32  # sampled sequences (one batch)
    prompt_tokens: int = 16  # tokens of held-out text per prompt
    max_new_tokens: int = 256  # longest response; others are spread evenly below it
    temperature: float = 1.0
    cap: float = 2.0  # importance-ratio cap for `above_cap`
    trainer: str = "batch"  # "batch" (teacher-forced) or "replay" (the sampler's own computation)
    seed: int = 0
    device: str = "cpu"


def held_out_prompts(lm: lm_mod.LM, n: int, length: int, seed: int) -> torch.Tensor:
    """n prompts of `length` tokens from random places of the held-out corpus: (n, length)."""
    _, held_out = split_corpus(corpus_path().read_text(encoding="utf-8"))
    ids = lm.tokenizer(held_out[:60_000], add_special_tokens=False)["input_ids"]  # ~18K tokens
    if len(ids) < n * length:
        raise SipitError("held-out corpus too short for the requested prompts")
    starts = torch.randperm(len(ids) - length, generator=torch.Generator().manual_seed(seed))[:n]
    return torch.tensor([ids[s : s + length] for s in starts.tolist()])


def response_lengths(n: int, max_new: int) -> torch.Tensor:
    """Lengths spread evenly over (0, max_new]: (n,)."""
    return torch.linspace(max_new / n, max_new, n).round().long().clamp(1, max_new)


def measure(config: MismatchConfig, lm: lm_mod.LM | None = None) -> dict:
    """Sample with the sampler, recompute with the trainer, and compare (see module docstring)."""
    if config.trainer not in ("batch", "replay"):
        raise SipitError(f"unknown trainer {config.trainer!r}: use batch or replay")
    if config.sequences < 2 or config.max_new_tokens < 1:
        raise SipitError("need at least 2 sequences and 1 new token")
    lm = lm or lm_mod.load(config.model, config.device, config.dtype)
    prompts = held_out_prompts(lm, config.sequences, config.prompt_tokens, config.seed)
    generator = torch.Generator().manual_seed(config.seed)

    started = time.perf_counter()
    responses, log_mu = engines.sample(lm, prompts, config.max_new_tokens, generator,
                                       config.temperature)  # (B, R), (B, R, V)
    sampler_s = time.perf_counter() - started
    lengths = response_lengths(config.sequences, config.max_new_tokens)
    mask = torch.arange(config.max_new_tokens)[None] < lengths[:, None]  # (B, R)
    with torch.no_grad():
        if config.trainer == "replay":
            log_pi = engines.replay(lm, prompts, responses, config.temperature)
        else:
            log_pi = engines.teacher_forced(lm, prompts, responses, mask,
                                            temperature=config.temperature).cpu()
    report = compare(log_mu, log_pi, responses, mask, config.cap)
    report.update(config=asdict(config), model=lm.name, dtype=lm.dtype_name,
                  sampler_seconds=sampler_s)
    log.info("%s %s: kl %.3g, mean |pi - mu| %.3g", lm.name, lm.dtype_name, report["kl"],
             report["dp_abs_mean"])
    return report


def compare(log_mu: torch.Tensor, log_pi: torch.Tensor, tokens: torch.Tensor,
            mask: torch.Tensor, cap: float = 2.0) -> dict:
    """Mismatch metrics from full log-probs (B, R, V), sampled tokens (B, R) and mask (B, R)."""
    kl_full = (log_mu.exp() * (log_mu - log_pi)).sum(-1)  # (B, R)
    lmu = log_mu.gather(-1, tokens[..., None])[..., 0]  # (B, R) at the sampled token
    lpi = log_pi.gather(-1, tokens[..., None])[..., 0]
    log_r = (lpi - lmu)[mask]  # (N,) over valid tokens
    r = log_r.exp()
    dp = (lpi.exp() - lmu.exp())[mask]
    seq_log_ratio = ((lpi - lmu) * mask).sum(1)  # (B,)
    lengths = mask.sum(1)
    return dict(
        tokens=int(mask.sum()),
        kl=float(kl_full[mask].mean()),
        k1=float((-log_r).mean()),
        k2=float((log_r**2 / 2).mean()),
        k3=float((r - 1 - log_r).mean()),
        dp_mean=float(dp.mean()), dp_abs_mean=float(dp.abs().mean()),
        dp_max=float(dp.max()), dp_min=float(dp.min()),
        log_ratio_abs_max=float(log_r.abs().max()),
        above_cap=float((r > cap).float().mean()),
        seq_kl=float((kl_full * mask).sum(1).mean()),
        seq_log_ratio_mean=float(seq_log_ratio.mean()),
        seq_slope_per_1k=slope(lengths.float() / 1000, seq_log_ratio),
        seq_lengths=lengths.tolist(),
        seq_log_ratios=seq_log_ratio.tolist(),
    )


def slope(x: torch.Tensor, y: torch.Tensor) -> float:
    """Least-squares slope of y against x (both (n,)); 0 when x does not vary."""
    dx = x - x.mean()
    denom = float((dx * dx).sum())
    return 0.0 if denom == 0 else float((dx * (y - y.mean())).sum()) / denom
