"""SipIt: recover a prompt from its hidden states, one position at a time.

Hidden states are causal: the state at position t depends only on tokens 1..t. With the prefix
already recovered, the token at t is the candidate whose state (computed by the verifier from
the cached prefix) matches the observed state within the acceptance rule of the run.
Long runs write a checkpoint after every position and resume from it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from sipit import lm as lm_mod
from sipit import states as states_mod
from sipit.errors import SipitError
from sipit.invert import policies
from sipit.invert.verify import Acceptance, Verifier, calibrate

log = logging.getLogger(__name__)

# A search stops early only on a candidate within tolerance / CONFIDENT_FRACTION; a nearest
# candidate between that and the tolerance is accepted only after the whole vocabulary was
# verified and it is still the nearest (in bf16 wrong tokens can sit just inside the tolerance).
CONFIDENT_FRACTION = 4


@dataclass
class TokenStat:
    """How one position was recovered."""

    position: int
    token_id: int
    token: str
    candidates: int  # candidates verified at this position
    distance: float  # L2 distance of the accepted candidate's state to the observed state
    runner_up: float | None  # distance of the nearest other verified candidate
    tolerance: float  # acceptance threshold at this position
    accepted: bool  # distance <= tolerance (False only if even the nearest failed the rule)
    seconds: float

    @property
    def margin(self) -> float | None:
        return None if self.runner_up is None else self.runner_up - self.distance


@dataclass
class InversionResult:
    """A recovered prompt with per-position statistics."""

    token_ids: list[int]
    text: str
    policy: str
    model: str
    layer: str
    dtype: str
    seconds: float
    acceptance: dict
    positions: list[TokenStat] = field(default_factory=list)

    @property
    def all_accepted(self) -> bool:
        return all(p.accepted for p in self.positions)

    def to_dict(self) -> dict:
        data = asdict(self)
        for stat, row in zip(self.positions, data["positions"], strict=True):
            row["margin"] = stat.margin
        data["all_accepted"] = self.all_accepted
        return data


def invert(
    states: str | Path | states_mod.States,
    model: str | lm_mod.LM | None = None,
    policy: str = policies.DEFAULT,
    device: str | None = "cpu",
    dtype: str | None = None,
    checkpoint: str | Path | None = None,
    force: bool = False,
    progress=None,
) -> InversionResult:
    """Recover the token ids and text behind a states file (or `States`) with SipIt.

    `model` overrides the model named in the file's metadata; `dtype` defaults to the capture
    dtype. `checkpoint` names a JSON file written after every position; an existing one for
    the same states and policy is resumed. `force` skips the model/weights provenance check.
    `progress(done, total)` is called after each position.
    """
    if isinstance(states, states_mod.States):
        states_mod.validate("states", states.states, states.meta)
    elif isinstance(states, str | Path):
        states = states_mod.load(states)
    else:
        raise SipitError(f"invert takes a states file or sipit.States, not {type(states).__name__}")
    meta = states.meta
    lm = model if isinstance(model, lm_mod.LM) else lm_mod.load(
        model or meta["model"], device, dtype or meta["dtype"])
    if dtype is not None and lm_mod.resolve_dtype(dtype) != lm.dtype:
        lm = lm_mod.cast(lm, dtype)
    check_provenance(lm, states, force)

    layer = lm_mod.parse_layer(meta["layer"], lm.n_layers, lm.n_loops)
    observed = states.states.float().to(lm.device)  # (T, d)
    search = Search(lm, layer, policies.make(policy, lm, layer), observed,
                    lm_mod.resolve_dtype(meta["dtype"]))
    done = Checkpoint(checkpoint, states, policy).load()
    return search.run(done, checkpoint=Checkpoint(checkpoint, states, policy), progress=progress)


def check_provenance(lm: lm_mod.LM, states: states_mod.States, force: bool) -> None:
    """Refuse states that were captured from another model (width, config or weights)."""
    meta = states.meta
    if int(meta["hidden_size"]) != lm.hidden_size:
        raise SipitError(f"states have width {meta['hidden_size']} but model {lm.name} has "
                         f"width {lm.hidden_size}: they come from another model")
    if force:
        return
    if meta["config_hash"] != lm.config_hash:
        raise SipitError(f"states were captured from {meta['model']} (config {meta['config_hash']})"
                         f", not {lm.name} (config {lm.config_hash}); --force to try anyway")
    if not states_mod.same_weights(meta, lm.model):
        raise SipitError(f"states were captured from other weights than {lm.name}'s "
                         "(weights fingerprint differs); --force to try anyway")


class Search:
    """The position-by-position search for one states tensor."""

    def __init__(self, lm, layer, policy: policies.Policy, observed: torch.Tensor,
                 capture_dtype: torch.dtype):
        self.lm, self.layer, self.policy, self.observed = lm, layer, policy, observed
        self.verifier = Verifier(lm, layer)
        self.acceptance: Acceptance = calibrate(lm, layer, len(observed), capture_dtype)
        policy.prepare(observed)

    def run(self, done: list[TokenStat], checkpoint=None, progress=None) -> InversionResult:
        started = time.perf_counter()
        stats = list(done)
        self.verifier.push_prefix([stat.token_id for stat in stats])
        if stats:
            log.info("resumed at position %d of %d", len(stats), len(self.observed))

        for position in range(len(stats), len(self.observed)):
            stats.append(self.recover(position))
            if checkpoint is not None:
                checkpoint.save(stats)
            if progress is not None:
                progress(position + 1, len(self.observed))

        ids = [s.token_id for s in stats]
        return InversionResult(
            token_ids=ids, text=self.lm.decode(ids), policy=self.policy.name, model=self.lm.name,
            layer=lm_mod.layer_name(self.layer), dtype=self.lm.dtype_name,
            seconds=time.perf_counter() - started, acceptance=self.acceptance.to_dict(),
            positions=stats,
        )

    def recover(self, position: int) -> TokenStat:
        """Verify the policy's batches until one holds an accepted candidate."""
        started = time.perf_counter()
        target = self.observed[position]
        tolerance = self.acceptance.tolerance(target)
        step = policies.Step(position, self.observed, self.verifier)
        best = Best()
        tried = torch.zeros(self.lm.vocab_size, dtype=torch.bool)
        step.best_token = lambda: best.token
        step.best_state = lambda: best.state

        confident = tolerance / CONFIDENT_FRACTION
        for batch in self.policy.candidates(step):
            self.verify(batch, target, best, tried)
            if best.distance <= confident and not getattr(self.policy, "exhaustive", False):
                break
        if best.distance > confident and not tried.all():
            self.verify((~tried).nonzero()[:, 0], target, best, tried)  # exhaustive fallback
        if best.distance > tolerance:
            log.warning("position %d: nearest candidate at %.3g exceeds tolerance %.3g",
                        position, best.distance, tolerance)

        self.verifier.push(best.token)
        return TokenStat(
            position=position, token_id=best.token, token=self.lm.decode([best.token]),
            candidates=best.count, distance=best.distance,
            runner_up=None if best.runner_up == float("inf") else best.runner_up,
            tolerance=tolerance, accepted=best.distance <= tolerance,
            seconds=time.perf_counter() - started,
        )

    def verify(self, batch: torch.Tensor, target: torch.Tensor, best: Best,
               tried: torch.Tensor) -> None:
        batch = batch[~tried[batch]]
        if len(batch) == 0:
            return
        states = self.verifier.states(batch)  # (K, d)
        distances = (states - target).norm(dim=-1)  # (K,)
        tried[batch] = True
        best.update(batch, distances.cpu(), states)


