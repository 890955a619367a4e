"""The verifier: states of many candidate tokens at one position, from a prefix computed once.

The prefix (tokens already recovered) lives in the model's cache. Candidates are run as one
batch of single-token continuations of a copy of that cache, so the prefix is never re-run.
Also here: the acceptance rule, which follows the numerics of the run instead of a fixed tolerance.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from sipit import lm as lm_mod

log = logging.getLogger(__name__)

# Unit roundoff of each dtype (half the distance from 1.0 to the next float).
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


class Verifier:
    """Candidate states at the next position of a growing prefix, for one model and layer."""

    def __init__(self, lm: lm_mod.LM, layer: int | str, max_batch: int = 512):
        self.lm, self.layer, self.max_batch = lm, layer, max_batch
        self.cache = None
        self.prefix: list[int] = []

    @property
    def position(self) -> int:
        return len(self.prefix)

    def _positions(self, batch: int) -> torch.Tensor:
        return torch.full((batch, 1), self.position, device=self.lm.device, dtype=torch.long)

    @torch.no_grad()
    def states(self, candidates: torch.Tensor) -> torch.Tensor:
        """States at the next position for each candidate token: (K,) -> (K, d), in fp32."""
        out = []
        for chunk in candidates.to(self.lm.device).split(self.max_batch):
            cache = None if self.cache is None else lm_mod.expand_cache(self.cache, len(chunk))
            hidden = lm_mod.forward_to(self.lm, self.layer, chunk[:, None], cache=cache,
                                       position_ids=self._positions(len(chunk)))  # (K, 1, d)
            out.append(hidden[:, 0].float())
        return torch.cat(out)

    def embedding_states(self, embeddings: torch.Tensor) -> torch.Tensor:
        """States at the next position for continuous input embeddings (K, d) -> (K, d), fp32.

        Differentiable: used by the gradient policy and the probe's Gauss-Newton refinement.
        """
        k = len(embeddings)
        cache = None if self.cache is None else lm_mod.expand_cache(self.cache, k)
        embeds = embeddings.to(self.lm.device, self.lm.dtype)[:, None]  # (K, 1, d)
        hidden = lm_mod.forward_to(self.lm, self.layer, None, cache=cache,
                                   position_ids=self._positions(k), inputs_embeds=embeds)
        return hidden[:, 0].float()

    def state_of_embedding(self, embedding: torch.Tensor) -> torch.Tensor:
        """State at the next position for one continuous embedding (d,) -> (d,), with grad."""
        return self.embedding_states(embedding[None])[0]

    def push(self, token: int) -> None:
        """Append a recovered token to the prefix and extend the cache by it."""
        self.push_prefix([token])

    @torch.no_grad()
    def push_prefix(self, tokens) -> None:
        """Append tokens to the prefix with one forward that extends the cache: (n,)."""
        tokens = [int(t) for t in tokens]
        if not tokens:
            return
        if self.cache is None:
            self.cache = lm_mod.new_cache(self.lm)
        ids = torch.tensor([tokens], device=self.lm.device)  # (1, n)
        positions = torch.arange(self.position, self.position + len(tokens),
                                 device=self.lm.device)[None]  # (1, n)
        lm_mod.forward_to(self.lm, self.layer, ids, cache=self.cache, position_ids=positions)
        self.prefix.extend(tokens)


@dataclass
class Acceptance:
    """Accept a candidate when its L2 distance to the observed state is at most
    rel_tol * ||observed|| + abs_tol; among several, the nearest wins.

    The search stops early only on a candidate well inside that tolerance (see
    sipit.invert.sipit.CONFIDENT_FRACTION); otherwise it verifies the whole vocabulary first.
    """

    rel_tol: float
    abs_tol: float
    measured_noise: float

    def tolerance(self, observed: torch.Tensor) -> float:
        return self.rel_tol * float(observed.norm()) + self.abs_tol

    def to_dict(self) -> dict:
        return dict(rel_tol=self.rel_tol, abs_tol=self.abs_tol, measured_noise=self.measured_noise)


@torch.no_grad()
def calibrate(lm: lm_mod.LM, layer: int | str, length: int, capture_dtype: torch.dtype,
              seed: int = 0, batch: int = 8) -> Acceptance:
    """Measure how far verifier states drift from full-forward states on a random prompt.

    The prompt has min(length, 24) random tokens. Each position is verified inside a batch of
    `batch` candidates, as in a real search, and compared with a single full forward (how states
    are captured). The tolerance is 8x the worst relative drift seen, and never below 8 unit
    roundoffs of the coarser of the capture and run dtypes.
    """
    generator = torch.Generator().manual_seed(seed)
    n = max(1, min(length, 24))
    ids = torch.randint(0, lm.vocab_size, (n,), generator=generator).tolist()
    full = lm_mod.states(lm, ids, layer).float()  # (n, d)

    verifier = Verifier(lm, layer)
    worst = 0.0
    for t, token in enumerate(ids):
        others = torch.randint(0, lm.vocab_size, (batch,), generator=generator)
        others[t % batch] = token
        state = verifier.states(others)[t % batch]
        drift = float((state - full[t]).norm() / full[t].norm().clamp_min(1e-12))
        worst = max(worst, drift)
        verifier.push(token)

    roundoff = max(UNIT_ROUNDOFF[lm.dtype], UNIT_ROUNDOFF.get(capture_dtype, 0.0))
    rel_tol = max(8 * worst, 8 * roundoff)
    log.info("acceptance: measured drift %.2e, rel_tol %.2e", worst, rel_tol)
    return Acceptance(rel_tol=rel_tol, abs_tol=1e-6, measured_noise=worst)
