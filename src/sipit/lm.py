"""One door to any causal LM: load it, name its layers, run it up to a layer, cache prefixes.

Layer names are the same everywhere in sipit (capture, invert, audit):

    "0"        the embedding output, i.e. the input of block 1 (after any embedding scale or
               learned positions the model adds);
    "i"        the output of block i (1 <= i <= n_layers): the residual stream, before the
               final norm;
    "-1"       counts from the end: the last block, still before the final norm;
    "final"    the output of the final norm (Hugging Face's hidden_states[-1]).

Looped models (Ouro: the block stack runs n_loops times) also take "u.i", loop step u (1-based)
and block i of that step: "u.0" is the input of the step (the embeddings for u = 1, else the
final-norm output of step u - 1), "u.i" the output of block i before any norm, "u.-1" the last
block and "u.final" the final-norm output of step u. Plain "i", "-1" and "final" mean the LAST
loop step; "0" is the embedding output.

Forward passes stop at the layer asked for: blocks above it never run.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from sipit.errors import SipitError
from sipit.states import DTYPES

log = logging.getLogger(__name__)

FINAL = "final"
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass
class LM:
    """A loaded causal LM with what sipit needs to address its hidden states."""

    model: nn.Module
    tokenizer: object
    name: str
    blocks: nn.ModuleList
    config_hash: str
    device: torch.device
    dtype: torch.dtype
    extra: dict = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def n_loops(self) -> int:
        """How many times the block stack runs (looped models such as Ouro; else 1)."""
        return int(getattr(self.model.config, "total_ut_steps", 1) or 1)

    @property
    def hidden_size(self) -> int:
        return self.model.get_input_embeddings().weight.shape[1]

    @property
    def vocab_size(self) -> int:
        return self.model.get_input_embeddings().weight.shape[0]

    @property
    def max_positions(self) -> int | None:
        cfg = self.model.config.get_text_config()
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            value = getattr(cfg, key, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    @property
    def dtype_name(self) -> str:
        return DTYPE_NAMES[self.dtype]

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with no special tokens added."""
        if not text or not text.strip():
            raise SipitError("empty prompt: give at least one non-blank character")
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        self.check_length(len(ids))
        return list(ids)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def check_length(self, n_tokens: int) -> None:
        if n_tokens == 0:
            raise SipitError("empty prompt: it encodes to zero tokens")
        limit = self.max_positions
        if limit is not None and n_tokens > limit:
            raise SipitError(f"prompt too long: {n_tokens} tokens, the model's context is {limit}")


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise SipitError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SipitError(f"device {device!r} asked for, but no CUDA device is available")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise SipitError(f"unknown device {device!r}: use cpu, cuda or cuda:N")
    return torch.device(device)


def config_hash(config) -> str:
    """A short, stable fingerprint of a model config (architecture and sizes, not weights)."""
    data = config.to_dict()
    for key in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash"):
        data.pop(key, None)
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load(
    name: str,
    device: str | None = "cpu",
    dtype: str | torch.dtype = "fp32",
    trust_remote_code: bool = False,
) -> LM:
    """Load a causal LM by built-in name, local folder or hub id, in eval mode.

    Built-in names (see `sipit.models.builtin`) are tried first, then a local folder, then the hub.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import sipit.models.ouro  # noqa: F401  (registers the "ouro" model type with the Auto classes)
    from sipit.models import builtin

    torch_dtype = resolve_dtype(dtype)
    torch_device = resolve_device(device)
    path = Path(builtin.path_of(name) or name).expanduser()
    if path.is_file():
        raise SipitError(f"model {name!r} is a file: give a built-in name, model folder or hub id")
    if not path.exists() and str(name).startswith((".", "/", "~")):
        raise SipitError(f"model folder {name!r} not found")
    kind = "folder" if path.is_dir() else "hub id (it is not a built-in name or a folder)"

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=torch_dtype, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SipitError(f"cannot load model {name!r} as a {kind}: {first}") from err

    model.to(torch_device).eval()
    log.info("loaded %s (%s, %s)", name, DTYPE_NAMES[torch_dtype], torch_device)
    return wrap(model, tokenizer, name)


def wrap(model: nn.Module, tokenizer, name: str) -> LM:
    """Make an LM from a model already in memory (used by tests and training)."""
    param = next(model.parameters())
    return LM(
        model=model,
        tokenizer=tokenizer,
        name=name,
        blocks=find_blocks(model),
        config_hash=config_hash(model.config),
        device=param.device,
        dtype=param.dtype,
    )


def cast(lm: LM, dtype: str | torch.dtype) -> LM:
    """A copy of `lm` with its weights in another dtype (the original stays as it is)."""
    model = copy.deepcopy(lm.model).to(resolve_dtype(dtype))
    return wrap(model, lm.tokenizer, lm.name)


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of transformer blocks: the shallowest one with num_hidden_layers entries."""
    n = getattr(model.config.get_text_config(), "num_hidden_layers", None)
    lists = [(name.count("."), name, m) for name, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) > 0]
    for _, _, modules in sorted(lists, key=lambda x: (x[0], x[1])):
        if n is None or len(modules) == n:
            return modules
    raise SipitError(f"cannot find the transformer blocks of {type(model).__name__}")


