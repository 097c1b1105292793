"""Lineage in MLflow: the datasets a stage read, as run inputs (source and digest), and the models it
wrote, as versions in the model registry (tagged with the pipeline run, stage, config hash and the
stage's held-out numbers), with an alias on the best version by a chosen metric."""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from orchestrator.runtime.tracking import summary_metrics
from pipelines.stages.base import StageBase

DATA_KINDS = ("pairs", "preferences", "prompts", "sft")
MODEL_KINDS = ("model", "reward_model")
_HUB = "hub:"


def file_digest(path: str | Path, length: int = 16) -> str:
    """sha256 of a file's bytes, or of a folder's files (names and bytes, in sorted order)."""
    root = Path(path)
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    h = hashlib.sha256()
    for file in files:
        if root.is_dir():
            h.update(str(file.relative_to(root)).encode())
        with file.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:length]


@dataclass(frozen=True)
class DatasetInput:
    """One data input of a stage: its field (``data.train``), where it came from and how it is used."""

    field: str
    source: str
    context: str  # "train" or "eval"


def stage_datasets(stage: StageBase, resolve: Callable[[str], str | None]) -> list[DatasetInput]:
    """The data inputs of ``stage`` (``resolve(field)`` gives a field's path: a literal or an upstream
    output), each ``train`` or ``eval`` as the stage uses it (``input_context``)."""
    found = []
    for field_path, (kind, _) in stage.inputs().items():
        if kind not in DATA_KINDS:
            continue
        source = resolve(field_path)
        if source:
            found.append(DatasetInput(field_path, str(source), stage.input_context(field_path)))
    return found


def log_datasets(inputs: Sequence[DatasetInput], *, stage: str = "", parent_run_id: str | None = None) -> None:
    """``mlflow.log_input`` of each dataset on the active (stage) run: name, source, digest, context;
    with ``parent_run_id`` also on the pipeline's parent run, its context prefixed by the stage
    (``sft/train``), so the runs table shows what a whole pipeline run read on its top row (a dataset
    that several stages read appears there once, with the first one's context)."""
    if not inputs:
        return
    import mlflow
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput as MlflowDatasetInput
    from mlflow.entities import InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    for item in inputs:
        if item.source.startswith(_HUB):
            from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource

            repo, _, split = item.source[len(_HUB):].partition(":")
            source = HuggingFaceDatasetSource(path=repo, split=split or "train")
            digest = hashlib.sha256(item.source.encode()).hexdigest()[:16]
            name = repo
        else:
            from mlflow.data.dataset_source_registry import resolve_dataset_source

            path = Path(item.source).resolve()
            source = resolve_dataset_source(str(path))
            digest = file_digest(path)
            name = path.stem if path.is_file() else path.name
        dataset = MetaDataset(source, name=name, digest=digest)
        mlflow.log_input(dataset, context=item.context, tags={"rlhf.field": item.field})
        if parent_run_id is not None:
            tags = [InputTag(MLFLOW_DATASET_CONTEXT, f"{stage}/{item.context}"), InputTag("rlhf.field", item.field)]
            mlflow.MlflowClient().log_inputs(parent_run_id, [MlflowDatasetInput(dataset._to_mlflow_entity(), tags)])


@dataclass(frozen=True)
class Registered:
    name: str
    version: str
    alias_moved: bool


def registered_name(template: str, pipeline: str, stage: str, output: str) -> str:
    """The registered model's name: the template with ``{pipeline}``, ``{stage}``, ``{output}``."""
    return template.format(pipeline=pipeline, stage=stage, output=output)


def better(candidate: float | None, holder: float | None, lower_is_better: bool) -> bool:
    """Whether a version with ``candidate`` takes the alias from one with ``holder`` (a version
    without the metric never does; any version does from a holder without it)."""
    if candidate is None:
        return False
    if holder is None:
        return True
    return candidate < holder if lower_is_better else candidate > holder


