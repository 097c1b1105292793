"""The one iteration loop of the online stages (``onpolicy_dpo``, ``ppo``): ``run_online(cfg, ctx,
algorithm)``.

Per iteration: ``rollout`` (the stage's sampler, on the vLLM workers; with ``rollout.max_staleness``
k ≥ 1 the batches of the next k iterations are generated while the trainer learns) → ``score`` ∥
``ref_logprobs`` ∥ ``policy_logprobs`` ∥ the algorithm's forwards (``∥``: concurrent with
``rollout.overlap_phases``) → the algorithm's ``learn`` (pairs and DPO steps; advantages and PPO
epochs) → ``sync_weights`` (versioned, verified); then the sample table, held-out evaluation,
metrics, the phase timeline and in-stage checkpoints. A lost trainer rank rolls the stage back to
its last checkpoint; the trained policy is saved at the end.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from actors.policy_trainer import PolicyTrainer
from orchestrator.runtime import faults
from orchestrator.runtime.calls import CALLS
from orchestrator.runtime.rollout_ops import gap_metrics
from orchestrator.runtime.weight_sync import WeightSync, submit_response_logprobs
from pipelines.data.lengths import report_lengths
from pipelines.data.tokens import EpochSampler
from pipelines.stages.base import ReferenceSource
from pipelines.stages.multi_turn import MultiTurn, load_tasks, trajectory_columns
from pipelines.stages.online import OnlineAlgorithm, OnlineStage, Scored
from pipelines.stages.online_rollout import (
    Sampler,
    evaluate,
    judge_counts,
    load_prompts,
    sampler_for,
    score_all,
    spawn_roles,
)
from pipelines.stages.rollout_queue import Batch, RolloutQueue
from pipelines.stages.timeline import IterationLines, plot_timeline, run_forwards
from pipelines.stages.training import policy_inputs, spawn_trainer

if TYPE_CHECKING:
    from orchestrator.runtime.context import StageContext


def run_online(cfg: OnlineStage, ctx: StageContext, algorithm: OnlineAlgorithm) -> dict[str, str]:
    """The stage: roles up, resume, the iterations, the trained policy saved at the end."""
    loop = OnlineLoop(cfg, ctx, algorithm)
    try:
        loop.run()
    finally:
        loop.queue.close()
    out_dir = str(ctx.stage_dir / "model")
    loop.trainer.broadcast(PolicyTrainer.save_hf, out_dir)
    loop.log_timeline()
    return {"model": out_dir} | algorithm.outputs(ctx)


class OnlineLoop:
    """One online stage's roles, weight sync, rollout queue and records, and its iterations."""

    def __init__(self, cfg: OnlineStage, ctx: StageContext, algorithm: OnlineAlgorithm) -> None:
        self.cfg, self.ctx, self.algorithm = cfg, ctx, algorithm
        policy_path, ref_path, tokenizer, self.pad_id = policy_inputs(cfg, ctx)
        d, s = cfg.data, cfg.schedule
        paths = {"train": ctx.input("data.train"), "eval": ctx.input("data.eval")}
        if cfg.environment is not None:  # tasks, not prompts: their first messages come from the environment
            cfg.check_model(policy_path, tokenizer)
            self.lengths = {}
            self.prompts = load_tasks(paths["train"], d.column)
            self.held_out = load_tasks(paths["eval"], d.column, d.eval_prompts) if paths["eval"] else None
        else:
            self.lengths = {name: d.lengths(path) for name, path in paths.items() if path}
            self.prompts = load_prompts(paths["train"], tokenizer, d.column, self.lengths["train"])
            self.held_out = (load_prompts(paths["eval"], tokenizer, d.column, self.lengths["eval"], d.eval_prompts)
                             if paths["eval"] else None)
        self.roles, roles_ready = spawn_roles(cfg, ctx, policy_path, ref_path)
        steps, per_step, per_microbatch = algorithm.trainer_steps()
        self.trainer = spawn_trainer(ctx, role="policy_trainer", model_path=policy_path, trainer=cfg.trainer,
                                     optim=cfg.optim, steps=steps, per_step=per_step, per_microbatch=per_microbatch,
                                     seed=s.seed)
        self.trainers = [self.trainer, *algorithm.spawn(ctx, self.trainer, policy_path, self.pad_id)]
        roles_ready()
        ws = cfg.rollout.weight_sync
        self.sync = WeightSync(self.trainer, self.roles.rollout, self.pad_id, bucket_bytes=int(ws.bucket_mib * 2**20),
                               tolerance=ws.tolerance, transport=ws.transport)
        count = len(self.prompts.fields)
        self.order = EpochSampler(count, min(s.prompts_per_iteration, count), s.seed)
        self.done, state = self.resume(None)
        algorithm.restore(self.done, state)
        # Which prompts each iteration trained on, and when each of its phases ran.
        self.consumed = IterationLines(ctx.stage_dir / "prompts_consumed.jsonl", self.done)
        self.timeline = IterationLines(ctx.stage_dir / "timeline.jsonl", self.done)
        ctx.log.params(report_lengths(self.lengths))
        self.sampler: Sampler = (MultiTurn.of(cfg, self.roles, tokenizer, self.prompts) if cfg.environment is not None
                                 else sampler_for(cfg, self.roles, self.prompts))
        if self.held_out is not None and not self.done:
            ctx.log.metrics(self.evaluate(), step=0)
        self.queue = RolloutQueue(lambda j: self.sampler.generate(j, self.order.indices(j - 1)),
                                  cfg.rollout.max_staleness, s.iterations, served=lambda: self.sync.version)
        self.queue.restore(state.get("rollout_queue", []))

    def evaluate(self) -> dict[str, float]:
        """Held-out ``eval/`` metrics: greedy answers scored by the reward, or trajectories in the environment."""
        assert self.held_out is not None
        if isinstance(self.sampler, MultiTurn):
            return self.sampler.evaluate(self.held_out.fields, self.cfg.eval.max_new_tokens)
        return evaluate(self.cfg, self.roles, self.held_out)

    def resume(self, lost: faults.RankLost | None) -> tuple[int, dict[str, Any]]:
        """(iterations done, loop state): from the last checkpoint, whose weights are then pushed to the
        rollout workers as the version they had, or (0, {}) for a fresh start. After ``lost`` (a trainer
        or critic rank died) the trainer groups are rolled back first, and the rollout workers get the
        weights rolled back to (version 0: the starting checkpoint)."""
        checkpoints = self.ctx.checkpoints
        self.sync.drop_export()
        if lost is not None:
            iteration, state = checkpoints.rollback(lost, self.trainers)
        else:
            restored = checkpoints.restore(self.trainers)
            if restored is None:
                return 0, {}
            iteration, state = restored
        self.ctx.log.progress(iteration, self.cfg.schedule.iterations, {})
        version = state.get("version", 0)
        if version or lost is not None:
            self.sync.version = version - 1
            self.sync.push()
        return iteration, state

    def run(self) -> None:
        it, total = self.done, self.cfg.schedule.iterations
        while it < total:
            it += 1
            start, cpu = time.perf_counter(), time.process_time()
            CALLS.take()  # count the iteration's calls from here
            try:
                m, scored, chosen = self.iteration(it)
            except faults.RankLost as lost:  # roll back to the last checkpoint; its iterations run again
                self.queue.drop_all()  # batches in flight came from versions the rollback discards
                it, state = self.resume(lost)
                self.algorithm.restore(it, state)
                self.queue.restore(state.get("rollout_queue", []))
                self.consumed.keep(it)
                self.timeline.keep(it)
                continue
            self.record(it, start, m | driver_metrics(time.perf_counter() - start, time.process_time() - cpu),
                        scored, chosen)

    def iteration(self, it: int) -> tuple[dict[str, float], Scored, list[int]]:
        """Phases ``rollout`` → ``score`` ∥ ``ref_logprobs`` ∥ ``policy_logprobs`` → the algorithm's →
        ``sync_weights`` (when it trained); every call made inside names the iteration and version."""
        m: dict[str, float] = {}
        self.ctx.log.take_spans(0.0)  # forget spans an earlier, rolled-back attempt left
        with faults.at(iteration=it, version=self.sync.version):
            batch = self.take(it, m)
            chosen = batch.prompts if batch.prompts is not None else self.order.indices(it - 1)
            scored, policy_lp = self.score(chosen, batch, m)
            self.sync.updating(True)
            if self.algorithm.learn(self.ctx, it, scored, policy_lp, m):
                self.sync.export()  # the trainer packs its new weights while the engines finish the next batch
                m["rollout/batches_regenerated"] = float(len(self.queue.settle()))  # then push between batches
                self.sync_weights(scored, m)
            self.sync.updating(False)
        return m, scored, chosen

    def take(self, it: int, m: dict[str, float]) -> Batch:
        """The iteration's batch from the queue (generated now, or ahead while the trainer learned): the
        ``rollout`` span, the time waited for it and the samples' staleness (trainer version − the
        version that sampled them) are added to ``m``."""
        batch, waited = self.queue.take(it)
        self.ctx.log.span("rollout", batch.start, batch.end, m)
        for phase, start, end in self.sampler.spans(it):
            self.ctx.log.span(phase, start, end, m)
        staleness = [self.sync.version - x.policy_version for x in batch.samples]
        m |= {"timing/rollout_wait_s": waited, "rollout/staleness_mean": sum(staleness) / max(1, len(staleness)),
              "rollout/staleness_max": float(max(staleness, default=0))} | batch.metrics
        return batch

    def score(self, chosen: list[int], batch: Batch, m: dict[str, float]) -> tuple[Scored, list[list[float]]]:
        """Phases ``score``, ``ref_logprobs``, ``policy_logprobs`` and the algorithm's forwards (PPO's
        ``values``) of the batch (K samples per prompt of ``chosen``); with ``rollout.overlap_phases``
        they run concurrently (they only read the samples), and the scoring began while the samples
        generated. Returns the scored samples and their per-token log-probs under the policy that
        sampled them: the trainer's, or with ``rollout.old_logprobs: rollout`` the engine's own."""
        cfg, log, k, samples = self.cfg, self.ctx.log, self.cfg.sampling.samples_per_prompt, batch.samples
        seqs = [(x.prompt_ids, x.response_ids) for x in samples]

        def scoring() -> tuple[list[float], Any]:
            stream = batch.scores
            restored = stream is None and (cfg.reward is None or all(x.reward is not None for x in samples))
            if restored:  # a restored batch of trajectories, or no task reward (scored 0)
                return [float(x.reward or 0.0) for x in samples], None
            if stream is None:
                with log.timed("score", m):
                    return score_all(self.roles.scorer, [self.prompts.fields[i] for i in chosen for _ in range(k)],
                                     [x.text for x in samples], cfg.reward_group.items_per_chunk)
            with faults.at(phase="score"):
                rewards, aux = stream.scores()
            log.span("score", stream.start if stream.start is not None else stream.end, stream.end, m)
            return rewards, aux

        jobs = self.forward_jobs(seqs)
        results, (rewards, aux) = run_forwards(log, jobs, m, overlap=cfg.rollout.overlap_phases, meanwhile=scoring,
                                               timeout_s=self.ctx.timeout_s)
        from_trainer = "policy_logprobs" in results
        policy_lp = results.pop("policy_logprobs") if from_trainer else [list(x.logprobs) for x in samples]
        texts = [self.prompts.texts[i] for i in chosen for _ in range(k)]
        scored = Scored(texts, samples, rewards, results.pop("ref_logprobs", None), aux, forwards=results)
        m.update(rollout_metrics(scored, k))
        if aux is not None and self.roles.aux is not None:
            m.update(self.roles.aux.score_metrics(aux, "rollout/aux"))
        m.update(judge_counts(cfg.reward, self.roles.reward, "judge"))
        if self.roles.served is not None:
            m.update(self.roles.served.take_stats())
        if from_trainer:
            m.update(gap_metrics(samples, policy_lp))
        return scored, policy_lp

    def forward_jobs(self, seqs: list[tuple[list[int], list[int]]]) -> dict[str, Any]:
        """phase → submit: the reference log-probs (unless the loss needs none), the trainer's own
        log-probs of the sampled tokens (``rollout.old_logprobs: trainer``), the algorithm's forwards."""
        jobs: dict[str, Any] = {}
        if self.cfg.reference_source() is not ReferenceSource.NONE:
            group, method = self.roles.reference_logps(self.trainer)
            jobs["ref_logprobs"] = lambda: submit_response_logprobs(group, method, seqs, self.pad_id)
        if self.cfg.rollout.old_logprobs == "trainer" and not self.cfg.old_logprobs_in_update():
            jobs["policy_logprobs"] = lambda: submit_response_logprobs(self.trainer, PolicyTrainer.evaluate, seqs,
                                                                       self.pad_id)
        own = self.algorithm.forwards()
        return jobs | {phase: (lambda submit=submit: submit(seqs)) for phase, submit in own.items()}

    def sync_weights(self, scored: Scored, m: dict[str, float]) -> None:
        """Phase ``sync_weights``: push the trainer's weights as the next version; every
        ``weight_sync.verify_every`` versions check the engines' log-probs on a few of this iteration's samples."""
        every = self.cfg.rollout.weight_sync.verify_every
        with self.ctx.log.timed("sync_weights", m):
            m.update(self.sync.push())
            if not self.sync.probe or (every and self.sync.version % every == 0):  # the first, then every N
                m.update(self.sync.verify([(x.prompt_ids, x.response_ids) for x in scored.samples[:8]]))

    def record(self, it: int, start: float, m: dict[str, float], scored: Scored, chosen: list[int]) -> None:
        """The iteration's records: consumed prompts, timeline, sample table, held-out evaluation when
        due, metrics, progress, and the checkpoint when due."""
        cfg, log, s = self.cfg, self.ctx.log, self.cfg.schedule
        self.consumed.add(it, prompts=chosen)
        m["timing/step_s"] = step_s = time.perf_counter() - start
        m["timing/sync_share"] = m.get("timing/sync_weights_s", 0.0) / step_s
        self.timeline.add(it, step_s=round(step_s, 4), spans=log.take_spans(start))
        m["policy_version"] = float(self.sync.version)
        shown = range(min(cfg.eval.table_rows, len(scored.samples)))
        if shown:
            log.table({"iteration": [it] * len(shown), "prompt": [scored.prompt_texts[i] for i in shown],
                       "response": [scored.samples[i].text for i in shown],
                       "reward": [scored.rewards[i] for i in shown],
                       "policy_version": [scored.samples[i].policy_version for i in shown]}
                      | trajectory_columns([scored.samples[i] for i in shown]),
                      artifact_file=f"samples/iter_{it:04d}.json")
        if self.held_out is not None and (it == s.iterations or bool(s.eval_every and it % s.eval_every == 0)):
            m.update(self.evaluate())
        log.metrics(m, step=it)
        log.progress(it, s.iterations, m)
        if self.ctx.checkpoints.due(it, s.iterations):
            state = {"version": self.sync.version, "rollout_queue": self.queue.state()} | self.algorithm.state()
            self.ctx.checkpoints.save(it, self.trainers, state)

    def log_timeline(self) -> None:
        """``timeline.jsonl`` and its picture ``timeline.png`` as MLflow artifacts of the stage."""
        picture = plot_timeline(self.timeline.read(), self.ctx.stage_dir / "timeline.png")
        for path in (self.timeline.path, picture):
            if path is not None:
                self.ctx.log.artifact(path, "timeline")