def parse_layer(spec: str | int, n_layers: int, n_loops: int | None = None) -> int | str:
    """Turn a layer name into 0..n_layers, FINAL or "u.i" (looped models); see the docstring."""
    text = str(spec).strip().lower()
    if text in (FINAL, "post-norm", "postnorm"):
        return FINAL
    if "." in text:
        if n_loops == 1:
            raise SipitError(f"bad layer {spec!r}: loop names (step.block) are for looped "
                             f"models; this one has layers 0..{n_layers} and 'final'")
        return _parse_loop_layer(spec, text, n_layers, n_loops)
    try:
        index = int(text)
    except ValueError:
        raise SipitError(f"bad layer {spec!r}: use 0..{n_layers}, -1 or 'final'") from None
    if index < 0:
        index += n_layers + 1
    if not 0 <= index <= n_layers:
        raise SipitError(f"layer {spec} out of range: this model has layers 0..{n_layers} "
                         "and 'final'")
    return index


def _parse_loop_layer(spec, text: str, n_layers: int, n_loops: int | None) -> str:
    """"u.i" -> the normalised name "u.i" or "u.final" (u checked when n_loops is known)."""
    step, _, block = text.partition(".")
    try:
        loop = int(step)
        if "." in block:
            raise ValueError
    except ValueError:
        raise SipitError(f"bad layer {spec!r}: use loop.block, e.g. '2.3'") from None
    if loop < 1 or (n_loops is not None and loop > n_loops):
        steps = f"steps 1..{n_loops}" if n_loops else "steps from 1"
        raise SipitError(f"loop step {loop} out of range: this model has {steps}")
    inner = parse_layer(block, n_layers)
    return f"{loop}.{inner}"


def loop_target(layer: int | str, n_loops: int) -> tuple[int, int | str]:
    """(loop step, block) of a parsed layer: plain block names mean the last loop step."""
    if isinstance(layer, str) and "." in layer:
        step, _, block = layer.partition(".")
        loop = int(step)
        if loop > n_loops:
            raise SipitError(f"loop step {loop} out of range: this model has steps 1..{n_loops}")
        if block == FINAL:
            return (n_loops, FINAL) if loop == n_loops else (loop + 1, 0)
        return loop, int(block)
    if layer == FINAL:
        return n_loops, FINAL
    return (1, 0) if int(layer) == 0 else (n_loops, int(layer))


def layer_name(layer: int | str) -> str:
    return str(layer)


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the wanted layer has been computed."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__()
        self.hidden = hidden


def _hidden_of(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def hook_state(blocks: nn.ModuleList, layer: int, loop: int, keep) -> object:
    """Call keep(state) with the state of `layer` (0 = input of block 1) on the `loop`-th
    call of that block (loop steps of a looped model reuse the same blocks); returns the
    hook handle."""
    calls = [0]

    if layer == 0:
        def pre_hook(module, args, kwargs):
            calls[0] += 1
            if calls[0] == loop:
                keep(args[0] if args else kwargs["hidden_states"])

        return blocks[0].register_forward_pre_hook(pre_hook, with_kwargs=True)

    def hook(module, args, output):
        calls[0] += 1
        if calls[0] == loop:
            keep(_hidden_of(output))

    return blocks[layer - 1].register_forward_hook(hook)


def _stop(hidden: torch.Tensor):
    raise _Stop(hidden)


def forward_to(
    lm: LM,
    layer: int | str,
    input_ids: torch.Tensor,
    cache=None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
) -> torch.Tensor:
    """Hidden states at `layer` for input_ids (B, T) -> (B, T, d), running no block above it.

    Give `inputs_embeds` (B, T, d) instead of ids to feed continuous embeddings. With a cache,
    the cache is extended in place by the blocks that ran.
    """
    base = lm.model.get_decoder() if hasattr(lm.model, "get_decoder") else lm.model.base_model
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                  inputs_embeds=inputs_embeds, use_cache=cache is not None)
    if cache is not None:
        kwargs["cache"] = cache
    loop, block = loop_target(layer, lm.n_loops)
    if block == FINAL:
        return base(**kwargs).last_hidden_state

    handle = hook_state(lm.blocks, block, loop, _stop)
    try:
        base(**kwargs)
    except _Stop as stop:
        return stop.hidden
    finally:
        handle.remove()
    raise RuntimeError("the forward pass ended without reaching the requested layer")


def new_cache(lm: LM):
    """An empty cache of the kind this model uses (DynamicCache for attention-only models)."""
    from transformers import DynamicCache

    return DynamicCache(config=lm.model.config)


def expand_cache(cache, batch: int):
    """A copy of a batch-1 prefix cache repeated `batch` times; the original stays unchanged.

    Attention layers repeat their keys and values; recurrent layers (e.g. Kimi Linear's KDA,
    which transformers' batch_repeat_interleave skips) repeat their convolution and recurrent
    states, so each candidate continues from its own copy of the prefix state.
    """
    grown = copy.deepcopy(cache)
    if batch > 1:
        for layer in grown.layers:
            if hasattr(layer, "batch_repeat_interleave"):
                layer.batch_repeat_interleave(batch)
            if hasattr(layer, "recurrent_states"):
                _repeat_linear_states(layer, batch)
    return grown


def _repeat_linear_states(layer, batch: int) -> None:
    """Repeat the conv and recurrent states of a linear-attention layer: (1, ..) -> (batch, ..)."""
    for states_of in (layer.conv_states, layer.recurrent_states):
        for index, state in states_of.items():
            if state is not None:
                states_of[index] = state.repeat_interleave(batch, dim=0)


@torch.no_grad()
def states(lm: LM, ids: list[int], layer: int | str) -> torch.Tensor:
    """Per-position states of a whole prompt at `layer` from one full forward: (T, d)."""
    lm.check_length(len(ids))
    input_ids = torch.tensor([ids], device=lm.device)
    return forward_to(lm, layer, input_ids)[0]
