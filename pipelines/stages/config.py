"""Config models every stage kind shares (each kind's own model sits beside its ``run`` in its module),
the stage base class, and ``StageKind``: what a stage module registers. Batch sizes carry their unit
in their name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Frozen(BaseModel):
    """Base for every config model: unknown fields are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class StageRef(Frozen):
    """A reference to an output of an earlier stage, e.g. ``{from: task, output: pairs_train}``."""

    from_: str = Field(alias="from", min_length=1)
    output: str | None = None


# The output types an input of a type takes: preference data (KTO's rows) may be pairs, which split.
ACCEPTS: dict[str, tuple[str, ...]] = {"preferences": ("preferences", "pairs")}

# A plain string is a filesystem path (for models a hub id too; for data ``hub:ORG/NAME[:SPLIT]``);
# a mapping refers to a stage output.
PathOrRef = str | StageRef
COLUMNS_DOC = "field → your file's column, e.g. {prompt: question, chosen: good}"


class LoraConfig(Frozen):
    """Low-rank adapters (PEFT LoRA) on the policy: only the adapters train and are checkpointed in
    the stage; the rollout engines get the merged weights (with the same parity check), and the
    stage's model output is the merged HF checkpoint with the adapter in ``adapter/``."""

    rank: int = Field(16, ge=1, description="r: the adapters' rank")
    alpha: float = Field(32.0, gt=0, description="scaling numerator: ΔW = (alpha / rank) · B·A")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: str | tuple[str, ...] = Field(
        "all-linear", description="module names to adapt (e.g. [q_proj, v_proj]), or all-linear")


class TrainerConfig(Frozen):
    """Resources and DeepSpeed settings of the policy-trainer group."""

    num_workers: int = Field(1, ge=1, description="data-parallel DeepSpeed ranks (Ray actors)")
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    zero_stage: Literal[0, 1, 2, 3] = 2
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto = bf16 on GPU, fp32 on CPU"
    )
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False
    lora: LoraConfig | None = Field(None, description="train LoRA adapters instead of every weight")
    tokens_per_microbatch: int | None = Field(
        None, ge=1, description="form micro-batches by a token budget instead of fixed row counts: each rank's rows "
        "sorted by length (longest first) and packed while rows x longest row stays within this many tokens, in the "
        "update passes and the log-prob passes (this group's and, for the policy trainer, the reference group's); "
        "null = the schedule's *_per_microbatch rows. Either way each micro-batch drops its all-padding columns")

    @model_validator(mode="after")
    def _lora_fits(self) -> TrainerConfig:
        if self.lora is not None and self.zero_stage == 3:
            raise ValueError("lora: LoRA runs at ZeRO stages 0-2; set zero_stage: 2 (the adapters are small)")
        return self


class ReferenceConfig(Frozen):
    """Resources of the reference-model group that computes the reference log-probs."""

    num_workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    from_trainer: bool = Field(
        True, description="with the starting policy as the reference, the policy trainer computes the reference "
        "log-probs and no reference group starts: a LoRA trainer with its adapters disabled (every stage), or, in "
        "offline DPO, any trainer before its first step; false: a reference group all the same")


def reference_from_trainer(stage: Any) -> bool:
    """Whether a stage's reference log-probs come from its policy trainer rather than a reference
    group: the reference is the starting policy, ``reference_group.from_trainer`` is on, and the
    trainer trains LoRA adapters (its model with the adapters disabled, ``PolicyTrainer.evaluate_base``)
    or the stage computes every reference log-prob before its first step (``REFERENCE_BEFORE_TRAINING``:
    offline DPO), when the trainer's model is still the starting policy."""
    before_training = getattr(stage, "REFERENCE_BEFORE_TRAINING", False)
    return (not reference_free(stage) and stage.reference in (None, stage.policy) and stage.reference_group.from_trainer
            and (stage.trainer.lora is not None or before_training))


def reference_free(stage: Any) -> bool:
    """Whether a stage's loss uses no reference model at all (``dpo.loss_type`` simpo or orpo)."""
    dpo = getattr(stage, "dpo", None)
    return dpo is not None and dpo.reference_free


def without_reference_group(stage: Any, roles: dict[str, Any]) -> dict[str, Any]:
    """``roles`` (role → resource config) less the reference group when the trainer is the reference
    or the loss needs none."""
    drop = reference_from_trainer(stage) or reference_free(stage)
    return {r: c for r, c in roles.items() if r != "reference"} if drop else roles


def reference_source(stage: Any) -> str:
    """Where a stage's reference log-probs come from, as the plan prints it."""
    if reference_free(stage):
        return f"none (dpo.loss_type {stage.dpo.loss_type} is reference-free)"
    return "policy_trainer (the starting policy)" if reference_from_trainer(stage) else "reference group"


