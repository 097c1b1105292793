"""Reading back what a stage logged to MLflow (shared by the e2e tests)."""

import json
from pathlib import Path

from mlflow.tracking import MlflowClient


def metric_history(client: MlflowClient, run_id: str) -> dict[str, list[float]]:
    """Every metric of a run, its values in step order."""
    run = client.get_run(run_id)
    return {k: [m.value for m in sorted(client.get_metric_history(run_id, k), key=lambda m: m.step)]
            for k in run.data.metrics}


def sample_tables(client: MlflowClient, run_id: str, iterations, tmp_path: Path) -> dict[int, dict[str, list]]:
    """The per-iteration sample tables (``samples/iter_NNNN.json``) as column → values."""
    tables = {}
    for it in iterations:
        path = client.download_artifacts(run_id, f"samples/iter_{it:04d}.json", str(tmp_path / f"t{it}"))
        table = json.loads(Path(path).read_text())
        tables[it] = {c: [row[i] for row in table["data"]] for i, c in enumerate(table["columns"])}
    return tables
