"""Pictures of a finished stage, logged as PNG artifacts under ``plots/`` of its child run: its
learning curves; for online stages the sampled reward against the KL to the reference, iteration by
iteration; for ``evaluate`` the win rates against the baseline with their intervals. Headless
(matplotlib's Agg backend); drawn in the driver from the metrics the stage logged."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PANELS = 6  # a stage draws the first of its headline metrics it logged, at most this many


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def learning_curves(stage: str, curves: Sequence[str], history: dict[str, list[tuple[int, float]]], out: Path
                    ) -> Path | None:
    """One panel per headline series (``curves``, in order) the stage logged (value by step); None when
    it logged none."""
    series = [(name, [(s, v) for s, v in history[name] if math.isfinite(v)]) for name in curves if history.get(name)]
    series = [(name, points) for name, points in series if points][:PANELS]
    if not series:
        return None
    plt = _pyplot()
    cols = min(3, len(series))
    rows = math.ceil(len(series) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, (name, points) in zip(axes.flat, series, strict=False):
        steps, values = zip(*points, strict=True)
        ax.plot(steps, values, marker="o" if len(points) < 20 else None, markersize=3)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(series):]:
        ax.axis("off")
    fig.suptitle(f"{stage}: learning curves", fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def reward_vs_kl(stage: str, history: dict[str, list[tuple[int, float]]], out: Path) -> Path | None:
    """The sampled reward (``objective/scores``) against the KL to the reference (``objective/kl``),
    one point per iteration, joined in order; None for stages that log neither."""
    scores, kls = dict(history.get("objective/scores", [])), dict(history.get("objective/kl", []))
    steps = sorted(set(scores) & set(kls))
    if len(steps) < 2:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    x, y = [kls[s] for s in steps], [scores[s] for s in steps]
    ax.plot(x, y, color="0.7", linewidth=0.8, zorder=1)
    points = ax.scatter(x, y, c=steps, cmap="viridis", s=18, zorder=2)
    fig.colorbar(points, ax=ax, label="iteration")
    ax.set_xlabel("KL to the reference (objective/kl)")
    ax.set_ylabel("sampled reward (objective/scores)")
    ax.set_title(f"{stage}: reward vs KL", fontsize=11)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def win_rates(stage: str, comparison: dict[str, Any], out: Path) -> Path | None:
    """Each policy's win rate against the baseline with its bootstrap interval (an ``evaluate`` output)."""
    rows = comparison.get("policies") or []
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 0.55 * len(rows) + 1.6))
    ys = range(len(rows))
    rates = [r["win_rate"] for r in rows]
    errors = [[r["win_rate"] - r["win_rate_low"] for r in rows], [r["win_rate_high"] - r["win_rate"] for r in rows]]
    ax.errorbar(rates, ys, xerr=errors, fmt="o", capsize=4, color="C0")
    ax.axvline(0.5, color="0.5", linestyle="--", linewidth=0.8)
    ax.set_yticks(list(ys), [r["policy"] for r in rows])
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    level = f"{comparison.get('confidence', 0.95):.0%}"
    ax.set_xlabel(f"win rate against {comparison['baseline']} (judge: {comparison['judge']}; ties half; "
                  f"{level} bootstrap interval)")
    ax.set_title(f"{stage}: win rates", fontsize=11)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def stage_plots(stage: str, curves: Sequence[str], history: dict[str, list[tuple[int, float]]],
                outputs: dict[str, str], directory: Path) -> list[Path]:
    """Every picture that applies to a finished stage (``curves``: its headline metrics), written under
    ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    made = [learning_curves(stage, curves, history, directory / "learning_curves.png"),
            reward_vs_kl(stage, history, directory / "reward_vs_kl.png")]
    comparison = outputs.get("comparison")
    if comparison and Path(comparison).is_file():
        made.append(win_rates(stage, json.loads(Path(comparison).read_text()), directory / "win_rates.png"))
    return [p for p in made if p is not None]