def best_metric(best_by: Sequence[str], numbers: dict[str, float]) -> tuple[str, float, bool] | None:
    """The first of ``best_by`` (``-name``: lower is better) that ``numbers`` holds: (name, value, lower)."""
    for spec in best_by:
        lower = spec.startswith("-")
        name = spec.removeprefix("-")
        if name in numbers:
            return name, numbers[name], lower
    return None


def register_model(uri: str, *, name: str, run_id: str, artifact_path: str, tags: dict[str, str],
                   numbers: dict[str, float], alias: str, best_by: Sequence[str]) -> Registered:
    """A new version of registered model ``name`` from run ``run_id``'s artifact ``artifact_path``,
    tagged with ``tags`` and the stage's numbers; ``alias`` moves to it when it is better than the
    alias holder by the first metric of ``best_by`` it has."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, tags={"rlhf.registered_by": "rayrlhf"})
    tagged = {k: f"{v:.6g}" for k, v in numbers.items()}
    version = client.create_model_version(name, f"runs:/{run_id}/{artifact_path}", run_id=run_id,
                                          tags=tags | tagged)
    # Judged at the precision the holder's tag keeps: a float32 accuracy 0.80500001 against the
    # holder's "0.805" is a tie, and a tie leaves the alias where it is.
    chosen = best_metric(best_by, {k: float(v) for k, v in tagged.items()})
    moved = False
    if chosen is not None:
        metric, value, lower = chosen
        try:
            holder = client.get_model_version_by_alias(name, alias)
            held = holder.tags.get(metric)
            held_value = float(held) if held is not None else None
        except MlflowException:
            held_value = None
        if better(value, held_value, lower):
            client.set_registered_model_alias(name, alias, version.version)
            moved = True
    return Registered(name, str(version.version), moved)


def stage_numbers(history: dict[str, list[tuple[int, float]]]) -> dict[str, float]:
    """A stage's final held-out numbers (what its model version is tagged and judged with)."""
    return {name: series[-1][1] for name, series in summary_metrics(history).items()}


def resolve_model_uri(uri: str, tracking_uri: str) -> str:
    """A ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` URI as a local checkpoint directory
    (downloaded from the registry's source run); anything else unchanged."""
    if not uri.startswith("models:/"):
        return uri
    import mlflow
    from mlflow.exceptions import MlflowException

    from pipelines.errors import UserError

    mlflow.set_tracking_uri(tracking_uri)
    # A folder named after the model (what a server reports as its model name), e.g. quickstart-ppo@best.
    dst = Path(tempfile.mkdtemp(prefix="rlhf-model-")) / uri[len("models:/"):].replace("/", "-v")
    dst.mkdir()
    try:
        return mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst))
    except MlflowException as exc:
        raise UserError(f"{uri}: not found in the model registry of {tracking_uri} ({exc.message})") from None


class RunRegistry:
    """The model registry as a stage's ``after_run`` sees it (``pipelines.stages.base.Registry``): the
    model versions this pipeline run's stages registered (``stage_runs``: stage → its MLflow run id)."""

    def __init__(self, uri: str, stage_runs: dict[str, str]) -> None:
        self.uri, self.stage_runs = uri, stage_runs

    def tag_versions(self, stage: str, tags: Mapping[str, str]) -> int:
        """Tag every version stage ``stage`` registered in this run; returns how many were tagged."""
        from mlflow.tracking import MlflowClient

        if stage not in self.stage_runs:
            return 0
        client = MlflowClient(self.uri)
        versions = client.search_model_versions(f"run_id = '{self.stage_runs[stage]}'")
        for version in versions:
            for key, value in tags.items():
                client.set_model_version_tag(version.name, version.version, key, value)
        return len(versions)

    def set_alias(self, stage: str, alias: str) -> list[str]:
        """Point ``alias`` at every version stage ``stage`` registered in this run; ``name vN`` of each."""
        from mlflow.tracking import MlflowClient

        if stage not in self.stage_runs:
            return []
        client = MlflowClient(self.uri)
        moved = []
        for version in client.search_model_versions(f"run_id = '{self.stage_runs[stage]}'"):
            client.set_registered_model_alias(version.name, alias, version.version)
            moved.append(f"{version.name} v{version.version}")
        return moved
