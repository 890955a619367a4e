"""The states file: per-position hidden states of one prompt, as safetensors with provenance.

A states file holds one tensor, `states` (T, d), in the dtype it was captured in, and string
metadata naming where it came from. It never holds the tokens or the text.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from sipit.errors import SipitError

log = logging.getLogger(__name__)

FORMAT = "sipit-states/1"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # by name
REQUIRED = ("format", "model", "config_hash", "weights_hash", "layer", "dtype", "length",
            "hidden_size", "n_layers", "sipit_version")


@dataclass
class States:
    """Hidden states of one prompt at one layer: states (T, d) and their provenance."""

    states: torch.Tensor
    meta: dict

    @property
    def length(self) -> int:
        return self.states.shape[0]

    @property
    def layer(self) -> str:
        return self.meta["layer"]


def weights_hash(model: torch.nn.Module, dtype: torch.dtype = torch.float16) -> str:
    """A fingerprint of the weights: shape and leading values of every parameter, rounded to
    `dtype` (fp16 by default; the bf16 fingerprint also matches a bf16 copy of fp32 weights)."""
    digest = hashlib.sha256()
    for name, param in model.state_dict().items():
        head = param.detach().flatten()[:4096].to("cpu", dtype)
        digest.update(name.encode())
        digest.update(str(tuple(param.shape)).encode())
        digest.update(head.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:16]


def same_weights(meta: dict, model: torch.nn.Module) -> bool:
    """Whether states metadata names these weights, also after rounding them to bf16 or fp16."""
    if meta["weights_hash"] == weights_hash(model):
        return True
    return meta.get("weights_hash_bf16") == weights_hash(model, torch.bfloat16)


def save(path: str | Path, states: States) -> Path:
    """Write a states file; refuses non-finite states."""
    from safetensors.torch import save_file

    check_finite(states.states, "captured states")
    path = Path(path)
    if path.is_dir():
        raise SipitError(f"cannot write states to {path}: it is a folder; name a file")
    meta = {k: str(v) for k, v in states.meta.items()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"states": states.states.detach().contiguous().cpu()}, str(path), metadata=meta)
    except Exception as err:  # safetensors wraps the OS error in its own type
        raise SipitError(f"cannot write states to {path}: {err}") from err
    log.info("wrote %s (%d positions)", path, states.length)
    return path


def load(path: str | Path) -> States:
    """Read and validate a states file; every failure is a one-line SipitError."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        raise SipitError(f"{path} is a folder, not a states file")
    if not path.is_file():
        raise SipitError(f"states file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            if "states" not in f.keys():
                raise SipitError(f"{path} is not a sipit states file: no 'states' tensor")
            tensor = f.get_tensor("states")
    except SipitError:
        raise
    except Exception as err:  # safetensors raises several types for a damaged file
        kind = type(err).__name__
        raise SipitError(f"{path} is not a readable safetensors file ({kind})") from err

    validate(path, tensor, meta)
    return States(states=tensor, meta=meta)


def validate(path, tensor, meta: dict) -> None:
    """Refuse states that are not a finite (T, d) tensor matching their provenance metadata."""
    if not isinstance(tensor, torch.Tensor) or not isinstance(meta, dict):
        raise SipitError(f"{path}: states must be a tensor with a metadata dict")
    missing = [k for k in REQUIRED if k not in meta]
    if meta.get("format") != FORMAT or missing:
        names = ", ".join(missing) or "format"
        raise SipitError(f"{path} has no sipit provenance (missing {names})")
    for key in ("length", "hidden_size", "n_layers"):
        if not str(meta[key]).isdigit():
            raise SipitError(f"{path}: metadata {key}={meta[key]!r} is not a count")
    if tensor.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise SipitError(f"{path}: states are {tensor.dtype}; expected fp32, fp16 or bf16")
    if DTYPES.get(str(meta["dtype"])) not in (None, tensor.dtype):
        raise SipitError(f"{path}: states are stored as {tensor.dtype} but the metadata says "
                         f"{meta['dtype']}")
    if tensor.ndim != 2:
        shape = tuple(tensor.shape)
        raise SipitError(f"{path}: states must be (positions, hidden), got shape {shape}")
    if tensor.shape[0] != int(meta["length"]) or tensor.shape[1] != int(meta["hidden_size"]):
        raise SipitError(f"{path}: states shape {tuple(tensor.shape)} disagrees with its metadata")
    if tensor.shape[0] == 0:
        raise SipitError(f"{path}: holds zero positions")
    check_finite(tensor, str(path))


def save_bundle(path: str | Path, tensors: dict[str, torch.Tensor], data: dict) -> None:
    """Write tensors and JSON-able data to one safetensors file, atomically (no pickle)."""
    import json

    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}
    save_file(tensors, str(tmp), metadata={"json": json.dumps(data)})
    tmp.replace(path)


def load_bundle(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read what save_bundle wrote: (tensors, data); a damaged file is a SipitError."""
    import json

    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            data = json.loads((f.metadata() or {})["json"])
            return {k: f.get_tensor(k) for k in f.keys()}, data
    except Exception as err:
        raise SipitError(f"{path} is damaged ({type(err).__name__}): delete it to start "
                         "again") from err


def check_finite(tensor: torch.Tensor, what: str) -> None:
    bad = ~torch.isfinite(tensor.float())
    if bad.any():
        position = int(bad.any(dim=-1).nonzero()[0, 0]) if tensor.ndim == 2 else 0
        raise SipitError(f"{what}: {int(bad.sum())} NaN/inf values (first at position {position})")
