"""Linear maps from observed states back to input embeddings, fitted in closed form.

They drive the default policy. Both are ridge regressions on states of random prompts (one
pass over the data, one small linear solve, no training loop), cached per weights, layer, dtype.

- The probe reads the observed states h_{t-1}, h_t and h_{t+1} (the neighbours carry the
  context h_t was built on and the token it was followed by), each scaled to unit RMS, and
  predicts the RMS-normalised input embedding of the token at t. It ranks tokens before any
  candidate has been verified.
- The correction is a first-order inverse around a verified anchor: with the prefix fixed,
  the state difference h(x) - h(a) between the true token x and an anchor token a is mapped
  linearly to e(x) - e(a). Once one candidate a has been verified, e(a) + C (h_t - h(a))
  predicts the embedding of the token at t with the real prefix in the anchor's state.
  It is fitted on anchors near the token in embedding space, as they are during a search.
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

VERSION = 3  # bump when the features change, so stale cache entries are not read


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
    correction: torch.Tensor  # (d + 1, d): [h(x) - h(a), 1] -> e(x) - e(a)

    def scores(self, observed: torch.Tensor) -> torch.Tensor:
        """Token scores for every position (higher is likelier): (T, d) -> (T, V)."""
        predicted = features(observed) @ self.weight  # (T, d)
        return -torch.cdist(predicted, self.table)

    def corrected(self, anchor_embedding: torch.Tensor, anchor_state: torch.Tensor,
                  observed: torch.Tensor) -> torch.Tensor:
        """Predicted raw input embedding at t from a verified anchor: (d,), (d,), (d,) -> (d,)."""
        delta = torch.cat([observed.float() - anchor_state.float(), observed.new_ones(1)])
        return anchor_embedding + delta @ self.correction

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(weight=self.weight, table=self.table, correction=self.correction)


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


def ridge(x: torch.Tensor, y: torch.Tensor, strength: float) -> torch.Tensor:
    """argmin_W ||x W - y||^2 + strength * N ||W||^2, in fp64: (N, f), (N, d) -> (f, d)."""
    x, y = x.double(), y.double()
    gram = x.T @ x + strength * len(x) * torch.eye(x.shape[1], dtype=x.dtype)  # (f, f)
    return torch.linalg.solve(gram, x.T @ y).float()


@torch.no_grad()
def sample_anchor_pairs(lm: lm_mod.LM, layer, n_prefixes: int, seed: int, groups: int = 8,
                        per_group: int = 8, near: int = 64):
    """State and embedding differences of (token, nearby anchor) at a shared random prefix.

    Each prefix (0-39 random tokens) is continued by `groups` random tokens x and, for each,
    `per_group - 1` anchors drawn from the `near` tokens closest to x by cosine: all of them
    in one batch through the prefix cache. Returns ([h(x) - h(a), 1], e(x) - e(a)).
    """
    from sipit.invert.verify import Verifier

    generator = torch.Generator().manual_seed(seed)
    embeddings = lm.model.get_input_embeddings().weight.detach().float().cpu()  # (V, d)
    unit = torch.nn.functional.normalize(embeddings, dim=-1)
    xs, ys = [], []
    for _ in range(n_prefixes):
        length = int(torch.randint(0, 40, (1,), generator=generator))
        verifier = Verifier(lm, layer)
        verifier.push_prefix(torch.randint(0, lm.vocab_size, (length,), generator=generator))

        tokens = torch.randint(0, lm.vocab_size, (groups,), generator=generator)
        neighbours = (unit[tokens] @ unit.T).topk(near, dim=-1).indices  # (G, near)
        picks = torch.randint(1, near, (groups, per_group - 1), generator=generator)
        batch = torch.cat([tokens[:, None], neighbours.gather(1, picks)], 1)  # (G, P)
        states = verifier.states(batch.flatten()).cpu().view(groups, per_group, -1)  # (G, P, d)
        emb = embeddings[batch]  # (G, P, d)
        dh = (states[:, :1] - states[:, 1:]).flatten(0, 1)  # (G (P - 1), d)
        xs.append(torch.cat([dh, torch.ones(len(dh), 1)], dim=1))
        ys.append((emb[:, :1] - emb[:, 1:]).flatten(0, 1))
    return torch.cat(xs), torch.cat(ys)


def fit(lm: lm_mod.LM, layer, n_states: int = 32768, seq_len: int = 64, strength: float = 1e-4,
        n_prefixes: int = 300, seed: int = 0) -> Probe:
    """Fit the probe and the anchored correction for one layer, both by ridge regression."""
    x, tokens = sample_states(lm, layer, n_states, seq_len, seed)
    table = targets(lm)
    weight = ridge(x, table[tokens], strength)  # (3d + 1, d)
    dx, de = sample_anchor_pairs(lm, layer, n_prefixes, seed)
    correction = ridge(dx, de, strength)  # (d + 1, d)
    return Probe(weight=weight, table=table, correction=correction)


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
