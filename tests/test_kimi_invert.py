"""SipIt on the Kimi Linear hybrid: exact inversion at KDA and attention layers.

The fast tests use a tiny random hybrid; the slow one inverts wiki20 prompts with the built-in
`shakespeare-kimi` at a KDA layer (1) and at the attention layer (4).
"""

from __future__ import annotations

import pytest
import torch

import sipit
from sipit import lm as lm_mod
from sipit.data import wiki20
from sipit.models import builtin, kimi
from sipit.train import load_tokenizer

TINY = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=2,
            kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
            linear_num_heads=2, linear_head_dim=16)


@pytest.fixture(scope="module")
def tiny_lm():
    torch.manual_seed(0)
    model = kimi.build_kimi(200, **TINY).eval()
    return lm_mod.wrap(model, load_tokenizer(builtin.DEFAULT), "tiny-kimi")


@pytest.mark.parametrize("layer", ["1", "3", "4"])
def test_exact_inversion_tiny_hybrid(tiny_lm, layer):
    ids = torch.randint(0, 200, (12,), generator=torch.Generator().manual_seed(1)).tolist()
    states = sipit.capture(tiny_lm, token_ids=ids, layer=layer)
    result = sipit.invert(states, model=tiny_lm, policy="exhaustive")
    assert result.token_ids == ids
    assert result.all_accepted


@pytest.mark.slow
@pytest.mark.skipif("shakespeare-kimi" not in builtin.names(), reason="built-in not present")
@pytest.mark.parametrize("layer", ["1", "4"])
def test_exact_inversion_wiki20_builtin(layer):
    lm = lm_mod.load("shakespeare-kimi")
    assert lm.model.config.layer_types[int(layer) - 1] == (
        kimi.KDA if layer == "1" else kimi.FULL)
    for text in wiki20(3):
        ids = lm.encode(text)[:20]
        states = sipit.capture(lm, token_ids=ids, layer=layer)
        result = sipit.invert(states, model=lm)
        assert result.token_ids == ids
