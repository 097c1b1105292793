"""Pipeline config: YAML → overrides → typed, frozen pydantic models, checked before anything starts."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Union

import yaml
from pydantic import Field, ValidationError, model_validator

from pipelines.errors import ConfigError
from pipelines.stages.base import ACCEPTS, FaultToleranceConfig, Frozen, StageBase, StageRef
from pipelines.stages.registry import KINDS

# Every registered kind's config model, told apart by ``kind``.
StageConfig = Annotated[Union[tuple(k.config for k in KINDS.values())], Field(discriminator="kind")]  # noqa: UP007
STAGE_KINDS = tuple(KINDS)


class RegistryConfig(Frozen):
    """The MLflow model registry: each policy and reward-model output becomes a model version."""

    enabled: bool | None = Field(None, description="default: when checkpoints are logged (log_checkpoints)")
    name: str = Field("{pipeline}-{stage}", description="registered model name; {pipeline}, {stage}, {output}")
    alias: str = Field("best", pattern=r"^[A-Za-z][A-Za-z0-9_-]*$", description="alias of the best version")
    best_by: tuple[str, ...] = Field(
        (), description="metrics ranking the versions, the first one a stage has (higher is better; -name: lower); "
        "default: each stage kind's own (e.g. eval/exact_match, then -eval/loss for sft)")

    @model_validator(mode="after")
    def _name_fields(self) -> RegistryConfig:
        try:
            self.name.format(pipeline="p", stage="s", output="o")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"name: {self.name!r} may use {{pipeline}}, {{stage}} and {{output}} only ({exc})"
                             ) from None
        return self


class TrackingConfig(Frozen):
    """MLflow. The URI resolves as: $MLFLOW_TRACKING_URI, else ``uri``, else sqlite:///mlflow.db."""

    uri: str | None = None
    experiment: str | None = Field(None, description="default: the pipeline name")
    system_metrics: bool = True
    log_checkpoints: bool = Field(True, description="upload final checkpoints as run artifacts")
    registry: RegistryConfig = RegistryConfig()

    @model_validator(mode="after")
    def _registry_needs_checkpoints(self) -> TrackingConfig:
        if self.registry.enabled and not self.log_checkpoints:
            raise ValueError("registry.enabled: a model version points at the run's logged checkpoint; "
                             "set log_checkpoints: true")
        return self

    @property
    def registers(self) -> bool:
        return self.log_checkpoints if self.registry.enabled is None else self.registry.enabled


class RayConfig(Frozen):
    """Where actors run. No address: a local Ray instance is started for the run."""

    address: str | None = None
    num_cpus: int | None = Field(None, ge=1)
    include_dashboard: bool = False
    placement_timeout_s: float = Field(120.0, gt=0, description="wait this long for a placement group")


