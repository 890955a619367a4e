"""The pairwise collision test: do any two distinct prompts share a last-token hidden state?

For every prompt and every requested layer, the state of the last token (one forward per batch
of equal-length prompts, all layers from the same pass); then all pairwise L2 distances per
layer with `sipit.audit.scan.PairScan`: exact minimum and closest pairs, the count under a
threshold (default 1e-6, the paper's line), percentiles of the distance distribution and the
minimum by prompt length. Identical token sequences are merged first (they are one prompt).
Long runs checkpoint after each block row and resume to the same report.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sipit import data
from sipit import lm as lm_mod
from sipit import states as states_mod
from sipit.audit import collect
from sipit.audit.scan import PairScan, check_lines
from sipit.errors import SipitError
from sipit.invert.verify import UNIT_ROUNDOFF

log = logging.getLogger(__name__)

Prompt = str | list[int]


@dataclass
class PairsReport:
    """Result of the pairwise test; `layers` holds one dict per layer (see PairScan.result)."""

    model: str
    dtype: str
    device: str
    threshold: float
    floor: float  # relative noise floor (see sipit.audit.scan)
    bos: bool  # whether a BOS token was put in front of every prompt
    n_prompts: int  # distinct token sequences compared
    n_merged: int  # prompts dropped because an earlier one had the same token ids
    lengths: dict  # prompt length (tokens) -> count
    layers: list[dict] = field(default_factory=list)
    seconds: dict = field(default_factory=dict)  # states, scan, total
    texts: list[str] = field(default_factory=list)  # decoded prompts, index = pair index

    @property
    def collisions(self) -> int:
        return sum(layer["under_threshold"] for layer in self.layers)

    @property
    def near_collisions(self) -> int:
        return sum(layer["under_floor"] for layer in self.layers)

    @property
    def pairs_per_second(self) -> float:
        pairs = sum(layer["pairs"] for layer in self.layers)
        return pairs / max(self.seconds.get("scan", 0.0), 1e-9)

    def to_dict(self, texts: bool = False) -> dict:
        out = asdict(self)
        out["collisions"] = self.collisions
        out["near_collisions"] = self.near_collisions
        out["pairs_per_second"] = self.pairs_per_second
        if not texts:
            out.pop("texts")
        return out


def read_prompts(path: str | Path) -> list[Prompt]:
    """Prompts from a file: .jsonl lines with "text" or "ids", else one prompt per line."""
    path = Path(path)
    if not path.is_file():
        raise SipitError(f"prompts file not found: {path}")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix == ".jsonl":
        try:
            rows = [json.loads(line) for line in lines]
            prompts = [row["ids"] if "ids" in row else row["text"] for row in rows]
        except (ValueError, KeyError, TypeError) as err:
            raise SipitError(f"bad prompts file {path}: each line needs 'text' or 'ids'") from err
    else:
        prompts = lines
    if not prompts:
        raise SipitError(f"prompts file {path} holds no prompts")
    return prompts


def encode_prompts(lm: lm_mod.LM, prompts: list[Prompt],
                   minimum: int = 2) -> tuple[list[list[int]], int]:
    """Token ids of each prompt, identical sequences merged: (unique ids in order, merged)."""
    seen: dict[tuple, None] = {}
    for prompt in prompts:
        ids = list(prompt) if isinstance(prompt, (list, tuple)) else lm.encode(prompt)
        lm.check_length(len(ids))
        if not all(0 <= int(i) < lm.vocab_size for i in ids):
            raise SipitError(f"token id outside the vocabulary (size {lm.vocab_size})")
        seen.setdefault(tuple(int(i) for i in ids), None)
    unique = [list(ids) for ids in seen]
    if len(unique) < minimum:
        raise SipitError(f"need at least {minimum} distinct prompt(s), got {len(unique)}")
    return unique, len(prompts) - len(unique)


def paper_prompts(lm: lm_mod.LM, n: int, seed: int = 0, max_len: int = 48) -> list[list[int]]:
    """A mixed set of n prompts as token ids, like the paper's collision study at our scale.

    Up to a quarter are wiki20 segments (real text), a quarter random-token prompts
    (1..max_len/2 tokens) and the rest random windows (1..max_len tokens) of the held-out
    Shakespeare text. Deterministic for a seed; may hold repeats (merged by the audit).
    """
    rng = random.Random(seed)
    wiki = [lm.encode(t) for t in data.wiki20(min(n // 4, 6000))]
    n_random = n // 4
    text = data.split_corpus(data.corpus_path().read_text(encoding="utf-8"))[1]
    held = lm.tokenizer(text, add_special_tokens=False)["input_ids"]  # longer than the context
    out = [ids[: lm.max_positions or len(ids)] for ids in wiki]
    for _ in range(n_random):
        out.append([rng.randrange(lm.vocab_size) for _ in range(rng.randint(1, max_len // 2))])
    while len(out) < n:
        length = rng.randint(1, max_len)
        start = rng.randrange(len(held) - length)
        out.append(held[start:start + length])
    return out


@dataclass
class Run:
    """What a pairs audit keeps between block rows (and in its checkpoint)."""

    fingerprint: str
    states: dict  # layer name -> (N, d)
    scans: dict = field(default_factory=dict)  # layer name -> PairScan.acc
    results: dict = field(default_factory=dict)  # layer name -> finished layer dict
    seconds: dict = field(default_factory=dict)


def _fingerprint(lm: lm_mod.LM, ids: list[list[int]], layers: list, settings: dict) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([lm.name, lm.config_hash, lm.dtype_name, [str(x) for x in layers],
                         settings], sort_keys=True).encode())
    for seq in ids:
        h.update(b"%d:" % len(seq) + ",".join(map(str, seq)).encode() + b";")
    return h.hexdigest()[:24]


def _save(run: Run, path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    states_file = path / "states.safetensors"
    if not states_file.exists():
        save_file({k: v.contiguous() for k, v in run.states.items()}, str(states_file))
    tensors, numbers = {}, {}
    for layer, acc in run.scans.items():
        for key, value in acc.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{layer}/{key}"] = value
            else:
                numbers[f"{layer}/{key}"] = value
    data = dict(fingerprint=run.fingerprint, numbers=numbers, results=run.results,
                seconds=run.seconds)
    states_mod.save_bundle(path / "scan.safetensors", tensors, data)


def _load(path: Path, fingerprint: str) -> Run | None:
    if not (path / "scan.safetensors").is_file():
        return None
    tensors, saved = states_mod.load_bundle(path / "scan.safetensors")
    if saved["fingerprint"] != fingerprint:
        raise SipitError(f"checkpoint {path} was made for other prompts, model or settings: "
                         "delete it or pick another --checkpoint")
    scans: dict = {}
    for name, value in [*tensors.items(), *saved["numbers"].items()]:
        layer, _, key = name.rpartition("/")
        scans.setdefault(layer, {})[key] = value
    states = load_file(str(path / "states.safetensors"))
    log.info("resuming from %s", path)
    return Run(fingerprint, states, scans, saved["results"], saved["seconds"])


def audit_pairs(
    model: str | lm_mod.LM,
    prompts: list[Prompt],
    layers: str | list | None = None,
    threshold: float = 1e-6,
    floor: float | None = None,
    bos: bool = False,
    k: int = 10,
    device: str | None = "cpu",
    dtype: str = "fp32",
    block: int = 2048,
    tile: int = 8192,
    sample: int | None = None,
    max_tokens: int = 8192,
    checkpoint: str | Path | None = None,
    save_every: float = 60.0,
    progress: Callable | None = None,
) -> PairsReport:
    """Pairwise collision test of last-token states over `prompts` at `layers`.

    `prompts` are texts or token-id lists; `layers` as in `collect.parse_layers` (default:
    every block and "final"). Pairs closer than `threshold` (L2) are collisions; pairs closer
    than `floor` * their larger norm (default: 16 unit roundoffs of the run dtype) are
    near-collisions, equal up to rounding. The `k` closest pairs are listed with exact
    distances. `bos` puts the tokenizer's BOS token in front of every prompt. Memory is
    bounded by block x tile floats. The histogram keeps every `sample`-th row (default: all
    rows up to 20k prompts, else 1 in 8).
    With `checkpoint` (a folder), progress is saved every `save_every` seconds and after each
    layer, and a later call with the same arguments resumes from it.
    `progress(done, total, label)` is called after each block row.
    """
    check_lines(threshold, floor)
    started = time.perf_counter()
    lm = model if isinstance(model, lm_mod.LM) else lm_mod.load(model, device, dtype)
    ids, merged = encode_prompts(lm, prompts)
    if bos:
        ids = [[_bos_id(lm), *seq] for seq in ids]
    where = collect.parse_layers(layers, lm.n_layers, lm.n_loops)
    sample = sample or (1 if len(ids) <= 20_000 else 8)
    floor = 16 * UNIT_ROUNDOFF[lm.dtype] if floor is None else floor
    settings = dict(threshold=threshold, k=k, block=block, tile=tile, sample=sample,
                    floor=floor)
    fingerprint = _fingerprint(lm, ids, where, settings)
    path = None if checkpoint is None else Path(checkpoint)

    run = _load(path, fingerprint) if path is not None else None
    if run is None:
        t0 = time.perf_counter()
        states = collect.last_token_states(lm, ids, where, max_tokens, progress)
        run = Run(fingerprint, {str(x): v for x, v in states.items()})
        run.seconds["states"] = time.perf_counter() - t0
        if path is not None:
            _save(run, path)

    lengths = [len(seq) for seq in ids]
    scan_layers(run, where, settings, lengths, path, save_every, progress)
    report = PairsReport(
        model=lm.name, dtype=lm.dtype_name, device=str(lm.device), threshold=threshold,
        floor=floor, bos=bos, n_prompts=len(ids), n_merged=merged,
        lengths={str(n): lengths.count(n) for n in sorted(set(lengths))},
        layers=[run.results[str(x)] for x in where],
        texts=[lm.decode(seq) for seq in ids],
    )
    finish(report, run, started, ids)
    return report


def _bos_id(lm: lm_mod.LM) -> int:
    bos = getattr(lm.tokenizer, "bos_token_id", None)
    if bos is None:
        raise SipitError(f"model {lm.name} has no BOS token to put in front of the prompts")
    return int(bos)


def finish(report: PairsReport, run: Run, started: float, ids: list[list[int]]) -> None:
    """Fill in a report's timings and the texts and token ids of its listed pairs."""
    per_layer = {k[5:]: v for k, v in run.seconds.items() if k.startswith("scan:")}
    report.seconds = dict(states=run.seconds.get("states", 0.0), scan=sum(per_layer.values()),
                          total=time.perf_counter() - started, layers=per_layer)
    for layer in report.layers:
        for pair in layer["closest"] + layer["collisions"] + layer["near_collisions"]:
            pair["text_i"], pair["text_j"] = report.texts[pair["i"]], report.texts[pair["j"]]
            pair["ids_i"], pair["ids_j"] = list(ids[pair["i"]]), list(ids[pair["j"]])


