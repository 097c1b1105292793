"""Config models the stage kinds share (each kind's own model sits beside its ``run`` in its module),
and ``PolicyStage``: the root of the two families that train a policy against a reference
(``preference.PreferenceStage``: offline DPO and KTO; ``online.OnlineStage``: on-policy DPO and PPO).
Batch sizes carry their unit in their name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from pipelines.data.judges import JudgeSpec
from pipelines.data.lengths import LengthPolicy, LengthTally, Truncation
from pipelines.stages.base import COLUMNS_DOC, Frozen, PathOrRef, ReadsFromStage, ReferenceSource, StageBase
from pipelines.stages.judge_config import JudgeConfig


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
    """Resources and DeepSpeed settings of a trainer group (the policy's, a reward model's, the critic's)."""

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


class RewardGroupConfig(Frozen):
    """Resources of the reward role (a function reward or a reward-model checkpoint)."""

    num_workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(0.5, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    items_per_chunk: int = Field(64, ge=1, description="(prompt, response) pairs per scoring call")


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


class DPOFields(Frozen):
    """The DPO-family loss of a stage (mixed into ``offline_dpo`` and ``onpolicy_dpo``): its reference-free
    types (SimPO, ORPO) start no reference model."""

    dpo: DPOConfig = DPOConfig()

    @property
    def reference_free(self) -> bool:
        return self.dpo.reference_free

    def reference_free_reason(self) -> str:
        return f"dpo.loss_type {self.dpo.loss_type}"


class RewardConfig(Frozen):
    """A reward for later stages: exactly one of a Python function, a reward-model checkpoint, a
    generative judge, or a reward served once on the cluster (Ray Serve)."""

    function: str | None = Field(None, description="module:function, called on (prompts, responses)")
    model: PathOrRef | None = Field(None, description="reward-model checkpoint (a reward_model stage output)")
    judge: JudgeConfig | None = Field(None, description="a generative judge (a causal LM asked for a verdict)")
    served: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="a Ray Serve application "
                               "on the cluster (rlhf serve --reward-name NAME), shared by every stage and pipeline "
                               "that names it: no reward role starts")
    normalize: bool = Field(False, description="model rewards: (r − mean) / std with the stats stored at training")

    @model_validator(mode="after")
    def _one_source(self) -> RewardConfig:
        if sum(x is not None for x in (self.function, self.model, self.judge, self.served)) != 1:
            raise ValueError("function: give exactly one of reward.function, reward.model, reward.judge or "
                             "reward.served")
        if self.normalize and self.model is None:
            raise ValueError("normalize: standardises a reward model's scores; drop it for a function or a judge")
        return self

    def source(self, resolve: Callable[[str], str | None], *, gpu: bool = False) -> str | JudgeSpec | None:
        """What the reward role loads beside a function: the reward model's path or the judge
        (``resolve``: a stage input's path, e.g. ``ctx.input``)."""
        if self.judge is not None:
            path = resolve("reward.judge.model")
            assert path is not None
            return self.judge.spec(path, gpu=gpu)
        return resolve("reward.model")


class GenerationEvalConfig(Frozen):
    """Greedy decoding of held-out prompts, scored against the reference or by a checker."""

    enabled: bool = True
    max_new_tokens: int = Field(16, ge=1)
    checker: str | None = Field(
        None, description="module:function scoring (prompts, responses) with 1.0 = correct; "
        "default: exact string match with the reference response",
    )

    def function_rewards(self) -> list[str]:
        return [self.checker] if self.enabled and self.checker else []


TRUNCATION_DOC = ("a row over the limits: error (one error once the file is read: how many rows, the longest), "
                  "drop, keep_end (the prompt keeps its end, the completions their start, cut at the limit; TRL's "
                  "DPO default), keep_start (the sequence keeps its start). See docs/data.md, 'Long rows'")
TruncationName = Literal["error", "drop", "keep_end", "keep_start"]


class LengthFields(Frozen):
    """Token limits of a stage's rows and what is done with a row over them (``pipelines.data.lengths``)."""

    max_length: int = Field(128, ge=4, description="prompt + completion tokens per row (at most the model's "
                            "positions)")
    truncation: TruncationName = Field("keep_end", description=TRUNCATION_DOC)
    max_prompt_length: int | None = Field(None, ge=1, description="prompt tokens per row (null: only max_length)")
    max_completion_length: int | None = Field(None, ge=1, description="completion tokens per row (null: only "
                                              "max_length)")

    def length_policy(self) -> LengthPolicy:
        return LengthPolicy(self.max_length, Truncation(self.truncation), self.max_prompt_length,
                            self.max_completion_length)

    def lengths(self, source: str) -> LengthTally:
        """A fresh count of ``source``'s rows under this policy."""
        return LengthTally(source, self.length_policy())


class PromptLengthFields(Frozen):
    """The token limit of an online or evaluation stage's prompts and what is done with a longer one."""

    max_prompt_length: int = Field(64, ge=1, description="prompt tokens")
    truncation: TruncationName = Field("keep_end", description="a prompt over max_prompt_length: error, drop, "
                                       "keep_end (its last tokens; TRL's GRPO default), keep_start (its first)")

    def lengths(self, source: str) -> LengthTally:
        return LengthTally(source, LengthPolicy(self.max_prompt_length, Truncation(self.truncation),
                                                setting="data.max_prompt_length"))


class PairDataConfig(LengthFields, ReadsFromStage):
    """Preference pairs (Parquet, JSON Lines, a `save_to_disk` folder or `hub:ORG/NAME[:SPLIT]`): fields
    prompt, chosen, rejected, as texts or conversations; without prompt, chosen and rejected share it
    (implicit prompt). See docs/data.md."""

    train: PathOrRef
    eval: PathOrRef | None = None
    columns: dict[str, str] = Field({}, description=COLUMNS_DOC)
    eval_pairs: int | None = Field(None, ge=1, description="cap on held-out pairs evaluated")


class RewardDataConfig(PairDataConfig):
    """Preference pairs, optionally with a per-pair margin column. Over-long pairs are dropped by
    default (TRL's reward trainer does the same): a cut pair may have lost what tells its sides apart."""

    truncation: TruncationName = Field("drop", description=TRUNCATION_DOC)
    margin_column: str | None = Field(None, description="float column m: required r_w − r_l (Llama 2)")


class SFTDataConfig(LengthFields, ReadsFromStage):
    """SFT examples: a `messages` conversation, or prompt and completion (or response), texts or
    conversations. See docs/data.md."""

    train: PathOrRef
    eval: PathOrRef | None = None
    format: Literal["auto", "messages", "prompt_completion", "prompt_response", "chosen"] = Field(
        "auto", description="auto = messages when the file has that column, chosen for a preference file (its "
        "prompts with their chosen responses), else prompt_completion; prompt_response = prompt_completion"
    )
    columns: dict[str, str] = Field({}, description=COLUMNS_DOC)
    eval_examples: int | None = Field(None, ge=1, description="cap on held-out rows evaluated")


class StepSchedule(Frozen):
    """How long an offline stage trains; a subclass names the unit of its batches (``UNIT``) and its
    two batch fields (``<unit>_per_step``, ``<unit>_per_microbatch``)."""

    steps: int = Field(100, ge=1, description="optimizer steps")
    eval_every: int = Field(0, ge=0, description="steps between evaluations; 0 = only at start and end")
    seed: int = 0

    UNIT: ClassVar[str] = "examples"

    @property
    def per_step(self) -> int:
        """The global batch of one optimizer step, in ``UNIT``."""
        raise NotImplementedError

    @property
    def per_microbatch(self) -> int:
        """One forward/backward on one worker, in ``UNIT``."""
        raise NotImplementedError


class SFTScheduleConfig(StepSchedule):
    """How long and with which batches the SFT stage trains."""

    UNIT: ClassVar[str] = "sequences"
    sequences_per_step: int = Field(32, ge=1, description="global batch: sequences per optimizer step")
    sequences_per_microbatch: int = Field(32, ge=1, description="sequences in one forward/backward on one worker")

    per_step = property(lambda self: self.sequences_per_step)
    per_microbatch = property(lambda self: self.sequences_per_microbatch)


class PairScheduleConfig(StepSchedule):
    """How long and with which batches a stage that trains on preference pairs trains."""

    UNIT: ClassVar[str] = "pairs"
    pairs_per_step: int = Field(32, ge=1, description="global batch: preference pairs per optimizer step")
    pairs_per_microbatch: int = Field(16, ge=1, description="pairs in one forward/backward on one worker")

    per_step = property(lambda self: self.pairs_per_step)
    per_microbatch = property(lambda self: self.pairs_per_microbatch)


class ExampleScheduleConfig(StepSchedule):
    """How long and with which batches a stage that trains on single examples trains."""

    examples_per_step: int = Field(32, ge=2, description="global batch: examples per optimizer step")
    examples_per_microbatch: int = Field(16, ge=1, description="examples in one forward/backward on one worker")
    seed: int = Field(0, description="batch order and the mismatched completions of the reference point")

    per_step = property(lambda self: self.examples_per_step)
    per_microbatch = property(lambda self: self.examples_per_microbatch)


class RewardLossConfig(Frozen):
    """Bradley–Terry loss; see pipelines.algorithms.reward_model."""

    centering_coef: float = Field(0.0, ge=0, description="c in c·mean((r_w + r_l)²)")


class PolicyStage(StageBase):
    """A stage that trains a policy against a reference model: the fields both families share, and
    where its reference log-probs come from (``reference_source``)."""

    policy: PathOrRef
    reference: PathOrRef | None = Field(None, description="default: the starting policy")
    optim: OptimConfig = OptimConfig()
    trainer: TrainerConfig = TrainerConfig()
    reference_group: ReferenceConfig = ReferenceConfig()

    MODEL_FIELD: ClassVar[str | None] = "policy"
    ROLE_FIELDS: ClassVar[dict[str, str]] = {"policy_trainer": "trainer", "reference": "reference_group"}

    # Whether the stage computes every reference log-prob before its first step (offline stages): the
    # trainer's model is then still the starting policy and can be its own reference.
    REFERENCE_BEFORE_TRAINING: ClassVar[bool] = False

    @property
    def reference_free(self) -> bool:
        """Whether the stage's loss uses no reference model at all (``dpo.loss_type`` simpo or orpo)."""
        return False

    def reference_source(self) -> ReferenceSource:
        """NONE for a reference-free loss; TRAINER when the reference is the starting policy,
        ``reference_group.from_trainer`` is on, and the trainer trains LoRA adapters (its model with
        the adapters disabled) or the stage computes every reference log-prob before its first step;
        else a reference GROUP."""
        if self.reference_free:
            return ReferenceSource.NONE
        starting = self.reference in (None, self.policy) and self.reference_group.from_trainer
        if starting and (self.trainer.lora is not None or self.REFERENCE_BEFORE_TRAINING):
            return ReferenceSource.TRAINER
        return ReferenceSource.GROUP

    def role_configs(self) -> dict[str, Any]:
        """role → resources; the reference group only where one starts."""
        roles = self.own_roles()
        if self.reference_source() is not ReferenceSource.GROUP:
            roles.pop("reference", None)
        return roles

    def own_roles(self) -> dict[str, Any]:
        """Every role the stage may start, the reference group included."""
        return {"policy_trainer": self.trainer, "reference": self.reference_group}

    def trainer_configs(self) -> dict[str, Any]:
        return {"policy_trainer": self.trainer}

    def reference_free_reason(self) -> str:
        """What makes the loss reference-free, for messages (e.g. ``dpo.loss_type simpo``)."""
        return "the loss"

    def reference_note(self) -> str:
        """Where the reference log-probs come from, as the plan prints it."""
        source = self.reference_source()
        if source is ReferenceSource.NONE:
            return f"none ({self.reference_free_reason()} is reference-free)"
        return source.value

    @model_validator(mode="after")
    def _reference_role_placed(self) -> PolicyStage:
        """A stage whose trainer is its reference, or whose loss is reference-free, has no reference
        role to place; a reference-free loss takes no reference model."""
        placed = [f"placement.colocate[{i}]" for i, roles in enumerate(self.placement.colocate) if "reference" in roles]
        placed += ["placement.nodes"] if "reference" in self.placement.nodes else []
        source = self.reference_source()
        if source is ReferenceSource.NONE and self.reference is not None:
            raise ValueError(f"reference: {self.reference_free_reason()} uses no reference model; drop reference")
        if placed and source is ReferenceSource.NONE:
            raise ValueError(f"{placed[0]}: no reference group starts ({self.reference_note()}); "
                             "drop 'reference' there")
        if placed and source is ReferenceSource.TRAINER:
            raise ValueError(f"{placed[0]}: no reference group starts (the starting policy is the reference and the "
                             "policy trainer computes its log-probs); drop 'reference' there, or set "
                             "reference_group.from_trainer: false")
        return self
