"""The table printed at the end of a run: per stage, headline metrics (start → end) and run ids."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from orchestrator.runner import PipelineResult

HEADLINE_METRICS = (
    "eval/exact_match", "eval/accuracy", "eval/margin", "eval/rewards/accuracies", "eval/ranking_accuracy",
    "eval/loss", "loss",
)


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
        for metric in HEADLINE_METRICS:
            pair = stage.first_last(metric)
            if pair:
                cells.append(f"{metric}: {pair[0]:.3f} → {pair[1]:.3f}")
        table.add_row(stage.name, stage.kind, "\n".join(cells) or "-", stage.run_id)
    console.print(table)
    console.print(f"MLflow parent run: {result.mlflow_run_id}   run directory: {result.run_dir}")
    if result.tracking_uri.startswith("sqlite:///"):
        console.print(f"Open it with:  mlflow ui --backend-store-uri {result.tracking_uri}")
    else:
        console.print(f"Tracking server: {result.tracking_uri}")
