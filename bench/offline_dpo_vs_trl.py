"""Offline-DPO training throughput (pairs/s): rayrlhf's ``offline_dpo`` stage vs TRL's ``DPOTrainer``.

Both sides get the same locally built model, the same Parquet pairs (exactly ``steps x pairs_per_step``
of them: one epoch, every pair seen once), the same global batch and micro-batch, the same number of
optimizer steps, fp32 on CPU with the same thread count, AdamW (torch.optim.AdamW on both sides) with
the same constant lr, clip 1.0, sigmoid DPO loss with the same beta, no gradient checkpointing, no eval,
no checkpoints. Reference log-probs are precomputed before training on both sides (ours: the trainer
group before its first step; TRL: ``precompute_ref_log_probs=True``, done inside ``DPOTrainer.__init__``) and not timed.

Each side runs in its own fresh subprocess (ours: the driver + Ray actors; TRL: one process), one after
the other, so neither competes with the other's leftovers. The first ``--warmup`` steps are not timed.
Two timings per side, over the same steps:

  update  ours: sum of the stage's ``timing/update_s`` (driver wall time of a step, from its submission,
              or from the previous step's result when it was sent ahead, to its result: collation, Ray
              dispatch, the DeepSpeed forward/backward/step, the result coming back). One fp32 trainer
              rank runs ZeRO stage 0 (nothing to partition; ``effective_zero_stage``).
          TRL:  sum over steps of on_step_begin -> on_step_end (forward/backward/clip/optimizer; the
              batch was already fetched and collated, which favours TRL slightly).
  loop    wall time from the end of the last warm-up step to the end of the last step, i.e. all the
              per-step costs of the training loop: ours adds batch building and MLflow metric logging
              (the driver's wall clock when each step's result is back); TRL adds data loading.

The headline ratio is update-based (ours / TRL; > 1 means rayrlhf is faster).

    .venv/bin/python bench/offline_dpo_vs_trl.py --steps 100
    .venv/bin/python bench/offline_dpo_vs_trl.py --steps 10              # smoke run

Needs TRL 1.16.0 (``.venv/bin/pip install -e '.[bench]'``; it only adds packages), or a separate
interpreter that has it, given with ``--trl-python``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import write_result  # noqa: E402

TRL_VERSION = "1.16.0"
INSTALL_HINT = (
    f"TRL {TRL_VERSION} is needed for this benchmark and is not importable by {{python}}.\n"
    f"Install it (it only adds trl, accelerate, datasets and their small deps to the venv):\n"
    f"    {ROOT}/.venv/bin/pip install -e '{ROOT}[bench]'      # or: pip install trl=={TRL_VERSION}\n"
    f"or point --trl-python at an interpreter that has it."
)


# --------------------------------------------------------------------------- our side (subprocess)
def side_ours(spec: dict) -> dict:
    """Run the offline_dpo stage on the given model and pairs; return its timings."""
    sys.path.insert(0, str(ROOT))
    work = Path(spec["work"]) / "ours"
    uri = f"sqlite:///{work}/mlflow.db"
    work.mkdir(parents=True, exist_ok=True)
    os.environ["MLFLOW_TRACKING_URI"] = uri  # the env var wins over tracking.uri: pin it to the temp store
    import ray

    from orchestrator.config import validate_pipeline
    from orchestrator.runner import run_pipeline

    step_ends = time_steps()
    startup = time_startup()

    threads = spec["threads"]
    raw = {
        "name": "bench_offline_dpo", "seed": 0, "run_dir": str(work / "runs"),
        "tracking": {"uri": uri, "log_checkpoints": False, "system_metrics": False},
        "ray": {"num_cpus": threads},
        "stages": [{
            "name": "offline_dpo", "kind": "offline_dpo", "policy": spec["model_dir"],
            "data": {"train": spec["pairs"], "max_length": spec["max_length"]},
            "dpo": {"beta": spec["beta"], "loss_type": "sigmoid"},
            "optim": {"lr": spec["lr"], "schedule": "constant", "warmup_steps": 0, "weight_decay": 0.0,
                      "max_grad_norm": 1.0},
            "schedule": {"steps": spec["steps"], "pairs_per_step": spec["pairs_per_step"],
                         "pairs_per_microbatch": spec["pairs_per_microbatch"], "eval_every": 0, "seed": 0},
            "trainer": {"num_workers": 1, "cpus_per_worker": threads, "zero_stage": 2, "precision": "fp32",
                        "gradient_checkpointing": False},
            "reference_group": {"num_workers": 1, "cpus_per_worker": threads},
        }],
    }
    start = time.perf_counter()
    result = run_pipeline(validate_pipeline(raw), quiet=True)
    total_s = time.perf_counter() - start
    ray.shutdown()
    startup["first_step_s"] = step_ends[1] - start - sum(startup.values())  # the rest: imports, MLflow, step 1
    startup["after_last_step_s"] = total_s - (step_ends[spec["steps"]] - start)  # save, rank check, shutdown
    stage = result.stages[0]
    warmup = spec["warmup"]
    update = [v for step, v in stage.metrics["timing/update_s"] if step > warmup]
    compute = [v for step, v in stage.metrics["timing/trainer_compute_s"] if step > warmup]
    losses = [v for _, v in stage.metrics["loss"]]
    return {"timed_steps": len(update), "update_s": sum(update), "trainer_compute_s": sum(compute),
            "loop_s": step_ends[spec["steps"]] - step_ends[warmup], "total_s": total_s,
            "mean_loss": statistics.fmean(losses), "startup": startup}


def time_steps() -> dict[int, float]:
    """Step (or iteration) → the driver's wall clock when its result was back, filled in as the stage
    runs. The driver reports each step's progress right after its result: these reports time the loop
    (MLflow's metric timestamps do not: metrics are logged asynchronously)."""
    from orchestrator.runtime.stage_log import StageLog

    ends: dict[int, float] = {}
    report = StageLog.progress

    def timed_report(self, step: int, total: int, metrics: dict[str, float]) -> None:
        ends[step] = time.perf_counter()
        report(self, step, total, metrics)

    StageLog.progress = timed_report
    return ends


def time_startup() -> dict[str, float]:
    """Time the fixed costs before the first step: Ray start, the pair store, the trainer group's
    spawn and setup, the reference pass (seconds, filled in as they run)."""
    import ray

    import pipelines.stages.offline_dpo as stage
    import pipelines.stages.preference as family

    spent: dict[str, float] = {}

    def timed(owner: object, name: str, label: str) -> None:
        inner = getattr(owner, name)

        def wrapper(*args, **kwargs):
            begin = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                spent[label] = spent.get(label, 0.0) + time.perf_counter() - begin

        setattr(owner, name, wrapper)

    timed(ray, "init", "ray_start_s")
    timed(stage, "write_pair_store", "tokenize_s")
    timed(family, "spawn_trainer", "trainer_spawn_s")
    timed(family, "reference_logps", "reference_pass_s")
    return spent


# --------------------------------------------------------------------------- TRL side (subprocess)
def side_trl(spec: dict) -> dict:
    """Train with trl.DPOTrainer on the same model and pairs; return its timings."""
    work = Path(spec["work"]) / "trl"
    os.environ.update(HF_DATASETS_CACHE=str(work / "hf_datasets"), HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    import pyarrow.parquet as pq
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(spec["threads"])
    begins: list[float] = []
    ends: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            begins.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

    pps, ppm = spec["pairs_per_step"], spec["pairs_per_microbatch"]
    config = DPOConfig(
        output_dir=str(work / "out"), max_steps=spec["steps"],
        per_device_train_batch_size=ppm, gradient_accumulation_steps=pps // ppm,
        learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        optim="adamw_torch",  # torch.optim.AdamW, as ours (TRL's default on torch>=2.8 is the fused variant)
        max_grad_norm=1.0, beta=spec["beta"], loss_type=["sigmoid"], max_length=spec["max_length"],
        precompute_ref_log_probs=spec["trl_precompute"],
        gradient_checkpointing=False,  # DPOConfig defaults to True; ours trains without it
        use_cpu=True, bf16=False, fp16=False, seed=0, data_seed=0, dataloader_num_workers=0,
        eval_strategy="no", save_strategy="no", logging_strategy="no", report_to="none", disable_tqdm=True,
    )
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    data = Dataset.from_dict(pq.read_table(spec["pairs"]).to_pydict())
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
    start = time.perf_counter()
    trainer = DPOTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                         callbacks=[StepTimer()])
    init_s = time.perf_counter() - start
    out = trainer.train()
    total_s = time.perf_counter() - start
    warmup = spec["warmup"]
    if len(ends) != spec["steps"] or len(begins) != spec["steps"]:
        raise RuntimeError(f"TRL ran {len(ends)} steps, expected {spec['steps']}")
    return {"timed_steps": spec["steps"] - warmup,
            "update_s": sum(e - b for b, e in zip(begins[warmup:], ends[warmup:], strict=True)),
            "loop_s": ends[-1] - ends[warmup - 1], "total_s": total_s, "init_s": init_s,
            "mean_loss": out.training_loss, "trl_version": __import__("trl").__version__,
            "gradient_checkpointing": trainer.args.gradient_checkpointing, "optim": str(trainer.args.optim)}


# --------------------------------------------------------------------------- driver
def run_side(python: str, side: str, spec_path: Path, work: Path, script: Path | None = None) -> dict:
    """Run ``script`` (default: this one) as ``--worker side`` in a fresh process; its result JSON."""
    result_path = work / f"result_{side}.json"
    result_path.unlink(missing_ok=True)
    log_path = work / f"{side}.log"
    cmd = [python, str((script or Path(__file__)).resolve()), "--worker", side, "--spec", str(spec_path),
           "--result", str(result_path)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, check=False, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if proc.returncode != 0 or not result_path.exists():
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-40:])
        raise SystemExit(f"{side} side failed (exit {proc.returncode}); last lines of {log_path}:\n{tail}")
    # the side's whole process, interpreter start and imports to exit: what a user waits for
    return json.loads(result_path.read_text()) | {"process_s": time.perf_counter() - start}


