"""Shared fixtures: the built-in model loaded once, real prompts, and a tiny foreign model."""

from __future__ import annotations

import pytest
import torch

from sipit import lm as lm_mod


@pytest.fixture(scope="session")
def llama():
    """The built-in Llama model in fp32 on the CPU."""
    return lm_mod.load("shakespeare-llama")


@pytest.fixture(scope="session")
def wiki_prompts():
    """Real Wikipedia segments from the shared data, or skip when it is absent."""
    from sipit.data import wiki20
    from sipit.errors import SipitError

    try:
        return wiki20(60)
    except SipitError as err:
        pytest.skip(f"shared data not available: {err}")


@pytest.fixture(scope="session")
def other_model_dir(tmp_path_factory, llama):
    """A tiny Llama of another width, saved as a local folder with the built-in tokenizer."""
    from sipit.models.archs import build_llama

    torch.manual_seed(1)
    model = build_llama(llama.vocab_size, hidden_size=64, intermediate_size=128,
                        num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=2)
    path = tmp_path_factory.mktemp("other-model")
    model.save_pretrained(path)
    llama.tokenizer.save_pretrained(path)
    return path
