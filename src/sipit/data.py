"""Where the shared data lives (never copied into the repository) and small readers for it.

The shared folder is `../shared/data` beside the project root, or wherever SIPIT_DATA points.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

from sipit.errors import SipitError


def data_dir() -> Path:
    """The shared data folder: $SIPIT_DATA, else ../shared/data from the project or the cwd."""
    if os.environ.get("SIPIT_DATA"):
        return Path(os.environ["SIPIT_DATA"])
    here = Path(__file__).resolve()
    for root in (*here.parents, Path.cwd(), *Path.cwd().parents):
        candidate = root / ".." / "shared" / "data"
        if candidate.is_dir():
            return candidate.resolve()
    raise SipitError("shared data not found: set SIPIT_DATA or put ../shared/data beside the "
                     "project")


def corpus_path() -> Path:
    """The training corpus (tiny Shakespeare)."""
    path = data_dir() / "tinyshakespeare.txt"
    if not path.is_file():
        raise SipitError(f"training corpus missing: {path}")
    return path


def split_corpus(text: str, held_out: float = 0.1) -> tuple[str, str]:
    """The corpus split into (train, held-out): the last `held_out` fraction is held out."""
    cut = int(len(text) * (1 - held_out))
    return text[:cut], text[cut:]


def wiki20(n: int | None = None) -> list[str]:
    """Wikipedia segments (about 20 GPT-2 tokens each), in file order, shard by shard."""
    texts = []
    for shard in sorted((data_dir() / "wiki20").glob("shard-*.jsonl.gz")):
        with gzip.open(shard, "rt", encoding="utf-8") as f:
            for line in f:
                texts.append(json.loads(line)["text"])
                if n is not None and len(texts) >= n:
                    return texts
    if not texts:
        raise SipitError("no wiki20 shards found in the shared data folder")
    return texts
