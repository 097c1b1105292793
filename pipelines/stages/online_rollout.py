"""What samples and judges in an online stage: its prompts, the rollout / reference / reward groups,
the ``Sampler`` that turns an iteration's prompts into scored samples (one completion per prompt;
with DAPO's dynamic sampling, rounds of them), and the held-out evaluation. The ``evaluate`` stage
spawns its groups with the same helpers."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from actors.environment import EnvironmentWorker
from actors.policy_trainer import PolicyTrainer
from actors.reference import ReferenceModel
from actors.reward import RewardSet
from actors.rollout import RolloutSample, RolloutWorker, SamplingSpec
from orchestrator.runtime.rollout_ops import generate, generate_scored, score
from orchestrator.runtime.served import ServedReward
from pipelines.algorithms.evaluation import exact_match
from pipelines.data.formats import plain_prompt, read_prompts, render_prompt
from pipelines.data.lengths import LengthTally
from pipelines.data.rewards import FunctionReward
from pipelines.data.tokens import count_unknown, encode_prompts, starts_with_bos
from pipelines.stages.auxiliary import AuxiliaryObjective, RewardSpec
from pipelines.stages.base import ReferenceSource
from pipelines.stages.config import RewardConfig
from pipelines.stages.dynamic_sampling import Round, fill_groups
from pipelines.stages.online import OnlineStage, RolloutConfig
from pipelines.stages.rollout_queue import Generated
from pipelines.stages.timeline import ScoredAlready, ScoreStream
from pipelines.stages.training import spawn_reference, spawn_reward

if TYPE_CHECKING:
    from orchestrator.runtime.actor_group import ActorGroup
    from orchestrator.runtime.context import StageContext


@dataclass
class Prompts:
    """Prompts as read (``fields``: texts or conversations, what the reward group scores), as shown
    in sample tables (``texts``: of a conversation, its last user turn), and as the policy sees them
    (``ids``: a conversation rendered by the policy's chat template)."""

    fields: list[Any]
    texts: list[str]
    ids: list[list[int]]


def load_prompts(path: str, tokenizer: Any, column: str, lengths: LengthTally, cap: int | None = None) -> Prompts:
    """A prompt file's prompts under the length policy of ``lengths`` (``data.max_prompt_length`` and
    ``data.truncation``; finished here): a cut prompt keeps its end or its start, a dropped one is gone."""
    prompts = read_prompts(path, column, limit=cap)
    rendered = [render_prompt(tokenizer, p, f"{path}: row {i + 1}") for i, p in enumerate(prompts)]
    ids = encode_prompts(tokenizer, rendered)
    lengths.unknown += count_unknown(tokenizer, ids)
    kept = Prompts([], [], [])
    for row, (prompt, row_ids) in enumerate(zip(prompts, ids, strict=True)):
        if (cut := lengths.fit(row, len(row_ids), (), keep_first=starts_with_bos(tokenizer, row_ids))) is not None:
            kept.fields.append(prompt)
            kept.texts.append(plain_prompt(prompt))
            kept.ids.append(cut.prompt(row_ids))
    lengths.finish()
    return kept


@dataclass
class OnlineRoles:
    """The groups that sample and judge: vLLM rollout workers, the reference model (None when the
    trainer computes the reference log-probs, or the loss needs none), the reward; ``aux``: the
    designer rewards the reward group scores beside the stage reward (UPO), or None."""

    rollout: ActorGroup
    reference: ActorGroup | None
    reward: ActorGroup | None  # None: an environment rewards the samples
    aux: AuxiliaryObjective | None = None
    environment: ActorGroup | None = None  # the environment actors (None: none, or in the driver)
    served: ServedReward | None = None  # a reward served on the cluster (reward.served): no reward role

    @property
    def scorer(self) -> ActorGroup | ServedReward | None:
        """What scores the samples outside the rollout workers: the served reward or the reward role."""
        return self.served if self.served is not None else self.reward

    def reference_logps(self, trainer: ActorGroup) -> tuple[ActorGroup, Any]:
        """(group, method) that computes the reference log-probs."""
        if self.reference is None:
            return trainer, PolicyTrainer.evaluate_base
        return self.reference, ReferenceModel.evaluate


def setups_overlap(cfg: OnlineStage) -> bool:
    """Whether the roles may load their models at once (the trainer's beside the rollout engine's): on
    CPUs, and on GPUs when no rank shares a device (whole GPUs per rank, no ``placement.colocate``).
    vLLM sizes its KV cache from the memory it sees free on its GPU while it starts."""
    return not cfg.placement.colocate and all(float(c.gpus_per_worker).is_integer()
                                              for c in cfg.role_configs().values())


def spawn_rollout(ctx: StageContext, r: RolloutConfig, model_path: str, *, seed: int,
                  trust_remote_code: bool) -> ActorGroup:
    """The rollout group: one vLLM engine per worker on ``model_path``."""
    return ctx.roles.spawn("rollout", RolloutWorker, model_path, max_model_len=r.max_model_len,
                           dtype=r.dtype if r.gpus_per_worker or r.dtype != "auto" else "float32",
                           kv_cache_gib=r.kv_cache_gib, tensor_parallel_size=r.tensor_parallel_size,
                           gpu_memory_utilization=r.gpu_memory_utilization, seed=seed,
                           num_threads=max(1, int(r.cpus_per_worker)), trust_remote_code=trust_remote_code)


def spawn_roles(cfg: OnlineStage, ctx: StageContext, policy_path: str, ref_path: str
                ) -> tuple[OnlineRoles, Callable[[], None]]:
    """Rollout, reference (where a reference group starts) and reward groups, and a call that waits
    until they are set up: at once when ``setups_overlap`` does not hold, else the setups run while
    the caller starts the trainers."""
    trust = cfg.trainer.trust_remote_code
    rollout = spawn_rollout(ctx, cfg.rollout, policy_path, seed=cfg.schedule.seed, trust_remote_code=trust)
    group = cfg.reference_source() is ReferenceSource.GROUP
    reference = spawn_reference(ctx, cfg.reference_group, ref_path, cfg.trainer) if group else None
    aux = cfg.auxiliary_objective()
    reward = environment = served = None
    if cfg.needs_reward_role():
        source = cfg.reward.source(ctx.input, gpu=bool(cfg.reward_group.gpus_per_worker))
        rewards: tuple[RewardSpec, ...] = (("reward", cfg.reward.function, source, cfg.reward.normalize),)
        if aux is not None:  # UPO: the designer's rewards are scored beside the stage reward
            rewards += aux.specs(ctx.input)
        reward = spawn_reward(ctx, cfg.reward_group, rewards, trust_remote_code=trust)
    elif cfg.reward is not None and cfg.reward.served is not None:  # Serve's replicas score: checked, no role
        served = ServedReward(cfg.reward.served, ctx.roles.supervisor.policy)
        served.check()
    elif cfg.environment is not None and cfg.env_group.num_workers:
        environment = ctx.roles.spawn("environment", EnvironmentWorker, cfg.environment.factory(),
                                      call_timeout_s=cfg.environment.call_timeout_s)
    pending = [g.setup_async(setup) for g, setup in ((rollout, RolloutWorker.setup), (reference, ReferenceModel.setup),
                                                     (reward, RewardSet.setup), (environment, EnvironmentWorker.setup))
               if g is not None]

    def ready() -> None:
        while pending:
            pending.pop(0).get()

    if not setups_overlap(cfg):
        ready()
    return OnlineRoles(rollout, reference, reward, aux, environment, served), ready


def score_all(reward: ActorGroup | ServedReward | None, prompts: list[Any], responses: list[str],
              items_per_chunk: int) -> tuple[list[float], torch.Tensor | None]:
    """Phase ``score``: the stage reward of each (prompt, response) (by the reward role, or the served
    reward) and, when the reward group holds auxiliary rewards, their (N, K) scores (else None)."""
    assert reward is not None, "no reward role and no served reward: the rollout workers scored the samples"
    if isinstance(reward, ServedReward):
        rows = reward.score(prompts, responses, items_per_chunk)
    else:
        rows = score(reward, prompts, responses, items_per_chunk, method=RewardSet.score_chunk)
    aux = torch.tensor([r[1:] for r in rows], dtype=torch.float64) if rows and len(rows[0]) > 1 else None
    return [r[0] for r in rows], aux


def judge_counts(reward_cfg: RewardConfig | None, reward: ActorGroup | None, prefix: str) -> dict[str, float]:
    """A judge reward's verdicts since the last call, summed over the reward ranks: ``<prefix>/verdicts``,
    ``…/unparsable`` (scored ``verdict.unparsable_score``), ``…/truncated`` (prompts cut to fit the
    judge's context); {} when the reward is not a judge."""
    if reward is None or reward_cfg is None or reward_cfg.judge is None:
        return {}
    counts = reward.broadcast(RewardSet.take_counts)
    total = {key: float(sum(c.get(key, 0) for c in counts)) for key in ("verdicts", "unparsable", "truncated")}
    return {f"{prefix}/{key}": value for key, value in total.items()}


def evaluate(cfg: OnlineStage, roles: OnlineRoles, held_out: Prompts) -> dict[str, float]:
    """Greedy decoding of the held-out prompts by the rollout workers (the served policy), scored by
    the stage reward and, when configured, the checker (``eval/exact_match``)."""
    greedy = SamplingSpec(max_new_tokens=cfg.eval.max_new_tokens or cfg.sampling.max_new_tokens, temperature=0.0)
    rewards: list[float] | None
    if cfg.reward is None:  # no task reward (distillation): the checker alone judges
        samples, rewards, aux = generate(roles.rollout, held_out.ids, greedy, cfg.rollout.prompts_per_chunk), None, None
    elif cfg.reward_in_rollout():  # the workers score (a function reward)
        assert cfg.reward.function is not None
        samples = generate_scored(roles.rollout, held_out.ids, held_out.fields, greedy,
                                  FunctionReward(cfg.reward.function))
        rewards, aux = [float(s.reward or 0.0) for s in samples], None
    else:
        samples = generate(roles.rollout, held_out.ids, greedy, cfg.rollout.prompts_per_chunk)
        rewards, aux = score_all(roles.scorer, held_out.fields, [s.text for s in samples],
                                 cfg.reward_group.items_per_chunk)
    responses = [s.text for s in samples]
    metrics = {"eval/response_length_mean": sum(len(s.response_ids) for s in samples) / len(samples)}
    if rewards is not None:
        metrics["eval/reward_mean"] = sum(rewards) / len(rewards)
    if aux is not None and roles.aux is not None:
        metrics |= roles.aux.score_metrics(aux, "eval/aux")
    metrics |= judge_counts(cfg.reward, roles.reward, "eval/judge")
    if cfg.eval.checker:
        metrics["eval/exact_match"] = exact_match(FunctionReward(cfg.eval.checker).score(held_out.fields, responses))
    return metrics


class Sampler(Protocol):
    """How an iteration's prompts become samples: ``generate(iteration, prompt indices)`` returns the
    samples (K per prompt, grouped by prompt), their scoring started meanwhile (or None), the prompts
    sampled when they are not the given ones, and metrics."""

    def generate(self, iteration: int, chosen: list[int]) -> Generated: ...

    def spans(self, iteration: int) -> list[tuple[str, float, float]]:
        """Phases the sampler ran beside the generation of ``iteration``'s batch (phase, start, end)."""
        ...


class SingleTurn:
    """One completion per sample: K samples of each chosen prompt, seeded by the iteration (and the
    round of dynamic sampling). With ``rollout.overlap_phases`` the ``score`` phase starts meanwhile:
    each chunk of samples is scored as it arrives (a ``ScoreStream``)."""

    def __init__(self, cfg: OnlineStage, roles: OnlineRoles, prompts: Prompts) -> None:
        self.cfg, self.roles, self.prompts = cfg, roles, prompts

    def sample(self, iteration: int, chosen: list[int], round_: int = 0
               ) -> tuple[list[RolloutSample], ScoreStream | ScoredAlready | None]:
        c, k = self.cfg, self.cfg.sampling.samples_per_prompt
        seed, per_chunk = c.schedule.seed, c.rollout.prompts_per_chunk
        sampling = SamplingSpec(max_new_tokens=c.sampling.max_new_tokens, temperature=c.sampling.temperature,
                                top_p=c.sampling.top_p, n=k, seed=(seed * 100_003 + iteration) * 1_000_003 + round_)
        if c.reward is None:  # no task reward (distillation): the samples alone, scored 0
            start = time.perf_counter()
            samples = generate(self.roles.rollout, [self.prompts.ids[i] for i in chosen], sampling, per_chunk)
            return samples, ScoredAlready([0.0] * len(samples), None, start, start)
        if c.reward_in_rollout():  # a function reward, run in the rollout workers: one call per worker
            assert c.reward.function is not None
            start = time.perf_counter()
            samples = generate_scored(self.roles.rollout, [self.prompts.ids[i] for i in chosen],
                                      [self.prompts.fields[i] for i in chosen], sampling,
                                      FunctionReward(c.reward.function))
            return samples, ScoredAlready([float(x.reward or 0.0) for x in samples], None, start, start)
        stream = None
        if c.rollout.overlap_phases:
            def score_chunk(i: int, samples: list[RolloutSample]) -> tuple[list[float], torch.Tensor | None]:
                part = chosen[i * per_chunk : (i + 1) * per_chunk]
                return self.score([self.prompts.fields[j] for j in part for _ in range(k)], samples)

            stream = ScoreStream(score_chunk)
        samples = generate(self.roles.rollout, [self.prompts.ids[i] for i in chosen], sampling, per_chunk,
                           on_chunk=stream.submit if stream is not None else None)
        return samples, stream

    def score(self, fields: list[Any], samples: list[RolloutSample]) -> tuple[list[float], torch.Tensor | None]:
        if self.cfg.reward_in_rollout():  # scored in the rollout workers
            return [float(x.reward or 0.0) for x in samples], None
        return score_all(self.roles.scorer, fields, [x.text for x in samples], self.cfg.reward_group.items_per_chunk)

    def generate(self, iteration: int, chosen: list[int]) -> Generated:
        return *self.sample(iteration, chosen), None, {}

    def spans(self, iteration: int) -> list[tuple[str, float, float]]:
        return []  # the scoring's spans are the loop's


class DynamicSampling(SingleTurn):
    """DAPO's dynamic sampling: rounds of ``SingleTurn`` samples, each scored, until the batch holds
    only prompts whose samples' rewards differ (``dynamic_sampling.fill_groups``), in at most
    ``max_rounds`` rounds."""

    def __init__(self, cfg: OnlineStage, roles: OnlineRoles, prompts: Prompts, max_rounds: int) -> None:
        super().__init__(cfg, roles, prompts)
        self.max_rounds = max_rounds

    def generate(self, iteration: int, chosen: list[int]) -> Generated:
        k = self.cfg.sampling.samples_per_prompt
        spans: list[float] = []

        def one_round(todo: list[int], round_: int) -> Round:
            samples, stream = self.sample(iteration, todo, round_)
            start = time.perf_counter()
            if stream is not None:
                rewards, aux = stream.scores()
                start = stream.start if stream.start is not None else stream.end
            else:
                rewards, aux = self.score([self.prompts.fields[i] for i in todo for _ in range(k)], samples)
            spans.extend((start, time.perf_counter()))
            return Round(todo, samples, rewards, aux)

        generator = torch.Generator().manual_seed(self.cfg.schedule.seed * 1_000_033 + iteration)
        filled = fill_groups(one_round, chosen, k=k, num_prompts=len(self.prompts.ids), max_rounds=self.max_rounds,
                             generator=generator)
        scores = ScoredAlready(filled.rewards, filled.aux, min(spans), max(spans))
        return filled.samples, scores, filled.prompts, filled.metrics


def sampler_for(cfg: OnlineStage, roles: OnlineRoles, prompts: Prompts) -> Sampler:
    """The stage's sampler: one completion per prompt, or with ``dynamic_sampling`` rounds of them."""
    rounds = cfg.dynamic_sampling()
    return SingleTurn(cfg, roles, prompts) if rounds is None else DynamicSampling(cfg, roles, prompts, rounds)