class Best:
    """The nearest and second-nearest verified candidates so far."""

    def __init__(self):
        self.token, self.distance, self.runner_up, self.count = -1, float("inf"), float("inf"), 0
        self.state: torch.Tensor | None = None  # state of the nearest candidate (d,)

    def update(self, batch: torch.Tensor, distances: torch.Tensor,
               states: torch.Tensor | None = None) -> None:
        self.count += len(batch)
        values, order = distances.sort()
        if states is not None and float(values[0]) < self.distance:
            self.state = states[int(order[0])]
        pool = [(float(values[i]), int(batch[order[i]])) for i in range(min(2, len(values)))]
        pool += [(self.distance, self.token), (self.runner_up, -1)]
        pool.sort(key=lambda x: x[0])
        (self.distance, self.token), (self.runner_up, _) = pool[0], pool[1]


class Checkpoint:
    """Recovered positions so far, as JSON next to the run; tied to the states and policy."""

    def __init__(self, path, states: states_mod.States, policy: str):
        self.path = Path(path) if path else None
        digest = hashlib.sha256(states.states.float().numpy().tobytes()).hexdigest()[:16]
        self.key = dict(states=digest, policy=policy)

    def load(self) -> list[TokenStat]:
        if self.path is None or not self.path.exists():
            return []
        if not self.path.is_file():
            raise SipitError(f"checkpoint {self.path} is not a file")
        try:
            data = json.loads(self.path.read_text())
        except json.JSONDecodeError as err:
            raise SipitError(f"checkpoint {self.path} is not valid JSON; delete it to "
                             "restart") from err
        if not isinstance(data, dict) or data.get("key") != self.key:
            raise SipitError(f"checkpoint {self.path} belongs to other states or another policy")
        try:
            return [TokenStat(**row) for row in data["positions"]]
        except (KeyError, TypeError) as err:
            raise SipitError(f"checkpoint {self.path} is damaged; delete it to restart") from err

    def save(self, stats: list[TokenStat]) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(dict(key=self.key, positions=[asdict(s) for s in stats])))
        tmp.replace(self.path)
