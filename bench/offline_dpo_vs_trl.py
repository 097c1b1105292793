"""Offline-DPO training throughput: rayrlhf's offline_dpo stage vs TRL's DPOTrainer, side by side.

Same locally built model, same Parquet pairs, same global batch (pairs per step), same number of
optimizer steps, fp32 on CPU, same lr/β/loss. Both sides precompute reference log-probs before
training and exclude that from the timed part:
  ours: sum of the stage's per-step `timing/update_s` (driver-side wall time of each step,
        including Ray dispatch, collation and the DeepSpeed step), steps after --warmup;
  TRL:  wall time of the training steps after --warmup (a TrainerCallback timestamps each step),
        with `precompute_ref_log_probs=True`.
Needs TRL: `.venv/bin/pip install -e '.[bench]'` (trl==1.16.0).

    .venv/bin/python bench/offline_dpo_vs_trl.py --steps 100
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run_ours(model_dir: Path, pairs: Path, work: Path, args: argparse.Namespace) -> float:
    from orchestrator.config import validate_pipeline
    from orchestrator.runner import run_pipeline

    raw = {
        "name": "bench_offline_dpo", "run_dir": str(work / "runs"),
        "tracking": {"uri": f"sqlite:///{work}/mlflow.db", "log_checkpoints": False, "system_metrics": False},
        "ray": {"num_cpus": 2},
        "stages": [{
            "name": "dpo", "kind": "offline_dpo", "policy": str(model_dir), "data": {"train": str(pairs)},
            "dpo": {"beta": 0.1, "loss_type": "sigmoid"},
            "optim": {"lr": 1e-4, "schedule": "constant", "max_grad_norm": 1.0},
            "schedule": {"steps": args.steps, "pairs_per_step": args.pairs_per_step,
                         "pairs_per_microbatch": args.pairs_per_step},
            "trainer": {"num_workers": 1, "cpus_per_worker": 2, "zero_stage": 2},
        }],
    }
    result = run_pipeline(validate_pipeline(raw), quiet=True)
    times = [v for step, v in result.stages[0].metrics["timing/update_s"] if step > args.warmup]
    return len(times) * args.pairs_per_step / sum(times)


def run_trl(model_dir: Path, pairs: Path, work: Path, args: argparse.Namespace) -> float:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer
    import pyarrow.parquet as pq

    torch.set_num_threads(2)
    stamps: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_end(self, *_a, **_k):
            stamps.append(time.perf_counter())

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = Dataset.from_dict(pq.read_table(pairs).to_pydict())
    config = DPOConfig(
        output_dir=str(work / "trl"), per_device_train_batch_size=args.pairs_per_step, gradient_accumulation_steps=1,
        max_steps=args.steps, learning_rate=1e-4, lr_scheduler_type="constant", beta=0.1, loss_type="sigmoid",
        max_length=64, precompute_ref_log_probs=True, report_to="none", save_strategy="no", logging_steps=10**9,
        use_cpu=True, bf16=False, fp16=False, dataloader_num_workers=0, seed=0, max_grad_norm=1.0,
    )
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir),
                         ref_model=AutoModelForCausalLM.from_pretrained(model_dir),
                         args=config, train_dataset=data, processing_class=tokenizer, callbacks=[StepTimer()])
    trainer.train()
    timed = stamps[args.warmup:]
    return (len(timed) - 1) * args.pairs_per_step / (timed[-1] - timed[0])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="tiny", choices=["tiny", "small", "85m"])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=5, help="steps excluded from timing on both sides")
    parser.add_argument("--pairs-per-step", type=int, default=32)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    try:
        import trl
    except ImportError:
        print("TRL is not installed: .venv/bin/pip install -e '.[bench]'  (trl==1.16.0)", file=sys.stderr)
        return 2
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from pipelines.tasks.arithmetic import write_datasets
    from pipelines.tasks.tiny_model import build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = build_tiny_model(work / "model", size=args.size)
        pairs = write_datasets(work / "data", max_operand=49, num_sft=1, num_pairs=4000, num_prompts=1, num_eval=1,
                               eval_fraction=0.1, seed=0)["pairs_train"]
        ours = run_ours(model_dir, pairs, work, args)
        theirs = run_trl(model_dir, pairs, work, args)
    result = {"size": args.size, "steps": args.steps, "warmup": args.warmup, "pairs_per_step": args.pairs_per_step,
              "trl_version": trl.__version__, "rayrlhf_pairs_per_s": round(ours, 1),
              "trl_pairs_per_s": round(theirs, 1), "ratio_rayrlhf_over_trl": round(ours / theirs, 3)}
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
