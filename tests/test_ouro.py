"""Ouro looped LM: architecture, exit distribution, training objectives and checkpoint names.

Each check compares the model with a slow, obviously correct reference built in the test.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from sipit.models import ouro_train
from sipit.models.ouro import (
    OuroConfig,
    OuroForCausalLM,
    exit_distribution,
    stage1_loss,
)

VOCAB = 61


def tiny(steps: int = 3, layers: int = 2, seed: int = 0, **extra) -> OuroForCausalLM:
    torch.manual_seed(seed)
    cfg = OuroConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                     num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=64,
                     total_ut_steps=steps, **extra)
    model = OuroForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norm weights and gate bias, so every norm matters
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or "layernorm_2" in name or "norm.weight" in name:
                p.add_(0.3 * torch.randn_like(p))
        model.model.early_exit_gate.bias.fill_(-0.4)
    return model


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding by hand: x (B, H, S, hd)."""
    half = x.shape[-1] // 2
    freq = 1.0 / theta ** (torch.arange(half, dtype=torch.float) / half)
    angle = positions[:, None].float() * freq[None]  # (S, half)
    cos, sin = angle.cos().repeat(1, 2), angle.sin().repeat(1, 2)
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def rms(x, norm):
    return norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon))


def reference_block(layer, x: torch.Tensor, heads: int, theta: float) -> torch.Tensor:
    """One sandwich-norm block written out: x (B, S, d) -> (B, S, d)."""
    b, s, d = x.shape
    att = layer.self_attn
    h = rms(x, layer.input_layernorm)
    q, k, v = (p(h).view(b, s, heads, -1).transpose(1, 2)
               for p in (att.q_proj, att.k_proj, att.v_proj))
    pos = torch.arange(s)
    q, k = rope(q, pos, theta), rope(k, pos, theta)
    a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    x = x + rms(att.o_proj(a.transpose(1, 2).reshape(b, s, d)), layer.input_layernorm_2)
    m = layer.mlp
    h = rms(x, layer.post_attention_layernorm)
    return x + rms(m.down_proj(torch.nn.functional.silu(m.gate_proj(h)) * m.up_proj(h)),
                   layer.post_attention_layernorm_2)


def reference_logits(model: OuroForCausalLM, ids: torch.Tensor, stack, per_loop: int):
    """An unshared stack of blocks with the final norm after every `per_loop` blocks: logits of
    each loop boundary."""
    cfg = model.config
    x = model.model.embed_tokens(ids)
    out = []
    for n, layer in enumerate(stack, start=1):
        x = reference_block(layer, x, cfg.num_attention_heads, cfg.rope_parameters["rope_theta"])
        if n % per_loop == 0:
            x = rms(x, model.model.norm)
            out.append(model.lm_head(x))
    return out


@torch.no_grad()
def test_one_step_is_a_plain_decoder():
    model = tiny(steps=1)
    ids = torch.randint(0, VOCAB, (2, 9))
    (expected,) = reference_logits(model, ids, model.model.layers, per_loop=2)
    out = model(ids)
    torch.testing.assert_close(out.logits, expected, atol=1e-5, rtol=1e-4)
    assert out.exit_probs.shape == (2, 9, 1) and torch.all(out.exit_probs == 1)


@torch.no_grad()
def test_unrolling_equals_unshared_stack_with_norm_at_loop_boundaries():
    model = tiny(steps=3)
    ids = torch.randint(0, VOCAB, (2, 9))
    stack = [copy.deepcopy(layer) for _ in range(3) for layer in model.model.layers]  # 6 blocks
    expected = reference_logits(model, ids, stack, per_loop=2)
    out = model(ids)
    assert len(out.loop_logits) == 3
    for got, want in zip(out.loop_logits, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.logits, expected[-1])


def test_exit_distribution_sums_to_one_and_ignores_last_gate():
    gates = torch.rand(5, 7, 4)
    p = exit_distribution(gates)
    torch.testing.assert_close(p.sum(-1), torch.ones(5, 7))
    other = gates.clone()
    other[..., -1] = torch.rand(5, 7)
    torch.testing.assert_close(exit_distribution(other), p)
    # p(t) = lambda_t * prod_{j<t}(1 - lambda_j) written out for one token
    g = gates[0, 0]
    want = torch.stack([g[0], g[1] * (1 - g[0]), g[2] * (1 - g[0]) * (1 - g[1]),
                        (1 - g[0]) * (1 - g[1]) * (1 - g[2])])
    torch.testing.assert_close(p[0, 0], want)


def test_uniform_gates_give_a_uniform_exit_distribution():
    gates = torch.tensor([1 / 4, 1 / 3, 1 / 2, 0.9])
    torch.testing.assert_close(exit_distribution(gates), torch.full((4,), 0.25))


