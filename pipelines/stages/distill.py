"""``kind: distill``: on-policy distillation from a teacher (``pipelines.algorithms.distill``).

The student (the policy) samples K responses per prompt on the rollout workers, the **teacher** role
scores every sampled token (a frozen model with the student's tokenizer: a transformers forward placed
like the reference, or a vLLM engine's prompt log-probs), and each token's advantage is its negative
reverse-KL-to-go ``A_t = −Σ_{s≥t} γ^{s−t} (log π_θ − log π_T)``, optionally plus a task reward's
group-normalised advantage (``distill.reward_weight``). The update is PPO's clipped surrogate; the
iteration loop (asynchronous rollouts, LoRA, fault recovery, resume) is ``online_loop.run_online``'s.
The loss has no reference model: the teacher is the target. Metrics ``distill/*``: the sampled
per-sequence reverse KL (``distill/reverse_kl``), its per-token mean, the teacher's mean log-prob.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator

from actors.reference import ReferenceModel
from actors.rollout import RolloutWorker
from orchestrator.runtime.weight_sync import ResponseValues, submit_response_logprobs
from pipelines.algorithms.distill import reverse_kl_advantages, sequence_reverse_kl
from pipelines.algorithms.ppo import estimate_advantages, masked_mean, token_rewards
from pipelines.data.batches import PPOBatch, response_matrix, sequence_layout, to_next_token_layout
from pipelines.errors import ConfigError
from pipelines.losses import CriticLoss, PolicyGradientLoss
from pipelines.stages.base import Frozen, Metric, PathOrRef, StageKind, trainer_numbers
from pipelines.stages.online import OnlineStage, Scored, Sequences
from pipelines.stages.online_loop import run_online
from pipelines.stages.ppo import ppo_update
from pipelines.stages.ppo_config import PPOSamplingConfig, PPOScheduleConfig

if TYPE_CHECKING:
    from orchestrator.runtime.actor_group import ActorGroup, Pending
    from orchestrator.runtime.context import StageContext


class DistillConfig(Frozen):
    """The per-token signal and the update (docs/online.md, "On-policy distillation")."""

    discount: float = Field(
        0.0, ge=0, le=1, description="γ of the reverse-KL-to-go: 0 = each token's own −(log π_θ − log π_T) "
        "(the practice: lower variance), 1 = the sum over the rest of the response (the unbiased gradient)")
    baseline: Literal["batch_mean", "none"] = Field(
        "batch_mean", description="subtract the mean reverse-KL advantage of the iteration's tokens (a constant "
        "baseline: the gradient stays unbiased, its variance falls); none: the raw −KL, all mostly negative, which "
        "pushes every sampled token down and raises the student's entropy")
    whiten: bool = Field(True, description="divide the reverse-KL advantages by their std over the iteration's tokens")
    kl_weight: float = Field(1.0, ge=0, description="weight of the reverse-KL advantages (0: the task reward alone)")
    reward_weight: float = Field(
        0.0, ge=0, description="weight of the task reward's advantages (each sample's score less its prompt's "
        "mean, over their std: GRPO's), added to every token's; needs reward")
    clip_eps: float = Field(0.2, gt=0, lt=1, description="ε of the clipped surrogate")
    is_cap: float = Field(2.0, ge=1, description="rollout.max_staleness > 0: cap of the truncated importance weights")


class TeacherGroupConfig(Frozen):
    """The teacher role: frozen weights that score the student's sampled tokens."""

    engine: Literal["transformers", "vllm"] = Field(
        "transformers", description="transformers: a forward of the model (placed like the reference); vllm: an "
        "engine's prompt log-probs (max_model_len from rollout)")
    num_workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    kv_cache_gib: float = Field(1.0, gt=0, description="vllm on CPU: KV-cache size")
    gpu_memory_utilization: float = Field(0.3, gt=0, le=1, description="vllm on GPU: share of device memory")


