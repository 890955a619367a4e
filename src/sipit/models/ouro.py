"""Ouro, a looped language model (Zhu et al., arXiv 2510.25741), as native transformers classes.

One stack of L decoder layers is applied `total_ut_steps` (T) times. Each layer is a
sandwich-norm block, x += N2(Attn(N1(x))); x += N4(MLP(N3(x))). The shared final RMSNorm runs at
the end of every loop step; its output feeds the untied LM head, the per-token exit gate
lambda_t = sigmoid(early_exit_gate(h_t)) and the next loop step. Embeddings are applied once.

Parameter and config names follow the released checkpoints (ByteDance/Ouro-1.4B, -2.6B), so those
load with plain `from_pretrained` and no remote code once `sipit.models.ouro` is imported.

What lives here:
- `OuroConfig`, `OuroModel`, `OuroForCausalLM`, registered with the Auto classes as "ouro";
- `exit_distribution` (p(t) from the gates) and `stage1_loss` (expected loss minus beta * H(p));
- inference options of `forward` / `generate`: `exit_threshold` (Q-exit: leave at the first step
  whose CDF >= q; in one-token decoding the remaining loop steps of that token are really skipped),
  `exit_step` (fixed exit, the same as running with T = k), and `cache_strategy`:
  "full" (one KV slot per loop step and layer, slot = u * L + i) or "last-step" (L slots holding
  each token's last computed loop step, which every loop step of later tokens attends to).
The Stage II gate objective is in `sipit.models.ouro_train`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    DynamicCache,
    GenerationMixin,
    PreTrainedModel,
    Qwen2Config,
)
from transformers.cache_utils import DynamicLayer
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import ModelOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, eager_attention_forward
from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP, Qwen2RMSNorm, Qwen2RotaryEmbedding

log = logging.getLogger(__name__)

CACHE_STRATEGIES = ("full", "last-step")


@strict
class OuroConfig(Qwen2Config):
    """Qwen2-like config plus the loop: defaults are those of Ouro-1.4B."""

    model_type = "ouro"

    vocab_size: int = 49152
    hidden_size: int = 2048
    intermediate_size: int = 5632
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_key_value_heads: int | None = None
    max_position_embeddings: int = 65536
    total_ut_steps: int = 4  # T: how many times the shared stack is applied
    early_exit_threshold: float | None = 1.0  # default q of the Q-exit; >= 1 means run all steps
    exit_entropy_beta: float = 0.1  # beta of the Stage I objective (entropy weight)
    cache_strategy: str = "full"  # default KV strategy: "full" or "last-step"

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        super().__post_init__(**kwargs)


@dataclass
class OuroOutput(ModelOutput):
    """Outputs of `OuroForCausalLM`; loop-step tensors are tuples over the steps that ran.

    logits (B, S, V) are those of each token's exit step (the last step unless an exit is set);
    loop_logits[t] (B, S, V) and loop_hidden_states[t] (B, S, d) are after the final norm of
    step t + 1 (loop_logits is None under a Q-exit without labels: the head then runs only at
    each token's exit); gate_probs (B, S, steps) hold lambda_t; exit_probs (B, S, steps) hold p(t);
    exit_steps (B, S) is the 1-based step each token left at; loop_losses (steps,) the mean
    next-token loss of each step when labels are given.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: object | None = None
    last_hidden_state: torch.Tensor | None = None
    loop_logits: tuple[torch.Tensor, ...] | None = None
    loop_hidden_states: tuple[torch.Tensor, ...] | None = None
    gate_probs: torch.Tensor | None = None
    exit_probs: torch.Tensor | None = None
    exit_steps: torch.Tensor | None = None
    loop_losses: torch.Tensor | None = None


def exit_distribution(gates: torch.Tensor) -> torch.Tensor:
    """p(t) = lambda_t * S_{t-1} for t < T and p(T) = S_{T-1}: (..., T) -> (..., T).

    S_t = prod_{j<=t} (1 - lambda_j); the last gate lambda_T is never used, so p sums to 1.
    """
    survive = torch.cumprod(1 - gates[..., :-1], dim=-1)  # S_1..S_{T-1}
    before = torch.cat([torch.ones_like(gates[..., :1]), survive], dim=-1)  # S_0..S_{T-1}
    leave = torch.cat([gates[..., :-1], torch.ones_like(gates[..., :1])], dim=-1)
    return leave * before


def stage1_loss(step_losses: torch.Tensor, probs: torch.Tensor, beta: float,
                valid: torch.Tensor | None = None) -> torch.Tensor:
    """Stage I objective: mean over tokens of sum_t p(t) L_t - beta * H(p).

    step_losses and probs are (N, T) per token; valid (N,) masks tokens without a label.
    """
    entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum(-1)  # (N,)
    per_token = (probs * step_losses).sum(-1) - beta * entropy
    if valid is None:
        return per_token.mean()
    return (per_token * valid).sum() / valid.sum().clamp_min(1)


class OuroAttention(nn.Module):
    """Full multi-head attention without biases; keys and values go through a `LoopKV`."""

    def __init__(self, config: OuroConfig, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.head_dim = getattr(config, "head_dim", None) or (
            config.hidden_size // config.num_attention_heads)
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        d, h, kv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
        self.q_proj = nn.Linear(d, h * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(h * self.head_dim, d, bias=False)

    def forward(self, x: torch.Tensor, position_embeddings, attention_mask, kv: Callable | None):
        shape = (*x.shape[:-1], -1, self.head_dim)
        q = self.q_proj(x).view(shape).transpose(1, 2)  # (B, H, S, hd)
        k = self.k_proj(x).view(shape).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, *position_embeddings)
        if kv is not None:
            k, v = kv(self.layer_idx, k, v)  # (B, H, past + S, hd)

        attend = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward)
        out, _ = attend(self, q, k, v, attention_mask, dropout=0.0, scaling=self.scaling)
        return self.o_proj(out.reshape(*x.shape[:-1], -1))


class OuroDecoderLayer(nn.Module):
    """One shared block with sandwich RMSNorm around attention and around the SwiGLU MLP."""

    def __init__(self, config: OuroConfig, layer_idx: int):
        super().__init__()
        d, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = OuroAttention(config, layer_idx)
        self.mlp = Qwen2MLP(config)
        self.input_layernorm = Qwen2RMSNorm(d, eps=eps)  # N1
        self.input_layernorm_2 = Qwen2RMSNorm(d, eps=eps)  # N2
        self.post_attention_layernorm = Qwen2RMSNorm(d, eps=eps)  # N3, before the MLP
        self.post_attention_layernorm_2 = Qwen2RMSNorm(d, eps=eps)  # N4

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, kv=None):
        attn = self.self_attn(self.input_layernorm(hidden_states), position_embeddings,
                              attention_mask, kv)
        hidden_states = hidden_states + self.input_layernorm_2(attn)
        mlp = self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states + self.post_attention_layernorm_2(mlp)


class LoopKV:
    """Key/value bookkeeping of one forward pass across loop steps, for one cache strategy.

    `pending[i]` holds, per row, the keys and values of this pass's tokens at layer i from the
    last loop step that row ran. Rows that exited early contribute those to later steps.
    """

    def __init__(self, cache, strategy: str, n_layers: int):
        self.cache, self.strategy, self.n_layers = cache, strategy, n_layers
        self.pending: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n_layers
        self.loop, self.rows = 0, None

    def __call__(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        if self.rows is not None:  # only some rows run: merge them into the pending states
            pk, pv = self.pending[layer]
            k, v = pk.index_copy(0, self.rows, k), pv.index_copy(0, self.rows, v)
        self.pending[layer] = (k, v)
        keys, values = self._with_past(layer, k, v)
        if self.rows is not None:
            keys, values = keys[self.rows], values[self.rows]
        return keys, values

    def _with_past(self, layer: int, k, v):
        if self.cache is None:
            return k, v
        if self.strategy == "full":
            return self.cache.update(k, v, self.loop * self.n_layers + layer)
        past = self.cache.layers[layer]
        if past.is_initialized and past.keys.numel() > 0:
            return torch.cat([past.keys, k], dim=-2), torch.cat([past.values, v], dim=-2)
        return k, v

    def finish(self, steps_run: int, n_loops: int) -> None:
        """Store what later tokens need: skipped loop slots (full) or the last step (last-step)."""
        if self.cache is None:
            return
        if self.strategy == "full":
            for loop in range(steps_run, n_loops):
                for layer, (k, v) in enumerate(self.pending):
                    self.cache.update(k, v, loop * self.n_layers + layer)
        else:
            for layer, (k, v) in enumerate(self.pending):
                self.cache.update(k, v, layer)


def ensure_slots(cache, n_slots: int) -> None:
    """Grow a DynamicCache to n_slots layers (a config-built one has only L)."""
    while len(cache.layers) < n_slots:
        cache.layers.append(DynamicLayer())


def _rows_of(x, rows: torch.Tensor | None, batch: int):
    """x restricted to the running rows when it has a batch dimension of size `batch`."""
    if rows is None or x is None or x.shape[0] != batch:
        return x
    return x[rows]


class OuroPreTrainedModel(PreTrainedModel):
    config_class = OuroConfig
    config: OuroConfig
    base_model_prefix = "model"
    _no_split_modules = ["OuroDecoderLayer"]
    _supports_sdpa = True
    _supports_attention_backend = True

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, OuroModel):
            nn.init.zeros_(module.early_exit_gate.bias)  # lambda = 1/2 at the start


class OuroModel(OuroPreTrainedModel):
    """Embeddings, the shared layer stack run T times, the shared final norm and the exit gate."""

    def __init__(self, config: OuroConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            OuroDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen2RotaryEmbedding(config=config)
        self.early_exit_gate = nn.Linear(config.hidden_size, 1)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                inputs_embeds=None, use_cache=None, exit_threshold=None, exit_step=None,
                cache_strategy=None, **kwargs) -> OuroOutput:
        """Run the loop steps; see `OuroOutput` (logits are added by `OuroForCausalLM`)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)  # (B, S, d)
        n_loops, n_layers = self.config.total_ut_steps, self.config.num_hidden_layers
        steps = n_loops if exit_step is None else int(exit_step)
        if not 1 <= steps <= n_loops:
            raise ValueError(f"exit_step {exit_step} outside 1..{n_loops}")
        strategy = cache_strategy or self.config.cache_strategy
        if strategy not in CACHE_STRATEGIES:
            raise ValueError(f"cache_strategy {strategy!r}: use one of {CACHE_STRATEGIES}")
        q = self.config.early_exit_threshold if exit_threshold is None else exit_threshold

        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if cache is not None:
            ensure_slots(cache, n_loops * n_layers if strategy == "full" else n_layers)
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device)
            position_ids = (position_ids + past)[None]
        mask = create_causal_mask(config=self.config, inputs_embeds=inputs_embeds,
                                  attention_mask=attention_mask, cache=cache,
                                  position_ids=position_ids)
        rope = self.rotary_emb(inputs_embeds, position_ids=position_ids)
        kv = LoopKV(cache, strategy, n_layers)
        states, gates, exit_steps, ran = self._loops(inputs_embeds, rope, mask, kv, steps, q)
        kv.finish(ran, n_loops)
        return OuroOutput(cache=cache, last_hidden_state=states[-1],
                          loop_hidden_states=tuple(states), gate_probs=torch.stack(gates, -1),
                          exit_steps=exit_steps)

    def _loops(self, hidden, rope, mask, kv: LoopKV, steps: int, q: float | None):
        """The loop steps; with a Q-exit, rows whose tokens all left stop running.

        Only one-token decoding really saves compute: in a prefill a row keeps running while any
        of its tokens is still in, since later tokens need every step's keys.
        """
        batch = hidden.shape[0]
        exit_steps = torch.full(hidden.shape[:2], steps, device=hidden.device, dtype=torch.long)
        survive = torch.ones(hidden.shape[:2], device=hidden.device, dtype=torch.float32)
        states, gates, rows = [], [], None
        for loop in range(steps):
            kv.loop, kv.rows = loop, rows
            h = _rows_of(hidden, rows, batch)
            rope_rows = tuple(_rows_of(x, rows, batch) for x in rope)
            mask_rows = _rows_of(mask, rows, batch) if isinstance(mask, torch.Tensor) else mask
            for layer in self.layers:
                h = layer(h, rope_rows, mask_rows, kv)
            h = self.norm(h)
            hidden = h if rows is None else hidden.index_copy(0, rows, h)
            gate = torch.sigmoid(self.early_exit_gate(hidden).squeeze(-1).float())  # (B, S)
            states.append(hidden)
            gates.append(gate)
            if q is None or q >= 1 or loop == steps - 1:
                continue
            survive = survive * (1 - gate)
            leaving = (1 - survive >= q) & (exit_steps == steps)  # CDF(loop + 1) >= q
            exit_steps = torch.where(leaving, loop + 1, exit_steps)
            running = (exit_steps > loop + 1).any(-1)  # (B,)
            if not running.any():
                return states, gates, exit_steps, loop + 1
            rows = None if running.all() else running.nonzero()[:, 0]
        return states, gates, exit_steps, steps


class OuroForCausalLM(OuroPreTrainedModel, GenerationMixin):
    """Ouro with its untied LM head, applied after every loop step."""

    def __init__(self, config: OuroConfig):
        super().__init__(config)
        self.model = OuroModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    def get_decoder(self):
        return self.model

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0,
                exit_threshold=None, exit_step=None, cache_strategy=None, **kwargs) -> OuroOutput:
        """Logits of each token's exit step, plus per-step outputs (see `OuroOutput`).

        With labels, `loss` is the Stage I objective in training mode, and in eval mode the
        next-token cross-entropy of the returned logits (comparable to a plain decoder's loss).
        """
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids, cache=cache, inputs_embeds=inputs_embeds,
                         use_cache=use_cache, exit_threshold=exit_threshold, exit_step=exit_step,
                         cache_strategy=cache_strategy)
        keep = slice(-logits_to_keep, None) if logits_to_keep else slice(None)
        out.exit_probs = exit_distribution(out.gate_probs)
        q = self.config.early_exit_threshold if exit_threshold is None else exit_threshold
        if labels is None and q is not None and q < 1:  # Q-exit: the head runs once per token
            exits = self._at_exit(out.loop_hidden_states, out.exit_steps)
            out.logits = self.lm_head(exits[:, keep])
        else:
            out.loop_logits = tuple(self.lm_head(h[:, keep]) for h in out.loop_hidden_states)
            out.logits = self._at_exit(out.loop_logits, out.exit_steps[:, keep])
        if labels is not None:
            self._add_loss(out, labels)
        return out

    @staticmethod
    def _at_exit(per_step, exit_steps: torch.Tensor) -> torch.Tensor:
        """Each token's value at its exit step: steps x (B, S, n), (B, S) -> (B, S, n)."""
        if torch.all(exit_steps == len(per_step)):
            return per_step[-1]
        stacked = torch.stack(per_step, dim=2)  # (B, S, steps, n)
        index = (exit_steps - 1)[:, :, None, None].expand(-1, -1, 1, stacked.shape[-1])
        return stacked.gather(2, index)[:, :, 0]

    def _add_loss(self, out: OuroOutput, labels: torch.Tensor) -> None:
        """Per-step next-token losses, and `loss` (Stage I when training, else plain CE)."""
        target = labels[:, 1:].reshape(-1)  # (N,)
        valid = (target != -100).float()
        step_losses = torch.stack([  # (N, steps)
            nn.functional.cross_entropy(lg[:, :-1].reshape(-1, lg.shape[-1]).float(), target,
                                        ignore_index=-100, reduction="none")
            for lg in out.loop_logits], dim=-1)
        n_valid = valid.sum().clamp_min(1)
        out.loop_losses = ((step_losses * valid[:, None]).sum(0) / n_valid).detach()
        if self.training:
            probs = out.exit_probs[:, :-1].reshape(-1, step_losses.shape[-1])
            out.loss = stage1_loss(step_losses, probs, self.config.exit_entropy_beta, valid)
        else:
            out.loss = nn.functional.cross_entropy(
                out.logits[:, :-1].reshape(-1, out.logits.shape[-1]).float(), target,
                ignore_index=-100)


# The built-in looped model: 2 shared blocks of width 192 applied 4 times (about 2.5M parameters).
OURO_DEFAULTS = dict(
    hidden_size=192,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=6,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    total_ut_steps=4,
    exit_entropy_beta=0.1,
    tie_word_embeddings=False,
)


def build_ouro(vocab_size: int, **overrides) -> OuroForCausalLM:
    """The built-in Ouro sizes unless overridden (e.g. total_ut_steps, num_hidden_layers)."""
    return OuroForCausalLM(OuroConfig(vocab_size=vocab_size, **{**OURO_DEFAULTS, **overrides}))


def build_ouro_flat(vocab_size: int, **overrides) -> OuroForCausalLM:
    """Iso-parameter control: the same blocks run once (T = 1)."""
    return build_ouro(vocab_size, **{"total_ut_steps": 1, **overrides})


def build_ouro_deep(vocab_size: int, **overrides) -> OuroForCausalLM:
    """Iso-FLOP control: L * T unshared blocks run once, as many block applications as Ouro."""
    layers = OURO_DEFAULTS["num_hidden_layers"] * OURO_DEFAULTS["total_ut_steps"]
    return build_ouro(vocab_size, **{"total_ut_steps": 1, "num_hidden_layers": layers, **overrides})


AutoConfig.register("ouro", OuroConfig, exist_ok=True)
AutoModelForCausalLM.register(OuroConfig, OuroForCausalLM, exist_ok=True)
