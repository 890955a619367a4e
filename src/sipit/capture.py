"""Capture: run a prompt through a model and keep its per-position hidden states at one layer."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

import sipit
from sipit import lm as lm_mod
from sipit import states as states_mod

log = logging.getLogger(__name__)


def capture(
    model: str | lm_mod.LM,
    text: str | None = None,
    layer: str | int = "-1",
    token_ids: list[int] | None = None,
    out: str | Path | None = None,
    device: str | None = "cpu",
    dtype: str = "fp32",
) -> states_mod.States:
    """Hidden states (T, d) of a prompt at `layer`, with provenance; written to `out` if given.

    Give the prompt as `text` or as `token_ids`. `model` is a built-in name, a folder, a hub id
    or an already loaded `sipit.lm.LM`. Layer names are documented in `sipit.lm`.
    """
    lm = model if isinstance(model, lm_mod.LM) else lm_mod.load(model, device, dtype)
    ids = lm.encode(text) if token_ids is None else list(token_ids)
    lm.check_length(len(ids))
    bad = [i for i in ids if not 0 <= i < lm.vocab_size]
    if bad:
        raise lm_mod.SipitError(f"token id {bad[0]} outside the vocabulary (size {lm.vocab_size})")

    where = lm_mod.parse_layer(layer, lm.n_layers, lm.n_loops)
    hidden = lm_mod.states(lm, ids, where)  # (T, d)
    result = states_mod.States(states=hidden.cpu(), meta=provenance(lm, where, len(ids)))
    if out is not None:
        states_mod.save(out, result)
    return result


def provenance(lm: lm_mod.LM, layer: int | str, length: int) -> dict:
    """The metadata a states file carries: enough to find and check the model, no tokens."""
    return dict(
        format=states_mod.FORMAT,
        model=lm.name,
        config_hash=lm.config_hash,
        weights_hash=states_mod.weights_hash(lm.model),
        weights_hash_bf16=states_mod.weights_hash(lm.model, torch.bfloat16),
        layer=str(layer),
        dtype=lm.dtype_name,
        length=length,
        hidden_size=lm.hidden_size,
        n_layers=lm.n_layers,
        sipit_version=sipit.__version__,
    )