class DistillStage(OnlineStage):
    """On-policy distillation: the student's samples, the teacher's per-token log-probs."""

    kind: Literal["distill"]
    teacher: PathOrRef = Field(description="the teacher model (a checkpoint with the student's tokenizer)")
    teacher_group: TeacherGroupConfig = TeacherGroupConfig()
    distill: DistillConfig = DistillConfig()
    sampling: PPOSamplingConfig = PPOSamplingConfig()
    schedule: PPOScheduleConfig = PPOScheduleConfig()

    ROLES: ClassVar[tuple[str, ...]] = ("policy_trainer", "teacher", "reward", "rollout")
    PHASES: ClassVar[tuple[tuple[str, ...], ...]] = (ROLES,)
    ROLE_FIELDS: ClassVar[dict[str, str]] = OnlineStage.ROLE_FIELDS | {"teacher": "teacher_group"}
    ROLE_CPUS: ClassVar[dict[str, float]] = OnlineStage.ROLE_CPUS | {"teacher": 0.25}
    INPUTS: ClassVar[dict[str, tuple[str, str]]] = {
        "policy": ("model", "model"),
        "teacher": ("model", "model"),
        "reward.model": ("reward_model", "reward_model"),
        "reward.judge.model": ("model", "model"),
        "data.train": ("prompts", "prompts_train"),
        "data.eval": ("prompts", "prompts_eval"),
    }
    HEADLINE: ClassVar[tuple[Metric, ...]] = (Metric("distill/reverse_kl", "rkl"), OnlineStage.HEADLINE[0],
                                               Metric("loss/policy", "pg_loss"), *OnlineStage.HEADLINE[3:6])

    @property
    def reference_free(self) -> bool:
        return True

    def reference_free_reason(self) -> str:
        return "distillation (the teacher is the target)"

    @property
    def samples_per_minibatch(self) -> int:
        return self.schedule.samples_per_minibatch(self.sampling.samples_per_prompt)

    def old_logprobs_in_update(self) -> bool:
        s = self.schedule
        return self.rollout.old_logprobs == "trainer" and s.ppo_epochs * s.minibatches_per_epoch == 1

    def own_roles(self) -> dict[str, Any]:
        roles = {"policy_trainer": self.trainer, "teacher": self.teacher_group, "rollout": self.rollout}
        return roles | ({"reward": self.reward_group} if self.needs_reward_role() else {})

    def numbers(self) -> dict[str, float | str]:
        s, t = self.schedule, self.trainer
        updates = s.updates_per_iteration
        steps, per_step, per_micro = s.trainer_steps(self.sampling.samples_per_prompt)
        numbers = trainer_numbers("samples", per_step, per_micro, steps, t.num_workers, t.zero_stage, 1)
        return numbers | self.online_numbers() | {"optimizer_steps_per_iteration": updates,
                                                  "teacher_engine": self.teacher_group.engine}

    # The task reward is optional: measured (objective/scores) and mixed in with distill.reward_weight.
    REWARD_OPTIONAL: ClassVar[bool] = True

    @model_validator(mode="after")
    def _consistent(self) -> DistillStage:
        s, d = self.schedule, self.distill
        if self.environment is not None:
            raise ValueError("environment: distillation samples single-turn responses (multi-turn is not built yet)")
        if d.reward_weight and self.reward is None:
            raise ValueError("distill.reward_weight: mixing in a task reward needs reward (a function or a model)")
        if d.reward_weight and self.sampling.samples_per_prompt < 2:
            raise ValueError("distill.reward_weight: the task reward's advantage compares the samples of a prompt, "
                             f"it needs sampling.samples_per_prompt >= 2, got {self.sampling.samples_per_prompt}")
        if not d.kl_weight and not d.reward_weight:
            raise ValueError("distill.kl_weight: with reward_weight 0 too there is nothing to learn from")
        if (s.prompts_per_iteration * self.sampling.samples_per_prompt) % s.minibatches_per_epoch:
            raise ValueError(f"schedule.minibatches_per_epoch: {s.minibatches_per_epoch} does not divide the "
                             f"{s.prompts_per_iteration * self.sampling.samples_per_prompt} samples of an iteration")
        per_worker, rest = divmod(self.samples_per_minibatch, self.trainer.num_workers)
        if rest or per_worker % s.samples_per_microbatch:
            raise ValueError(f"schedule.samples_per_microbatch: a minibatch of {self.samples_per_minibatch} samples "
                             f"must split into trainer.num_workers = {self.trainer.num_workers} equal shards of whole "
                             f"micro-batches of {s.samples_per_microbatch}")
        if self.sampling.dynamic:
            raise ValueError("sampling.dynamic: not available in distillation (every sample carries a signal)")
        return self