class PipelineConfig(Frozen):
    """One YAML file: a name, shared settings, and stages run in order."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=64)
    seed: int = Field(0, description="every stage's seed (schedule.seed; a synthetic task's seed) unless it sets "
                      "its own")
    run_dir: str = "runs"
    tracking: TrackingConfig = TrackingConfig()
    ray: RayConfig = RayConfig()
    fault_tolerance: FaultToleranceConfig = FaultToleranceConfig()
    stages: list[StageConfig] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _stage_seeds(cls, data: Any) -> Any:
        """A stage without a seed of its own takes the pipeline's: ``seed: 1`` changes the data a
        synthetic task draws, the batch order and the sampling of every stage."""
        if not isinstance(data, dict) or not isinstance(data.get("stages"), list):
            return data
        seed = data.get("seed", 0)
        stages = []
        for stage in data["stages"]:
            kind = KINDS.get(stage.get("kind")) if isinstance(stage, dict) else None
            stages.append(kind.config.with_seed(stage, seed) if kind is not None else stage)
        return {**data, "stages": stages}

    @model_validator(mode="after")
    def _check_stage_graph(self) -> PipelineConfig:
        """References name existing stages with outputs of the right type and form no cycle; the
        stages are then put in dependency order (file order where the graph leaves a choice)."""
        by_name: dict[str, tuple[int, StageBase]] = {}
        for i, stage in enumerate(self.stages):
            if stage.name in by_name:
                raise ValueError(f"stages[{i}].name: duplicate stage name {stage.name!r}")
            by_name[stage.name] = (i, stage)
        for i, stage in enumerate(self.stages):
            for field, (want_type, default_output) in stage.inputs().items():
                ref = stage.field(field)
                if isinstance(ref, StageRef):
                    _check_ref(f"stages[{i}].{field}", ref, want_type, default_output, by_name)
        object.__setattr__(self, "stages", dependency_order(self.stages))
        return self

    def stage(self, name: str) -> StageBase:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(name)


def stage_dependencies(stage: StageBase) -> list[str]:
    """Names of the stages whose outputs ``stage`` reads, in field order, without repeats."""
    refs = (stage.field(field) for field in stage.inputs())
    return list(dict.fromkeys(ref.from_ for ref in refs if isinstance(ref, StageRef)))


def dependency_order(stages: list[StageBase]) -> list[StageBase]:
    """Stages ordered so each runs after the stages it reads from; among ready stages the one
    earlier in the file goes first. A cycle is a ValueError naming it."""
    deps = {s.name: stage_dependencies(s) for s in stages}
    ordered: list[StageBase] = []
    done: set[str] = set()
    pending = list(stages)
    while pending:
        ready = next((s for s in pending if all(d in done for d in deps[s.name])), None)
        if ready is None:
            cycle = " -> ".join(_find_cycle(deps, pending[0].name, done))
            raise ValueError(f"stages: the references form a cycle: {cycle}")
        ordered.append(ready)
        done.add(ready.name)
        pending.remove(ready)
    return ordered


def _find_cycle(deps: dict[str, list[str]], start: str, done: set[str]) -> list[str]:
    """Follow references to unfinished stages from ``start`` (every unfinished stage has one) until
    a stage repeats; the loop, closed."""
    path: list[str] = []
    node = start
    while node not in path:
        path.append(node)
        node = next(d for d in deps[node] if d not in done)
    return path[path.index(node):] + [node]


def _check_ref(where: str, ref: StageRef, want_type: str, default_output: str,
               by_name: dict[str, tuple[int, StageBase]]) -> None:
    if ref.from_ not in by_name:
        raise ValueError(f"{where}.from: no stage named {ref.from_!r}; stages: {sorted(by_name)}")
    upstream = by_name[ref.from_][1]
    output = ref.output or default_output
    accepted = ACCEPTS.get(want_type, (want_type,))
    if ref.output is None and not set(accepted) & set(upstream.OUTPUTS.values()):
        have = ", ".join(f"{name} ({kind})" for name, kind in upstream.OUTPUTS.items()) or "nothing"
        raise ValueError(f"{where}: a {want_type} is needed, but stage {ref.from_!r} ({upstream.kind}) outputs {have}")
    if output not in upstream.OUTPUTS:
        raise ValueError(
            f"{where}.output: stage {ref.from_!r} ({upstream.kind}) has no output {output!r}; "
            f"it has {sorted(upstream.OUTPUTS)}"
        )
    if upstream.OUTPUTS[output] not in accepted:
        raise ValueError(
            f"{where}: output {ref.from_}.{output} is a {upstream.OUTPUTS[output]}, but a {want_type} is needed"
        )


# ---------------------------------------------------------------- loading and overrides

def load_pipeline(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """Read, override and validate a pipeline YAML. Raises ConfigError naming the field path."""
    raw = read_yaml(path)
    for item in overrides or []:
        apply_override(raw, item)
    return validate_pipeline(raw, source=str(path))


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: pipeline file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping with 'name' and 'stages'")
    return raw


def dump_pipeline(config: PipelineConfig) -> str:
    """The resolved pipeline as YAML: it loads back to an equal config (equal stage hashes)."""
    return yaml.safe_dump(config.model_dump(mode="json", by_alias=True), sort_keys=False)


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one ``a.b.c=value`` override in place. Stages are addressed by name or index.

    The value is parsed as a YAML scalar (``10`` → int, ``1e-4`` → float, ``true`` → bool).
    """
    key, eq, value = item.partition("=")
    if not eq or not key:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. stages.dpo.schedule.steps=10")
    parts = key.split(".")
    node: Any = raw
    for depth, part in enumerate(parts[:-1]):
        node = _descend(node, part, ".".join(parts[: depth + 1]), item)
    leaf = parts[-1]
    if isinstance(node, list):
        node[_list_index(node, leaf, key, item)] = _parse_scalar(value)
    elif isinstance(node, dict):
        node[leaf] = _parse_scalar(value)
    else:
        raise ConfigError(f"--set {item!r}: {'.'.join(parts[:-1])} is not a mapping")