def check_reference_role(stage: Any) -> None:
    """A stage whose trainer is its reference, or whose loss is reference-free, has no reference role
    to place; a reference-free loss takes no reference model."""
    placed = [f"placement.colocate[{i}]" for i, roles in enumerate(stage.placement.colocate) if "reference" in roles]
    placed += ["placement.nodes"] if "reference" in stage.placement.nodes else []
    if reference_free(stage):
        if stage.reference is not None:
            raise ValueError(f"reference: dpo.loss_type {stage.dpo.loss_type} uses no reference model; drop reference")
        if getattr(stage, "reference_mode", "fixed") != "fixed":
            raise ValueError(f"reference_mode: dpo.loss_type {stage.dpo.loss_type} uses no reference model; "
                             "drop reference_mode")
        if placed:
            raise ValueError(f"{placed[0]}: no reference group starts (dpo.loss_type {stage.dpo.loss_type} is "
                             "reference-free); drop 'reference' there")
    if placed and reference_from_trainer(stage):
        raise ValueError(f"{placed[0]}: no reference group starts (the starting policy is the reference and the "
                         "policy trainer computes its log-probs); drop 'reference' there, or set "
                         "reference_group.from_trainer: false")


class OptimConfig(Frozen):
    """AdamW and the learning-rate schedule."""

    lr: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["constant", "linear", "cosine"] = "cosine"
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    max_grad_norm: float = Field(1.0, gt=0)


REFERENCE_FREE_LOSSES = ("simpo", "orpo")


class DPOConfig(Frozen):
    """DPO-family loss; see pipelines.algorithms.dpo (``dpo_loss``; ``simpo_loss`` and ``orpo_loss``
    for the reference-free types, which start no reference model)."""

    beta: float = Field(0.1, gt=0, description="β; for simpo the reward scale (its paper: 2 to 10); unused by orpo")
    loss_type: Literal["sigmoid", "hinge", "ipo", "robust", "simpo", "orpo"] = "sigmoid"
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="ε (sigmoid, robust, simpo)")
    rpo_alpha: float = Field(0.0, ge=0, description="weight of the NLL term on chosen responses (RPO)")
    simpo_gamma: float = Field(0.5, ge=0, description="SimPO's target reward margin γ")
    orpo_lambda: float = Field(0.1, ge=0, description="ORPO's weight λ of the odds-ratio term beside the SFT term")

    @property
    def reference_free(self) -> bool:
        """SimPO and ORPO use no reference model."""
        return self.loss_type in REFERENCE_FREE_LOSSES


class PairDataConfig(Frozen):
    """Preference pairs (Parquet, JSON Lines, a `save_to_disk` folder or `hub:ORG/NAME[:SPLIT]`): fields
    prompt, chosen, rejected, as texts or conversations; without prompt, chosen and rejected share it
    (implicit prompt). See docs/data.md."""

    train: PathOrRef
    eval: PathOrRef | None = None
    columns: dict[str, str] = Field({}, description=COLUMNS_DOC)
    max_length: int = Field(128, ge=4, description="prompt + response tokens; longer rows are an error")
    eval_pairs: int | None = Field(None, ge=1, description="cap on held-out pairs evaluated")


class PairScheduleConfig(Frozen):
    """How long and with which batches a stage that trains on preference pairs trains."""

    steps: int = Field(100, ge=1, description="optimizer steps")
    pairs_per_step: int = Field(32, ge=1, description="global batch: preference pairs per optimizer step")
    pairs_per_microbatch: int = Field(16, ge=1, description="pairs in one forward/backward on one worker")
    eval_every: int = Field(0, ge=0, description="steps between evaluations; 0 = only at start and end")
    seed: int = 0


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


class SFTDataConfig(Frozen):
    """SFT examples: a `messages` conversation, or prompt and completion (or response), texts or
    conversations. See docs/data.md."""

    train: PathOrRef
    eval: PathOrRef | None = None
    format: Literal["auto", "messages", "prompt_completion", "prompt_response"] = Field(
        "auto", description="auto = messages when the file has that column; prompt_response = prompt_completion"
    )
    columns: dict[str, str] = Field({}, description=COLUMNS_DOC)
    max_length: int = Field(128, ge=4, description="tokens per row; longer rows are an error")
    eval_examples: int | None = Field(None, ge=1, description="cap on held-out rows evaluated")


class SFTScheduleConfig(Frozen):
    """How long and with which batches the SFT stage trains."""

    steps: int = Field(100, ge=1, description="optimizer steps")
    sequences_per_step: int = Field(32, ge=1, description="global batch: sequences per optimizer step")
    sequences_per_microbatch: int = Field(32, ge=1, description="sequences in one forward/backward on one worker")
    eval_every: int = Field(0, ge=0, description="steps between evaluations; 0 = only at start and end")
    seed: int = 0


