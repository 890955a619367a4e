"""Stage II of Ouro's training: fit the exit gate to the measured benefit of another loop step.

The LM is frozen; only `model.early_exit_gate` learns. For each token and step t >= 2, the
improvement I_t = max(0, L_{t-1} - L_t) of the detached per-token losses gives the target
w_t = sigmoid(k * (I_t - gamma)) (k = 50, gamma = 0.005) for the probability 1 - lambda_t of
continuing; the loss is the binary cross-entropy between the two, summed over t = 2..T and
divided by T, as the paper writes it (lambda_t is trained on the improvement into step t).
Stage I (expected loss minus beta * H(p)) is `OuroForCausalLM`'s training-mode loss.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

SLOPE = 50.0  # k: sharpness of the target
MARGIN = 0.005  # gamma: the improvement (nats) at which the target is 1/2


def gate_targets(improvement: torch.Tensor, slope: float = SLOPE,
                 margin: float = MARGIN) -> torch.Tensor:
    """w = sigmoid(slope * (I - margin)), the target probability of running another step."""
    return torch.sigmoid(slope * (improvement - margin))


@torch.no_grad()
def _frozen_pass(model, input_ids: torch.Tensor, labels: torch.Tensor):
    """Loop-step states (steps, B, S-1, d) and per-token losses (steps, B, S-1), no grad."""
    out = model(input_ids=input_ids)
    target = labels[:, 1:]
    losses = torch.stack([
        nn.functional.cross_entropy(lg[:, :-1].transpose(1, 2).float(), target,
                                    ignore_index=-100, reduction="none")
        for lg in out.loop_logits])
    states = torch.stack([h[:, :-1] for h in out.loop_hidden_states])
    return states, losses, (target != -100).float()


def stage2_loss(model, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """The Stage II gate loss for a batch (B, S); gradients reach only the exit gate."""
    labels = input_ids if labels is None else labels
    states, losses, valid = _frozen_pass(model, input_ids, labels)
    n_steps = states.shape[0]
    gate = model.model.early_exit_gate
    lam = torch.sigmoid(gate(states.to(gate.weight.dtype)).squeeze(-1).float())  # (steps, B, S-1)

    improvement = (losses[:-1] - losses[1:]).clamp_min(0)  # I_t for t = 2..T
    target = gate_targets(improvement)
    keep = (1 - lam[1:]).clamp(1e-6, 1 - 1e-6)  # 1 - lambda_t for t = 2..T
    bce = nn.functional.binary_cross_entropy(keep, target, reduction="none")  # (T-1, B, S-1)
    per_token = bce.sum(0) / n_steps
    return (per_token * valid).sum() / valid.sum().clamp_min(1)


def train_gate(model, stream: torch.Tensor, steps: int = 100, batch_size: int = 8,
               seq_len: int = 256, lr: float = 1e-3, seed: int = 0) -> list[float]:
    """Stage II on random windows of a token stream (N,): AdamW on the gate only."""
    for p in model.parameters():
        p.requires_grad_(False)
    gate_params = list(model.model.early_exit_gate.parameters())
    for p in gate_params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(gate_params, lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    model.eval()
    losses = []
    for _ in range(steps):
        starts = torch.randint(0, len(stream) - seq_len - 1, (batch_size,), generator=generator)
        window = stream[starts[:, None] + torch.arange(seq_len)[None]]  # (B, S)
        loss = stage2_loss(model, window)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    for p in model.parameters():
        p.requires_grad_(True)
    log.info("stage II: gate loss %.4f -> %.4f", losses[0], losses[-1])
    return losses