def check_same_tokenizer(student: str, teacher: str, *, trust_remote_code: bool = False) -> None:
    """The teacher must read the student's token ids as the same tokens: equal vocabularies (token →
    id) and special tokens. Raises ``ConfigError`` naming the first difference."""
    from pipelines.data.tokens import load_tokenizer

    a = load_tokenizer(student, trust_remote_code=trust_remote_code)
    b = load_tokenizer(teacher, trust_remote_code=trust_remote_code)
    va, vb = a.get_vocab(), b.get_vocab()
    if va != vb:
        diff = sorted(set(va.items()) ^ set(vb.items()))[:3]
        raise ConfigError(f"teacher: {teacher} has another tokenizer than the student {student} ({len(vb)} vs "
                          f"{len(va)} tokens; first differences {diff}); distillation compares log-probs of the same "
                          "token ids")
    for name in ("eos_token_id", "bos_token_id", "pad_token_id"):
        if getattr(a, name) != getattr(b, name):
            raise ConfigError(f"teacher: {teacher}'s {name} is {getattr(b, name)}, the student's {getattr(a, name)}")


@dataclass
class EngineLogprobs:
    """Teacher log-probs from vLLM engines, submitted and not collected (``Submitted``)."""

    pending: Pending
    rows: int

    def get(self) -> list[list[float]]:
        return [row for shard in self.pending.get() for row in shard][: self.rows]