def check_trl(python: str) -> str | None:
    code = "import trl; print(trl.__version__)"
    proc = subprocess.run([python, "-c", code], check=False, capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else None


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("torch", "transformers", "deepspeed", "ray", "mlflow")}


def prepare(work: Path, args: argparse.Namespace) -> tuple[Path, Path, int]:
    sys.path.insert(0, str(ROOT))
    from pipelines.tasks.arithmetic import write_datasets
    from pipelines.tasks.tiny_model import build_tiny_model

    model_dir = build_tiny_model(work / "model", size=args.size, seed=0)
    num_pairs = args.steps * args.pairs_per_step  # one epoch exactly: both sides see every pair once
    pairs = write_datasets(work / "data", max_operand=49, num_sft=1, num_pairs=num_pairs, num_prompts=1,
                           num_eval=1, eval_fraction=0.1, seed=0)["pairs_train"]
    from safetensors.torch import load_file

    params = sum(t.numel() for t in load_file(str(model_dir / "model.safetensors")).values())
    return model_dir, pairs, params


def summarize(args: argparse.Namespace, params: int, ours: list[dict], trl: list[dict], trl_version: str,
              load: float) -> dict:
    def rate(r: dict, key: str) -> float:
        return r["timed_steps"] * args.pairs_per_step / r[key]

    def med(rs: list[dict], key: str) -> float:
        return statistics.median(rate(r, key) for r in rs)

    out = {
        "settings": {
            "size": args.size, "params": params, "steps": args.steps, "warmup_steps": args.warmup,
            "timed_steps": args.steps - args.warmup, "pairs_per_step": args.pairs_per_step,
            "pairs_per_microbatch": args.pairs_per_microbatch, "lr": args.lr, "beta": args.beta,
            "loss": "sigmoid", "max_length": args.max_length, "threads": args.threads, "precision": "fp32",
            "device": "cpu", "repeats": args.repeats,
            "trl_ref_logps": ("live: a reference forward in each step" if args.trl_live_ref
                              else "precomputed, untimed"),
            "trl_version": trl_version, **versions(),
            "load_avg_1min_before": round(load, 2),
        },
        "rayrlhf_pairs_per_s": round(med(ours, "update_s"), 2),
        "trl_pairs_per_s": round(med(trl, "update_s"), 2),
        "rayrlhf_loop_pairs_per_s": round(med(ours, "loop_s"), 2),
        "trl_loop_pairs_per_s": round(med(trl, "loop_s"), 2),
        "runs": {"rayrlhf": ours, "trl": trl},
    }
    for r in (*ours, *trl):  # the fixed cost: the whole process less its steps at the timed steps' pace
        r["fixed_s"] = r["process_s"] - args.steps * r["loop_s"] / r["timed_steps"]
    out["rayrlhf_fixed_s"] = round(statistics.median(r["fixed_s"] for r in ours), 2)
    out["trl_fixed_s"] = round(statistics.median(r["fixed_s"] for r in trl), 2)
    out["fixed_ratio_rayrlhf_over_trl"] = round(out["rayrlhf_fixed_s"] / out["trl_fixed_s"], 3)
    out["ratio_rayrlhf_over_trl"] = round(out["rayrlhf_pairs_per_s"] / out["trl_pairs_per_s"], 3)
    out["loop_ratio_rayrlhf_over_trl"] = round(
        out["rayrlhf_loop_pairs_per_s"] / out["trl_loop_pairs_per_s"], 3)
    # Both samplers draw torch.randperm(N) from a generator seeded with 0 and the data is one epoch, so
    # the two sides train on the same batches in the same order: equal losses mean equal work.
    out["mean_loss_abs_diff"] = max(abs(o["mean_loss"] - t["mean_loss"]) for o in ours for t in trl)
    return out


