"""Plots of the precision experiments (matplotlib, Agg backend): mismatch and RL curves."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"fp32": "tab:gray", "bf16": "tab:red", "fp16": "tab:blue"}


def plot_mismatch(reports: list[dict], path: str | Path) -> Path:
    """Per model: sequence log-ratio against response length, one colour per dtype."""
    models = sorted({r["model"] for r in reports})
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        for r in (r for r in reports if r["model"] == model):
            ax.scatter(r["seq_lengths"], r["seq_log_ratios"], s=10, color=COLORS[r["dtype"]],
                       label=f"{r['dtype']}: KL/token {r['kl']:.1e}, "
                             f"slope {r['seq_slope_per_1k']:+.2f}/1K")
        ax.axhline(0, color="black", lw=0.5)
        ax.set(title=model, xlabel="response length (tokens)",
               ylabel="sequence log-ratio  sum log(pi / mu)")
        ax.legend(fontsize=7)
    fig.suptitle("Sampler (KV cache) vs trainer (padded batch): same weights, same dtype")
    return _save(fig, path)


def smooth(values: list[float], window: int = 10) -> list[float]:
    """Trailing moving average."""
    out = []
    for i in range(len(values)):
        part = values[max(0, i - window + 1) : i + 1]
        out.append(sum(part) / len(part))
    return out


def plot_rl(results: list[dict], path: str | Path) -> Path:
    """Per variant: training reward (smoothed) and per-token KL[mu || pi], one colour per dtype."""
    variants = list(dict.fromkeys(r["config"]["variant"] for r in results))
    fig, axes = plt.subplots(2, len(variants), figsize=(4.5 * len(variants), 7), squeeze=False)
    for col, variant in enumerate(variants):
        for r in (r for r in results if r["config"]["variant"] == variant):
            dtype, rows = r["config"]["dtype"], r["history"]
            steps = [row["step"] for row in rows]
            axes[0, col].plot(steps, smooth([row["reward"] for row in rows]),
                              color=COLORS[dtype], label=dtype)
            axes[1, col].semilogy(steps, smooth([max(row["kl"], 1e-12) for row in rows]),
                                  color=COLORS[dtype], label=dtype)
        axes[0, col].set(title=f"Dr. GRPO, {variant}", xlabel="step",
                         ylabel="training reward (10-step mean)", ylim=(0, 1.02))
        axes[1, col].set(xlabel="step", ylabel="KL[mu || pi] per token (10-step mean)")
        axes[0, col].legend()
        axes[1, col].legend()
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
