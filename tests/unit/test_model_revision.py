"""A hub model's resolved commit is what a stage logs (`rlhf.model.<field>.revision`): read here from
a hub cache laid out as `huggingface_hub` writes it, offline, in a fresh process (the hub library
reads HF_HOME when imported)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from pipelines.tasks.tiny_model import build_tiny_model

ROOT = Path(__file__).resolve().parents[2]
SHA = "0123456789abcdef0123456789abcdef01234567"
PROBE = """
import json
from orchestrator.config import validate_pipeline
from orchestrator.stage_run import model_revisions
from pipelines.data.tokens import hub_revision
from pipelines.errors import DataError
stage = validate_pipeline({"name": "p", "stages": [{"name": "sft", "kind": "sft", "policy": "acme/tiny",
                           "data": {"train": "x.parquet"}}]}).stages[0]
try:
    hub_revision("acme/absent")
    missing = None
except DataError as exc:
    missing = str(exc)
print(json.dumps({"tags": model_revisions(stage), "local": hub_revision(%r), "missing": missing}))
"""


def test_a_hub_models_commit_is_resolved_and_a_local_path_has_none(tmp_path):
    repo = tmp_path / "hub" / "models--acme--tiny"
    build_tiny_model(repo / "snapshots" / SHA)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SHA)
    env = {**os.environ, "HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", PROBE % str(tmp_path)], env=env, capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["tags"] == {"rlhf.model.policy.revision": SHA}
    assert result["local"] is None
    assert result["missing"].startswith("acme/absent: cannot resolve the hub model's revision")
