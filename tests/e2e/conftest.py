"""Fixtures of the end-to-end tier."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def shipped_online_start(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The ``task`` and ``sft`` stages that ``pipelines/onpolicy_dpo.yaml`` and ``pipelines/ppo.yaml``
    share (the same config in both files: a test checks it), run once for the session: the SFT model
    and the prompt files their online stages start from. Ray is started for it and shut down after,
    when no module holds it."""
    import ray

    from orchestrator.config import read_yaml, validate_pipeline
    from orchestrator.runner import run_pipeline

    tmp = tmp_path_factory.mktemp("shipped_online_start")
    raw = read_yaml(ROOT / "pipelines" / "ppo.yaml")
    raw["stages"] = raw["stages"][:2]
    raw.update(run_dir=str(tmp / "runs"), tracking={"uri": f"sqlite:///{tmp}/mlflow.db", "log_checkpoints": False})
    started = not ray.is_initialized()
    try:
        task, sft = run_pipeline(validate_pipeline(raw), quiet=True).stages
    finally:
        if started:
            ray.shutdown()
    return {"model": sft.outputs["model"], "base": task.outputs["model"],
            "prompts_train": task.outputs["prompts_train"], "prompts_eval": task.outputs["prompts_eval"]}


def shipped_online_stage(name: str, start: dict[str, str], tmp_path: Path, **changes: Any) -> dict[str, Any]:
    """``pipelines/<name>.yaml`` with its online stage alone, starting from ``start`` (the shared SFT
    model and prompts), tracked under ``tmp_path``; ``changes`` set keys of that stage."""
    from orchestrator.config import read_yaml

    raw = read_yaml(ROOT / "pipelines" / f"{name}.yaml")
    stage = raw["stages"][2]
    stage["policy"] = start["model"]
    stage["data"].update(train=start["prompts_train"], eval=start["prompts_eval"])
    for key, value in changes.items():
        node = stage
        *path, last = key.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    raw["stages"] = [stage]
    raw.update(run_dir=str(tmp_path / "runs"), tracking={"uri": f"sqlite:///{tmp_path}/mlflow.db",
                                                         "log_checkpoints": False})
    return raw