class GenerationEvalConfig(Frozen):
    """Greedy decoding of held-out prompts, scored against the reference or by a checker."""

    enabled: bool = True
    max_new_tokens: int = Field(16, ge=1)
    checker: str | None = Field(
        None, description="module:function scoring (prompts, responses) with 1.0 = correct; "
        "default: exact string match with the reference response",
    )


class RewardLossConfig(Frozen):
    """Bradley–Terry loss; see pipelines.algorithms.reward_model."""

    centering_coef: float = Field(0.0, ge=0, description="c in c·mean((r_w + r_l)²)")


class RewardDataConfig(PairDataConfig):
    """Preference pairs, optionally with a per-pair margin column."""

    margin_column: str | None = Field(None, description="float column m: required r_w − r_l (Llama 2)")


class RewardConfig(Frozen):
    """A reward for later stages: exactly one of a Python function or a reward-model checkpoint."""

    function: str | None = Field(None, description="module:function, called on (prompts, responses)")
    model: PathOrRef | None = Field(None, description="reward-model checkpoint (a reward_model stage output)")
    normalize: bool = Field(False, description="model rewards: (r − mean) / std with the stats stored at training")

    @model_validator(mode="after")
    def _one_source(self) -> RewardConfig:
        if (self.function is None) == (self.model is None):
            raise ValueError("function: give exactly one of reward.function or reward.model")
        return self


class WeightSyncConfig(Frozen):
    """How trainer weights reach the rollout engines after each update (orchestrator.runtime.weight_sync)."""

    transport: Literal["object_store", "collective"] = Field(
        "object_store", description="object_store: Ray objects, actor to actor; collective: gloo (CPU) / NCCL (GPU) broadcast"
    )
    bucket_mib: float = Field(64.0, gt=0, description="parameters are sent in buckets of about this size")
    tolerance: float = Field(1e-3, gt=0, description="max |rollout − trainer| log-prob on the probe batch after a sync")
    verify_every: int = Field(1, ge=0, description="verify parity every N syncs (0: never)")


class RolloutConfig(Frozen):
    """The vLLM rollout workers: one engine per worker, created once per stage and reused."""

    num_workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per engine; needs gpus_per_worker equal to it")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_model_len: int = Field(256, ge=8, description="prompt + response tokens; at most the model's positions")
    kv_cache_gib: float = Field(1.0, gt=0, description="CPU engines: KV-cache size")
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1, description="GPU engines: share of device memory")
    prompts_per_chunk: int = Field(16, ge=1, description="prompts per dispatch to a worker (balancing unit)")
    max_staleness: int = Field(
        0, ge=0, description="asynchronous rollouts: generate the batches of the next k iterations while the trainer "
        "learns, so a batch is at most k weight versions behind the trainer; 0 = the synchronous loop")
    overlap_phases: bool = Field(
        True, description="score each chunk of samples as it is generated, and run an iteration's independent "
        "forwards over its samples (reference, policy and critic log-probs/values) concurrently with each other and "
        "with the rest of the scoring; false: one after another")
    old_logprobs: Literal["trainer", "rollout"] = Field(
        "trainer", description="the samples' log-probs under the policy that sampled them (PPO's pi_old, on-policy "
        "DPO's policy reference): 'trainer' = a forward of the trainer over the samples (and the train-inference gap "
        "measured every iteration, rollout/logprob_gap); 'rollout' = the rollout engine's own log-probs of the "
        "sampled tokens, no forward (within weight_sync.tolerance of the trainer's, checked at each verified sync). "
        "'rollout' needs max_staleness: 0")
    weight_sync: WeightSyncConfig = WeightSyncConfig()

    @model_validator(mode="after")
    def _tensor_parallel_has_gpus(self) -> RolloutConfig:
        tp = self.tensor_parallel_size
        if tp > 1 and self.gpus_per_worker != tp:
            raise ValueError(f"gpus_per_worker: tensor_parallel_size {tp} needs {tp} whole GPUs per rollout worker, "
                             f"got {self.gpus_per_worker:g}")
        if self.old_logprobs == "rollout" and self.max_staleness:
            raise ValueError("old_logprobs: 'rollout' needs max_staleness: 0 (stale samples are weighted by the "
                             "trainer's log-probs over the engine's: set old_logprobs: trainer)")
        return self


