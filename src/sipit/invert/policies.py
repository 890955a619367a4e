"""Candidate policies: the order in which SipIt tries tokens at a position.

A policy yields batches of not-yet-tried token ids; the search verifies each batch and stops
at the first batch holding an accepted candidate. Whatever a policy leaves untried is covered
by the exhaustive fallback, so every policy is exact when the acceptance rule is.

    random      a random permutation of the vocabulary (the paper's brute-force ablation)
    gradient    the paper's policy: gradient steps on a continuous proxy embedding, each
                proposing the nearest untried token embedding (published hyperparameters)
    exhaustive  the whole vocabulary, nearest state wins (the guaranteed fallback)
    probe       default: a closed-form linear probe proposes one candidate, a linear
                correction around the nearest verified one proposes 3, 4 and 8 more; if
                none is accepted, Gauss-Newton on the input embedding re-ranks the
                vocabulary, verified in batches of growing size (16, 64, 256, ...)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from sipit import lm as lm_mod
from sipit.errors import SipitError
from sipit.invert.verify import UNIT_ROUNDOFF, Verifier

log = logging.getLogger(__name__)


@dataclass
class Step:
    """What a policy may look at for one position."""

    position: int
    observed: torch.Tensor  # all observed states (T, d), fp32
    verifier: Verifier
    best_token: Callable[[], int] = lambda: -1  # nearest verified candidate so far
    best_state: Callable[[], torch.Tensor | None] = lambda: None  # its state (d,)

    @property
    def target(self) -> torch.Tensor:
        return self.observed[self.position]


class Policy:
    """Base class: `candidates(step)` yields LongTensor batches of token ids."""

    name = "base"

    def __init__(self, lm, layer, seed: int = 0):
        self.lm, self.layer, self.seed = lm, layer, seed

    def prepare(self, observed: torch.Tensor) -> None:
        """Called once before the search with all observed states (T, d)."""

    def candidates(self, step: Step) -> Iterator[torch.Tensor]:
        raise NotImplementedError


class RandomPolicy(Policy):
    """A fresh random permutation of the vocabulary at every position, in batches."""

    name = "random"

    def __init__(self, lm, layer, seed: int = 0, batch: int = 256):
        super().__init__(lm, layer, seed)
        self.batch = batch
        self.generator = torch.Generator().manual_seed(seed)

    def candidates(self, step: Step) -> Iterator[torch.Tensor]:
        yield from torch.randperm(self.lm.vocab_size, generator=self.generator).split(self.batch)


class ExhaustivePolicy(Policy):
    """The whole vocabulary in one pass; the search then takes the nearest state."""

    name = "exhaustive"
    exhaustive = True

    def candidates(self, step: Step) -> Iterator[torch.Tensor]:
        yield torch.arange(self.lm.vocab_size)


class ProbePolicy(Policy):
    """Probe, then anchored corrections, then Gauss-Newton, verifying small batches first.

    1. The probe's top token (sipit.invert.probe) is verified alone.
    2. Anchored corrections: from the nearest verified candidate a, the probe's correction
       predicts e(a) + C (h_t - h(a)); the untried tokens nearest to it are verified, 3, then
       4, then 8 (4, 8 and 16 candidates in all), each round from the newest nearest anchor.
       The first prediction is refined by `first_steps` Gauss-Newton steps (below) before
       its tokens are verified: deep layers are too nonlinear for the correction alone.
    3. If none is accepted, damped Gauss-Newton on ||state(e) - observed||^2 over the input
       embedding e starts from the nearest verified candidate (Jacobian by finite differences,
       one batched forward of d + 1 embeddings per step); the untried vocabulary is re-ranked
       by cosine similarity to the solution and verified in batches of 16, 64, 256, then 1024.

    Proposals only need to be good, not to match the run's numerics: when the run is in fp16 or
    bf16, the probe and the Gauss-Newton steps use an fp32 copy of the model (the guide), whose
    finite differences are not drowned in half-precision rounding. Candidates are still
    verified by the model in the run's dtype. Models above GUIDE_MAX_PARAMETERS keep one copy.
    """

    name = "probe"
    anchored = (3, 4, 8)
    schedule = (16, 64, 256)
    gauss_newton_steps = 6
    first_steps = 3  # Gauss-Newton steps refining the first correction (before 4 candidates)
    damping = 1e-2
    step = 1e-3  # finite-difference step, relative to the embedding scale (at least 8 ulp)

    def prepare(self, observed: torch.Tensor) -> None:
        from sipit.invert import probe

        self.guide = guide_model(self.lm)
        self.guide_verifier = None if self.guide is self.lm else Verifier(self.guide, self.layer)
        self.probe = probe.load_or_fit(self.guide, self.layer)
        self.ranking = self.probe.scores(observed.cpu())  # (T, V)
        self.table = self.lm.model.get_input_embeddings().weight.detach().float()  # (V, d)
        self.table_cpu = self.table.cpu()

    def candidates(self, step: Step) -> Iterator[torch.Tensor]:
        untried = torch.ones(self.lm.vocab_size, dtype=torch.bool)
        first = self.ranking[step.position].argmax().view(1)
        untried[first] = False
        yield first

        for i, size in enumerate(self.anchored):
            anchor = step.best_token()
            predicted = self.probe.corrected(self.table_cpu[anchor], step.best_state().cpu(),
                                             step.target.cpu())  # (d,)
            if i == 0 and self.first_steps:
                predicted = self.gauss_newton(step, predicted.to(self.table.device),
                                              self.first_steps).cpu()
            distances = (self.table_cpu - predicted).norm(dim=-1)  # (V,)
            distances[~untried] = float("inf")
            batch = distances.topk(size, largest=False).indices
            untried[batch] = False
            yield batch

        refined = self.gauss_newton(step, self.table[step.best_token()].clone())
        cosine = (nn_normalize(self.table) @ nn_normalize(refined)).cpu()  # (V,)
        cosine[~untried] = float("-inf")
        order = cosine.argsort(descending=True)[: int(untried.sum())]
        start = 0
        for size in self.schedule:
            yield order[start:size]
            start = size
        yield from order[start:].split(1024)

    def guide_at(self, step: Step) -> Verifier:
        """The verifier proposals are computed with, its prefix caught up with the search's."""
        if self.guide_verifier is None:
            return step.verifier
        self.guide_verifier.push_prefix(step.verifier.prefix[self.guide_verifier.position:])
        return self.guide_verifier

    @torch.no_grad()
    def gauss_newton(self, step: Step, embedding: torch.Tensor, steps: int | None = None
                     ) -> torch.Tensor:
        """Damped Gauss-Newton on the input embedding; returns the best iterate (d,)."""
        d = len(embedding)
        verifier = self.guide_at(step)
        relative = max(self.step, 8 * UNIT_ROUNDOFF[self.guide.dtype])
        eps = relative * float(self.table.norm(dim=-1).mean()) / d**0.5
        best, best_residual = embedding, float("inf")
        for _ in range(steps or self.gauss_newton_steps):
            probes = torch.cat([embedding[None], embedding[None] + eps * torch.eye(d)])
            states = verifier.embedding_states(probes)  # (d + 1, d)
            residual = step.target - states[0]
            if float(residual.norm()) < best_residual:
                best, best_residual = embedding, float(residual.norm())
            jacobian = (states[1:] - states[0]).T / eps  # (d_out, d_in)
            normal = jacobian.T @ jacobian
            normal += self.damping * normal.diagonal().mean() * torch.eye(d)
            embedding = embedding + torch.linalg.solve(normal, jacobian.T @ residual)
        return best


