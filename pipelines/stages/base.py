"""What every stage kind is: ``StageBase`` (the fields all stages have, what a stage declares to the
planner, the driver and the console) and ``StageKind`` (what a stage module registers).

A kind declares, in one place, everything the layers above need to know about it: its inputs and
outputs, its roles and phases, its headline metrics (the progress line, the summary table, the
learning-curve panels and the registry's ranking all read ``headline()``), how its data inputs are
used (``input_context``) and what the driver does after it ran (``after_run``). The driver holds no
kind names; the stage families (``preference.PreferenceStage``, ``online.OnlineStage``) build on this.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Frozen(BaseModel):
    """Base for every config model: unknown fields are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def with_default(model: Frozen, **values: Any) -> Any:
    """A copy of ``model`` with ``values`` as if they were its defaults: they stay out of
    ``model_fields_set``, which is how the plan tells what the YAML left unset (and may fit to the
    machine) from what the user chose."""
    copy = model.model_copy(update=values)
    copy.__pydantic_fields_set__.difference_update(values)
    return copy


class StageRef(Frozen):
    """A reference to an output of an earlier stage, e.g. ``{from: task, output: pairs_train}``."""

    from_: str = Field(alias="from", min_length=1)
    output: str | None = None


class ReadsFromStage(Frozen):
    """A data section whose inputs may all come from one earlier stage: ``{from: task, ...}`` stands for
    ``{train: {from: task}, eval: {from: task}, ...}`` (``FROM_FIELDS``; a field given beside it wins),
    each field then reading that stage's output of the type it needs (its default output)."""

    FROM_FIELDS: ClassVar[tuple[str, ...]] = ("train", "eval")

    @model_validator(mode="before")
    @classmethod
    def _from_stage(cls, data: Any) -> Any:
        if not isinstance(data, dict) or "from" not in data:
            return data
        rest = {k: v for k, v in data.items() if k != "from"}
        return {**{name: {"from": data["from"]} for name in cls.FROM_FIELDS if name not in rest}, **rest}


# The output types an input of a type takes: preference data (KTO's rows) may be pairs, which split.
ACCEPTS: dict[str, tuple[str, ...]] = {"preferences": ("preferences", "pairs")}

# A plain string is a filesystem path (for models a hub id too; for data ``hub:ORG/NAME[:SPLIT]``);
# a mapping refers to a stage output.
PathOrRef = str | StageRef
COLUMNS_DOC = "field → your file's column, e.g. {prompt: question, chosen: good}"


@dataclass(frozen=True)
class Metric:
    """A headline metric of a stage kind: its logged name, its short label on the progress line, and
    whether lower is better (``ranks``: it may rank the kind's model versions in the registry)."""

    name: str
    label: str
    lower_is_better: bool = False
    ranks: bool = False


class ReferenceSource(Enum):
    """Where a stage's reference log-probs come from (the plan prints the value)."""

    GROUP = "reference group"
    TRAINER = "policy_trainer (the starting policy)"
    NONE = "none (the loss is reference-free)"


class Registry(Protocol):
    """What a stage's ``after_run`` may do with the model registry (the driver implements it)."""

    def tag_versions(self, stage: str, tags: Mapping[str, str]) -> int:
        """Tag every model version that stage ``stage`` of this pipeline run registered; returns how many."""
        ...

    def set_alias(self, stage: str, alias: str) -> list[str]:
        """Point ``alias`` of each registered model at the version stage ``stage`` of this run registered;
        returns those versions as ``name vN`` (empty: the stage registered none)."""
        ...


class CheckpointConfig(Frozen):
    """In-stage checkpoints: what ``rlhf run --resume`` continues an interrupted stage from."""

    every: int | None = Field(
        None, ge=0, description="steps (sft, reward_model, offline_dpo) or iterations (onpolicy_dpo, ppo) between "
        "checkpoints; 0 = none (an interrupted stage restarts); default 100 steps / 10 iterations (none under ZeRO-3)",
    )


class FaultToleranceConfig(Frozen):
    """Deadlines and in-stage recovery. Every remote call waits at most ``call_timeout_s`` (calls that
    load a model ``setup_timeout_s``) and then fails with an error naming the role, ranks, phase,
    iteration and weight version. A dead rank of a stateless role (rollout, reward, reference) is
    replaced inside the stage, at most ``max_restarts`` times per role; a dead trainer or critic rolls
    the stage back to its last in-stage checkpoint (or stops it with that checkpoint kept)."""

    max_restarts: int = Field(3, ge=0, description="replacements per role and stage; 0 = fail at once")
    call_timeout_s: float = Field(600.0, gt=0, description="deadline of one remote call (a chunk, a step)")
    setup_timeout_s: float = Field(1800.0, gt=0, description="deadline of a call that loads a model")


