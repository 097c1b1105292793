"""Test tiers by directory: unit (no Ray), ray (real local Ray), e2e (real pipelines), sanity."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        tier = Path(str(item.fspath)).relative_to(ROOT / "tests").parts[0]
        if tier in ("unit", "ray", "e2e", "sanity"):
            item.add_marker(getattr(pytest.mark, tier))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pipelines.tasks.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_model") / "model", size="tiny", seed=0)


@pytest.fixture(scope="session")
def task_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from pipelines.tasks.arithmetic import write_datasets

    return write_datasets(tmp_path_factory.mktemp("task_data"), max_operand=99, num_sft=256, num_pairs=512,
                          num_prompts=64, num_eval=64, eval_fraction=0.1, seed=0)


@pytest.fixture(scope="module")
def ray_local():
    """A real local Ray instance (2 CPUs), shut down after the module."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