GUIDE_MAX_PARAMETERS = 2_000_000_000  # an fp32 guide costs 4 bytes per parameter


def guide_model(lm):
    """The model proposals are computed with: `lm` itself in fp32, else an fp32 copy of it,
    made once per loaded model (kept in lm.extra, so repeated inversions share it)."""
    if lm.dtype == torch.float32:
        return lm
    n_parameters = sum(p.numel() for p in lm.model.parameters())
    if n_parameters > GUIDE_MAX_PARAMETERS:
        log.info("%s has %.1fB parameters: proposals run in %s, not an fp32 copy",
                 lm.name, n_parameters / 1e9, lm.dtype_name)
        return lm
    if "fp32_guide" not in lm.extra:
        lm.extra["fp32_guide"] = lm_mod.cast(lm, torch.float32)
    return lm.extra["fp32_guide"]


def nn_normalize(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


class GradientPolicy(Policy):
    """The paper's gradient-guided policy with its published hyperparameters.

    A proxy embedding starts at a random token's embedding. Each proposal takes one SGD step on
    the mean squared error between the proxy's state and the observed state (fp32, gradient norm
    clipped to 1, step size 1.0 decayed linearly to 0.01 over the first window) and proposes the
    untried token whose embedding is nearest (L2) to the proxy. Every `window` proposals the
    proxy snaps to that nearest untried embedding; the window is 50, at the first position
    50 * (1 + |V| // 25000). At most |V| proposals; a NaN ends the policy (the fallback follows).
    """

    name = "gradient"

    def __init__(self, lm, layer, seed: int = 8, lr: float = 1.0, final_lr_ratio: float = 0.01):
        super().__init__(lm, layer, seed)
        self.lr, self.final_lr_ratio = lr, final_lr_ratio
        self.generator = torch.Generator().manual_seed(seed)
        self.table = lm.model.get_input_embeddings().weight.detach().float()  # (V, d)

    def window(self, position: int) -> int:
        return 50 * (1 + self.lm.vocab_size // 25000) if position == 0 else 50

    def step_size(self, k: int, window: int) -> float:
        decay = min(k, window) / window
        return self.lr * (1 - (1 - self.final_lr_ratio) * decay)

    def nearest_untried(self, proxy: torch.Tensor, untried: torch.Tensor) -> int:
        distances = (self.table - proxy).norm(dim=-1)
        distances[~untried] = float("inf")
        return int(distances.argmin())

    def candidates(self, step: Step) -> Iterator[torch.Tensor]:
        vocab = self.lm.vocab_size
        window = self.window(step.position)
        untried = torch.ones(vocab, dtype=torch.bool, device=self.table.device)
        start = int(torch.randint(0, vocab, (1,), generator=self.generator))
        proxy = self.table[start].clone()

        for k in range(vocab):
            proxy = self.sgd_step(step, proxy, self.step_size(k, window))
            if not torch.isfinite(proxy).all():
                log.warning("gradient policy hit NaN at position %d; falling back", step.position)
                return
            token = self.nearest_untried(proxy, untried)
            untried[token] = False
            yield torch.tensor([token])
            if (k + 1) % window == 0 and untried.any():
                proxy = self.table[self.nearest_untried(proxy, untried)].clone()

    def sgd_step(self, step: Step, proxy: torch.Tensor, lr: float) -> torch.Tensor:
        proxy = proxy.detach().requires_grad_(True)
        with torch.enable_grad():
            state = step.verifier.state_of_embedding(proxy)
            loss = torch.nn.functional.mse_loss(state, step.target.to(state.device))
            (grad,) = torch.autograd.grad(loss, proxy)
        norm = grad.norm()
        if norm > 1.0:
            grad = grad / norm
        return (proxy - lr * grad).detach()


POLICIES = {p.name: p for p in (ProbePolicy, GradientPolicy, RandomPolicy, ExhaustivePolicy)}
DEFAULT = "probe"


def make(name: str, lm, layer, seed: int | None = None) -> Policy:
    """A policy by name, for one model and layer."""
    if name not in POLICIES:
        raise SipitError(f"unknown policy {name!r}: choose one of {', '.join(POLICIES)}")
    cls = POLICIES[name]
    return cls(lm, layer) if seed is None else cls(lm, layer, seed=seed)
