"""What every stage that trains shares: spawning and stepping the trainer group, the offline loop
(SFT, reward model, offline DPO), the policy's inputs and greedy-decoding evaluation.

Offline stages differ in the batch they build for a step, the loss and the evaluation; this module
owns spawning the trainer group, stepping it, evaluating on schedule, logging and the rank check.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from actors.policy_trainer import PolicyTrainer, TrainerSpec
from actors.reference import ReferenceModel
from actors.reward import RewardSet
from orchestrator.runtime import faults
from orchestrator.runtime.sharding import sharded_rows
from pipelines.algorithms.evaluation import exact_match
from pipelines.data.batches import TensorBatch
from pipelines.data.judges import JudgeSpec
from pipelines.data.rewards import FunctionReward
from pipelines.data.tokens import load_tokenizer, pad_token_id
from pipelines.errors import TrainingError

if TYPE_CHECKING:
    from orchestrator.runtime.actor_group import ActorGroup, Pending
    from orchestrator.runtime.context import StageContext
    from pipelines.stages.config import (
        GenerationEvalConfig,
        OptimConfig,
        PolicyStage,
        ReferenceConfig,
        RewardGroupConfig,
        TrainerConfig,
    )

# (name, function, model path or judge, normalize): one reward of a ``RewardSet``
RewardSpec = tuple[str, str | None, str | JudgeSpec | None, bool]


def spawn_trainer(ctx: StageContext, *, role: str, model_path: str, trainer: TrainerConfig, optim: OptimConfig,
                  steps: int, per_step: int, per_microbatch: int, seed: int,
                  model_kind: str = "causal_lm") -> ActorGroup:
    """Start the DeepSpeed trainer group and join its ranks into one process group."""
    t, o = trainer, optim
    spec = TrainerSpec(
        model_path=model_path, total_steps=steps, examples_per_step=per_step, examples_per_microbatch=per_microbatch,
        lr=o.lr, zero_stage=t.zero_stage, precision=t.precision, weight_decay=o.weight_decay, betas=o.betas,
        eps=o.eps, warmup_steps=o.warmup_steps, schedule=o.schedule, min_lr_ratio=o.min_lr_ratio,
        max_grad_norm=o.max_grad_norm, seed=seed, num_threads=max(1, int(t.cpus_per_worker)),
        gradient_checkpointing=t.gradient_checkpointing, trust_remote_code=t.trust_remote_code, model_kind=model_kind,
        lora=t.lora.model_dump() if t.lora is not None else None,
        tokens_per_microbatch=t.tokens_per_microbatch,
    )
    group = ctx.roles.spawn(role, PolicyTrainer, spec)
    ctx.roles.supervisor.set_up_with(group, join_ranks)  # after a lost rank: every rank anew, in a new process group
    info = join_ranks(group)
    if ctx.log.tracker is not None:
        ctx.log.tracker.log_params({f"{role}.params": info["params"],
                                    f"{role}.trainable_params": info["trainable_params"]})
    return group


def spawn_reference(ctx: StageContext, rc: ReferenceConfig, ref_path: str, trainer: TrainerConfig) -> ActorGroup:
    """The reference group of a stage (not set up yet): fp32 on CPU, the trainer's precision on GPU."""
    return ctx.roles.spawn("reference", ReferenceModel, ref_path,
                           precision="fp32" if not rc.gpus_per_worker else trainer.precision,
                           num_threads=max(1, int(rc.cpus_per_worker)), trust_remote_code=trainer.trust_remote_code,
                           tokens_per_chunk=trainer.tokens_per_microbatch)


def spawn_reward(ctx: StageContext, rw: RewardGroupConfig, rewards: tuple[RewardSpec, ...], *,
                 trust_remote_code: bool) -> ActorGroup:
    """The reward group (not set up yet) scoring ``rewards``, each (name, function, model path,
    normalize): a ``RewardSet``, fp32 on CPU."""
    return ctx.roles.spawn("reward", RewardSet, rewards, precision="fp32" if not rw.gpus_per_worker else "auto",
                           num_threads=max(1, int(rw.cpus_per_worker)), trust_remote_code=trust_remote_code)


def join_ranks(group: ActorGroup) -> dict[str, Any]:
    """Load the model on every rank and join the ranks into one process group at rank 0's address;
    returns rank 0's setup report (device, dtype, parameter counts)."""
    addr, port = group.rank0(PolicyTrainer.open_rendezvous)
    return group.setup(PolicyTrainer.setup, addr, port)[0]


def train_one_step(trainer: ActorGroup, batch: TensorBatch, loss_fn: Any, *, stage: str, unit: str) -> dict[str, float]:
    """One optimizer step of the whole group; metrics are averaged over ranks."""
    return train_together([(trainer, batch, loss_fn)], stage=stage, unit=unit)[0]


