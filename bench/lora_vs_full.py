"""LoRA against full fine-tuning on the same offline-DPO and PPO runs, side by side.

One ``synthetic_task`` builds a model (``--size``, default 85m) and the arithmetic data; with
``--sft-steps N`` an SFT stage (every weight) first teaches it the task, so that the arms start
from a model that knows something and their final metrics mean something. Each arm then runs the
same stage from that model, with the same data, schedule and seed. The only
difference is ``trainer.lora``: none (every weight trains) or ``{rank, alpha}`` over every linear
layer. The arms:

  offline_dpo   ``--dpo-steps`` steps of ``--pairs`` pairs; final held-out eval/rewards/accuracies
  ppo           ``--ppo-iterations`` iterations with a critic (which trains every weight in both
                arms) on ``--reward`` (default: the answer is right); objective/scores (mean over
                the iteration's samples), eval/reward_mean (greedy answers to held-out prompts)
                and the LoRA weight-sync parity

With LoRA the trainer with its adapters disabled is the reference (no reference group), as a LoRA
stage runs by default.

Measured per arm:
- trainable / total parameters (the trainer's logged params);
- the peak RSS of the policy-trainer process (``memory/trainer_peak_rss_mib``, which the trainer
  logs at each step; DeepSpeed ZeRO-2 on CPU: weights, gradients and Adam moments live there; the
  critic's is logged apart);
- the median optimizer-step time inside the trainer (``timing/trainer_compute_s``);
- the metric at the start and at the end (start: step 0 of offline DPO's held-out evaluation, the
  first iteration's samples in PPO; end: the last).

Ratios LoRA / full come from one run of this script on one machine.

    .venv/bin/python bench/lora_vs_full.py --size 85m --sft-steps 300 --dpo-steps 40 --ppo-iterations 8 \
        --out bench/out/lora.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import write_result  # noqa: E402


def stage(kind: str, args: argparse.Namespace, lora: dict | None) -> dict:
    trainer = {"cpus_per_worker": 1 if kind == "offline_dpo" else 0.5, "lora": lora}
    if kind == "offline_dpo":
        return {"name": "arm", "kind": "offline_dpo", "policy": {"from": "task"},
                "data": {"train": {"from": "task", "output": "pairs_train"},
                         "eval": {"from": "task", "output": "pairs_eval"}, "eval_pairs": 64},
                "schedule": {"steps": args.dpo_steps, "pairs_per_step": args.pairs,
                             "pairs_per_microbatch": args.pairs},
                "optim": {"lr": 5.0e-5 if lora is None else 5.0e-4}, "generation": {"enabled": False},
                "checkpoint": {"every": 0}, "trainer": trainer, "reference_group": {"cpus_per_worker": 1}}
    return {"name": "arm", "kind": "ppo", "policy": {"from": "task"},
            "reward": {"function": args.reward},
            "data": {"train": {"from": "task", "output": "prompts_train"}, "max_prompt_length": 16},
            "sampling": {"samples_per_prompt": 4, "max_new_tokens": 8},
            "schedule": {"iterations": args.ppo_iterations, "prompts_per_iteration": 16, "ppo_epochs": 1,
                         "minibatches_per_epoch": 1, "samples_per_microbatch": 16},
            "optim": {"lr": 1.0e-5 if lora is None else 1.0e-4}, "critic": {"init": "policy"},
            "eval": {"table_rows": 0}, "checkpoint": {"every": 0}, "trainer": trainer,
            "critic_group": {"cpus_per_worker": 0.25}, "reference_group": {"cpus_per_worker": 0.25},
            "reward_group": {"cpus_per_worker": 0.25},
            "rollout": {"cpus_per_worker": 0.75, "max_model_len": 64, "kv_cache_gib": 1}}


def step_key(metrics: dict) -> str:
    """The trainer's own time per optimizer step where the stage logs it, else the driver's."""
    return next(k for k in ("timing/trainer_compute_s", "timing/update_s") if k in metrics)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="85m", choices=["tiny", "mini", "small", "85m"])
    parser.add_argument("--dpo-steps", type=int, default=20)
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--ppo-iterations", type=int, default=3)
    parser.add_argument("--sft-steps", type=int, default=0, help="SFT steps before the arms (0: start from the "
                        "random model)")
    parser.add_argument("--max-operand", type=int, default=19)
    parser.add_argument("--reward", default="pipelines.tasks.arithmetic:reward")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--kinds", nargs="+", default=["offline_dpo", "ppo"], choices=["offline_dpo", "ppo"])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import ray
    from mlflow.tracking import MlflowClient

    from orchestrator.config import validate_pipeline
    from orchestrator.runner import run_pipeline

    work = Path(tempfile.mkdtemp(prefix="lora_vs_full_"))
    uri = f"sqlite:///{work}/mlflow.db"
    task = {"name": "task", "kind": "synthetic_task", "model_size": args.size, "max_operand": args.max_operand,
            "num_sft": 4000, "num_pairs": 2048, "num_prompts": 256, "num_eval": 64}
    stages = [task]
    if args.sft_steps:
        stages.append({"name": "sft", "kind": "sft", "policy": {"from": "task"},
                       "data": {"train": {"from": "task", "output": "sft_train"},
                                "eval": {"from": "task", "output": "sft_eval"}},
                       "generation": {"max_new_tokens": 6, "checker": "pipelines.tasks.arithmetic:reward"},
                       "optim": {"lr": 3.0e-4, "warmup_steps": 20},
                       "schedule": {"steps": args.sft_steps, "sequences_per_step": 32, "sequences_per_microbatch": 32},
                       "checkpoint": {"every": 0}, "trainer": {"cpus_per_worker": 2}})
    base = {"run_dir": str(work / "runs"), "tracking": {"uri": uri, "log_checkpoints": False}}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    made = run_pipeline(validate_pipeline({**base, "name": "start", "stages": stages}), quiet=True)
    model = made.stages[0].outputs | {"model": made.stages[-1].outputs["model"]}
    report: dict = {"size": args.size, "rank": args.rank, "sft_steps": args.sft_steps, "arms": {}}
    if args.sft_steps:
        report["sft"] = {k: made.stages[-1].first_last(k) for k in ("eval/loss", "eval/exact_match")}
        print(f"sft: {json.dumps(report['sft'])}", flush=True)
    lora = {"rank": args.rank, "alpha": 2.0 * args.rank}
    final = {"offline_dpo": ("eval/rewards/accuracies", "eval/loss"), "ppo": ("objective/scores", "eval/reward_mean")}
    for kind in args.kinds:
        for arm, adapters in (("full", None), ("lora", lora)):
            arm_stage = stage(kind, args, adapters)
            arm_stage["policy"] = model["model"]
            arm_stage["data"]["train"] = model["pairs_train" if kind == "offline_dpo" else "prompts_train"]
            arm_stage["data"]["eval"] = model["pairs_eval" if kind == "offline_dpo" else "prompts_eval"]
            start = time.perf_counter()
            result = run_pipeline(validate_pipeline({**base, "name": f"{kind}_{arm}", "stages": [arm_stage]}),
                                  quiet=True)
            wall = time.perf_counter() - start
            run = result.stages[0]
            params = MlflowClient(uri).get_run(run.run_id).data.params
            metrics = run.metrics
            row = {"params": int(params["policy_trainer.params"]),
                   "trainable_params": int(params["policy_trainer.trainable_params"]),
                   "trainer_peak_rss_mib": max(v for _, v in metrics["memory/trainer_peak_rss_mib"]),
                   "step_s_median": statistics.median(v for _, v in metrics[step_key(metrics)]),
                   "final": {name: run.first_last(name) for name in final[kind]}, "wall_s": wall}
            if "sync/logprob_max_abs_diff" in metrics:
                row["sync_parity_max"] = max(v for _, v in metrics["sync/logprob_max_abs_diff"])
            report["arms"][f"{kind} {arm}"] = row
            print(f"{kind} {arm}: {json.dumps(row)}", flush=True)
    ray.shutdown()
    write_result(args.out, report)
    print("| run | trainable / total | trainer peak RSS MiB | step s (median) | final | parity |")
    print("|---|---|---|---|---|---|")
    for name, r in report["arms"].items():
        print(f"| {name} | {r['trainable_params']:,} / {r['params']:,} | {r['trainer_peak_rss_mib']:.0f} | "
              f"{r['step_s_median']:.3f} | {json.dumps(r['final'])} | {r.get('sync_parity_max', '')} |")


if __name__ == "__main__":
    main()
