"""A linear probe from observed states back to input embeddings, fitted in closed form.

It is the first ranking of the default policy. For position t it reads the observed states
h_{t-1}, h_t and h_{t+1} (the neighbours carry the context h_t was built on and the token it
was followed by), each scaled to unit RMS, and predicts the RMS-normalised input embedding of
the token at t. Tokens are ranked by L2 distance between their normalised embedding and the
prediction. Fitting is ridge regression on states of random prompts: one pass over the data
and one small linear solve, no training loop. Probes are cached per weights, layer and dtype.
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

VERSION = 2  # bump when the features change, so stale cache entries are not read


def cache_dir() -> Path:
    root = os.environ.get("SIPIT_CACHE") or Path.home() / ".cache" / "sipit"
    return Path(root) / "probes"


def unit_rms(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit root-mean-square (all-zero rows stay zero)."""
    return x / x.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-12)


def features(observed: torch.Tensor) -> torch.Tensor:
    """Probe inputs: (T, d) -> (T, 3d + 1) = [h_t, h_{t-1}, h_{t+1}, 1], each unit RMS."""
    h = unit_rms(observed.float())
    zero = torch.zeros_like(h[:1])
    previous, following = torch.cat([zero, h[:-1]]), torch.cat([h[1:], zero])
    return torch.cat([h, previous, following, torch.ones_like(h[:, :1])], dim=-1)


def targets(lm: lm_mod.LM) -> torch.Tensor:
    """What the probe predicts: the unit-RMS input embedding of every token, (V, d)."""
    return unit_rms(lm.model.get_input_embeddings().weight.detach().float().cpu())


@dataclass
class Probe:
    """Predicted embeddings = features @ weight: (T, 3d + 1) -> (T, d)."""

    weight: torch.Tensor  # (3d + 1, d)
    table: torch.Tensor  # (V, d) unit-RMS input embeddings

    def scores(self, observed: torch.Tensor) -> torch.Tensor:
        """Token scores for every position (higher is likelier): (T, d) -> (T, V)."""
        predicted = features(observed) @ self.weight  # (T, d)
        return -torch.cdist(predicted, self.table)

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(weight=self.weight, table=self.table)


@torch.no_grad()
def sample_states(lm: lm_mod.LM, layer, n_states: int, seq_len: int, seed: int):
    """Features and tokens of random prompts at `layer`: (N, 3d + 1) and (N,)."""
    generator = torch.Generator().manual_seed(seed)
    seq_len = min(seq_len, lm.max_positions or seq_len)
    n_seqs = max(1, n_states // seq_len)
    ids = torch.randint(0, lm.vocab_size, (n_seqs, seq_len), generator=generator)
    xs = []
    for chunk in ids.split(16):
        hidden = lm_mod.forward_to(lm, layer, chunk.to(lm.device)).float().cpu()  # (B, T, d)
        xs.extend(features(h) for h in hidden)
    return torch.cat(xs), ids.flatten()


def fit(lm: lm_mod.LM, layer, n_states: int = 32768, seq_len: int = 64, ridge: float = 1e-4,
        seed: int = 0) -> Probe:
    """Ridge regression from features onto normalised embeddings, solved in closed form."""
    x, tokens = sample_states(lm, layer, n_states, seq_len, seed)
    table = targets(lm)
    x = x.double()
    gram = x.T @ x + ridge * len(x) * torch.eye(x.shape[1], dtype=x.dtype)  # (3d+1, 3d+1)
    weight = torch.linalg.solve(gram, x.T @ table[tokens].double()).float()  # (3d+1, d)
    return Probe(weight=weight, table=table)


def load_or_fit(lm: lm_mod.LM, layer) -> Probe:
    """The probe for this model's weights, layer and dtype, from the disk cache or fitted now."""
    from safetensors.torch import load_file, save_file

    name = f"v{VERSION}-{weights_hash(lm.model)}-{lm_mod.layer_name(layer)}-{lm.dtype_name}"
    path = cache_dir() / f"{name}.safetensors"
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