def mean_over_steps(steps: Iterable[dict[str, float]], n: int) -> dict[str, float]:
    """Each metric's mean over the ``n`` optimizer steps of a phase (summed as value / n, in step
    order), without the steps' own ``timing/update_s`` (the phase's timer covers them all)."""
    totals: dict[str, float] = {}
    for step in steps:
        for name, value in step.items():
            totals[name] = totals.get(name, 0.0) + value / n
    return {name: value for name, value in totals.items() if not name.endswith("timing/update_s")}


@dataclass
class StepsInFlight:
    """Optimizer steps submitted to their groups and not collected yet (``submit_steps``)."""

    steps: list[tuple[ActorGroup, TensorBatch, Any]]
    pending: list[Pending]
    submitted: float  # perf_counter at submission


def submit_steps(steps: list[tuple[ActorGroup, TensorBatch, Any]]) -> StepsInFlight:
    """Send one optimizer step of each (group, global batch, loss) without waiting for it."""
    submitted = time.perf_counter()
    return StepsInFlight(steps, [group.shard_async(PolicyTrainer.train_step, batch.split(group.num_workers), loss_fn)
                                 for group, batch, loss_fn in steps], submitted)


def train_together(steps: list[tuple[ActorGroup, TensorBatch, Any]], *, stage: str, unit: str
                   ) -> list[dict[str, float]]:
    """One optimizer step of each (group, global batch, loss) at the same time (the policy and its
    critic step concurrently); per group, metrics averaged over its ranks."""
    return collect_steps(submit_steps(steps), stage=stage, unit=unit)


def collect_steps(flight: StepsInFlight, *, stage: str, unit: str, since: float = 0.0) -> list[dict[str, float]]:
    """Wait for submitted steps; per group, metrics averaged over its ranks. The step's time
    (``timing/update_s``, the throughputs) runs from its submission, or from ``since`` when that is
    later (the previous step's result: a step sent ahead waits behind it in the actor)."""
    try:
        results = [p.get() for p in flight.pending]
    except FloatingPointError as exc:  # Ray re-raises a rank's error as a subclass of its type
        raise TrainingError(f"{stage}: training diverged: {str(exc).splitlines()[-1]}") from None
    elapsed = time.perf_counter() - max(flight.submitted, since)
    out = []
    for (_, batch, _), per_rank in zip(flight.steps, results, strict=True):
        peaks = ("peak_rss_mib", "peak_gpu_mib")
        metrics = resolve_ratios({k: sum(r[k] for r in per_rank) / len(per_rank) for k in per_rank[0]
                                  if k not in ("num_tokens", "compute_s", *peaks)})
        metrics[f"throughput/{unit}_per_s"] = len(batch) / elapsed
        metrics["throughput/tokens_per_s"] = sum(r["num_tokens"] for r in per_rank) / elapsed
        metrics["timing/update_s"] = elapsed
        # Time inside the slowest rank's train_step; update_s minus this is collation + Ray dispatch.
        metrics["timing/trainer_compute_s"] = max(r["compute_s"] for r in per_rank)
        # The largest trainer process so far (weights, gradients, optimizer state, activations, syncs).
        metrics.update({f"memory/trainer_{k}": max(r[k] for r in per_rank) for k in peaks if k in per_rank[0]})
        out.append(metrics)
    return out


def resolve_ratios(metrics: dict[str, float]) -> dict[str, float]:
    """``metrics`` with each ``name@num`` / ``name@den`` pair (``losses.ratio_metrics``, averaged over
    micro-batches and ranks) replaced by ``name`` = num / den, left out where den is 0 (no such row)."""
    out = {k: v for k, v in metrics.items() if not k.endswith(("@num", "@den"))}
    for key, num in metrics.items():
        if key.endswith("@num") and metrics.get(den := key[:-4] + "@den"):
            out[key[:-4]] = num / metrics[den]
    return out


