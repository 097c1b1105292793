"""The evaluate stage's benchmark gates: standard-harness results per policy (``benchmarks``, run by
EleutherAI's ``lm-eval`` on local task YAMLs) and the registry alias that moves only when a policy
passes every requirement (``registry.promote``).

Benchmark numbers join each policy's row of the comparison as ``lm_eval/<task>/<metric>`` (and
``…_stderr``): logged as ``eval/<policy>/lm_eval/…``, tagged on the policy's model version, and
usable in ``registry.promote.require`` beside the stage's own numbers (``exact_match``, ``kl`` …).
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, field_validator

from pipelines.benchmarks.tasks import load_task
from pipelines.errors import ConfigError
from pipelines.stages.base import Frozen, Registry

ALIAS_PATTERN = r"^[A-Za-z][A-Za-z0-9_-]*$"


class BenchmarksConfig(Frozen):
    """lm-eval tasks run against each policy, its checkpoint loaded in the driver (transformers)."""

    tasks: tuple[str, ...] = Field(min_length=1, description="shipped task names (arith_heldout, arith_choice) or "
                                   "paths of lm-eval task YAMLs with local data")
    batch_size: int = Field(16, ge=1)
    limit: int | None = Field(None, ge=1, description="documents per task at most (null: all)")
    num_fewshot: int | None = Field(None, ge=0, description="default: each task's own")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda where the driver has a GPU")

    @field_validator("tasks")
    @classmethod
    def _readable(cls, tasks: tuple[str, ...]) -> tuple[str, ...]:
        names = []
        for i, spec in enumerate(tasks):
            try:  # a missing file or a malformed task fails here, when the pipeline loads
                names.append(load_task(spec)["task"])
            except ConfigError as exc:
                raise ValueError(f"[{i}] {exc}") from None
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"the task {dupes[0]!r} is given twice")
        return tasks


class PromoteConfig(Frozen):
    """Move a registry alias to a policy's version only when every requirement holds."""

    alias: str = Field(pattern=ALIAS_PATTERN, description="the alias to move (e.g. production)")
    require: dict[str, float] = Field(
        min_length=1, description="metric of the policy's comparison row -> threshold: the value must be >= it; "
        "'-metric' -> the value must be <= it (e.g. -kl: 0.5). lm-eval numbers are lm_eval/<task>/<metric>")
    policies: tuple[str, ...] | None = Field(None, description="policies that may be promoted (default: every "
                                             "policy this pipeline run trained and registered)")


class EvaluateRegistryConfig(Frozen):
    """What the evaluate stage does in the model registry beyond tagging the versions with its numbers."""

    promote: PromoteConfig | None = None


def run_benchmarks(cfg: BenchmarksConfig, model_path: str, *, trust_remote_code: bool = False
                   ) -> dict[str, float]:
    """Every task of ``cfg`` on the checkpoint at ``model_path``: ``lm_eval/<task>/<metric>`` → value."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    device = cfg.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    results = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": model_path, "dtype": "float32" if device == "cpu" else "auto",
                                "trust_remote_code": trust_remote_code},
        tasks=[load_task(spec) for spec in cfg.tasks], batch_size=cfg.batch_size, device=device, limit=cfg.limit,
        num_fewshot=cfg.num_fewshot, log_samples=False, task_manager=TaskManager(include_defaults=False),
        verbosity="ERROR")
    assert results is not None  # rank 0 of one process always gets them
    return flatten_results(results["results"])


def flatten_results(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """lm-eval's ``{task: {"acc,none": 0.5, "acc_stderr,none": 0.05, …}}`` as flat metric names
    (``lm_eval/task/acc``; a filter other than ``none`` is appended: ``…/exact_match_strict``)."""
    flat = {}
    for task, values in results.items():
        for key, value in values.items():
            metric, _, filt = key.partition(",")
            if not filt or not isinstance(value, int | float) or isinstance(value, bool):
                continue
            name = metric if filt == "none" else f"{metric}_{filt}"
            if math.isfinite(float(value)):
                flat[f"lm_eval/{task}/{name}"] = float(value)
    return flat


def failed_requirements(require: dict[str, float], row: dict[str, Any]) -> list[str]:
    """The requirements a policy's row misses, as ``metric value op threshold`` (a metric the row
    lacks is a failure: ``metric missing``)."""
    failed = []
    for key, threshold in require.items():
        lower = key.startswith("-")
        metric = key[1:] if lower else key
        value = row.get(metric)
        if not isinstance(value, int | float) or not math.isfinite(value):
            failed.append(f"{metric} missing")
        elif (value > threshold) if lower else (value < threshold):
            failed.append(f"{metric} {value:.4g} {'>' if lower else '<'} {threshold:g}")
    return failed


def promote(cfg: PromoteConfig, candidates: dict[str, str], rows: dict[str, dict[str, Any]], registry: Registry,
            where: str) -> list[str]:
    """Move ``cfg.alias`` to each candidate policy's version (``candidates``: policy → the stage of this
    run that registered it) whose row meets every requirement; tag each version with the verdict
    (``rlhf.promote.<alias>``). Returns the console lines: what moved, what was refused and why."""
    lines = []
    for name, stage in candidates.items():
        if cfg.policies is not None and name not in cfg.policies:
            continue
        failed = failed_requirements(cfg.require, rows[name])
        if failed:
            verdict = "refused: " + "; ".join(failed)
            registry.tag_versions(stage, {f"rlhf.promote.{cfg.alias}": verdict})
            lines.append(f"{where}: @{cfg.alias} refused for {name} ({'; '.join(failed)})")
            continue
        met = ", ".join(f"{k.lstrip('-')} {rows[name][k.lstrip('-')]:.4g}" for k in cfg.require)
        registry.tag_versions(stage, {f"rlhf.promote.{cfg.alias}": f"moved: {met}"})
        for version in registry.set_alias(stage, cfg.alias):
            lines.append(f"{where}: @{cfg.alias} -> {version} ({name}: {met}; every requirement met)")
    return lines
