"""Cache correctness of the Kimi Linear hybrid, and sipit's cache helpers on it.

Chunked prefill followed by token-by-token decoding (cached convolution, recurrent and attention
state) must equal one full forward; left padding must not reach the recurrent state; the
verifier's per-candidate copies of the prefix cache must give the states of a full forward.
"""

from __future__ import annotations

import logging

import pytest
import torch

from sipit import lm as lm_mod
from sipit.invert.verify import Verifier
from sipit.models import archs, kimi

log = logging.getLogger(__name__)

VOCAB = 97
TINY = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=2,
            kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
            linear_num_heads=2, linear_head_dim=16)


def tiny_model(ratio: int = 3, seed: int = 0):
    """A tiny random 4-layer Kimi Linear model with strong-ish, varied decays."""
    torch.manual_seed(seed)
    model = kimi.build_kimi(VOCAB, ratio=ratio, **TINY).eval()
    for layer in model.model.layers:
        if layer.block_type == kimi.KDA:
            torch.nn.init.uniform_(layer.self_attn.forget_gate.dt_bias, -2.0, 1.0)
    return model


def tiny_lm(ratio: int = 3):
    return lm_mod.wrap(tiny_model(ratio), tokenizer=None, name="tiny-kimi")


def ids(length: int, seed: int = 1, batch: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def test_layer_pattern():
    assert kimi.layer_types(4, 3) == ["linear_attention"] * 3 + ["full_attention"]
    assert kimi.layer_types(8, 1) == ["linear_attention", "full_attention"] * 4
    assert kimi.layer_types(8, 7)[-1] == "full_attention"
    assert kimi.layer_types(8, 7).count("linear_attention") == 7
    assert set(kimi.layer_types(4, 0)) == {"full_attention"}
    assert kimi.kda_layers(tiny_model().config) == [0, 1, 2]


def test_registered_archs():
    for name in ("kimi", "kimi-full", "kimi-r1", "kimi-r7"):
        assert name in archs.ARCHS
    full = archs.build("kimi-full", VOCAB, **TINY)
    assert kimi.kda_layers(full.config) == []


@pytest.mark.parametrize("prefill", [1, 5, 70])
@torch.no_grad()
def test_prefill_then_decode_equals_full_forward(prefill):
    model, x = tiny_model(), ids(90)
    full = model(input_ids=x).logits  # (1, 90, V)

    cache = lm_mod.new_cache(lm_mod.wrap(model, None, "tiny"))
    parts = [model(input_ids=x[:, :prefill], cache=cache, use_cache=True).logits]
    for t in range(prefill, x.shape[1]):  # one token at a time: recurrent KDA, conv update
        parts.append(model(input_ids=x[:, t:t + 1], cache=cache, use_cache=True).logits)
    err = rel_err(torch.cat(parts, dim=1), full)
    log.info("prefill %d + decode vs full forward: rel err %.2e", prefill, err)
    assert err < 1e-4


@torch.no_grad()
def test_prefill_in_pieces_equals_full_forward():
    """Multi-token continuation from a cache (chunked path with an initial state and conv state)."""
    model, x = tiny_model(), ids(100)
    full = model(input_ids=x).logits
    cache = lm_mod.new_cache(lm_mod.wrap(model, None, "tiny"))
    parts = [model(input_ids=x[:, a:b], cache=cache, use_cache=True).logits
             for a, b in ((0, 3), (3, 67), (67, 100))]
    assert rel_err(torch.cat(parts, dim=1), full) < 1e-4


def recurrent_states(cache) -> list[torch.Tensor]:
    """The KDA states of the layers that have run: (B, H, dk, dv) each."""
    return [layer.recurrent_states[0] for layer in cache.layers
            if getattr(layer, "recurrent_states", {0: None})[0] is not None]


@torch.no_grad()
def test_left_padding_does_not_leak_into_the_state():
    model, x, pad = tiny_model(), ids(30, seed=3), 11
    alone_cache = lm_mod.new_cache(lm_mod.wrap(model, None, "tiny"))
    alone = model(input_ids=x, cache=alone_cache, use_cache=True).logits

    padded = torch.cat([torch.full((1, pad), 5), x], dim=1)
    batch = torch.cat([padded, ids(30 + pad, seed=4)])  # a second, unpadded row
    mask = torch.ones_like(batch)
    mask[0, :pad] = 0
    cache = lm_mod.new_cache(lm_mod.wrap(model, None, "tiny"))
    out = model(input_ids=batch, attention_mask=mask, cache=cache, use_cache=True).logits
    assert rel_err(out[0, pad:], alone[0]) < 1e-4
    for state, state_alone in zip(recurrent_states(cache), recurrent_states(alone_cache),
                                  strict=True):
        assert rel_err(state[0], state_alone[0]) < 1e-4

    # decoding on from the padded cache continues the unpadded sequence
    nxt = ids(1, seed=5)
    step = model(input_ids=torch.cat([nxt, nxt]), cache=cache, use_cache=True,
                 attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)).logits
    ref = model(input_ids=nxt, cache=alone_cache, use_cache=True).logits
    assert rel_err(step[0], ref[0]) < 1e-4


