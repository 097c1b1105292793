"""The one iteration loop of the online stages (``onpolicy_dpo``, ``ppo``), and what they share:
prompts, the sampling roles, the rollout → score ∥ ref_logprobs ∥ policy_logprobs phases (``∥``:
concurrent with ``rollout.overlap_phases``), the weight sync, held-out evaluation, the phase
timeline, checkpoints and resume.

``run_online(cfg, ctx, algorithm)`` owns the iteration; a stage supplies an ``OnlineAlgorithm``:
how many optimizer steps the trainer plans, the extra trainer groups it needs (PPO's critic), its
own ``forwards`` over the samples (PPO's critic values, beside the log-probs), and ``learn``: the
phases that turn one iteration's scored samples into an update (pairs and DPO steps; advantages
and PPO epochs), with its metrics and checkpoint state.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

from actors.policy_trainer import PolicyTrainer
from actors.reference import ReferenceModel
from actors.reward import RewardSet
from actors.rollout import RolloutSample, RolloutWorker, SamplingSpec
from orchestrator.runtime import faults
from orchestrator.runtime.rollout_ops import gap_metrics, generate, score
from orchestrator.runtime.weight_sync import WeightSync, submit_response_logprobs
from pipelines.data import EpochSampler, encode_prompts
from pipelines.errors import DataError
from pipelines.formats import plain_prompt, read_prompts, render_prompt
from pipelines.rewards import FunctionReward
from pipelines.stages import auxiliary
from pipelines.stages.config import reference_free, reference_from_trainer
from pipelines.stages.dynamic_sampling import Round, fill_groups
from pipelines.stages.rollout_queue import Batch, Generated, RolloutQueue
from pipelines.stages.timeline import (
    IterationLines,
    ScoredAlready,
    ScoreStream,
    Submitted,
    iteration_spans,
    plot_timeline,
    run_forwards,
)
from pipelines.stages.training import policy_inputs, spawn_reference, spawn_trainer

if TYPE_CHECKING:
    from orchestrator.runtime.actor_group import ActorGroup
    from orchestrator.runtime.context import StageContext

OnlineStage = Any  # an online stage's config: OnPolicyDPOStage or PPOStage (their modules import this one)


@dataclass
class Prompts:
    """Prompts as read (``fields``: texts or conversations, what the reward group scores), as shown
    in sample tables (``texts``: of a conversation, its last user turn), and as the policy sees them
    (``ids``: a conversation rendered by the policy's chat template)."""

    fields: list[Any]
    texts: list[str]
    ids: list[list[int]]


def load_prompts(path: str, tokenizer: Any, column: str, max_length: int, cap: int | None = None) -> Prompts:
    prompts = read_prompts(path, column, limit=cap)
    ids = encode_prompts(tokenizer, [render_prompt(tokenizer, p, f"{path}: row {i}") for i, p in enumerate(prompts)])
    texts = [plain_prompt(p) for p in prompts]
    for row, row_ids in enumerate(ids):
        if len(row_ids) > max_length:
            raise DataError(f"{path}: row {row}: prompt is {len(row_ids)} tokens, more than "
                            f"data.max_prompt_length = {max_length}")
    return Prompts(prompts, texts, ids)


def load_prompt_sets(cfg: OnlineStage, ctx: StageContext, tokenizer: Any) -> tuple[Prompts, Prompts | None]:
    """The stage's training prompts and its held-out prompts (None without ``data.eval``)."""
    d = cfg.data
    prompts = load_prompts(ctx.input("data.train"), tokenizer, d.column, d.max_prompt_length)
    eval_path = ctx.input("data.eval")
    held_out = load_prompts(eval_path, tokenizer, d.column, d.max_prompt_length, d.eval_prompts) if eval_path else None
    return prompts, held_out


@dataclass
class Scored:
    """One iteration's samples (K per prompt, grouped by prompt) with rewards and log-probs."""

    prompt_texts: list[str]
    samples: list[RolloutSample]
    rewards: list[float]
    ref_logps: list[list[float]] | None  # per token, reference role; None for a reference-free loss
    aux: torch.Tensor | None = None  # (N, K) auxiliary (designer) rewards of the samples (UPO)
    forwards: dict[str, Any] = field(default_factory=dict)  # the algorithm's own forwards (PPO: "values")

    def per_prompt(self, k: int) -> list[range]:
        return [range(i, i + k) for i in range(0, len(self.samples), k)]


@dataclass
class OnlineRoles:
    """The groups that sample and judge: vLLM rollout workers, the reference model (None when the
    LoRA policy trainer with its adapters disabled is the reference), the reward."""

    rollout: ActorGroup
    reference: ActorGroup | None
    reward: ActorGroup

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


def spawn_rollout(ctx: StageContext, r: Any, model_path: str, *, seed: int, trust_remote_code: bool) -> ActorGroup:
    """The rollout group (``r``: a ``RolloutConfig``): one vLLM engine per worker on ``model_path``."""
    return ctx.spawn("rollout", RolloutWorker, model_path, max_model_len=r.max_model_len,
                     dtype=r.dtype if r.gpus_per_worker or r.dtype != "auto" else "float32",
                     kv_cache_gib=r.kv_cache_gib, tensor_parallel_size=r.tensor_parallel_size,
                     gpu_memory_utilization=r.gpu_memory_utilization, seed=seed,
                     num_threads=max(1, int(r.cpus_per_worker)), trust_remote_code=trust_remote_code)


def spawn_reward(ctx: StageContext, rw: Any, rewards: tuple[tuple[str, str | None, str | None, bool], ...], *,
                 trust_remote_code: bool) -> ActorGroup:
    """The reward group (``rw``: a ``RewardGroupConfig``) scoring ``rewards`` (name, function, model, normalize)."""
    return ctx.spawn("reward", RewardSet, rewards, precision="fp32" if not rw.gpus_per_worker else "auto",
                     num_threads=max(1, int(rw.cpus_per_worker)), trust_remote_code=trust_remote_code)


def spawn_roles(cfg: OnlineStage, ctx: StageContext, policy_path: str, ref_path: str
                ) -> tuple[OnlineRoles, Callable[[], None]]:
    """Rollout, reference (unless the trainer is the reference or the loss needs none) and reward
    groups, and a call that waits until they are set up: at once when ``setups_overlap`` does not
    hold, else the setups run while the caller starts the trainers."""
    trust = cfg.trainer.trust_remote_code
    rollout = spawn_rollout(ctx, cfg.rollout, policy_path, seed=cfg.schedule.seed, trust_remote_code=trust)
    no_group = reference_from_trainer(cfg) or reference_free(cfg)
    reference = None if no_group else spawn_reference(cfg, ctx, ref_path)
    rewards = (("reward", cfg.reward.function, ctx.input("reward.model"), cfg.reward.normalize),)
    if getattr(cfg, "auxiliary", ()):  # UPO: the designer's rewards are scored beside the stage reward
        rewards += auxiliary.reward_specs(cfg, ctx)
    reward = spawn_reward(ctx, cfg.reward_group, rewards, trust_remote_code=trust)
    pending = [group.setup_async(setup) for group, setup in ((rollout, RolloutWorker.setup),
                                                              (reference, ReferenceModel.setup),
                                                              (reward, RewardSet.setup)) if group is not None]

    def ready() -> None:
        while pending:
            pending.pop(0).get()

    if not setups_overlap(cfg):
        ready()
    return OnlineRoles(rollout, reference, reward), ready


def score_all(reward: ActorGroup, prompts: list[str], responses: list[str], items_per_chunk: int
              ) -> tuple[list[float], torch.Tensor | None]:
    """Phase ``score``: the stage reward of each (prompt, response) and, when the reward group holds
    auxiliary rewards, their (N, K) scores (else None)."""
    rows = score(reward, prompts, responses, items_per_chunk, method=RewardSet.score_chunk)
    aux = torch.tensor([r[1:] for r in rows], dtype=torch.float64) if rows and len(rows[0]) > 1 else None
    return [r[0] for r in rows], aux


def rollout_metrics(scored: Scored, k: int) -> dict[str, float]:
    samples, rewards = scored.samples, scored.rewards
    best = [max(rewards[i] for i in idx) for idx in scored.per_prompt(k)]
    return {
        "objective/scores": sum(rewards) / len(rewards),  # TRL's name: the mean score of the samples
        "rollout/reward_max": max(rewards),
        "rollout/reward_best_of_k_mean": sum(best) / len(best),
        "rollout/response_length_mean": sum(len(s.response_ids) for s in samples) / len(samples),
        "rollout/truncated_rate": sum(s.finish_reason == "length" for s in samples) / len(samples),
        "rollout/samples": float(len(samples)),
    }


def evaluate(cfg: OnlineStage, roles: OnlineRoles, held_out: Prompts) -> dict[str, float]:
    """Greedy decoding of the held-out prompts by the rollout workers (the served policy), scored by
    the stage reward and, when configured, the checker (``eval/exact_match`` = share scored ≥ 1)."""
    greedy = SamplingSpec(max_new_tokens=cfg.eval.max_new_tokens or cfg.sampling.max_new_tokens, temperature=0.0)
    samples = generate(roles.rollout, held_out.ids, greedy, cfg.rollout.prompts_per_chunk)
    responses = [s.text for s in samples]
    rewards, aux = score_all(roles.reward, held_out.fields, responses, cfg.reward_group.items_per_chunk)
    metrics = {"eval/reward_mean": sum(rewards) / len(rewards),
               "eval/response_length_mean": sum(len(s.response_ids) for s in samples) / len(samples)}
    if aux is not None:
        metrics |= auxiliary.score_metrics(cfg, aux, "eval/aux")
    if cfg.eval.checker:
        checks = FunctionReward(cfg.eval.checker).score(held_out.fields, responses)
        metrics["eval/exact_match"] = sum(c >= 1.0 for c in checks) / len(checks)
    return metrics


def rollout_batch(cfg: OnlineStage, roles: OnlineRoles, prompts: Prompts, chosen: list[int], iteration: int,
                  round_: int = 0) -> tuple[list[RolloutSample], ScoreStream | None]:
    """Phase ``rollout``: K samples of each chosen prompt (indices), seeded by the iteration (and the
    round of dynamic sampling). With
    ``rollout.overlap_phases`` the ``score`` phase starts meanwhile: each chunk of samples is scored
    as it arrives (returned as a ``ScoreStream``; else None)."""
    k, seed, per_chunk = cfg.sampling.samples_per_prompt, cfg.schedule.seed, cfg.rollout.prompts_per_chunk
    sampling = SamplingSpec(max_new_tokens=cfg.sampling.max_new_tokens, temperature=cfg.sampling.temperature,
                            top_p=cfg.sampling.top_p, n=k, seed=(seed * 100_003 + iteration) * 1_000_003 + round_)
    stream = None
    if cfg.rollout.overlap_phases:
        def score_chunk(i: int, samples: list[RolloutSample]) -> tuple[list[float], torch.Tensor | None]:
            fields = [prompts.fields[j] for j in chosen[i * per_chunk : (i + 1) * per_chunk] for _ in range(k)]
            return score_all(roles.reward, fields, [x.text for x in samples], cfg.reward_group.items_per_chunk)

        stream = ScoreStream(score_chunk)
    samples = generate(roles.rollout, [prompts.ids[i] for i in chosen], sampling, per_chunk,
                       on_chunk=stream.submit if stream is not None else None)
    return samples, stream


def next_batch(cfg: OnlineStage, roles: OnlineRoles, prompts: Prompts, chosen: list[int], iteration: int
               ) -> Generated:
    """The queue's generation of one iteration: ``rollout_batch`` of its prompts, or with
    ``sampling.dynamic`` (DAPO) rounds of it, each scored, until the batch holds only prompts whose
    samples' rewards differ (``dynamic_sampling.fill_groups``)."""
    if not getattr(cfg.sampling, "dynamic", False):
        return *rollout_batch(cfg, roles, prompts, chosen, iteration), None, {}
    k = cfg.sampling.samples_per_prompt
    spans: list[float] = []

    def one_round(todo: list[int], round_: int) -> Round:
        samples, stream = rollout_batch(cfg, roles, prompts, todo, iteration, round_)
        start = time.perf_counter()
        if stream is not None:
            rewards, aux = stream.scores()
            start = stream.start if stream.start is not None else stream.end
        else:
            rewards, aux = score_all(roles.reward, [prompts.fields[i] for i in todo for _ in range(k)],
                                     [x.text for x in samples], cfg.reward_group.items_per_chunk)
        spans.extend((start, time.perf_counter()))
        return Round(todo, samples, rewards, aux)

    filled = fill_groups(one_round, chosen, k=k, num_prompts=len(prompts.ids), max_rounds=cfg.sampling.dynamic_max_rounds,
                         generator=torch.Generator().manual_seed(cfg.schedule.seed * 1_000_033 + iteration))
    scores = ScoredAlready(filled.rewards, filled.aux, min(spans), max(spans))
    return filled.samples, scores, filled.prompts, filled.metrics


def take_samples(ctx: StageContext, queue: RolloutQueue, iteration: int, version: int, m: dict[str, float]
                 ) -> Batch:
    """The iteration's batch from the queue (generated now, or ahead while the trainer learned):
    the ``rollout`` span, the time waited for it and the samples' staleness (trainer version − the
    version that sampled them) are added to ``m``."""
    batch, waited = queue.take(iteration)
    ctx.span("rollout", batch.start, batch.end, m)
    staleness = [version - x.policy_version for x in batch.samples]
    m |= {"timing/rollout_wait_s": waited, "rollout/staleness_mean": sum(staleness) / max(1, len(staleness)),
          "rollout/staleness_max": float(max(staleness, default=0))} | batch.metrics
    return batch


def sample_and_score(cfg: OnlineStage, ctx: StageContext, roles: OnlineRoles, trainer: ActorGroup, prompts: Prompts,
                     chosen: list[int], batch: Batch, pad_id: int, m: dict[str, float],
                     forwards: dict[str, Callable[[list[tuple[list[int], list[int]]]], Submitted]]
                     ) -> tuple[Scored, list[list[float]]]:
    """Phases ``score``, ``ref_logprobs``, ``policy_logprobs`` and the algorithm's ``forwards`` (PPO's
    ``values``) of one iteration's samples; with ``rollout.overlap_phases`` they run concurrently
    (they only read the samples), and the scoring began while the samples generated.

    Args:
        chosen: indices of this iteration's prompts.
        batch: their samples (K per prompt, grouped by prompt), and their scoring if it has begun.
        m: the iteration's metrics; phase timings, ``rollout/*`` and the logprob gap are added.
        forwards: phase → submit(sequences): the algorithm's forwards over the samples.

    Returns:
        The scored samples and their per-token log-probs under the policy that sampled them: the
        trainer's, or with ``rollout.old_logprobs: rollout`` the engine's own.
    """
    reward, k, samples = roles.reward, cfg.sampling.samples_per_prompt, batch.samples
    texts = [prompts.texts[i] for i in chosen for _ in range(k)]
    seqs = [(x.prompt_ids, x.response_ids) for x in samples]

    def scoring() -> tuple[list[float], torch.Tensor | None]:
        stream = batch.scores
        if stream is None:
            with ctx.timed("score", m):
                return score_all(reward, [prompts.fields[i] for i in chosen for _ in range(k)],
                                 [x.text for x in samples], cfg.reward_group.items_per_chunk)
        with faults.at(phase="score"):
            rewards, aux = stream.scores()
        ctx.span("score", stream.start if stream.start is not None else stream.end, stream.end, m)
        return rewards, aux

    jobs = {} if reference_free(cfg) else {
        "ref_logprobs": lambda: submit_response_logprobs(*roles.reference_logps(trainer), seqs, pad_id)}
    from_trainer = cfg.rollout.old_logprobs == "trainer"
    if from_trainer:  # the trainer's view of the sampled tokens
        jobs["policy_logprobs"] = lambda: submit_response_logprobs(trainer, PolicyTrainer.evaluate, seqs, pad_id)
    jobs |= {phase: (lambda submit=submit: submit(seqs)) for phase, submit in forwards.items()}
    results, (rewards, aux) = run_forwards(ctx, jobs, m, overlap=cfg.rollout.overlap_phases, meanwhile=scoring)
    policy_lp = results.pop("policy_logprobs") if from_trainer else [list(x.logprobs) for x in samples]
    scored = Scored(texts, samples, rewards, results.pop("ref_logprobs", None), aux, forwards=results)
    m.update(rollout_metrics(scored, k))
    if aux is not None:
        m.update(auxiliary.score_metrics(cfg, aux, "rollout/aux"))
    if from_trainer:
        m.update(gap_metrics(samples, policy_lp))
    return scored, policy_lp


def log_sample_table(ctx: StageContext, scored: Scored, rows: int, iteration: int) -> None:
    """The first ``rows`` samples of an iteration as an MLflow table (``samples/iter_NNNN.json``)."""
    shown = range(min(rows, len(scored.samples)))
    if not rows:
        return
    table = {"iteration": [iteration] * len(shown), "prompt": [scored.prompt_texts[i] for i in shown],
             "response": [scored.samples[i].text for i in shown], "reward": [scored.rewards[i] for i in shown],
             "policy_version": [scored.samples[i].policy_version for i in shown]}
    ctx.defer(lambda: ctx.tracker.log_table(table, artifact_file=f"samples/iter_{iteration:04d}.json"))


def resume_online(ctx: StageContext, trainers: list[ActorGroup], sync: WeightSync,
                  lost: faults.RankLost | None = None) -> tuple[int, dict[str, Any]]:
    """(iterations done, loop state) of an online stage: from its last checkpoint, whose weights are
    then pushed to the rollout workers as the version they had, or (0, {}) for a fresh start. After
    ``lost`` (a trainer or critic rank died) the trainer groups are rebuilt first and the rollout
    workers get the weights rolled back to (version 0: the starting checkpoint)."""
    if lost is not None:
        iteration, state = ctx.recover(lost, trainers)
    else:
        restored = ctx.restore_checkpoint(trainers)
        if restored is None:
            return 0, {}
        iteration, state = restored
    ctx.report_progress(iteration, ctx.stage.schedule.iterations, {})
    version = state.get("version", 0)
    if version or lost is not None:
        sync.version = version - 1
        sync.push()
    return iteration, state


def due(iteration: int, iterations: int, every: int) -> bool:
    """Evaluate at the last iteration and every ``every`` iterations (0: only the last)."""
    return iteration == iterations or bool(every and iteration % every == 0)


def sync_and_verify(cfg: OnlineStage, ctx: StageContext, sync: WeightSync, scored: Scored, m: dict[str, float]) -> None:
    """Phase ``sync_weights``: push the trainer's weights as the next version; every
    ``weight_sync.verify_every`` versions check the engines' log-probs on a few of this iteration's samples."""
    ws = cfg.rollout.weight_sync
    with ctx.timed("sync_weights", m):
        m.update(sync.push())
        if ws.verify_every and sync.version % ws.verify_every == 0:
            probe = [(x.prompt_ids, x.response_ids) for x in scored.samples[:8]]
            m.update(sync.verify(probe))


def open_weight_sync(cfg: OnlineStage, trainer: ActorGroup, roles: OnlineRoles, pad_id: int) -> WeightSync:
    ws = cfg.rollout.weight_sync
    return WeightSync(trainer, roles.rollout, pad_id, bucket_bytes=int(ws.bucket_mib * 2**20), tolerance=ws.tolerance,
                      transport=ws.transport)


class OnlineAlgorithm(Protocol):
    """What an online stage supplies to ``run_online``; everything else is the loop's. The phases
    ``learn`` times (``ctx.timed``) land in the timeline between the sampling phases and ``sync_weights``."""

    def trainer_steps(self) -> tuple[int, int, int]:
        """The policy trainer's (total optimizer steps, examples per step, examples per micro-batch)."""
        ...

    def spawn(self, ctx: StageContext, trainer: ActorGroup, policy_path: str, pad_id: int) -> list[ActorGroup]:
        """Take the policy trainer and start the stage's other trainer groups (e.g. the critic); those
        are checkpointed with the policy."""
        ...

    def restore(self, done: int, state: dict[str, Any]) -> None:
        """Continue after ``done`` iterations from the checkpoint's ``state`` ({} and 0 on a fresh start)."""
        ...

    def forwards(self) -> dict[str, Callable[[list[tuple[list[int], list[int]]]], Submitted]]:
        """The stage's own forwards over an iteration's samples (phase → submit((prompt, response) ids)),
        run beside the reference and policy log-probs; their results reach ``learn`` in ``Scored.forwards``."""
        ...

    def learn(self, ctx: StageContext, iteration: int, scored: Scored, policy_lp: list[list[float]],
              m: dict[str, float]) -> bool:
        """Turn the iteration's scored samples into optimizer steps, adding metrics to ``m``; False when
        there was nothing to train on (the weights did not change: no sync)."""
        ...

    def state(self) -> dict[str, Any]:
        """The loop state a checkpoint keeps (JSON), beside the weight version."""
        ...

    def outputs(self, ctx: StageContext) -> dict[str, str]:
        """Outputs beside the policy ``model`` (written after the last iteration)."""
        ...


def run_online(cfg: OnlineStage, ctx: StageContext, algorithm: OnlineAlgorithm) -> dict[str, str]:
    """The stage: roles up, resume, then per iteration ``rollout`` → ``score`` ∥ ``ref_logprobs`` ∥
    ``policy_logprobs`` → the algorithm's phases → ``sync_weights``, with the sample table,
    held-out evaluation, metrics and in-stage checkpoints; the trained policy is saved at the end.
    With ``rollout.max_staleness`` k ≥ 1 the batches of the next k iterations are generated while the
    trainer learns (``rollout_queue``)."""
    policy_path, ref_path, tokenizer, pad_id = policy_inputs(cfg, ctx)
    s = cfg.schedule
    prompts, held_out = load_prompt_sets(cfg, ctx, tokenizer)
    roles, roles_ready = spawn_roles(cfg, ctx, policy_path, ref_path)
    steps, per_step, per_microbatch = algorithm.trainer_steps()
    trainer = spawn_trainer(ctx, role="policy_trainer", model_path=policy_path, trainer=cfg.trainer, optim=cfg.optim,
                            steps=steps, per_step=per_step, per_microbatch=per_microbatch, seed=s.seed)
    trainers = [trainer, *algorithm.spawn(ctx, trainer, policy_path, pad_id)]
    roles_ready()
    sync = open_weight_sync(cfg, trainer, roles, pad_id)
    sampler = EpochSampler(len(prompts.ids), min(s.prompts_per_iteration, len(prompts.ids)), s.seed)
    done, state = resume_online(ctx, trainers, sync)
    algorithm.restore(done, state)
    # Which prompts each iteration trained on, and when each of its phases ran.
    consumed = IterationLines(ctx.stage_dir / "prompts_consumed.jsonl", done)
    timeline = IterationLines(ctx.stage_dir / "timeline.jsonl", done)
    if held_out is not None and not done:
        ctx.log_metrics(evaluate(cfg, roles, held_out), step=0)

    queue = RolloutQueue(lambda j: next_batch(cfg, roles, prompts, sampler.indices(j - 1), j),
                         cfg.rollout.max_staleness, s.iterations)
    queue.restore(state.get("rollout_queue", []))
    try:
        it = done
        while it < s.iterations:
            it += 1
            m: dict[str, float] = {}
            start = time.perf_counter()
            ctx.spans.clear()
            try:
                with faults.at(iteration=it, version=sync.version):  # named by any error of a call below
                    batch = take_samples(ctx, queue, it, sync.version, m)
                    chosen = batch.prompts if batch.prompts is not None else sampler.indices(it - 1)
                    scored, policy_lp = sample_and_score(cfg, ctx, roles, trainer, prompts, chosen, batch, pad_id, m,
                                                         algorithm.forwards())
                    sync.updating(True)
                    if algorithm.learn(ctx, it, scored, policy_lp, m):
                        m["rollout/batches_regenerated"] = float(len(queue.settle()))  # then push between batches
                        sync_and_verify(cfg, ctx, sync, scored, m)
                    sync.updating(False)
            except faults.RankLost as lost:  # roll back to the last checkpoint; its iterations run again
                queue.drop_all()  # batches in flight came from versions the rollback discards
                it, state = resume_online(ctx, trainers, sync, lost)
                algorithm.restore(it, state)
                queue.restore(state.get("rollout_queue", []))
                consumed.keep(it)
                timeline.keep(it)
                continue
            consumed.add(it, prompts=chosen)
            m["timing/step_s"] = step_s = time.perf_counter() - start
            timeline.add(it, step_s=round(step_s, 4), spans=iteration_spans(ctx, start))
            m["policy_version"] = float(sync.version)
            log_sample_table(ctx, scored, cfg.eval.table_rows, it)
            if held_out is not None and due(it, s.iterations, s.eval_every):
                m.update(evaluate(cfg, roles, held_out))
            ctx.log_metrics(m, step=it)
            ctx.report_progress(it, s.iterations, m)
            if ctx.checkpoint_due(it, s.iterations):
                ctx.save_checkpoint(it, trainers, {"version": sync.version, "rollout_queue": queue.state()}
                                    | algorithm.state())
    finally:
        queue.close()

    out_dir = str(ctx.stage_dir / "model")
    trainer.broadcast(PolicyTrainer.save_hf, out_dir)
    log_timeline(ctx, timeline)
    return {"model": out_dir} | algorithm.outputs(ctx)


def log_timeline(ctx: StageContext, timeline: IterationLines) -> None:
    """``timeline.jsonl`` and its picture ``timeline.png`` as MLflow artifacts of the stage."""
    picture = plot_timeline(timeline.read(), ctx.stage_dir / "timeline.png")
    for path in (timeline.path, picture):
        if path is not None:
            ctx.tracker.log_artifact(path, "timeline")