def print_table(res: dict) -> None:
    s = res["settings"]
    print(f"\noffline DPO throughput, {s['size']} model ({s['params'] / 1e6:.2f}M params), "
          f"{s['steps']} steps ({s['warmup_steps']} warm-up, untimed), {s['pairs_per_step']} pairs/step, "
          f"{s['pairs_per_microbatch']} pairs/micro-batch, fp32 CPU, {s['threads']} threads, "
          f"TRL {s['trl_version']} (reference log-probs {s['trl_ref_logps']})")
    print(f"{'':10}{'rayrlhf':>12}{'TRL':>12}{'ours/TRL':>10}")
    print(f"{'update':10}{res['rayrlhf_pairs_per_s']:>12.1f}{res['trl_pairs_per_s']:>12.1f}"
          f"{res['ratio_rayrlhf_over_trl']:>10.3f}   pairs/s (headline)")
    print(f"{'loop':10}{res['rayrlhf_loop_pairs_per_s']:>12.1f}{res['trl_loop_pairs_per_s']:>12.1f}"
          f"{res['loop_ratio_rayrlhf_over_trl']:>10.3f}   pairs/s")
    o, t = res["runs"]["rayrlhf"][-1], res["runs"]["trl"][-1]
    print(f"{'total':10}{o['total_s']:>11.1f}s{t['total_s']:>11.1f}s{'':10}   end to end incl. start-up and "
          f"reference pass (last run)")
    print(f"{'fixed':10}{res['rayrlhf_fixed_s']:>11.1f}s{res['trl_fixed_s']:>11.1f}s"
          f"{res['fixed_ratio_rayrlhf_over_trl']:>10.3f}   the process (start, imports, set-up, exit) less its steps "
          f"(medians)")
    parts = ", ".join(f"{k.removesuffix('_s').replace('_', ' ')} {v:.1f}s" for k, v in o["startup"].items())
    print(f"{'':10}ours: {parts}")
    print(f"{'':10}TRL: DPOTrainer init (tokenize, reference pass) {t['init_s']:.1f}s")
    same = "same batches and math on both sides" if res["mean_loss_abs_diff"] < 1e-4 else "DIFFERENT!"
    print(f"{'mean loss':10}{o['mean_loss']:>12.5f}{t['mean_loss']:>12.5f}{'':10}   {same}")
    if s["load_avg_1min_before"] > 0.5:
        print(f"note: load average {s['load_avg_1min_before']} before the run ({os.cpu_count()} CPUs): other "
              f"jobs were running, so these numbers are noisy (multi-threaded torch on a busy machine slows "
              f"down many-fold). Prefer an idle machine, or --threads 1 --repeats 3.")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="tiny", choices=["tiny", "small", "85m"])
    p.add_argument("--steps", type=int, default=100, help="optimizer steps per side")
    p.add_argument("--warmup", type=int, default=5, help="first steps left out of the timing, both sides")
    p.add_argument("--pairs-per-step", type=int, default=32,
                   help="global batch (TRL: batch size x accumulation)")
    p.add_argument("--pairs-per-microbatch", type=int,
                   help="pairs per forward/backward; default: pairs-per-step")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--max-length", type=int, default=64, help="prompt + response tokens")
    p.add_argument("--threads", type=int, default=2, help="torch threads per side (ours: trainer actor CPUs)")
    p.add_argument("--repeats", type=int, default=1, help="alternate the two sides this many times; medians")
    p.add_argument("--trl-live-ref", action="store_true",
                   help="TRL without precompute_ref_log_probs (a reference forward inside every step)")
    p.add_argument("--trl-python", default=sys.executable, help="interpreter with TRL installed")
    p.add_argument("--work-dir", type=Path, help="keep model, data, logs here (default: a temp dir)")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    p.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.pairs_per_microbatch = args.pairs_per_microbatch or args.pairs_per_step
    if args.pairs_per_step % args.pairs_per_microbatch:
        p.error("--pairs-per-microbatch must divide --pairs-per-step")
    if not 1 <= args.warmup < args.steps:
        p.error("need 1 <= --warmup < --steps")
    return args


