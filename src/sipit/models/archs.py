"""Architectures `sipit train` can build, each a small transformers model for the built-in zoo.

Every builder takes the vocabulary size and keyword overrides and returns a fresh
`PreTrainedModel`. Other modules of `sipit.models` add their architectures to ARCHS.
"""

from __future__ import annotations

from collections.abc import Callable

from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

# The built-in Llama-style decoder: 4 blocks of width 192, untied head, about 3.4M parameters.
LLAMA_DEFAULTS = dict(
    hidden_size=192,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=6,
    num_key_value_heads=6,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)


def build_llama(vocab_size: int, **overrides) -> PreTrainedModel:
    """A Llama decoder (RMSNorm, SwiGLU, RoPE) with the built-in sizes unless overridden."""
    config = LlamaConfig(vocab_size=vocab_size, **{**LLAMA_DEFAULTS, **overrides})
    return LlamaForCausalLM(config)


ARCHS: dict[str, Callable[..., PreTrainedModel]] = {"llama": build_llama}


def _register_kimi() -> None:
    """Kimi Linear: "kimi" (3 KDA : 1 attention; override `ratio`), "kimi-full" (the control),
    and "kimi-rN" (N KDA : 1 attention) for the ratio ablation from the CLI."""
    from functools import partial

    from sipit.models import kimi

    ARCHS["kimi"] = kimi.build_kimi
    ARCHS["kimi-full"] = kimi.build_kimi_full
    for ratio in (0, 1, 3, 7):
        ARCHS[f"kimi-r{ratio}"] = partial(kimi.build_kimi, ratio=ratio)


_register_kimi()


def _register_ouro() -> None:
    """Ouro (looped, 2 blocks x 4 steps) and its controls: "ouro-flat" (same blocks, one step,
    iso-parameter) and "ouro-deep" (8 unshared blocks, one step, iso-FLOP)."""
    from sipit.models import ouro

    ARCHS["ouro"] = ouro.build_ouro
    ARCHS["ouro-flat"] = ouro.build_ouro_flat
    ARCHS["ouro-deep"] = ouro.build_ouro_deep


_register_ouro()


def build(arch: str, vocab_size: int, **overrides) -> PreTrainedModel:
    """A fresh model of architecture `arch`."""
    from sipit.errors import SipitError

    if arch not in ARCHS:
        raise SipitError(f"unknown architecture {arch!r}: choose one of {', '.join(ARCHS)}")
    return ARCHS[arch](vocab_size, **overrides)