def driver_metrics(wall_s: float, cpu_s: float) -> dict[str, float]:
    """What the driver cost an iteration: its remote calls per role (``driver/calls_<role>`` and
    ``driver/calls``, counted when sent, also by the thread that generates ahead), the CPU seconds
    of the driver process (its threads: batch building, serialisation, Ray's own) and their share of
    the iteration's wall time (``driver/cpu_share``); and the weight sync's share (``timing/sync_share``)."""
    calls = CALLS.take()
    return ({f"driver/calls_{role}": float(n) for role, n in calls.items()}
            | {"driver/calls": float(sum(calls.values())), "timing/driver_cpu_s": cpu_s,
               "driver/cpu_share": cpu_s / wall_s if wall_s else 0.0})


def rollout_metrics(scored: Scored, k: int) -> dict[str, float]:
    samples, rewards = scored.samples, scored.rewards
    best = [max(rewards[i] for i in idx) for idx in scored.per_prompt(k)]
    return {
        "objective/scores": sum(rewards) / len(rewards),  # TRL's name: the mean score of the samples
        "rollout/reward_max": max(rewards),
        "rollout/reward_best_of_k_mean": sum(best) / len(best),
        # the policy's own tokens (a trajectory's environment tokens are not its response)
        "rollout/response_length_mean": sum(sum(s.sampled_mask()) for s in samples) / len(samples),
        "rollout/truncated_rate": sum(s.finish_reason == "length" for s in samples) / len(samples),
        "rollout/samples": float(len(samples)),
    }