def submit_engine_logprobs(group: ActorGroup, seqs: Sequences) -> EngineLogprobs:
    """Shard the sequences over the teacher's engines, one call each (``RolloutWorker.token_logprobs``)."""
    n = group.num_workers
    per = -(-len(seqs) // n)
    shards = [seqs[i * per : (i + 1) * per] for i in range(n)]
    return EngineLogprobs(group.shard_async(RolloutWorker.token_logprobs, shards), len(seqs))


def distill_batch(cfg: DistillStage, scored: Scored, student_lp: list[list[float]], pad_id: int
                  ) -> tuple[PPOBatch, dict[str, float]]:
    """Phase ``advantages``: the per-token reverse KL against the teacher, the advantages (KL and task
    reward, weighted) and the training batch; the ``distill/*`` metrics."""
    d_cfg, samples, k = cfg.distill, scored.samples, cfg.sampling.samples_per_prompt
    ids, attn, column, mask = sequence_layout([(x.prompt_ids, x.response_ids) for x in samples], pad_id)
    width = column.shape[1]
    student = response_matrix(student_lp, width)
    teacher = response_matrix(scored.forwards["teacher_logprobs"], width)
    d, kl_adv = reverse_kl_advantages(student, teacher, mask, discount=d_cfg.discount)
    if d_cfg.baseline == "batch_mean":
        kl_adv = (kl_adv - masked_mean(kl_adv, mask)) * mask
    if d_cfg.whiten:
        var = masked_mean(kl_adv.square(), mask) - masked_mean(kl_adv, mask).square()
        kl_adv = kl_adv / var.clamp(min=1e-8).sqrt()
    adv = d_cfg.kl_weight * kl_adv
    if d_cfg.reward_weight:
        scores = torch.tensor(scored.rewards, dtype=torch.float32)
        rewards = token_rewards(scores, torch.zeros_like(student), mask, kl_coef=0.0)
        task, _ = estimate_advantages("grpo", rewards, mask, group_size=k, gamma=1.0, lam=1.0, whiten=False,
                                      scale=True)
        adv = adv + d_cfg.reward_weight * task
    tokens = mask.sum().clamp(min=1)
    metrics = {
        "distill/reverse_kl": float(sequence_reverse_kl(d).mean()),
        "distill/reverse_kl_per_token": float(d.sum() / tokens),
        "distill/teacher_logprob_mean": float((teacher * mask).sum() / tokens),
        "distill/student_logprob_mean": float((student * mask).sum() / tokens),
        "advantages/mean": float(masked_mean(adv, mask)),
        "advantages/abs_mean": float(masked_mean(adv.abs(), mask)),
    }
    fused, t = cfg.old_logprobs_in_update(), ids.shape[1] - 1

    def layout(x: torch.Tensor) -> torch.Tensor:
        return to_next_token_layout(x, column, mask, t)

    batch = PPOBatch(ids, attn, layout(mask), None if fused else layout(student), layout(adv),
                     behaviour_logps=layout(student) if fused else None)
    return batch, metrics


class Distill:
    """The distillation part of an iteration (``OnlineAlgorithm``): the teacher's forward beside the
    loop's → the reverse-KL advantages → the clipped policy-gradient update."""

    def __init__(self, cfg: DistillStage) -> None:
        self.cfg = cfg
        self.generator = torch.Generator().manual_seed(cfg.schedule.seed)
        self.trainer: ActorGroup | None = None
        self.teacher: ActorGroup | None = None
        self.pad_id = 0

    def trainer_steps(self) -> tuple[int, int, int]:
        return self.cfg.schedule.trainer_steps(self.cfg.sampling.samples_per_prompt)

    def spawn(self, ctx: StageContext, trainer: ActorGroup, policy_path: str, pad_id: int) -> list[ActorGroup]:
        """The teacher group (frozen; not checkpointed: it is not a trainer)."""
        cfg, t = self.cfg, self.cfg.teacher_group
        self.trainer, self.pad_id = trainer, pad_id
        path, trust = ctx.input("teacher"), cfg.trainer.trust_remote_code
        if t.engine == "vllm":
            r = cfg.rollout
            self.teacher = ctx.roles.spawn(
                "teacher", RolloutWorker, path, max_model_len=r.max_model_len,
                dtype=r.dtype if t.gpus_per_worker or r.dtype != "auto" else "float32", kv_cache_gib=t.kv_cache_gib,
                gpu_memory_utilization=t.gpu_memory_utilization, seed=cfg.schedule.seed,
                num_threads=max(1, int(t.cpus_per_worker)), trust_remote_code=trust)
            self.teacher.setup(RolloutWorker.setup)
        else:
            self.teacher = ctx.roles.spawn(
                "teacher", ReferenceModel, path, precision="fp32" if not t.gpus_per_worker else cfg.trainer.precision,
                num_threads=max(1, int(t.cpus_per_worker)), trust_remote_code=trust,
                tokens_per_chunk=cfg.trainer.tokens_per_microbatch)
            self.teacher.setup(ReferenceModel.setup)
        return []

    def restore(self, done: int, state: dict[str, Any]) -> None:
        if done and "generator" in state:
            self.generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))
        else:
            self.generator.manual_seed(self.cfg.schedule.seed)

    def forwards(self) -> dict[str, Callable[[Sequences], ResponseValues | EngineLogprobs]]:
        teacher = self.teacher
        assert teacher is not None, "spawn() first"
        if self.cfg.teacher_group.engine == "vllm":
            return {"teacher_logprobs": lambda seqs: submit_engine_logprobs(teacher, seqs)}
        return {"teacher_logprobs": lambda seqs: submit_response_logprobs(teacher, ReferenceModel.evaluate, seqs,
                                                                          self.pad_id)}

    def learn(self, ctx: StageContext, iteration: int, scored: Scored, policy_lp: list[list[float]],
              m: dict[str, float]) -> bool:
        cfg = self.cfg
        assert self.trainer is not None
        with ctx.log.timed("advantages", m):
            batch, metrics = distill_batch(cfg, scored, policy_lp, self.pad_id)
        m.update(metrics)
        stale = cfg.rollout.max_staleness and cfg.old_logprobs_in_update()
        loss = PolicyGradientLoss(cfg.distill.clip_eps, is_cap=cfg.distill.is_cap if stale else None)
        with ctx.log.timed("update", m):
            m.update(ppo_update(cfg.schedule, cfg.name, self.trainer, None, batch, loss, CriticLoss(),
                                self.generator))
        return True

    def state(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state().tolist()}

    def outputs(self, ctx: StageContext) -> dict[str, str]:
        return {}


def run(cfg: DistillStage, ctx: StageContext) -> dict[str, str]:
    policy = ctx.input("policy")
    check_same_tokenizer(policy, ctx.input("teacher"), trust_remote_code=cfg.trainer.trust_remote_code)
    return run_online(cfg, ctx, Distill(cfg))


STAGE = StageKind(DistillStage, run)
