"""The built-in model zoo: small models trained by `sipit train`, shipped inside the package.

Each lives in `sipit/models/weights/<name>/` as a Hugging Face folder (config.json, safetensors
weights stored in fp16 to stay under 10 MB, tokenizer files, and train_record.json).
"""

from __future__ import annotations

import json
from pathlib import Path

WEIGHTS = Path(__file__).parent / "weights"
DEFAULT = "shakespeare-llama"


def names() -> list[str]:
    """Names of the built-in models present in this install."""
    if not WEIGHTS.is_dir():
        return []
    return sorted(p.name for p in WEIGHTS.iterdir() if (p / "config.json").is_file())


def path_of(name: str) -> Path | None:
    """The folder of a built-in model, or None when `name` is not one."""
    path = WEIGHTS / str(name)
    return path if (path / "config.json").is_file() else None


def record(name: str) -> dict:
    """The training record of a built-in model (size, time, held-out loss)."""
    path = path_of(name)
    if path is None or not (path / "train_record.json").is_file():
        return {}
    return json.loads((path / "train_record.json").read_text())
