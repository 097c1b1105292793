"""Where a PPO step's time goes: the share of each phase (rollout, scoring, reference and policy
log-probs, critic values, advantages, update, weight sync) on the tiny and the ~85M model.

Both models start untrained (the task stage's fresh weights; no SFT), so both sample
``max_new_tokens`` tokens for nearly every response and do the same work per step; the critic is
on (``estimator: ppo``). The first iteration is warm-up and left out of the means.

    .venv/bin/python bench/ppo_phases.py                      # tiny and 85m
    .venv/bin/python bench/ppo_phases.py --sizes tiny --iterations 6
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("rollout", "score", "ref_logprobs", "policy_logprobs", "values", "advantages", "update", "sync_weights")


def pipeline(size: str, args: argparse.Namespace) -> dict:
    raw = yaml.safe_load((ROOT / "pipelines" / "ppo.yaml").read_text())
    task, ppo = raw["stages"][0], raw["stages"][2]
    task.update(model_size=size, num_sft=16, num_prompts=512, num_eval=16)
    ppo["policy"] = {"from": "task"}
    ppo["data"].pop("eval")
    ppo["sampling"]["max_new_tokens"] = args.max_new_tokens
    ppo["schedule"] = {"iterations": args.iterations, "prompts_per_iteration": args.prompts, "ppo_epochs": 1,
                       "minibatches_per_epoch": 1, "samples_per_microbatch": 16}
    ppo["rollout"]["max_model_len"] = 16 + args.max_new_tokens
    ppo["eval"]["table_rows"] = 0
    return {**raw, "name": f"bench_ppo_phases_{size}", "run_dir": args.runs, "stages": [task, ppo],
            "tracking": {"experiment": "ppo_phases", "log_checkpoints": False}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "85m"])
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=16, help="prompts per iteration (x 4 samples)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--runs", default="runs/bench_ppo_phases")
    parser.add_argument("--out", default="bench/out/ppo_phases.json")
    args = parser.parse_args()

    from orchestrator.config import validate_pipeline
    from orchestrator.runner import run_pipeline

    results = {}
    for size in args.sizes:
        stage = run_pipeline(validate_pipeline(pipeline(size, args)), quiet=True).stages[1]

        def mean(name: str) -> float:
            return statistics.mean(v for step, v in stage.metrics[name] if step >= 2)

        results[size] = {
            "step_s": mean("timing/step_s"),
            "response_tokens_mean": mean("rollout/response_length_mean"),
            "samples": mean("rollout/samples"),
            "sync_bytes": mean("sync/bytes"),
            "phases": {p: {"s": mean(f"timing/{p}_s"), "share": mean(f"timing/{p}_frac")} for p in PHASES},
            "mlflow_run_id": stage.run_id,
        }
    print("| phase | " + " | ".join(f"{s} share (s)" for s in results) + " |")
    print("|---|" + "---|" * len(results))
    for p in PHASES:
        cells = [f"{r['phases'][p]['share']:.1%} ({r['phases'][p]['s']:.2f})" for r in results.values()]
        print(f"| {p} | " + " | ".join(cells) + " |")
    print("| step | " + " | ".join(f"{r['step_s']:.2f} s" for r in results.values()) + " |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