def main() -> int:
    args = parse_args()
    if args.worker:
        result = (side_ours if args.worker == "ours" else side_trl)(json.loads(args.spec.read_text()))
        args.result.write_text(json.dumps(result))
        return 0
    trl_version = check_trl(args.trl_python)
    if trl_version is None:
        print(INSTALL_HINT.format(python=args.trl_python), file=sys.stderr)
        return 2
    if trl_version != TRL_VERSION:
        print(f"warning: TRL {trl_version} found, this benchmark was written against {TRL_VERSION}",
              file=sys.stderr)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench_dpo_") as tmp:
        work = (args.work_dir or Path(tmp)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        model_dir, pairs, params = prepare(work, args)
        spec = {"work": str(work), "model_dir": str(model_dir), "pairs": str(pairs), "steps": args.steps,
                "warmup": args.warmup, "pairs_per_step": args.pairs_per_step,
                "pairs_per_microbatch": args.pairs_per_microbatch, "lr": args.lr, "beta": args.beta,
                "max_length": args.max_length, "threads": args.threads,
                "trl_precompute": not args.trl_live_ref}
        spec_path = work / "spec.json"
        spec_path.write_text(json.dumps(spec, indent=1))
        ours, trl = [], []
        for i in range(args.repeats):
            for side in (("ours", "trl") if i % 2 == 0 else ("trl", "ours")):
                print(f"[{time.strftime('%H:%M:%S')}] run {i + 1}/{args.repeats}: {side}", file=sys.stderr)
                python = sys.executable if side == "ours" else args.trl_python
                (ours if side == "ours" else trl).append(run_side(python, side, spec_path, work))
    res = summarize(args, params, ours, trl, trl_version, load_before)
    print(json.dumps(res, indent=1))
    print_table(res)
    write_result(args.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
