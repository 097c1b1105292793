"""Adding a stage kind touches its own module and the registry, nothing else: a throw-away kind is
added to a copy of the product, and the copy validates, plans, lists and runs a pipeline with it."""

from __future__ import annotations

import filecmp
import os
import shutil
import subprocess
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

from tests.sanity.import_graph import PACKAGES

ROOT = Path(__file__).resolve().parents[2]

ECHO = '''"""Stage ``echo``: write a line of text ``times`` times (a throw-away kind added by a test)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from pipelines.stages.base import StageBase, StageKind


class EchoStage(StageBase):
    """Write a line of text to a file."""

    kind: Literal["echo"]
    text: str
    times: int = Field(1, ge=1)

    OUTPUTS: ClassVar[dict[str, str]] = {"text": "text"}

    def numbers(self) -> dict[str, float]:
        return {"lines_total": self.times}


def run(cfg: EchoStage, ctx) -> dict[str, str]:
    path = ctx.stage_dir / "echo.txt"
    path.write_text((cfg.text + "\\n") * cfg.times)
    ctx.log.metrics({"echo/lines": float(cfg.times)}, step=1)
    return {"text": str(path)}


STAGE = StageKind(EchoStage, run)
'''

PIPELINE = """name: echo_demo
ray: {num_cpus: 1}
stages:
  - name: hello
    kind: echo
    text: hello
    times: 3
"""


def _add_echo_kind(tree: Path) -> None:
    """What a contributor writes: the stage module and its entry in the registry."""
    (tree / "pipelines" / "stages" / "echo.py").write_text(ECHO)
    registry = tree / "pipelines" / "stages" / "registry.py"
    text = registry.read_text()
    text = text.replace("from pipelines.stages import (\n", "from pipelines.stages import (\n    echo,\n", 1)
    text = text.replace("MODULES = (", "MODULES = (echo, ", 1)
    registry.write_text(text)


def _changed_files(tree: Path) -> list[str]:
    changed = []
    for package in PACKAGES:
        for path in sorted((tree / package).rglob("*.py")):
            rel = path.relative_to(tree)
            if not (ROOT / rel).exists() or not filecmp.cmp(path, ROOT / rel, shallow=False):
                changed.append(str(rel))
    return changed


def test_a_new_kind_is_its_module_and_one_registry_entry(tmp_path):
    tree = tmp_path / "tree"
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tree / package, ignore=shutil.ignore_patterns("__pycache__"))
    _add_echo_kind(tree)
    assert _changed_files(tree) == ["pipelines/stages/echo.py", "pipelines/stages/registry.py"]

    (tree / "echo.yaml").write_text(PIPELINE)
    env = {**os.environ, "PYTHONPATH": str(tree), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}

    def rlhf(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=tree, env=env,
                              capture_output=True, text=True, timeout=300)

    kinds = rlhf("kinds")
    assert kinds.returncode == 0, kinds.stderr
    assert "echo: Write a line of text to a file." in kinds.stdout
    plan = rlhf("plan", "echo.yaml")
    assert plan.returncode == 0, plan.stderr
    assert "[0] hello (echo)" in plan.stdout and "lines_total = 3" in plan.stdout
    bad = rlhf("validate", "echo.yaml", "--set", "stages.hello.times=0")
    assert bad.returncode == 2 and "stages[0].times: must be >= 1" in bad.stderr, bad.stderr

    run = rlhf("run", "echo.yaml", "--quiet")
    assert run.returncode == 0, run.stderr[-3000:]
    (written,) = (tree / "runs" / "echo_demo").glob("*/stages/hello/echo.txt")
    assert written.read_text() == "hello\n" * 3
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("echo_demo")
    (child,) = client.search_runs([experiment.experiment_id], "tags.rlhf.stage_kind = 'echo'")
    assert child.data.tags["mlflow.parentRunId"]
    assert child.data.metrics["echo/lines"] == 3.0
