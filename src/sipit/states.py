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


def weights_hash(model: torch.nn.Module) -> str:
    """A fingerprint of the weights: shape and leading values of every parameter, in fp16."""
    digest = hashlib.sha256()
    for name, param in model.state_dict().items():
        head = param.detach().flatten()[:4096].to("cpu", torch.float16)
        digest.update(name.encode())
        digest.update(str(tuple(param.shape)).encode())
        digest.update(head.numpy().tobytes())
    return digest.hexdigest()[:16]


def save(path: str | Path, states: States) -> Path:
    """Write a states file; refuses non-finite states."""
    from safetensors.torch import save_file

    check_finite(states.states, "captured states")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {k: str(v) for k, v in states.meta.items()}
    save_file({"states": states.states.detach().contiguous().cpu()}, str(path), metadata=meta)
    log.info("wrote %s (%d positions)", path, states.length)
    return path


def load(path: str | Path) -> States:
    """Read and validate a states file; every failure is a one-line SipitError."""
    from safetensors import safe_open

    path = Path(path)
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


def validate(path: Path, tensor: torch.Tensor, meta: dict) -> None:
    missing = [k for k in REQUIRED if k not in meta]
    if meta.get("format") != FORMAT or missing:
        names = ", ".join(missing) or "format"
        raise SipitError(f"{path} has no sipit provenance (missing {names})")
    if tensor.ndim != 2:
        shape = tuple(tensor.shape)
        raise SipitError(f"{path}: states must be (positions, hidden), got shape {shape}")
    if tensor.shape[0] != int(meta["length"]) or tensor.shape[1] != int(meta["hidden_size"]):
        raise SipitError(f"{path}: states shape {tuple(tensor.shape)} disagrees with its metadata")
    if tensor.shape[0] == 0:
        raise SipitError(f"{path}: holds zero positions")
    check_finite(tensor, str(path))


def check_finite(tensor: torch.Tensor, what: str) -> None:
    bad = ~torch.isfinite(tensor.float())
    if bad.any():
        position = int(bad.any(dim=-1).nonzero()[0, 0]) if tensor.ndim == 2 else 0
        raise SipitError(f"{what}: {int(bad.sum())} NaN/inf values (first at position {position})")
