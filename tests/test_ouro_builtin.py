"""The built-in looped model shakespeare-ouro: loads by name, and SipIt inverts its loop steps."""

from __future__ import annotations

import pytest
import torch

import sipit
from sipit import lm as lm_mod
from sipit.data import wiki20
from sipit.models import builtin
from sipit.models.ouro import OuroForCausalLM

NAME = "shakespeare-ouro"
pytestmark = pytest.mark.skipif(builtin.path_of(NAME) is None, reason=f"{NAME} not trained")


def test_builtin_loads_by_name_and_is_small():
    lm = lm_mod.load(NAME)
    assert isinstance(lm.model, OuroForCausalLM)
    assert lm.n_loops == 4 and lm.n_layers == 2
    assert (builtin.path_of(NAME) / "model.safetensors").stat().st_size < 10 * 2**20
    record = builtin.record(NAME)
    assert record["arch"] == "ouro" and record["held_out_loss"] < 6.0
    with torch.no_grad():
        out = lm.model(torch.tensor([lm.encode("To be, or not to be")]))
    assert len(out.loop_logits) == 4
    torch.testing.assert_close(out.exit_probs.sum(-1), torch.ones(out.exit_probs.shape[:2]))


@pytest.mark.slow
@pytest.mark.parametrize("loop", [1, 2, 4])
def test_wiki20_prompts_invert_exactly_from_each_loop_step(loop):
    lm = lm_mod.load(NAME)
    for text in wiki20(3):
        ids = lm.encode(text)[:20]
        states = sipit.capture(lm, token_ids=ids, layer=f"{loop}.-1")
        result = sipit.invert(states, model=lm)
        assert result.token_ids == ids and result.all_accepted