class RewardGroupConfig(Frozen):
    """Resources of the reward role (a function reward or a reward-model checkpoint)."""

    num_workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(0.5, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    items_per_chunk: int = Field(64, ge=1, description="(prompt, response) pairs per scoring call")


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
    replaced inside the stage, at most ``max_restarts`` times per role; a dead trainer or critic stops
    the stage with its last checkpoint kept (``rlhf run --resume``)."""

    max_restarts: int = Field(3, ge=0, description="replacements per stateless role and stage; 0 = fail at once")
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
    (the placement plan's peak demand is the largest phase).
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

    @model_validator(mode="after")
    def _colocated_roles_exist(self) -> StageBase:
        seen: set[str] = set()
        for i, roles in enumerate(self.placement.colocate):
            if len(roles) < 2:
                raise ValueError(f"placement.colocate[{i}]: a colocation set needs at least two roles, got {list(roles)}")
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
        return [role for role, c in self.role_configs().items() if getattr(c, "zero_stage", None) == 3]

    def checkpoint_interval(self) -> int:
        """Steps (offline stages) or iterations (online stages) between in-stage checkpoints; 0 = none."""
        if self.checkpoint.every is not None:
            return self.checkpoint.every
        return 0 if self._zero3_roles() else self.CHECKPOINT_EVERY

    def function_rewards(self) -> list[str]:
        """``module:function`` specs this stage calls (imported before any actor starts)."""
        return []

    def role_configs(self) -> dict[str, Any]:
        """Each role's resource config (``num_workers``, ``cpus_per_worker``, ``gpus_per_worker``)."""
        return {}

    def inputs(self) -> dict[str, tuple[str, str]]:
        """Input field path → (output type it expects, default output name): ``INPUTS`` plus the
        per-instance fields of lists (e.g. ``auxiliary.0.model``)."""
        return dict(self.INPUTS)

    def phases(self) -> tuple[tuple[str, ...], ...]:
        """The sets of roles alive at the same time, in order (the plan's peak is the largest)."""
        return self.PHASES

    def field(self, dotted: str) -> object:
        """The value at a dotted field path, e.g. ``data.train`` or ``auxiliary.0.model``."""
        value: object = self
        for part in dotted.split("."):
            value = value[int(part)] if part.isdigit() else getattr(value, part)
        return value

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


class PromptDataConfig(Frozen):
    """Prompts for on-policy stages: a column (default ``prompt``) of texts or conversations, which
    the policy's chat template renders with its generation prompt. See docs/data.md."""

    train: PathOrRef
    eval: PathOrRef | None = Field(None, description="held-out prompts, decoded greedily for eval/ metrics")
    column: str = "prompt"
    max_prompt_length: int = Field(64, ge=1, description="prompt tokens; longer prompts are an error")
    eval_prompts: int | None = Field(None, ge=1, description="cap on held-out prompts evaluated")


class OnPolicySamplingConfig(Frozen):
    """How the rollout workers sample: K responses per prompt with the current policy."""

    samples_per_prompt: int = Field(4, ge=2, description="K")
    max_new_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)


class PairSelectionConfig(Frozen):
    """Which sampled responses become (chosen, rejected) pairs; see pipelines.algorithms.pair_selection."""

    method: Literal["max_min", "max_random", "rso"] = "max_min"
    rso_beta: float = Field(0.5, gt=0, description="β of statistical rejection sampling (not DPO's β)")
    rso_samples: int = Field(2, ge=2, description="k: samples RSO accepts per prompt, paired consecutively")


class OnPolicyScheduleConfig(Frozen):
    """Iterations of rollout → score → select → update → sync."""

    iterations: int = Field(10, ge=1)
    prompts_per_iteration: int = Field(64, ge=1)
    updates_per_iteration: int = Field(1, ge=1, description="optimizer steps over each iteration's new pairs")
    pairs_per_update: int = Field(32, ge=1, description="global batch of one optimizer step (drawn from the new pairs)")
    pairs_per_microbatch: int = Field(16, ge=1)
    max_pair_passes: float | None = Field(
        None, gt=0, description="cap on passes over each iteration's pairs: fewer than updates_per_iteration "
        "steps when the pairs run short (the last step topped up from the start of the pass); "
        "None: updates_per_iteration steps always, drawing pairs again when they run short")
    eval_every: int = Field(0, ge=0, description="iterations between held-out evaluations; 0 = start and end")
    seed: int = 0


class OnPolicyEvalConfig(Frozen):
    """Held-out greedy generations and the per-iteration sample table."""

    max_new_tokens: int | None = Field(None, ge=1, description="default: sampling.max_new_tokens")
    checker: str | None = Field(None, description="module:function; eval/exact_match = share scored >= 1")
    table_rows: int = Field(16, ge=0, description="sample generations per iteration logged with mlflow.log_table")


def check_model_len(stage: Any) -> None:
    """An online stage's prompts plus its longest generation must fit the rollout engine's context."""
    need = stage.data.max_prompt_length + max(stage.sampling.max_new_tokens, stage.eval.max_new_tokens or 0)
    if need > stage.rollout.max_model_len:
        raise ValueError(f"rollout.max_model_len: {stage.rollout.max_model_len} < data.max_prompt_length + "
                         f"max_new_tokens = {need}")