class PlacementConfig(Frozen):
    """How a stage's actor groups map onto placement-group bundles.

    ``colocate`` lists sets of roles that share bundles: rank i of every role in a set is placed in
    bundle i of one placement group, whose size is the sum of those ranks' resources. On GPUs this
    is how roles share a device (e.g. ``gpus_per_worker: 0.5`` for the trainer and the reference).
    """

    strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="Ray placement strategy of every placement group of the stage"
    )
    colocate: tuple[tuple[str, ...], ...] = Field((), description="sets of roles that share bundles")
    nodes: dict[str, str] = Field(
        {}, description="role → node: every rank of the role runs on the node that has this custom resource "
        "(`ray start --resources '{\"node_a\": 1}'`; `rlhf cluster up` names its workers node_a, node_b, ...)")


class StageBase(Frozen):
    """Fields every stage has. OUTPUTS maps output name to output type.

    ROLES are the actor groups a stage starts, and PHASES the sets of them alive at the same time
    (the placement plan's peak demand is the largest phase). HEADLINE are the metrics worth showing,
    in order of interest (training metrics first); RANKED_BY the metrics that rank its model versions.
    """

    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$", max_length=48)
    placement: PlacementConfig = PlacementConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    fault_tolerance: FaultToleranceConfig | None = Field(None, description="default: the pipeline's")
    CHECKPOINT_EVERY: ClassVar[int] = 0  # the default interval (0: the stage has no in-stage checkpoints)
    TRAINS: ClassVar[bool] = True  # its model outputs are trained: versions in the model registry
    OUTPUTS: ClassVar[dict[str, str]] = {}
    # Field name → (output type it expects, default output name of the referenced stage).
    INPUTS: ClassVar[dict[str, tuple[str, str]]] = {}
    ROLES: ClassVar[tuple[str, ...]] = ()
    PHASES: ClassVar[tuple[tuple[str, ...], ...]] = ()
    HEADLINE: ClassVar[tuple[Metric, ...]] = ()
    # The input whose tokenizer reads the stage's data and whose positions bound its sequences.
    MODEL_FIELD: ClassVar[str | None] = None
    # Role -> the field holding its resources (what ``role_configs`` returns it from).
    ROLE_FIELDS: ClassVar[dict[str, str]] = {}

    @model_validator(mode="after")
    def _colocated_roles_exist(self) -> StageBase:
        seen: set[str] = set()
        for i, roles in enumerate(self.placement.colocate):
            if len(roles) < 2:
                raise ValueError(f"placement.colocate[{i}]: a colocation set needs at least two roles, got "
                                 f"{list(roles)}")
            for role in roles:
                if role not in self.ROLES:
                    raise ValueError(f"placement.colocate[{i}]: {self.kind} has no role {role!r}; "
                                     f"its roles are {list(self.ROLES)}")
                if role in seen:
                    raise ValueError(f"placement.colocate[{i}]: role {role!r} is in two colocation sets")
                seen.add(role)
            if len({self.placement.nodes.get(role) for role in roles}) > 1:
                raise ValueError(f"placement.nodes: the colocated roles {list(roles)} are pinned to different nodes")
        for role, node in self.placement.nodes.items():
            if role not in self.ROLES:
                raise ValueError(f"placement.nodes.{role}: {self.kind} has no role {role!r}; its roles are "
                                 f"{list(self.ROLES)}")
            if not node or node in ("CPU", "GPU", "memory", "object_store_memory"):
                raise ValueError(f"placement.nodes.{role}: {node!r} is not a node's custom resource name")
        return self

    @model_validator(mode="after")
    def _checkpoints_supported(self) -> StageBase:
        if self.checkpoint.every and self._zero3_roles():
            raise ValueError(f"checkpoint.every: in-stage checkpoints support ZeRO stages 0-2, and "
                             f"{', '.join(self._zero3_roles())} use ZeRO-3; set checkpoint.every: 0")
        return self

    def _zero3_roles(self) -> list[str]:
        return [role for role, c in self.trainer_configs().items() if c.zero_stage == 3]

    @classmethod
    def with_seed(cls, raw: dict[str, Any], seed: int) -> dict[str, Any]:
        """A stage's YAML mapping with the pipeline's ``seed`` where it sets none of its own: in its
        ``seed`` field, or its ``schedule``'s (every schedule has one)."""
        if "seed" in cls.model_fields and "seed" not in raw:
            raw = {**raw, "seed": seed}
        schedule = raw.get("schedule", {})
        if "schedule" in cls.model_fields and isinstance(schedule, dict) and "seed" not in schedule:
            raw = {**raw, "schedule": {**schedule, "seed": seed}}
        return raw

    def checkpoint_interval(self) -> int:
        """Steps (offline stages) or iterations (online stages) between in-stage checkpoints; 0 = none."""
        if self.checkpoint.every is not None:
            return self.checkpoint.every
        return 0 if self._zero3_roles() else self.CHECKPOINT_EVERY

    def function_rewards(self) -> list[str]:
        """``module:function`` specs this stage calls (imported before any actor starts)."""
        return []

    def reads_tasks(self) -> bool:
        """Whether its prompt files are an environment's tasks (rows of any columns), not prompts."""
        return False

    def check_model(self, path: str, tokenizer: Any = None) -> None:
        """Checks of the local model the stage reads (``path``, its tokenizer when loaded already),
        before any actor starts (``preflight``, and the stage's own start); raise ``ConfigError``."""

    def role_configs(self) -> dict[str, Any]:
        """Each role's resource config (``num_workers``, ``cpus_per_worker``, ``gpus_per_worker``)."""
        return {}

    def with_role_resources(self, configs: dict[str, Any]) -> Any:
        """A copy of the stage with these roles' resource configs (role -> config) replaced."""
        return self.model_copy(update={self.ROLE_FIELDS[role]: config for role, config in configs.items()})

    def trainer_configs(self) -> dict[str, Any]:
        """The roles that train (a ``TrainerConfig`` each: DeepSpeed ranks with optimizer state)."""
        return {}

    def inputs(self) -> dict[str, tuple[str, str]]:
        """Input field path → (output type it expects, default output name): ``INPUTS`` plus the
        per-instance fields of lists (e.g. ``auxiliary.0.model``)."""
        return dict(self.INPUTS)

    def input_context(self, field_path: str) -> Literal["train", "eval"]:
        """How the stage uses a data input: held out (``*.eval``) or trained on."""
        return "eval" if field_path.endswith(".eval") else "train"

    def phases(self) -> tuple[tuple[str, ...], ...]:
        """The sets of roles alive at the same time, in order (the plan's peak is the largest)."""
        return self.PHASES

    def headline(self) -> tuple[Metric, ...]:
        """The metrics worth showing, in order of interest (a stage adds the ones its config names)."""
        return self.HEADLINE

    def ranked_by(self) -> tuple[str, ...]:
        """Metrics that rank this stage's model versions, the first it logged deciding (``-name``: lower
        is better); the default of ``tracking.registry.best_by``."""
        return tuple(("-" if m.lower_is_better else "") + m.name for m in self.headline() if m.ranks)

    def after_run(self, outputs: dict[str, str], registry: Registry | None) -> list[str]:
        """What the driver does once the stage finished (e.g. tag the model versions it evaluated);
        ``registry`` is None when the pipeline registers no models. Returns lines for the console."""
        return []

    def field(self, dotted: str) -> object:
        """The value at a dotted field path, e.g. ``data.train`` or ``auxiliary.0.model``; None below an
        unset optional section (``reward.model`` of a stage rewarded by its environment)."""
        value: object = self
        for part in dotted.split("."):
            if value is None:
                return None
            value = value[int(part)] if part.isdigit() else getattr(value, part)  # type: ignore[index]
        return value

    def built_positions(self) -> int | None:
        """The positions of the model the stage builds (``init_model``, ``synthetic_task``), or None."""
        return None

    def longest_sequence(self) -> tuple[str, int] | None:
        """(the settings, their tokens) of the longest sequence the stage feeds ``MODEL_FIELD``'s model,
        checked against its positions before any actor starts; None: the stage has no such bound."""
        return None

    def numbers(self) -> dict[str, float | str]:
        """The derived batch numbers of the placement plan (units in the names; a few are words, like
        where the reference log-probs come from); logged as ``plan.*``."""
        return {}

    def edges(self) -> tuple[str, ...]:
        """The stage's edges in the pipeline graph: ``field <- stage.output``."""
        out = []
        for field_path, (_, default_output) in self.inputs().items():
            ref = self.field(field_path)
            if isinstance(ref, StageRef):
                out.append(f"{field_path} <- {ref.from_}.{ref.output or default_output}")
        return tuple(out)