@torch.no_grad()
def test_expand_cache_repeats_recurrent_and_conv_states():
    lm = tiny_lm()
    cache = lm_mod.new_cache(lm)
    lm.model(input_ids=ids(9), cache=cache, use_cache=True)
    grown = lm_mod.expand_cache(cache, 5)
    for layer, original in zip(grown.layers, cache.layers, strict=True):
        if hasattr(layer, "recurrent_states"):
            assert layer.recurrent_states[0].shape[0] == 5
            assert layer.conv_states[0].shape[0] == 5
            assert original.recurrent_states[0].shape[0] == 1
            assert torch.equal(layer.recurrent_states[0][3], original.recurrent_states[0][0])
        else:
            assert layer.keys.shape[0] == 5 and original.keys.shape[0] == 1


@pytest.mark.parametrize("layer", [1, 3, 4, "final"])
@torch.no_grad()
def test_verifier_candidates_match_full_forward(layer):
    """Candidate states from the expanded prefix cache equal full-forward states, at KDA layers
    (1, 3) and at the attention layer (4); the prefix cache itself is left unchanged."""
    lm = tiny_lm()
    prefix = ids(12, seed=6)[0].tolist()
    verifier = Verifier(lm, lm_mod.parse_layer(layer, lm.n_layers), max_batch=4)
    for token in prefix:
        verifier.push(token)
    before = [s.clone() for s in recurrent_states(verifier.cache)]

    candidates = torch.tensor([3, 50, 7, 96, 0, 41])
    got = verifier.states(candidates)  # (6, d), in batches of 4 and 2
    for row, token in zip(got, candidates.tolist(), strict=True):
        want = lm_mod.states(lm, prefix + [token], verifier.layer)[-1]
        assert rel_err(row, want) < 1e-4
    for state, old in zip(recurrent_states(verifier.cache), before, strict=True):
        assert torch.equal(state, old)


@torch.no_grad()
def test_expand_cache_keeps_llama_behaviour():
    """Attention-only caches still repeat keys and values and leave the original alone."""
    model = archs.build("llama", VOCAB, hidden_size=32, intermediate_size=64,
                        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2).eval()
    lm = lm_mod.wrap(model, None, "tiny-llama")
    cache = lm_mod.new_cache(lm)
    model(input_ids=ids(7), cache=cache, use_cache=True)
    grown = lm_mod.expand_cache(cache, 3)
    for layer, original in zip(grown.layers, cache.layers, strict=True):
        assert layer.keys.shape[0] == 3 and original.keys.shape[0] == 1
        assert torch.equal(layer.values[2], original.values[0])
