"""The table printed at the end of a run: per stage, headline metrics (start → end) and run ids."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from orchestrator.runner import PipelineResult
from orchestrator.runtime.tracking import runs_page


def print_summary(result: PipelineResult, console: Console | None = None) -> None:
    if console is None:
        console = Console()
        if not console.is_terminal or console.width < 140:
            console = Console(width=160)  # run ids and metric names must not be cut
    table = Table(title=f"pipeline run {result.run_id}")
    table.add_column("stage")
    table.add_column("kind")
    table.add_column("metrics (first → last)")
    table.add_column("MLflow run id")
    for stage in result.stages:
        cells = []
        for metric in stage.headline:
            pair = stage.first_last(metric)
            if pair:
                cells.append(f"{metric}: {pair[0]:.3f} → {pair[1]:.3f}")
        table.add_row(stage.name, stage.kind, "\n".join(cells) or "-", stage.run_id)
    console.print(table)
    story = task_metric_story(result)
    if story:
        console.print(story)
    for stage in result.stages:
        if "comparison" in stage.outputs and Path(stage.outputs["comparison"]).is_file():
            console.print(comparison_table(stage.name, json.loads(Path(stage.outputs["comparison"]).read_text())))
    console.print(f"MLflow parent run: {result.mlflow_run_id}   run directory: {result.run_dir}")
    if result.tracking_uri.startswith("sqlite:///"):
        console.print(f"Open it with:  mlflow ui --backend-store-uri {result.tracking_uri}\n"
                      f"then:          {runs_page('http://127.0.0.1:5000', result.experiment_id)}", soft_wrap=True)
    elif result.tracking_uri.startswith(("http://", "https://")):
        console.print(f"Its runs:  {runs_page(result.tracking_uri, result.experiment_id)}", soft_wrap=True)
    else:
        console.print(f"Tracking store: {result.tracking_uri}  (experiment id {result.experiment_id})")


TASK_METRIC = "eval/exact_match"


def task_metric_story(result: PipelineResult) -> str | None:
    """One line following the held-out task metric through the policy stages: where the first of
    them started (the base model) and where each ended."""
    steps = [(stage.name, stage.first_last(TASK_METRIC)) for stage in result.stages]
    steps = [(name, pair) for name, pair in steps if pair]
    if not steps:
        return None
    chain = [f"start {steps[0][1][0]:.3f}"] + [f"{name} {pair[1]:.3f}" for name, pair in steps]
    return f"held-out {TASK_METRIC.removeprefix('eval/')}: " + " → ".join(chain)


def comparison_table(stage: str, comparison: dict[str, Any]) -> Table:
    """An ``evaluate`` stage's comparison: per policy its numbers and its win rate against the baseline."""
    base, judge = comparison["baseline"], comparison["judge"]
    table = Table(title=f"{stage}: policies on the same held-out prompts (judge: {judge}; KL to "
                  f"{comparison['reference']})")
    rows = comparison["policies"]
    has_em = any("exact_match" in row for row in rows)
    # lm-eval's numbers (benchmarks), their standard errors left to comparison.json
    harness = sorted({k for row in rows for k in row if k.startswith("lm_eval/") and not k.endswith("_stderr")})
    for column in ("policy", "reward (sampled)", *(["exact match (greedy)"] if has_em else []), "KL",
                   "length", f"win rate vs {base} [{comparison.get('confidence', 0.95):.0%} CI]",
                   *(k.removeprefix("lm_eval/") for k in harness)):
        table.add_column(column, justify="left" if column == "policy" else "right")
    for row in rows:
        cells = [row["policy"], f"{row['reward_mean']:.3f}"]
        if has_em:
            cells.append(f"{row['exact_match']:.3f}" if "exact_match" in row else "-")
        cells += [f"{row['kl']:.3f}", f"{row['response_length_mean']:.1f}",
                  f"{row['win_rate']:.3f} [{row['win_rate_low']:.3f}, {row['win_rate_high']:.3f}]"]
        cells += [f"{row[k]:.3f}" if k in row else "-" for k in harness]
        table.add_row(*cells)
    return table