def test_entropy_regularised_optimum_is_softmax_of_minus_loss_over_beta():
    losses = torch.tensor([[3.0, 2.6, 2.5, 2.45]])
    beta = 0.1
    logits = torch.zeros(1, 4, requires_grad=True)
    optimizer = torch.optim.Adam([logits], lr=0.05)
    for _ in range(1500):
        loss = stage1_loss(losses, exit_distribution(torch.sigmoid(logits)), beta)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    p = exit_distribution(torch.sigmoid(logits)).detach()
    torch.testing.assert_close(p, torch.softmax(-losses / beta, -1), atol=2e-3, rtol=0)


def test_training_loss_is_stage1_and_eval_loss_is_cross_entropy():
    model = tiny(steps=3)
    ids = torch.randint(0, VOCAB, (2, 9))
    model.train()
    out = model(ids, labels=ids)
    p = out.exit_probs[:, :-1].reshape(-1, 3)  # (N, T)
    per_step = torch.stack([torch.nn.functional.cross_entropy(
        lg[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1), reduction="none")
        for lg in out.loop_logits], -1)  # (N, T)
    entropy = -(p * p.log()).sum(-1)
    want = ((p * per_step).sum(-1) - model.config.exit_entropy_beta * entropy).mean()
    torch.testing.assert_close(out.loss, want)
    out.loss.backward()
    assert model.model.early_exit_gate.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        out = model(ids, labels=ids)
    torch.testing.assert_close(out.loss, out.loop_losses[-1])


def test_stage2_targets():
    w = ouro_train.gate_targets(torch.tensor([0.0, 0.005, 0.1]))
    torch.testing.assert_close(w, torch.tensor([0.438, 0.5, 0.991]), atol=1e-3, rtol=0)


def test_stage2_trains_the_gate_only():
    model = tiny(steps=3)
    ids = torch.randint(0, VOCAB, (2, 9))
    loss = ouro_train.stage2_loss(model, ids)
    loss.backward()
    for name, p in model.named_parameters():
        if "early_exit_gate" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0
        else:
            assert p.grad is None or torch.all(p.grad == 0), name
    stream = torch.randint(0, VOCAB, (200,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ouro_train.train_gate(model, stream, steps=3, batch_size=2, seq_len=16, lr=1e-2)
    for key, value in model.state_dict().items():
        changed = not torch.equal(value, before[key])
        assert changed == ("early_exit_gate" in key), key


@torch.no_grad()
def test_fixed_exit_at_k_equals_running_k_steps():
    model = tiny(steps=4)
    short = tiny(steps=2)
    short.load_state_dict(model.state_dict())
    ids = torch.randint(0, VOCAB, (2, 9))
    out = model(ids, exit_step=2)
    want = short(ids)
    torch.testing.assert_close(out.logits, want.logits)
    torch.testing.assert_close(out.exit_probs, want.exit_probs)
    assert torch.all(out.exit_steps == 2)


RELEASED_NAMES = [
    "model.embed_tokens.weight", "model.norm.weight", "model.early_exit_gate.weight",
    "model.early_exit_gate.bias", "lm_head.weight",
] + [f"model.layers.{i}.{name}.weight" for i in range(2) for name in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm", "input_layernorm_2",
    "post_attention_layernorm", "post_attention_layernorm_2")]


def released_config(**sizes) -> dict:
    """A config.json in the released layout (Qwen2-like names, rope_theta, loop fields)."""
    return dict(
        architectures=["OuroForCausalLM"], model_type="ouro", vocab_size=VOCAB, hidden_size=32,
        intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        hidden_act="silu", max_position_embeddings=64, initializer_range=0.02,
        rms_norm_eps=1e-6, use_cache=True, tie_word_embeddings=False, rope_theta=1000000.0,
        rope_scaling=None, use_sliding_window=False, sliding_window=None, max_window_layers=2,
        layer_types=["full_attention", "full_attention"], attention_dropout=0.0,
        total_ut_steps=4, early_exit_threshold=1.0, torch_dtype="bfloat16", **sizes)


def test_released_names_load_strictly(tmp_path):
    shapes = {n: p.shape for n, p in tiny(steps=4).state_dict().items()}
    assert sorted(shapes) == sorted(RELEASED_NAMES)
    torch.manual_seed(1)
    weights = {n: torch.randn(shapes[n]) for n in RELEASED_NAMES}
    save_file(weights, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(released_config()))

    model, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True,
                                                       dtype=torch.float32)
    assert isinstance(model, OuroForCausalLM)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert model.config.total_ut_steps == 4 and model.config.rope_parameters["rope_theta"] == 1e6
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, weights[name])
    fresh = OuroForCausalLM(model.config)
    fresh.load_state_dict(weights, strict=True)


@pytest.mark.parametrize("bad", [0, 5])
def test_exit_step_out_of_range_is_refused(bad):
    with pytest.raises(ValueError, match="exit_step"):
        tiny(steps=4)(torch.zeros(1, 3, dtype=torch.long), exit_step=bad)
