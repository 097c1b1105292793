"""Preference arms where the on-policy papers' setting holds: a trained reward model's dense scores as
the on-policy reward and a weak SFT start; offline DPO, on-policy DPO, KTO, SimPO and ORPO at equal
pairs and optimizer steps, over seeds.

Setup (seed 0, once): ``pipelines/quickstart.yaml``'s ``task`` stage, its ``sft`` stage cut to
``--sft-steps`` (250 of its 600: held-out greedy exact match 0.145 against about 0.71, the weak
start) and its ``rm`` stage from that SFT checkpoint (Bradley–Terry on the task's pairs). Every arm then starts from the
SFT checkpoint (also its reference where it has one) and takes ``--steps`` optimizer steps of 32
pairs (KTO: 64 rows, each pair split into a desirable and an undesirable row):

  offline_dpo   ``offline_dpo`` on the task's fixed pairs (DPO β 0.1 + RPO NLL α 1, lr 2e-4)
  onpolicy_dpo  ``onpolicy_dpo``, best vs worst of 8 samples scored by the reward model
                (normalized), 4 updates of 32 pairs per iteration, the same DPO loss and lr
  onpolicy_dpo_beta05  the same with DPO β 0.5: five times the pull towards the reference
  kto           ``kind: kto`` on the same pairs, split (β 0.1, λ_D 1.33; ``pipelines/kto.yaml``'s lr 5e-5)
  simpo         ``offline_dpo`` with ``loss_type: simpo`` (β 2, γ 0.5; no reference model), lr 2e-4
  orpo          ``offline_dpo`` with ``loss_type: orpo`` (λ 0.1; its SFT term built in), lr 2e-4

Every arm is scored the same way afterwards on the 200 held-out problems: greedy decoding with
transformers, checked by the task checker (exact match), and the reward model's normalized score
of those greedy answers (what the on-policy arm optimises).

    .venv/bin/python bench/preference_arms.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import greedy_responses, write_result  # noqa: E402

CHECKER = "pipelines.tasks.arithmetic:reward"
NEW_TOKENS = 6
ARMS = ("offline_dpo", "onpolicy_dpo", "onpolicy_dpo_beta05", "kto", "simpo", "orpo")


def score(model_dir: str, prompts_path: str, rm: str) -> dict[str, float]:
    """Held-out greedy exact match and the reward model's mean normalized score of the same answers."""
    from actors.reward import RewardModelScorer
    from pipelines.data.rewards import FunctionReward

    prompts, responses = greedy_responses(model_dir, prompts_path, NEW_TOKENS)
    checks = FunctionReward(CHECKER).score(prompts, responses)
    rm_scores = RewardModelScorer(0, 1, rm, normalize=True).score(prompts, responses)
    return {"exact_match": sum(c >= 1.0 for c in checks) / len(checks), "rm_score": statistics.mean(rm_scores)}


