"""The two computations of one policy whose gap RL suffers from: the sampler and the trainer.

The sampler decodes one token at a time with a KV cache (as an inference engine does); the
trainer recomputes the same sequences in one teacher-forced, padded batch forward (as a training
framework does). Both take the log-softmax in fp32, so what differs is only the forward itself.
`replay` runs the sampler's computation on given tokens: the same computation as `sample`.
"""

from __future__ import annotations

import contextlib

import torch

from sipit import lm as lm_mod


def _step(lm: lm_mod.LM, ids: torch.Tensor, cache, position: int) -> torch.Tensor:
    """Logits of the last position after feeding ids (B, t) at `position`: (B, V)."""
    batch, length = ids.shape
    positions = torch.arange(position, position + length, device=ids.device).expand(batch, -1)
    out = lm.model(input_ids=ids, cache=cache, use_cache=True, position_ids=positions)
    return out.logits[:, -1]


def _decode(lm, prompts, max_new, temperature, generator, forced):
    """Shared loop of `sample` and `replay`: (B, P) -> tokens (B, R), log-probs (B, R, V)."""
    cache = lm_mod.new_cache(lm)
    logits = _step(lm, prompts.to(lm.device), cache, 0)
    tokens, logprobs = [], []
    for t in range(max_new):
        logp = torch.log_softmax(logits.float() / temperature, dim=-1)  # (B, V), fp32
        if forced is None:
            token = torch.multinomial(logp.exp().cpu(), 1, generator=generator)[:, 0]
        else:
            token = forced[:, t]
        tokens.append(token)
        logprobs.append(logp.cpu())
        if t + 1 < max_new:
            logits = _step(lm, token[:, None].to(lm.device), cache, prompts.shape[1] + t)
    return torch.stack(tokens, dim=1), torch.stack(logprobs, dim=1)


@torch.no_grad()
def sample(lm: lm_mod.LM, prompts: torch.Tensor, max_new: int, generator: torch.Generator,
           temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampler: prompts (B, P) -> responses (B, R) and the sampler's log-probs mu (B, R, V)."""
    return _decode(lm, prompts, max_new, temperature, generator, None)


@torch.no_grad()
def replay(lm: lm_mod.LM, prompts: torch.Tensor, responses: torch.Tensor,
           temperature: float = 1.0) -> torch.Tensor:
    """The sampler's own computation on given responses (B, R) -> log-probs (B, R, V)."""
    return _decode(lm, prompts, responses.shape[1], temperature, None, responses.cpu())[1]


def autocast(dtype: torch.dtype, device: torch.device):
    """Mixed precision for the trainer: matmuls in `dtype` over fp32 weights (none for fp32)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def teacher_forced(lm: lm_mod.LM, prompts: torch.Tensor, responses: torch.Tensor,
                   mask: torch.Tensor, pad_id: int = 0, temperature: float = 1.0,
                   amp_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Trainer: one padded batch forward over prompt + response.

    prompts (B, P), responses (B, R), mask (B, R) bool (False = padding) -> log-probs of the
    response positions (B, R, V) in fp32. Gradients flow; wrap in no_grad to measure only.
    """
    batch, length = prompts.shape
    ids = torch.cat([prompts, responses.masked_fill(~mask, pad_id)], dim=1).to(lm.device)
    attention = torch.cat([torch.ones_like(prompts, dtype=torch.bool), mask], dim=1)
    with autocast(amp_dtype, lm.device):
        logits = lm.model(input_ids=ids, attention_mask=attention.long().to(lm.device)).logits
    logits = logits[:, length - 1 : -1].float()  # (B, R, V): position t predicts token t + 1
    return torch.log_softmax(logits / temperature, dim=-1)
