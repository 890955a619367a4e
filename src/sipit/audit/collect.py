"""Hidden states at several layers from one forward pass, for the audits.

`sipit.lm.forward_to` returns one layer; an audit wants every layer of the same run. Here, hooks
on the blocks keep the requested layers (only the positions the audit needs, in fp32) while one
forward runs up to the highest of them. Also here: parsing a list of layer names, and grouping
prompts by length so that batches need no padding (states of a causal model then match the
single-prompt forward up to kernel rounding).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator

import torch

from sipit import lm as lm_mod
from sipit.errors import SipitError

log = logging.getLogger(__name__)

Layer = int | str  # 0..n_layers, lm_mod.FINAL, or "u.i" / "u.final" on looped models


def layer_order(layer: Layer, n_loops: int) -> tuple[int, float]:
    """Where a layer comes in the forward pass: (loop step, block), the final norm last."""
    loop, block = lm_mod.loop_target(layer, n_loops)
    return loop, math.inf if block == lm_mod.FINAL else float(block)


def all_layers(n_layers: int, n_loops: int) -> list[Layer]:
    """Every block and the final norm; on a looped model, those of every loop step."""
    if n_loops == 1:
        return [*range(1, n_layers + 1), lm_mod.FINAL]
    return [f"{u}.{i}" for u in range(1, n_loops + 1)
            for i in (*range(1, n_layers + 1), lm_mod.FINAL)]


def parse_layers(spec: str | list | None, n_layers: int, n_loops: int = 1) -> list[Layer]:
    """Layer names -> unique layers in forward order. None or "all" means `all_layers`.

    Layer 0 (the embedding output) is allowed but not in "all": at the last position it is
    the embedding of the last token alone, so prompts ending in the same token collide there.
    """
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "all"):
        return all_layers(n_layers, n_loops)
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [str(item).strip() for item in items if str(item).strip()]
    layers = [lm_mod.parse_layer(name, n_layers, n_loops) for name in names]
    if not layers:
        raise SipitError("no layers given: use e.g. --layers 1,2,final or --layers all")
    return sorted(set(layers), key=lambda layer: layer_order(layer, n_loops))


@torch.no_grad()
def forward_layers(
    lm: lm_mod.LM,
    layers: list[Layer],
    input_ids: torch.Tensor,
    pick: Callable[[torch.Tensor], torch.Tensor],
    cache=None,
    position_ids: torch.Tensor | None = None,
) -> dict[Layer, torch.Tensor]:
    """Run input_ids (B, T) up to the highest layer; return {layer: pick(state (B, T, d))}.

    `pick` selects what to keep (e.g. the last position) so full states are never stored.
    Loop-step names of looped models are kept on the right call of the shared block.
    """
    top = max(layers, key=lambda layer: layer_order(layer, lm.n_loops))
    kept: dict[Layer, torch.Tensor] = {}
    handles = []
    for layer in layers:
        loop, block = lm_mod.loop_target(layer, lm.n_loops)
        if block == lm_mod.FINAL or layer == top:
            continue

        def keep(hidden, _layer=layer):
            kept[_layer] = pick(hidden)

        handles.append(lm_mod.hook_state(lm.blocks, block, loop, keep))
    try:
        state = lm_mod.forward_to(lm, top, input_ids, cache=cache, position_ids=position_ids)
    finally:
        for handle in handles:
            handle.remove()
    for layer in layers:  # the top, and its other names (e.g. "final" and "4.final")
        if layer not in kept:
            kept[layer] = pick(state)
    return kept


def last_position(hidden: torch.Tensor) -> torch.Tensor:
    """(B, T, d) -> (B, d) in fp32 on the CPU."""
    return hidden[:, -1].float().cpu()


def length_batches(lengths: list[int], max_tokens: int) -> Iterator[list[int]]:
    """Indices grouped by equal length, in batches of at most max_tokens tokens."""
    by_length: dict[int, list[int]] = {}
    for index, length in enumerate(lengths):
        by_length.setdefault(length, []).append(index)
    for length in sorted(by_length):
        group = by_length[length]
        size = max(1, max_tokens // length)
        for start in range(0, len(group), size):
            yield group[start:start + size]


@torch.no_grad()
def last_token_states(
    lm: lm_mod.LM,
    prompts: list[list[int]],
    layers: list[Layer],
    max_tokens: int = 8192,
    progress: Callable | None = None,
) -> dict[Layer, torch.Tensor]:
    """Last-position states of every prompt at every layer: {layer: (N, d) fp32 on the CPU}."""
    n, d = len(prompts), lm.hidden_size
    out = {layer: torch.empty(n, d) for layer in layers}
    done = 0
    for batch in length_batches([len(p) for p in prompts], max_tokens):
        ids = torch.tensor([prompts[i] for i in batch], device=lm.device)  # (B, T)
        kept = forward_layers(lm, layers, ids, last_position)
        index = torch.tensor(batch)
        for layer in layers:
            out[layer][index] = kept[layer]
        done += len(batch)
        if progress is not None:
            progress(done, n, "states")
    return out


@torch.no_grad()
def continuation_states(
    lm: lm_mod.LM,
    prefix: list[int],
    layers: list[Layer],
    candidates: torch.Tensor,
    chunk: int = 512,
) -> dict[Layer, torch.Tensor]:
    """States of prefix + each candidate token at the new position: {layer: (K, d) fp32}.

    The prefix is run once into a cache; candidates run as batches of single-token
    continuations of a copy of it (the batch trick of `sipit.invert.verify.Verifier`).
    """
    cache = None
    if prefix:
        cache = lm_mod.new_cache(lm)
        forward_layers(lm, layers, torch.tensor([prefix], device=lm.device), last_position,
                       cache=cache)
    parts: dict[Layer, list[torch.Tensor]] = {layer: [] for layer in layers}
    for piece in candidates.to(lm.device).split(chunk):
        grown = None if cache is None else lm_mod.expand_cache(cache, len(piece))
        positions = torch.full((len(piece), 1), len(prefix), device=lm.device, dtype=torch.long)
        kept = forward_layers(lm, layers, piece[:, None], last_position, cache=grown,
                              position_ids=positions)  # each (K', d)
        for layer in layers:
            parts[layer].append(kept[layer])
    return {layer: torch.cat(parts[layer]) for layer in layers}
