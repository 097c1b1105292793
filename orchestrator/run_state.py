"""The run directory's small state file and the config hashes that decide what a resume reuses.

``runs/<pipeline>/<run-id>/state.json`` records the MLflow parent run and, per stage, its config
hash, status (running / completed), MLflow child run and outputs. It is rewritten atomically
(temp file + rename) at every status change, so a crash leaves either the old or the new file.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.config import PipelineConfig, stage_dependencies
from pipelines.errors import UserError

STATE_FILE = "state.json"


@dataclass
class StageRecord:
    config_hash: str
    status: str  # "running" or "completed"
    mlflow_run_id: str
    outputs: dict[str, str] = field(default_factory=dict)


@dataclass
class RunState:
    run_id: str
    pipeline: str
    mlflow_parent_run_id: str
    tracking_uri: str
    stages: dict[str, StageRecord] = field(default_factory=dict)
    attempts: int = 1

    def save(self, run_dir: Path) -> None:
        tmp = run_dir / f".{STATE_FILE}.tmp"
        tmp.write_text(json.dumps(asdict(self), indent=1))
        os.replace(tmp, run_dir / STATE_FILE)

    @classmethod
    def load(cls, run_dir: Path) -> RunState:
        path = run_dir / STATE_FILE
        try:
            raw = json.loads(path.read_text())
            stages = {name: StageRecord(**rec) for name, rec in raw.pop("stages").items()}
            return cls(**raw, stages=stages)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise UserError(f"{path}: cannot read the run state to resume ({exc})") from None


def stage_hashes(config: PipelineConfig) -> dict[str, str]:
    """Per stage, a hash of its resolved config, the pipeline seed and the hashes of the stages it
    reads from: changing a stage changes its hash and every downstream one."""
    hashes: dict[str, str] = {}
    for stage in config.stages:  # dependency order: upstream hashes exist
        digest = hashlib.sha256()
        resolved = stage.model_dump(mode="json", by_alias=True, exclude={"checkpoint"})  # how often, not what
        digest.update(json.dumps(resolved, sort_keys=True).encode())
        digest.update(f"seed={config.seed}".encode())
        for upstream in stage_dependencies(stage):
            digest.update(f"{upstream}={hashes[upstream]}".encode())
        hashes[stage.name] = digest.hexdigest()[:16]
    return hashes


def find_run_dir(config: PipelineConfig, run_id: str | None) -> Path:
    """The directory of run ``run_id`` of this pipeline, or of its latest run with a state file."""
    base = Path(config.run_dir) / config.name
    if run_id:
        run_dir = base / run_id
        if not (run_dir / STATE_FILE).is_file():
            raise UserError(f"--resume {run_id}: no run {run_id!r} of pipeline {config.name!r} "
                            f"({run_dir / STATE_FILE} does not exist)")
        return run_dir
    runs = sorted(p.parent for p in base.glob(f"*/{STATE_FILE}"))  # run ids start with a timestamp
    if not runs:
        raise UserError(f"--resume: no earlier run of pipeline {config.name!r} under {base}/ to resume")
    return runs[-1]


def outputs_exist(outputs: dict[str, Any]) -> bool:
    return all(Path(path).exists() for path in outputs.values())