def _descend(node: Any, part: str, where: str, item: str) -> Any:
    if isinstance(node, list):
        return node[_list_index(node, part, where, item)]
    if not isinstance(node, dict):
        raise ConfigError(f"--set {item!r}: {where} is not a mapping")
    return node.setdefault(part, {})


def _list_index(node: list[Any], part: str, where: str, item: str) -> int:
    if part.isdigit() and int(part) < len(node):
        return int(part)
    for i, entry in enumerate(node):
        if isinstance(entry, dict) and entry.get("name") == part:
            return i
    raise ConfigError(f"--set {item!r}: {where}: no stage named or numbered {part!r}")


def _parse_scalar(value: str) -> Any:
    try:
        return yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError:
        return value


def validate_pipeline(raw: dict[str, Any], source: str = "<pipeline>") -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{source}: invalid pipeline\n" + format_validation_error(exc)) from None


_MESSAGES = {
    "greater_than": "must be > {gt}",
    "greater_than_equal": "must be >= {ge}",
    "less_than": "must be < {lt}",
    "less_than_equal": "must be <= {le}",
    "extra_forbidden": "unknown field",
    "missing": "required field is missing",
    "literal_error": "must be one of {expected}",
    "string_pattern_mismatch": "must match the pattern {pattern}",
    "too_short": "must have at least {min_length} item(s)",
}


def format_validation_error(exc: ValidationError) -> str:
    """One line per problem: ``stages[0].dpo.beta: must be > 0``."""
    lines = []
    for err in exc.errors():
        loc = _format_loc(err["loc"])
        template = _MESSAGES.get(err["type"])
        ctx = {k: _fmt(v) for k, v in err.get("ctx", {}).items()}
        msg = template.format(**ctx) if template else err["msg"]
        if err["type"] == "value_error":
            msg = re.sub(r"^Value error, ", "", msg)
            # Validators name the field they check first: "schedule.steps: ..." joins the location.
            head = re.match(r"^([A-Za-z_][\w.\[\]]*): (.*)$", msg, re.S)
            if head:
                loc = f"{loc}.{head.group(1)}" if loc else head.group(1)
                msg = head.group(2)
        if err["type"] == "union_tag_invalid":
            msg = f"unknown stage kind {err['ctx'].get('tag')!r}; expected one of {', '.join(STAGE_KINDS)}"
        lines.append(f"  {loc}: {msg}" if loc else f"  {msg}")
    return "\n".join(dict.fromkeys(lines))


def _fmt(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _format_loc(loc: tuple[Any, ...]) -> str:
    out = ""
    parts = list(loc)
    i = 0
    while i < len(parts):
        part = parts[i]
        if isinstance(part, int):
            out += f"[{part}]"
            # A discriminated union adds the tag (the stage kind) after the index; drop it.
            if i + 1 < len(parts) and parts[i + 1] in STAGE_KINDS:
                i += 1
        elif part in ("str", "StageRef") or str(part).startswith("function-after["):
            pass  # union member and validator names add nothing for the user
        else:
            out += f".{part}" if out else str(part)
        i += 1
    return out


# ---------------------------------------------------------------- flattening for MLflow params

_SECRET_KEY = re.compile(r"(token|secret|password|passwd|api_key|apikey|credential|private_key)", re.I)
_URI_CREDENTIALS = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/@\s]+@", re.I)


def flatten_for_params(config: PipelineConfig) -> dict[str, str]:
    """Dotted-key view of the resolved config with secrets redacted (never logged to MLflow)."""
    flat: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for i, v in enumerate(value):
                walk(f"{prefix}.{v.get('name', i)}", v)
        else:
            flat[prefix] = redact(prefix, value)

    walk("", config.model_dump(mode="json", by_alias=True))
    return flat


def redact(key: str, value: Any) -> str:
    if _SECRET_KEY.search(key.rsplit(".", 1)[-1]) and value not in (None, ""):
        return "***"
    return _URI_CREDENTIALS.sub(r"\g<scheme>***@", str(value))
