"""Small Kimi Linear models (arXiv 2510.26692) built on transformers' own `KimiLinearForCausalLM`.

A Kimi Linear hybrid interleaves Kimi Delta Attention (KDA) layers, which keep a fixed-size
recurrent state per head, with full-attention layers (multi-head latent attention without
positional encoding, NoPE). Nothing of KDA is re-implemented here: these are configs only.

    build_kimi(vocab, ratio=3)    3 KDA : 1 full attention, the shipped `shakespeare-kimi`
    build_kimi_full(vocab)        the full-attention control: same sizes, every layer attention

The layer pattern for `ratio` r puts a full-attention layer after every r KDA layers, and always
makes the last layer full attention (as Kimi-Linear-48B does); ratio 0 is all full attention.
On CPU (no flash-linear-attention) transformers runs its pure-PyTorch KDA fallbacks.
"""

from __future__ import annotations

import logging

from transformers import KimiLinearConfig, KimiLinearForCausalLM, PreTrainedModel

from sipit.errors import SipitError

log = logging.getLogger(__name__)

KDA = "linear_attention"
FULL = "full_attention"

# KDA chunk length while training: the pure-PyTorch chunked fallback materialises
# (chunk x chunk x head_dim) decay products; chunks of 8 train about 3x faster than 64 on CPU.
TRAIN_CHUNK = 8

# Same width, depth, MLP and head as the built-in Llama model (4 blocks, width 192, untied head).
KIMI_DEFAULTS = dict(
    hidden_size=192,
    intermediate_size=512,  # dense SwiGLU MLP in every layer (no experts)
    num_hidden_layers=4,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    max_position_embeddings=65536,  # NoPE attention and KDA: no learned length limit
    # full attention: MLA with 6 heads; the cache holds kv_lora_rank + qk_rope_head_dim per token
    num_attention_heads=6,
    num_key_value_heads=6,
    q_lora_rank=None,
    kv_lora_rank=64,
    qk_nope_head_dim=32,
    qk_rope_head_dim=16,  # a shared key part; NoPE, so no rotation is applied to it
    v_head_dim=32,
    # KDA: 4 heads of 32 key/value channels, short convolution of kernel 4 (4 not 6 heads:
    # the pure-PyTorch KDA fallback dominates CPU training time, which grows with the heads)
    linear_num_heads=4,
    linear_head_dim=32,
    linear_conv_kernel_dim=4,
    pad_token_id=0,
    bos_token_id=0,
    eos_token_id=0,
)


def layer_types(n_layers: int, ratio: int) -> list[str]:
    """Layer pattern with `ratio` KDA layers per full-attention layer; the last is attention."""
    if ratio < 0:
        raise SipitError(f"bad KDA ratio {ratio}: use 0 (all attention) or a positive integer")
    types = [FULL if ratio == 0 or (i + 1) % (ratio + 1) == 0 else KDA for i in range(n_layers)]
    types[-1] = FULL
    return types


def kimi_config(vocab_size: int, ratio: int = 3, **overrides) -> KimiLinearConfig:
    """A small KimiLinearConfig with `ratio` KDA layers per full-attention layer."""
    settings = {**KIMI_DEFAULTS, **overrides}
    types = layer_types(settings["num_hidden_layers"], ratio)
    return KimiLinearConfig(
        vocab_size=vocab_size,
        layer_types=types,
        mlp_layer_types=["dense"] * len(types),
        **settings,
    )


def build_kimi(vocab_size: int, ratio: int = 3, **overrides) -> PreTrainedModel:
    """A Kimi Linear hybrid (default 3 KDA : 1 NoPE full attention) with the built-in sizes."""
    config = kimi_config(vocab_size, ratio=ratio, **overrides)
    log.info("kimi layers: %s", config.layer_types)
    model = KimiLinearForCausalLM(config)
    use_chunk_size(model, TRAIN_CHUNK)
    return model


def use_chunk_size(model: PreTrainedModel, chunk_size: int) -> list:
    """Make the KDA layers of `model` run the chunked form with chunks of `chunk_size` tokens.

    The chunk size changes only the cost, not the result (up to fp32 rounding). The hooks live
    in memory only: a model loaded from disk uses the library default (64). Returns the handles.
    """
    def add_chunk_size(module, args, kwargs):
        return args, {**kwargs, "chunk_size": chunk_size}

    return [layer.self_attn.register_forward_pre_hook(add_chunk_size, with_kwargs=True)
            for layer in model.model.layers if layer.block_type == KDA]


def build_kimi_full(vocab_size: int, **overrides) -> PreTrainedModel:
    """The full-attention control: the same model with every layer full attention."""
    return build_kimi(vocab_size, ratio=0, **overrides)


def kda_layers(config) -> list[int]:
    """0-based indices of the KDA layers of a Kimi Linear config (empty for other models)."""
    return [i for i, t in enumerate(getattr(config, "layer_types", None) or []) if t == KDA]


def kda_path() -> str:
    """Which KDA kernels transformers will run here: 'fla' (Triton) or 'torch' (the fallback)."""
    import importlib.util

    import torch

    if torch.cuda.is_available() and importlib.util.find_spec("fla") is not None:
        return "fla"
    return "torch"
