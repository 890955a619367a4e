"""Audit reports: JSON, a markdown summary, and matplotlib plots (PNG, Agg backend).

Plots: the pairwise distance distribution per layer (log scale), minimum distance against
layer, minimum distance against prompt length, and per-position margins against the rounding
of fp32 / fp16 / bf16 at each state's scale.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np


def write_json(data: dict, path: str | Path) -> Path:
    """Write a report dict as JSON (nan and inf become null)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(data), indent=1) + "\n", encoding="utf-8")
    return path


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _fmt(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4g}"


def _short(text: str, width: int = 60) -> str:
    text = text.replace("\n", "\\n").replace("|", "\\|")
    return text if len(text) <= width else text[: width - 1] + "…"


def min_distinct(layer: dict) -> float:
    """Smallest listed distance that is neither a collision nor a near-collision (nan if the
    closest pairs are all such)."""
    bad = {(p["i"], p["j"]) for p in layer["collisions"] + layer.get("near_collisions", [])}
    rest = [p["distance"] for p in layer["closest"] if (p["i"], p["j"]) not in bad]
    return min(rest) if rest else math.nan


def pairs_markdown(report: dict) -> str:
    """Markdown summary of a pairwise report (`PairsReport.to_dict()`)."""
    verdict = ("no collisions" if report["collisions"] == 0
               else f"**{report['collisions']} colliding pairs**")
    verdict += (", no near-collisions" if report["near_collisions"] == 0 else
                f", **{report['near_collisions']} near-collisions** (closer than "
                f"{report['floor']:.2g} x their norm: equal up to rounding)")
    lines = [
        f"# Pairwise collision audit: {report['model']} ({report['dtype']})", "",
        f"{report['n_prompts']} distinct prompts ({report['n_merged']} duplicates merged), "
        f"threshold {report['threshold']:g} (L2){' with BOS' if report.get('bos') else ''}: "
        f"{verdict}. "
        f"Scan {report['seconds']['scan']:.1f} s, "
        f"{report['pairs_per_second'] / 1e6:.1f} M pairs/s.", "",
        "| layer | pairs | min (exact) | min, not near | p0.1 | p1 | p50 | p99 | under threshold "
        "| under floor |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for layer in report["layers"]:
        p = layer["percentiles"]
        lines.append(f"| {layer['layer']} | {layer['pairs']:.3g} | {_fmt(layer['min_distance'])}"
                     f" | {_fmt(min_distinct(layer))} | {_fmt(p['p0.1'])} | {_fmt(p['p1'])}"
                     f" | {_fmt(p['p50'])} |"
                     f" {_fmt(p['p99'])} | {layer['under_threshold']} | {layer['under_floor']} |")
    lines += ["", "Percentiles come from a log-scale histogram (bins about 1% wide in "
              "distance); minima and counts are exact.", "", "## Closest pairs", ""]
    for layer in report["layers"]:
        lines.append(f"Layer {layer['layer']}:")
        lines.append("")
        for pair in layer["closest"][:3]:
            lines.append(f"- {pair['distance']:.4g}: `{_short(pair.get('text_i', ''))}` vs "
                         f"`{_short(pair.get('text_j', ''))}`")
        for kind, key in (("COLLISION", "collisions"), ("NEAR", "near_collisions")):
            for pair in layer[key][:10]:
                lines.append(f"- {kind} {pair['distance']:.3g}: "
                             f"`{_short(pair.get('text_i', ''))}` {pair.get('ids_i', '')} vs "
                             f"`{_short(pair.get('text_j', ''))}` {pair.get('ids_j', '')}")
        lines.append("")
    return "\n".join(lines)


def continuations_markdown(report: dict) -> str:
    """Markdown summary of a continuation report (`ContinuationsReport.to_dict()`)."""
    lines = [
        f"# Exhaustive continuation audit: {report['model']} ({report['dtype']})", "",
        f"{len(report['prefixes'])} prefixes x {report['candidates']} continuations, "
        f"threshold {report['threshold']:g}: "
        + ("no collisions." if report["collisions"] == 0
           else f"**{report['collisions']} colliding pairs**."), "",
        "| layer | pairs | min (exact) | under threshold | closest pair |",
        "|---|---|---|---|---|",
    ]
    for layer in report["layers"]:
        top = layer["closest"][0] if layer["closest"] else {}
        pair = (f"prefix {top.get('prefix')}: `{_short(top.get('token_i', ''), 20)}` vs "
                f"`{_short(top.get('token_j', ''), 20)}`") if top else "-"
        lines.append(f"| {layer['layer']} | {layer['pairs']:.3g} | {_fmt(layer['min_distance'])}"
                     f" | {layer['under_threshold']} | {pair} |")
    lines += ["", "Prefixes:", ""] + [f"{i}. `{_short(p)}`"
                                      for i, p in enumerate(report["prefixes"])]
    return "\n".join(lines) + "\n"


def margins_markdown(report: dict) -> str:
    """Markdown summary of a margins report (`MarginsReport.to_dict()`)."""
    lines = [
        f"# Margins: {report['model']} ({report['dtype']})", "",
        "Margin = distance from the true token's state to the nearest other candidate's state "
        "(same prefix). Safe in a format when its rounding u*||h|| is under margin / 2.", "",
        "| layer | positions | min margin | median norm | safe fp32 | safe fp16 | safe bf16 |",
        "|---|---|---|---|---|---|---|",
    ]
    for layer, s in report["summary"].items():
        lines.append(f"| {layer} | {s['positions']} | {_fmt(s['min_margin'])} | "
                     f"{_fmt(s['median_norm'])} | {s['safe_fp32']:.0%} | {s['safe_fp16']:.0%} |"
                     f" {s['safe_bf16']:.0%} |")
    return "\n".join(lines) + "\n"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def plot_distances(report: dict, path: str | Path) -> Path:
    """Distribution of pairwise distances per layer (log-x, share of pairs per bin)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for layer in report["layers"]:
        edges = np.asarray(layer["histogram"]["edges"])
        counts = np.asarray(layer["histogram"]["counts"], dtype=float)
        if len(counts) == 0:
            continue
        centres = np.sqrt(np.maximum(edges[:-1], 1e-30) * edges[1:])
        ax.plot(centres, counts / counts.sum(), label=f"layer {layer['layer']}", lw=1)
    ax.axvline(report["threshold"], color="red", ls="--", lw=1, label="threshold")
    lowest = min([x["min_distance"] for x in report["layers"] if x["min_distance"] > 0]
                 + [report["threshold"]])
    ax.set_xlim(left=lowest / 3)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("L2 distance between last-token states")
    ax.set_ylabel("share of pairs per bin (bins about 1% wide)")
    ax.set_title(f"{report['model']}: {report['n_prompts']:,} prompts, pairwise distances")
    ax.legend(fontsize=8)
    return _save(fig, Path(path))


def plot_min_by_layer(report: dict, path: str | Path,
                      continuations: dict | None = None) -> Path:
    """Exact minimum (and 0.1% / 50% percentiles) of pairwise distance against layer."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    names = [layer["layer"] for layer in report["layers"]]
    x = np.arange(len(names))
    ax.plot(x, [layer["min_distance"] for layer in report["layers"]], "o-", label="minimum")
    ax.plot(x, [min_distinct(layer) for layer in report["layers"]], "^-",
            label="minimum without near-collisions")
    for q in ("p0.1", "p50"):
        ax.plot(x, [layer["percentiles"][q] for layer in report["layers"]], ".--", lw=1,
                label=f"{q[1:]}th percentile")
    if continuations:
        cont = {layer["layer"]: layer["min_distance"] for layer in continuations["layers"]}
        ax.plot(x, [cont.get(name, math.nan) for name in names], "s-",
                label="minimum, continuations")
    ax.axhline(report["threshold"], color="red", ls="--", lw=1, label="threshold")
    ax.set_xticks(x, names)
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("L2 distance")
    ax.set_title("minimum pairwise distance by layer")
    ax.legend(fontsize=8)
    return _save(fig, Path(path))


def plot_min_by_length(report: dict, path: str | Path) -> Path:
    """Per layer, the exact minimum nearest-neighbour distance of prompts of each length."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for layer in report["layers"]:
        items = sorted((int(k), v) for k, v in layer["min_by_length"].items())
        ax.plot([k for k, _ in items], [v for _, v in items], ".-", lw=1,
                label=f"layer {layer['layer']}")
    ax.set_yscale("log")
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("min distance to any other prompt")
    ax.set_title("minimum distance against prompt length")
    ax.legend(fontsize=8)
    return _save(fig, Path(path))


def plot_margins(report: dict, path: str | Path) -> Path:
    """Margins per position and layer, with each format's rounding u*||h|| (dashed)."""
    plt = _plt()
    rows = report["rows"]
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    fig, axes = plt.subplots(1, len(layers), figsize=(3.2 * len(layers), 3.6), sharey=True,
                             squeeze=False)
    for ax, layer in zip(axes[0], layers, strict=True):
        sel = [r for r in rows if r["layer"] == layer]
        x = np.arange(len(sel))
        ax.semilogy(x, [r["margin"] / 2 for r in sel], "o-", ms=3, label="margin / 2")
        for name, colour in (("fp32", "green"), ("fp16", "orange"), ("bf16", "red")):
            ax.semilogy(x, [r[f"rounding_{name}"] for r in sel], "--", color=colour, lw=1,
                        label=f"{name} rounding")
        ax.set_title(f"layer {layer}")
        ax.set_xlabel("position (all prompts)")
    axes[0][0].set_ylabel("L2")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{report['model']}: margins against dtype resolution")
    return _save(fig, Path(path))


def plot_all(pairs: dict | None, out_dir: str | Path, prefix: str = "audit_",
             continuations: dict | None = None, margins: dict | None = None) -> list[Path]:
    """Every plot available from the given reports, as out_dir/<prefix><name>.png."""
    out = Path(out_dir)
    paths = []
    if pairs is not None:
        paths += [plot_distances(pairs, out / f"{prefix}distances.png"),
                  plot_min_by_layer(pairs, out / f"{prefix}min_by_layer.png", continuations),
                  plot_min_by_length(pairs, out / f"{prefix}min_by_length.png")]
    if margins is not None:
        paths.append(plot_margins(margins, out / f"{prefix}margins.png"))
    return paths


MARKDOWN = {"pairs": pairs_markdown, "continuations": continuations_markdown,
            "margins": margins_markdown}


def save(out_dir: str | Path, name: str, data: dict, plots: bool = True) -> list[Path]:
    """Write audit_<name>.json, audit_<name>.md and the report's plots into out_dir.

    `name` is pairs, continuations, margins or minilm (a MiniLM report holds a pairs report).
    """
    out = Path(out_dir)
    paths = [write_json(data, out / f"audit_{name}.json")]
    pairs = data["pairs"] if name == "minilm" else data if name == "pairs" else None
    text = MARKDOWN["pairs"](pairs) if pairs is not None else MARKDOWN[name](data)
    (out / f"audit_{name}.md").write_text(text, encoding="utf-8")
    paths.append(out / f"audit_{name}.md")
    if plots:
        prefix = "audit_minilm_" if name == "minilm" else "audit_"
        paths += plot_all(pairs, out, prefix, margins=data if name == "margins" else None)
    return paths