def train_loop(ctx: StageContext, trainer: ActorGroup, *, steps: int, eval_every: int, unit: str,
               batches_per_epoch: int, make_batch: Callable[[int], TensorBatch], loss_fn: Any,
               evaluate: Callable[[], dict[str, float]] | None = None,
               start_metrics: dict[str, float] | None = None) -> None:
    """``steps`` optimizer steps; evaluation at step 0, every ``eval_every`` steps and at the end; an
    in-stage checkpoint every ``ctx.checkpoints.every`` steps, from which a resumed stage continues.

    The next step is built and sent while the trainer runs the current one (the driver's batch
    building, Ray dispatch and metric logging hide behind the step), except after a step that is
    evaluated or checkpointed: those see exactly the weights of their step.

    Args:
        make_batch: the global batch of 0-based step ``i``.
        evaluate: held-out metrics (names start with ``eval/``), or None for no evaluation.
        start_metrics: logged at step 0 of a fresh start (e.g. statistics of the training data).
    """
    restored = ctx.checkpoints.restore([trainer])  # the data position is the step: batches are a function of it
    step = restored[0] if restored else 0
    ctx.log.progress(step, steps, {})
    if restored is None and (evaluate is not None or start_metrics):
        ctx.log.metrics({**(start_metrics or {}), **(evaluate() if evaluate is not None else {})}, step=0)

    def evaluated(n: int) -> bool:
        return evaluate is not None and (n == steps or bool(eval_every and n % eval_every == 0))

    def send(n: int) -> StepsInFlight:
        return submit_steps([(trainer, make_batch(n - 1), loss_fn)])

    ahead: StepsInFlight | None = None
    last_result = 0.0
    while step < steps:
        n = step + 1
        try:
            with faults.at(step=n, phase="update"):
                flight = ahead or send(n)
                ahead = send(n + 1) if n < steps and not evaluated(n) and not ctx.checkpoints.due(n, steps) else None
                metrics = collect_steps(flight, stage=ctx.name, unit=unit, since=last_result)[0]
            last_result = time.perf_counter()
            if evaluated(n):
                with faults.at(step=n):
                    metrics.update(evaluate())
        except faults.RankLost as lost:  # roll back to the last checkpoint and take the steps again
            ahead = None  # sent to the lost group
            step, _ = ctx.checkpoints.rollback(lost, [trainer])
            continue
        step = n
        metrics["epoch"] = step / batches_per_epoch
        ctx.log.metrics(metrics, step=step)
        ctx.log.progress(step, steps, metrics)
        if ctx.checkpoints.due(step, steps):
            ctx.checkpoints.save(step, [trainer], {})
    check_ranks_in_sync(trainer, ctx)


def check_ranks_in_sync(trainer: ActorGroup, ctx: StageContext) -> None:
    """Data-parallel ranks must hold identical weights; record each rank's digest and fail if not."""
    digests = trainer.broadcast(PolicyTrainer.weights_digest)
    (ctx.stage_dir / "rank_digests.json").write_text(json.dumps(digests, indent=1))
    if len(set(digests)) != 1:
        raise TrainingError(f"data-parallel ranks diverged: weight digests {digests}")


def policy_inputs(cfg: PolicyStage, ctx: StageContext) -> tuple[str, str, Any, int]:
    """(policy path, reference path (default: the policy), tokenizer, pad id) of a policy stage."""
    policy_path = ctx.input("policy")
    tokenizer = load_tokenizer(policy_path, trust_remote_code=cfg.trainer.trust_remote_code)
    return policy_path, ctx.input("reference") or policy_path, tokenizer, pad_token_id(tokenizer)


# extra(prompts, generations) -> (columns, metrics) of the held-out generations (``score_generations``)
Extra = Callable[[list[str], list[str]], tuple[dict[str, list[float]], dict[str, float]]]


def generate_responses(trainer: ActorGroup, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy responses of the current policy, prompts split across the trainer ranks."""
    shards, _ = sharded_rows(prompts, trainer.num_workers)
    results = trainer.shard(PolicyTrainer.generate, shards, max_new_tokens)
    return [row for shard in results for row in shard][: len(prompts)]


def score_generations(gen: GenerationEvalConfig, ctx: StageContext, trainer: ActorGroup, held_out: list[Any],
                      tokenizer: Any, extra: Extra | None = None) -> dict[str, float]:
    """Greedy-decode every held-out prompt (items with ``prompt_ids``, ``prompt_text`` and
    ``reference``, as ``SFTExample``) up to ``gen.max_new_tokens``, scored by ``gen.checker`` or
    against the reference; write them to ``eval_generations.parquet``. ``extra(prompts,
    generations)`` adds (columns, metrics), e.g. the auxiliary rewards of the generations."""
    generated = generate_responses(trainer, [e.prompt_ids for e in held_out], gen.max_new_tokens)
    texts = tokenizer.batch_decode(generated, skip_special_tokens=True)
    prompts = [e.prompt_text for e in held_out]
    if gen.checker is not None:
        scores = FunctionReward(gen.checker).score(prompts, texts)
    else:
        scores = [float(t.strip() == e.reference.strip()) for t, e in zip(texts, held_out, strict=True)]
    correct = [s >= 1.0 for s in scores]
    columns, metrics = extra(prompts, texts) if extra is not None else ({}, {})
    table = pa.table({"prompt": prompts, "reference": [e.reference for e in held_out], "generated": texts,
                      "score": scores, "correct": correct, **columns})
    pq.write_table(table, ctx.stage_dir / "eval_generations.parquet")
    return metrics | {
        "eval/exact_match": exact_match(scores),
        "eval/score_mean": sum(scores) / len(scores),
        "eval/response_length_mean": sum(len(g) for g in generated) / len(generated),
    }
