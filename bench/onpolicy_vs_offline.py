"""Offline DPO vs on-policy DPO (max_min) vs on-policy DPO (rso), at equal preference pairs and
equal optimizer steps, from one SFT checkpoint, over seeds.

Setup: ``pipelines/onpolicy_dpo.yaml``'s task and SFT stages run once (seed 0); every arm starts
from that SFT checkpoint with the same DPO β, optimizer and ``iterations × updates_per_iteration``
optimizer steps of ``pairs_per_update`` pairs:

  offline      ``offline_dpo`` on the task's fixed pair dataset (correct answer vs a wrong one)
  max_min      ``onpolicy_dpo``, best vs worst of K samples of the current policy
  rso          ``onpolicy_dpo``, statistical rejection sampling (k accepted, consecutive pairs)

Every arm is scored the same way afterwards: greedy decoding of the held-out prompts with
transformers, checked by the task checker (exact match). All runs land in one MLflow experiment.

    .venv/bin/python bench/onpolicy_vs_offline.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import exact_match  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--iterations", type=int, default=None, help="default: the shipped YAML's")
    parser.add_argument("--out", default="bench/out/onpolicy_vs_offline.json")
    parser.add_argument("--runs", default="runs/bench_onpolicy")
    args = parser.parse_args()

    from orchestrator.config import validate_pipeline
    from orchestrator.runner import run_pipeline

    raw = yaml.safe_load((ROOT / "pipelines" / "onpolicy_dpo.yaml").read_text())
    raw["run_dir"] = args.runs
    raw["tracking"] = {"experiment": "onpolicy_vs_offline", "log_checkpoints": False}
    online = raw["stages"][2]
    if args.iterations:
        online["schedule"]["iterations"] = args.iterations
    sched = online["schedule"]
    base = run_pipeline(validate_pipeline({**raw, "name": "bench_sft", "stages": raw["stages"][:2]}), quiet=True)
    task, sft = base.stages[0].outputs, base.stages[1].outputs["model"]
    new_tokens = online["sampling"]["max_new_tokens"]
    results: dict[str, object] = {"sft_exact_match": exact_match(sft, task["prompts_eval"], new_tokens),
                                  "steps": sched["iterations"] * sched["updates_per_iteration"],
                                  "pairs_per_step": sched["pairs_per_update"], "arms": {}}

    def arm_stage(arm: str, seed: int) -> dict:
        if arm == "offline":
            return {"name": "dpo", "kind": "offline_dpo", "policy": sft,
                    "data": {"train": task["pairs_train"], "eval": task["pairs_eval"], "max_length": 32},
                    "dpo": online["dpo"], "optim": online["optim"],
                    "schedule": {"steps": results["steps"], "pairs_per_step": sched["pairs_per_update"],
                                 "pairs_per_microbatch": sched["pairs_per_microbatch"], "seed": seed},
                    "trainer": {**online["trainer"], "cpus_per_worker": 2}, "reference_group": {"cpus_per_worker": 1}}
        stage = copy.deepcopy(online)
        stage.update(name="dpo", policy=sft, data={**stage["data"], "train": task["prompts_train"],
                                                   "eval": task["prompts_eval"]})
        stage["schedule"]["seed"] = seed
        stage["schedule"]["eval_every"] = 0
        stage["selection"]["method"] = arm
        return stage

    for arm in ("offline", "max_min", "rso"):
        rows = []
        for seed in args.seeds:
            start = time.perf_counter()
            result = run_pipeline(validate_pipeline({**raw, "name": f"bench_{arm}", "seed": seed,
                                                     "stages": [arm_stage(arm, seed)]}), quiet=True)
            em = exact_match(result.stages[0].outputs["model"], task["prompts_eval"], new_tokens)
            rows.append({"seed": seed, "exact_match": em, "seconds": time.perf_counter() - start,
                         "mlflow_run_id": result.stages[0].run_id})
            print(f"{arm} seed {seed}: exact match {em:.3f}", flush=True)
        values = [r["exact_match"] for r in rows]
        results["arms"][arm] = {"runs": rows, "mean": statistics.mean(values),
                                "std": statistics.stdev(values) if len(values) > 1 else 0.0}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