def arm_stage(arm: str, seed: int, steps: int, sft: str, task: dict[str, str], rm: str, online: dict) -> dict:
    pairs = {"train": task["pairs_train"], "eval": task["pairs_eval"]}
    optim = {"lr": 2.0e-4, "warmup_steps": 10, "schedule": "constant"}
    offline = {"name": arm, "kind": "offline_dpo", "policy": sft, "data": pairs, "optim": optim,
               "dpo": {"beta": 0.1, "rpo_alpha": 1.0}, "generation": {"enabled": False},
               "schedule": {"steps": steps, "pairs_per_step": 32, "pairs_per_microbatch": 32, "seed": seed},
               "checkpoint": {"every": 0}, "trainer": {"cpus_per_worker": 2}, "reference_group": {"cpus_per_worker": 1}}
    if arm == "offline_dpo":
        return offline
    if arm in ("simpo", "orpo"):
        stage = {k: v for k, v in offline.items() if k != "reference_group"}
        return stage | {"dpo": {"loss_type": "simpo", "beta": 2.0, "simpo_gamma": 0.5} if arm == "simpo"
                        else {"loss_type": "orpo", "orpo_lambda": 0.1}}
    if arm == "kto":
        return {"name": arm, "kind": "kto", "policy": sft, "data": pairs,
                "kto": {"beta": 0.1, "desirable_weight": 1.33, "undesirable_weight": 1.0},
                "generation": {"enabled": False}, "optim": optim | {"lr": 5.0e-5},
                "schedule": {"steps": steps, "examples_per_step": 64, "examples_per_microbatch": 64, "seed": seed},
                "checkpoint": {"every": 0}, "trainer": {"cpus_per_worker": 2},
                "reference_group": {"cpus_per_worker": 1}}
    stage = copy.deepcopy(online)
    stage.update(name=arm, policy=sft, reward={"model": rm, "normalize": True},
                 data={**stage["data"], "train": task["prompts_train"], "eval": task["prompts_eval"]})
    stage["dpo"] = {"beta": 0.5 if arm == "onpolicy_dpo_beta05" else 0.1, "rpo_alpha": 1.0}
    stage["optim"] = optim
    # max_pair_passes: None: 4 updates every iteration however few pairs it found (ties shrink the
    # supply as the policy narrows), so the arm takes as many steps as the offline ones.
    stage["schedule"] |= {"iterations": steps // 4, "updates_per_iteration": 4, "pairs_per_update": 32,
                          "pairs_per_microbatch": 32, "max_pair_passes": None, "eval_every": 0, "seed": seed}
    stage["eval"] = {"checker": CHECKER, "table_rows": 0}
    return stage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--sft-steps", type=int, default=250)
    parser.add_argument("--steps", type=int, default=120, help="optimizer steps of every arm (a multiple of 4)")
    parser.add_argument("--out", default="bench/out/preference_arms.json")
    parser.add_argument("--runs", default="runs/bench_preference_arms")
    args = parser.parse_args()

    from orchestrator.config import validate_pipeline
    from orchestrator.runner import run_pipeline

    raw = yaml.safe_load((ROOT / "pipelines" / "quickstart.yaml").read_text())
    raw.update(run_dir=args.runs, tracking={"experiment": "bench_preference_arms", "log_checkpoints": False})
    stages = {s["name"]: s for s in raw["stages"]}
    stages["sft"]["schedule"] |= {"steps": args.sft_steps, "eval_every": 0}
    online = stages["onpolicy_dpo"]
    base = run_pipeline(validate_pipeline({**raw, "name": "bench_arms_base",
                                           "stages": [stages[n] for n in ("task", "sft", "rm")]}), quiet=True)
    task, sft, rm = base.stages[0].outputs, base.stages[1].outputs["model"], base.stages[2].outputs["reward_model"]
    results: dict[str, Any] = {"sft_steps": args.sft_steps, "steps": args.steps, "pairs_per_step": 32,
                               "sft": score(sft, task["prompts_eval"], rm), "arms": {}}
    print("sft:", results["sft"], flush=True)
    for arm in args.arms:
        rows = []
        for seed in args.seeds:
            start = time.perf_counter()
            stage = arm_stage(arm, seed, args.steps, sft, task, rm, online)
            result = run_pipeline(validate_pipeline({**raw, "name": f"bench_arms_{arm}", "seed": seed,
                                                     "stages": [stage]}), quiet=True)
            row = score(result.stages[0].outputs["model"], task["prompts_eval"], rm)
            if arm.startswith("onpolicy"):
                metrics = result.stages[0].metrics
                row |= {"kl": metrics["objective/kl"][-1][1], "updates": sum(v for _, v in metrics["pairs/updates"]),
                        "pairs_per_iteration": statistics.mean(v for _, v in metrics["pairs/count"])}
            rows.append(row | {"seed": seed, "seconds": time.perf_counter() - start,
                               "mlflow_run_id": result.stages[0].run_id})
            print(f"{arm} seed {seed}: {row}", flush=True)
        results["arms"][arm] = {"runs": rows} | {
            k: {"mean": statistics.mean(r[k] for r in rows),
                "std": statistics.stdev(r[k] for r in rows) if len(rows) > 1 else 0.0}
            for k in ("exact_match", "rm_score")}
    write_result(args.out, results)
    print(f"{'arm':20} exact match      RM score (normalized)")
    print(f"{'sft (start)':20} {results['sft']['exact_match']:.3f}            {results['sft']['rm_score']:+.3f}")
    for arm, r in results["arms"].items():
        em, rs = r["exact_match"], r["rm_score"]
        print(f"{arm:20} {em['mean']:.3f} ± {em['std']:.3f}    {rs['mean']:+.3f} ± {rs['std']:.3f}")


if __name__ == "__main__":
    main()
