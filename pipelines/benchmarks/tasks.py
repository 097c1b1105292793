"""The lm-eval tasks the evaluate stage's ``benchmarks`` run: a shipped task by name (a YAML file of
this folder) or any lm-eval task YAML by path, read and checked before any actor starts.

A task YAML is lm-eval's own format (``task``, ``dataset_path``, ``output_type``, ``doc_to_text`` …)
without ``!function`` tags (the file is read with ``yaml.safe_load``: no code runs from it). Local
data: ``dataset_path: json`` or ``parquet`` with ``dataset_kwargs.data_files`` relative to the YAML
file, resolved here to absolute paths, so the harness reads them offline. Shipped tasks (data from
``make_data.py``): ``arith_heldout`` (greedy exact match on held-out sums) and ``arith_choice`` (four
candidate sums, log-likelihood multiple choice).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from pipelines.errors import ConfigError

SHIPPED_DIR = Path(__file__).resolve().parent
OUTPUT_TYPES = ("generate_until", "multiple_choice", "loglikelihood", "loglikelihood_rolling")


def shipped_tasks() -> list[str]:
    return sorted(p.stem for p in SHIPPED_DIR.glob("*.yaml"))


def task_file(spec: str) -> Path:
    """A shipped task's YAML (by name) or the YAML at ``spec``."""
    if "/" not in spec and not spec.endswith((".yaml", ".yml")):
        path = SHIPPED_DIR / f"{spec}.yaml"
        if not path.is_file():
            raise ConfigError(f"{spec}: not a shipped lm-eval task ({', '.join(shipped_tasks())}); give a task YAML's "
                              "path for another")
        return path
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ConfigError(f"{spec}: task YAML not found")
    return path


def load_task(spec: str) -> dict[str, Any]:
    """The task's config as lm-eval takes it (a dict), its local data files resolved and checked."""
    path = task_file(spec)
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not a plain YAML task ({exc.__class__.__name__}: {exc}); !function tags are "
                          "not read") from None
    if not isinstance(config, dict) or not isinstance(config.get("task"), str):
        raise ConfigError(f"{path}: an lm-eval task YAML needs a 'task' name")
    if config.get("output_type", "generate_until") not in OUTPUT_TYPES:
        raise ConfigError(f"{path}: output_type: {config['output_type']!r} is not one of {list(OUTPUT_TYPES)}")
    kwargs = config.get("dataset_kwargs") or {}
    files = kwargs.get("data_files")
    if files is not None:
        named = files if isinstance(files, dict) else {"": files}
        resolved = {}
        for split, name in named.items():
            file = (path.parent / str(name)).resolve()
            if not file.is_file():
                raise ConfigError(f"{path}: dataset_kwargs.data_files{'.' + split if split else ''}: {file} not found")
            resolved[split] = str(file)
        config["dataset_kwargs"] = kwargs | {"data_files": resolved if isinstance(files, dict) else resolved[""]}
    return config
