"""Margins: how much noise on a hidden state inversion tolerates, per position of a prompt.

At position t, with the true prefix (tokens before t), every candidate token v gives a state
h_t(v). The margin Delta_t is the distance from the true token's state to the nearest other
candidate's state. SipIt's robustness theorem: recovery stays exact while the noise on the
observed state is below Delta_t / 2.

Storing a state in a float format rounds each entry by at most u |h_k| (u the format's unit
roundoff), so the rounding noise is at most u ||h||_2: the format's resolution at that state's
scale. A position is safe in a format when u ||h|| < Delta_t / 2 (and, for fp16, no entry
overflows). Only storage rounding is modelled; a model run in that format adds its own drift.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from sipit import lm as lm_mod
from sipit.audit import collect
from sipit.audit.pairs import Prompt, encode_prompts
from sipit.errors import SipitError
from sipit.invert.verify import UNIT_ROUNDOFF

log = logging.getLogger(__name__)

FORMATS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FP16_MAX = 65504.0


@dataclass
class MarginsReport:
    """One row per (prompt, position, layer): margin, nearest rival, state scale, roundings."""

    model: str
    dtype: str
    device: str
    prompts: list[str]
    rows: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict:
        """Per layer: smallest margin and the share of positions safe in each format."""
        out: dict[str, dict] = {}
        for layer in dict.fromkeys(r["layer"] for r in self.rows):
            rows = [r for r in self.rows if r["layer"] == layer]
            out[layer] = dict(
                positions=len(rows),
                min_margin=min(r["margin"] for r in rows),
                median_norm=sorted(r["norm"] for r in rows)[len(rows) // 2],
                **{f"safe_{f}": sum(r[f"safe_{f}"] for r in rows) / len(rows) for f in FORMATS},
            )
        return out

    def to_dict(self) -> dict:
        return dict(asdict(self), summary=self.summary())


@torch.no_grad()
def position_margins(lm: lm_mod.LM, ids: list[int], where: list, chunk: int = 512,
                     progress: Callable | None = None) -> list[dict]:
    """Margin rows of one prompt (token ids) at every layer in `where`, one per position."""
    rows = []
    tokens = torch.arange(lm.vocab_size)
    for t, true in enumerate(ids):
        states = collect.continuation_states(lm, ids[:t], where, tokens, chunk)  # (V, d)
        for layer in where:
            rows.append(_row(lm, t, true, str(layer), states[layer]))
        if progress is not None:
            progress(t + 1, len(ids), "positions")
    return rows


def _row(lm: lm_mod.LM, t: int, true: int, layer: str, states: torch.Tensor) -> dict:
    """Margin of the true token among all candidates' states (V, d), with dtype roundings."""
    h = states[true].double()
    dist = (states.double() - h).norm(dim=1)  # (V,)
    dist[true] = float("inf")
    rival = int(dist.argmin())
    margin, norm = float(dist[rival]), float(h.norm())
    row = dict(position=t, layer=layer, token_id=int(true), token=lm.decode([true]),
               margin=margin, rival_id=rival, rival=lm.decode([rival]), norm=norm,
               max_abs=float(h.abs().max()))
    for name, fmt in FORMATS.items():
        rounding = UNIT_ROUNDOFF[fmt] * norm
        row[f"rounding_{name}"] = rounding
        row[f"safe_{name}"] = rounding < margin / 2 and not (
            name == "fp16" and row["max_abs"] > FP16_MAX)
    return row


def audit_margins(
    model: str | lm_mod.LM,
    prompts: list[Prompt],
    layers: str | list | None = None,
    device: str | None = "cpu",
    dtype: str = "fp32",
    chunk: int = 512,
    checkpoint: str | Path | None = None,
    progress: Callable | None = None,
) -> MarginsReport:
    """Per-position margins of each prompt at each layer, against fp32/fp16/bf16 resolution.

    Costs one batch of |V| candidate continuations per position. Finished prompts are kept in
    `checkpoint` (JSON) and skipped on resume. `progress(done, total, label)` per position.
    """
    started = time.perf_counter()
    lm = model if isinstance(model, lm_mod.LM) else lm_mod.load(model, device, dtype)
    ids, _ = encode_prompts(lm, prompts, minimum=1)
    where = collect.parse_layers(layers, lm.n_layers, lm.n_loops)
    path = None if checkpoint is None else Path(checkpoint)
    key = json.dumps([ids, [str(x) for x in where]])
    done = _resume(path, key)

    total = sum(len(seq) for seq in ids)
    for p, seq in enumerate(ids):
        if p < len(done):
            continue
        offset = sum(len(s) for s in ids[:p])

        def tick(t, _n, label, _offset=offset):
            if progress is not None:
                progress(_offset + t, total, label)

        done.append([dict(row, prompt=p) for row in position_margins(lm, seq, where, chunk,
                                                                     tick)])
        if path is not None:
            path.write_text(json.dumps(dict(key=key, done=done)))

    report = MarginsReport(model=lm.name, dtype=lm.dtype_name, device=str(lm.device),
                           prompts=[lm.decode(seq) for seq in ids])
    report.rows = [row for rows in done for row in rows]
    report.seconds = time.perf_counter() - started
    return report


def _resume(path: Path | None, key: str) -> list:
    if path is None or not path.is_file():
        return []
    saved = json.loads(path.read_text(encoding="utf-8"))
    if saved.get("key") != key:
        raise SipitError(f"checkpoint {path} was made for other prompts or settings")
    return saved["done"]
