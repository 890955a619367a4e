"""The exhaustive continuation test: extend a prefix by every vocabulary token, compare all.

For each prefix, the |V| prompts "prefix + v" differ only in their last token; their last-token
states at each layer come from one cached prefix and batched single-token continuations
(`collect.continuation_states`), and all |V|(|V|-1)/2 pairs are scanned per prefix and layer
with the same exact-minimum scan as the pairwise test. Prefixes can be given, or taken from
the closest pairs of a pairwise report (the paper extends the closest prompts it found).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from sipit import lm as lm_mod
from sipit.audit import collect
from sipit.audit.pairs import Prompt, encode_prompts
from sipit.audit.scan import PairScan, check_lines
from sipit.errors import SipitError
from sipit.invert.verify import UNIT_ROUNDOFF

log = logging.getLogger(__name__)


@dataclass
class ContinuationsReport:
    """Per layer: min distance, collisions and closest pairs over all prefixes' continuations."""

    model: str
    dtype: str
    device: str
    threshold: float
    candidates: int  # continuations per prefix (the vocabulary unless restricted)
    prefixes: list[str]
    layers: list[dict] = field(default_factory=list)
    per_prefix: list[dict] = field(default_factory=list)  # prefix -> layer -> min, collisions
    seconds: float = 0.0

    @property
    def collisions(self) -> int:
        return sum(layer["under_threshold"] for layer in self.layers)

    @property
    def near_collisions(self) -> int:
        return sum(layer["under_floor"] for layer in self.layers)

    @property
    def pairs(self) -> int:
        return sum(layer["pairs"] for layer in self.layers)

    def to_dict(self) -> dict:
        return dict(asdict(self), collisions=self.collisions,
                    near_collisions=self.near_collisions)


def closest_prompts(report: dict | str | Path, k: int = 10,
                    layer: str | None = None) -> list[list[int]]:
    """Up to k distinct prompts (token ids) from the closest pairs of a pairwise report (JSON
    or dict), taken at `layer` (default: the first layer listed), then from the other layers."""
    if not isinstance(report, dict):
        path = Path(report)
        if not path.is_file():
            raise SipitError(f"pairs report not found: {path}")
        try:
            report = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise SipitError(f"{path} is not a pairs report (JSON from `audit pairs`)") from err
    if not isinstance(report, dict):
        raise SipitError("the pairs report is not a JSON object from `audit pairs`")
    layers = report.get("layers", [])
    if layer is not None:
        layers = sorted(layers, key=lambda x: x["layer"] != str(layer))
    found: list[list[int]] = []
    for entry in layers:
        for pair in entry.get("closest", []):
            for key in ("ids_i", "ids_j"):
                if key in pair and pair[key] not in found:
                    found.append(pair[key])
    if not found:
        raise SipitError("the pairs report lists no closest pairs with token ids")
    return found[:k]


def audit_continuations(
    model: str | lm_mod.LM,
    prefixes: list[Prompt],
    layers: str | list | None = None,
    threshold: float = 1e-6,
    k: int = 10,
    candidates: int | None = None,
    device: str | None = "cpu",
    dtype: str = "fp32",
    chunk: int = 512,
    checkpoint: str | Path | None = None,
    progress: Callable | None = None,
) -> ContinuationsReport:
    """Exhaustive continuation test: every prefix extended by each of the first `candidates`
    tokens (default: the whole vocabulary); all continuation pairs of a prefix compared at
    every layer. Finished prefixes are kept in `checkpoint` (JSON) and skipped on resume.
    `progress(done, total, label)` is called after each prefix."""
    check_lines(threshold)
    started = time.perf_counter()
    lm = model if isinstance(model, lm_mod.LM) else lm_mod.load(model, device, dtype)
    ids, _ = encode_prompts(lm, prefixes, minimum=1)
    where = collect.parse_layers(layers, lm.n_layers, lm.n_loops)
    n_cand = min(candidates or lm.vocab_size, lm.vocab_size)
    if n_cand < 2:
        raise SipitError("need at least two candidate tokens")
    tokens = torch.arange(n_cand)

    path = None if checkpoint is None else Path(checkpoint)
    done = _resume(path, ids, where, n_cand, threshold)
    for p, prefix in enumerate(ids):
        if p < len(done):
            continue
        if lm.max_positions is not None and len(prefix) + 1 > lm.max_positions:
            raise SipitError(f"prefix {p} is too long to extend: {len(prefix)} tokens")
        states = collect.continuation_states(lm, prefix, where, tokens, chunk)  # layer: (V, d)
        floor = 16 * UNIT_ROUNDOFF[lm.dtype]  # as in the pairwise test
        done.append({str(x): PairScan(states[x], threshold, k, 2048, 4096, floor=floor).run()
                     for x in where})
        _save(path, ids, where, n_cand, threshold, done)
        if progress is not None:
            progress(p + 1, len(ids), "prefixes")

    report = ContinuationsReport(
        model=lm.name, dtype=lm.dtype_name, device=str(lm.device), threshold=threshold,
        candidates=n_cand, prefixes=[lm.decode(seq) for seq in ids],
    )
    report.layers = [_merge(lm, str(x), done, k) for x in where]
    report.per_prefix = [{layer: dict(min_distance=r["min_distance"],
                                      under_threshold=r["under_threshold"])
                          for layer, r in scans.items()} for scans in done]
    report.seconds = time.perf_counter() - started
    return report


def _merge(lm: lm_mod.LM, layer: str, done: list[dict], k: int) -> dict:
    """One layer's results over all prefixes: totals, minimum, k closest (with their tokens)."""
    closest, collisions, near = [], [], []
    for p, scans in enumerate(done):
        for pair in scans[layer]["closest"]:
            closest.append(dict(pair, prefix=p))
        collisions += [dict(pair, prefix=p) for pair in scans[layer]["collisions"]]
        near += [dict(pair, prefix=p) for pair in scans[layer]["near_collisions"]]
    closest.sort(key=lambda x: (x["distance"], x["prefix"], x["i"], x["j"]))
    for pair in closest[:k] + collisions + near:
        pair["token_i"], pair["token_j"] = lm.decode([pair["i"]]), lm.decode([pair["j"]])
    return dict(
        layer=layer,
        pairs=sum(s[layer]["pairs"] for s in done),
        min_distance=min((s[layer]["min_distance"] for s in done), default=math.nan),
        under_threshold=sum(s[layer]["under_threshold"] for s in done),
        under_floor=sum(s[layer]["under_floor"] for s in done),
        closest=closest[:k], collisions=collisions[:100], near_collisions=near[:100],
    )


def _key(ids: list[list[int]], where: list, n_cand: int, threshold: float) -> str:
    return json.dumps([ids, [str(x) for x in where], n_cand, threshold])


def _resume(path: Path | None, ids, where, n_cand, threshold) -> list[dict]:
    if path is None or not path.is_file():
        return []
    saved = json.loads(path.read_text(encoding="utf-8"))
    if saved.get("key") != _key(ids, where, n_cand, threshold):
        raise SipitError(f"checkpoint {path} was made for other prefixes or settings")
    return saved["done"]


def _save(path: Path | None, ids, where, n_cand, threshold, done: list[dict]) -> None:
    if path is None:
        return
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(dict(key=_key(ids, where, n_cand, threshold), done=done)))
    tmp.replace(path)
