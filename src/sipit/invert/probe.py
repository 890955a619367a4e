"""A linear probe from observed states back to tokens, fitted in closed form on random prompts.

It is the ranking behind the default policy: for position t it scores every vocabulary token
from the observed states h_t and h_{t-1} (the previous state carries the context h_t was built
on). Fitting is ridge regression onto one-hot targets, so it needs one pass over the data and
one small linear solve, no training loop. Probes are cached per model weights, layer and dtype.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from sipit import lm as lm_mod
from sipit.states import weights_hash

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    root = os.environ.get("SIPIT_CACHE") or Path.home() / ".cache" / "sipit"
    return Path(root) / "probes"


def features(observed: torch.Tensor) -> torch.Tensor:
    """Probe inputs for every position: (T, d) -> (T, 2d + 1) = [h_t, h_{t-1}, 1]."""
    h = observed.float()
    previous = torch.cat([torch.zeros_like(h[:1]), h[:-1]])
    ones = torch.ones_like(h[:, :1])
    return torch.cat([h, previous, ones], dim=-1)


@dataclass
class Probe:
    """Scores = standardised features @ weight: (T, 2d + 1) -> (T, V)."""

    mean: torch.Tensor  # (2d + 1,)
    scale: torch.Tensor  # (2d + 1,)
    weight: torch.Tensor  # (2d + 1, V)

    def scores(self, observed: torch.Tensor) -> torch.Tensor:
        """Token scores for every position of observed states (T, d) -> (T, V)."""
        x = (features(observed) - self.mean) / self.scale
        return x @ self.weight

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(mean=self.mean, scale=self.scale, weight=self.weight)


@torch.no_grad()
def sample_states(lm: lm_mod.LM, layer, n_states: int, seq_len: int, seed: int):
    """Features and tokens of random prompts at `layer`: (N, 2d + 1) and (N,)."""
    generator = torch.Generator().manual_seed(seed)
    seq_len = min(seq_len, lm.max_positions or seq_len)
    n_seqs = max(1, n_states // seq_len)
    ids = torch.randint(0, lm.vocab_size, (n_seqs, seq_len), generator=generator)
    xs = []
    for chunk in ids.split(16):
        hidden = lm_mod.forward_to(lm, layer, chunk.to(lm.device)).float().cpu()  # (B, T, d)
        xs.extend(features(h) for h in hidden)
    return torch.cat(xs), ids.flatten()


def fit(lm: lm_mod.LM, layer, n_states: int = 32768, seq_len: int = 64, ridge: float = 1e-3,
        seed: int = 0) -> Probe:
    """Ridge regression from standardised features onto one-hot tokens, solved in closed form."""
    x, tokens = sample_states(lm, layer, n_states, seq_len, seed)
    mean, scale = x.mean(0), x.std(0).clamp_min(1e-6)
    mean[-1], scale[-1] = 0.0, 1.0  # keep the bias column
    x = ((x - mean) / scale).double()

    gram = x.T @ x + ridge * len(x) * torch.eye(x.shape[1], dtype=x.dtype)  # (2d+1, 2d+1)
    rhs = torch.zeros(x.shape[1], lm.vocab_size, dtype=x.dtype)
    rhs.index_add_(1, tokens, x.T)  # x.T @ one_hot(tokens): (2d+1, V)
    weight = torch.linalg.solve(gram, rhs).float()
    return Probe(mean=mean, scale=scale, weight=weight)


def load_or_fit(lm: lm_mod.LM, layer) -> Probe:
    """The probe for this model's weights, layer and dtype, from the disk cache or fitted now."""
    from safetensors.torch import load_file, save_file

    key = f"{weights_hash(lm.model)}-{lm_mod.layer_name(layer)}-{lm.dtype_name}.safetensors"
    path = cache_dir() / key
    if path.is_file():
        try:
            return Probe(**load_file(str(path)))
        except Exception:  # a damaged cache entry is refitted
            log.warning("probe cache %s unreadable; refitting", path)
    log.info("fitting the probe for layer %s (cached in %s)", layer, path.parent)
    probe = fit(lm, layer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in probe.tensors().items()}, str(tmp))
    tmp.replace(path)
    return probe