def scan_layers(run: Run, where: list, settings: dict, lengths: list[int], path: Path | None,
                save_every: float, progress: Callable | None) -> None:
    """Scan each layer not yet finished in `run`, checkpointing as it goes."""
    n = next(iter(run.states.values())).shape[0]
    total = len(where) * n * (n - 1) // 2
    for index, layer in enumerate(str(x) for x in where):
        if layer in run.results:
            continue
        scan = PairScan(run.states[layer], settings["threshold"], settings["k"],
                        settings["block"], settings["tile"], settings["sample"],
                        settings["floor"])
        if layer in run.scans:
            scan.acc = run.scans[layer]
        t0, saved = time.perf_counter(), time.perf_counter()
        while not scan.finished:
            scan.step()
            run.scans[layer] = scan.acc
            if path is not None and time.perf_counter() - saved >= save_every:
                run.seconds[f"scan:{layer}"] = run.seconds.get(f"scan:{layer}", 0.0) + (
                    time.perf_counter() - t0)
                t0 = saved = time.perf_counter()
                _save(run, path)
            if progress is not None:
                progress(index * n * (n - 1) // 2 + scan.acc["pairs"], total, f"layer {layer}")
        result = dict(layer=layer, **scan.result())
        result["min_by_length"] = {str(k): v for k, v in scan.group_minima(lengths).items()}
        run.results[layer] = result
        run.scans.pop(layer, None)
        run.seconds[f"scan:{layer}"] = run.seconds.get(f"scan:{layer}", 0.0) + (
            time.perf_counter() - t0)
        if path is not None:
            _save(run, path)
        log.info("layer %s: min %.4g, %d under threshold, %d under floor", layer,
                 result["min_distance"], result["under_threshold"], result["under_floor"])