@dataclass(frozen=True)
class StageKind:
    """What a stage module registers: its config model and its ``run(config, ctx) -> outputs``."""

    config: type[StageBase]
    run: Callable[[Any, Any], dict[str, str]]

    @property
    def kind(self) -> str:
        return self.config.model_fields["kind"].annotation.__args__[0]


def trainer_numbers(unit: str, per_step: int, per_microbatch: int, steps: int, workers: int,
                    zero_stage: int, sequences_per_row: int) -> dict[str, float]:
    """The plan numbers of a trainer group: global and per-worker batches, accumulation, totals."""
    per_worker = per_step // workers
    return {
        "data_parallel_workers": workers,
        f"{unit}_per_step": per_step,
        f"{unit}_per_worker_per_step": per_worker,
        f"{unit}_per_microbatch": per_microbatch,
        "gradient_accumulation_steps": per_worker // per_microbatch,
        "sequences_per_microbatch": sequences_per_row * per_microbatch,
        "total_steps": steps,
        f"total_{unit}": steps * per_step,
        "zero_stage": zero_stage,
    }


def check_batches(per_step: int, per_microbatch: int, workers: int, unit: str, step_field: str | None = None) -> None:
    """The global batch must split evenly into workers, and each worker's share into micro-batches."""
    step_field = step_field or f"{unit}_per_step"
    per_worker, rest = divmod(per_step, workers)
    if rest or per_worker == 0:
        raise ValueError(
            f"schedule.{step_field}: {per_step} is not a positive multiple of trainer.num_workers ({workers})"
        )
    if per_worker % per_microbatch:
        raise ValueError(
            f"schedule.{unit}_per_microbatch: {per_microbatch} does not divide the {unit} per worker per step "
            f"({per_worker} = {step_field} / num_workers)"
        )
