"""Model access: layer naming, forward passes stopped at a layer, loading errors."""

from __future__ import annotations

import pytest
import torch

from sipit import lm as lm_mod
from sipit.errors import SipitError


def test_parse_layer_names(llama):
    n = llama.n_layers
    assert lm_mod.parse_layer("0", n) == 0
    assert lm_mod.parse_layer(2, n) == 2
    assert lm_mod.parse_layer("-1", n) == n
    assert lm_mod.parse_layer("final", n) == lm_mod.FINAL
    for bad in ("5", "-6", "middle", "1.5"):
        with pytest.raises(SipitError):
            lm_mod.parse_layer(bad, n)


@torch.no_grad()
def test_layers_match_hugging_face_hidden_states(llama):
    ids = torch.tensor([llama.encode("Good morrow, cousin.")])
    hf = llama.model(ids, output_hidden_states=True).hidden_states  # n_layers + 1 entries
    for layer in range(llama.n_layers):  # HF's entry i < n is the output of block i
        assert torch.equal(lm_mod.forward_to(llama, layer, ids), hf[layer])
    assert torch.equal(lm_mod.forward_to(llama, "final", ids), hf[-1])
    embeddings = llama.model.get_input_embeddings()(ids)
    assert torch.equal(lm_mod.forward_to(llama, 0, ids), embeddings)


@torch.no_grad()
def test_last_block_is_before_the_final_norm(llama):
    ids = torch.tensor([llama.encode("Good morrow, cousin.")])
    last = lm_mod.forward_to(llama, llama.n_layers, ids)
    final = lm_mod.forward_to(llama, "final", ids)
    assert not torch.allclose(last, final)
    assert torch.allclose(llama.model.model.norm(last), final)


@torch.no_grad()
def test_forward_stops_at_the_layer(llama):
    ran = []
    handles = [block.register_forward_hook(lambda m, a, o, i=i: ran.append(i))
               for i, block in enumerate(llama.blocks)]
    try:
        lm_mod.forward_to(llama, 2, torch.tensor([[5, 6, 7]]))
    finally:
        for handle in handles:
            handle.remove()
    assert ran == [0, 1]


@torch.no_grad()
def test_cached_candidates_match_full_forward(llama):
    ids = llama.encode("Now is the winter of our discontent")
    full = lm_mod.states(llama, ids, 3)
    cache = lm_mod.new_cache(llama)
    lm_mod.forward_to(llama, 3, torch.tensor([ids[:-1]]), cache=cache)
    candidates = torch.tensor([[ids[-1]], [11], [12]])
    position = torch.full((3, 1), len(ids) - 1)
    grown = lm_mod.expand_cache(cache, 3)
    out = lm_mod.forward_to(llama, 3, candidates, cache=grown, position_ids=position)
    assert torch.allclose(out[0, 0], full[-1], atol=1e-4)
    assert cache.get_seq_length() == len(ids) - 1  # the prefix cache is left as it was


def test_unknown_model_and_bad_options():
    with pytest.raises(SipitError, match="not found"):
        lm_mod.load("./no/such/folder")
    with pytest.raises(SipitError, match="dtype"):
        lm_mod.resolve_dtype("fp8")
    with pytest.raises(SipitError, match="device"):
        lm_mod.resolve_device("tpu")


def test_empty_and_long_prompts(llama):
    with pytest.raises(SipitError, match="empty"):
        llama.encode("   ")
    with pytest.raises(SipitError, match="too long"):
        llama.check_length(llama.max_positions + 1)
