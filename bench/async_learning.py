"""Learning at equal samples: the synchronous loop vs asynchronous rollouts (``rollout.max_staleness:
1``) on the shipped online pipelines, over seeds.

Setup: the shipped pipelines' task and SFT stages run once (seed 0; ``pipelines/ppo.yaml`` and
``pipelines/onpolicy_dpo.yaml`` share them); every run starts from that SFT checkpoint with the
shipped stage's settings, changing only ``rollout.max_staleness`` and the seed:

  ppo            ``pipelines/ppo.yaml``'s stage (critic, GAE)
  grpo           the same stage with ``algorithm.estimator: grpo``
  onpolicy_dpo   ``pipelines/onpolicy_dpo.yaml``'s stage

Both modes see the same number of iterations, prompts and samples. Reported per run: the mean
sampled score (``objective/scores``) over the first 3 and the last 5 iterations, held-out exact match
at the start and the end (greedy, from the served policy), the staleness and, for the PPO family, the
truncated importance weights' mean and clip fraction (means over iterations), and the stage's time.

    .venv/bin/python bench/async_learning.py                          # 3 arms x 2 modes x 3 seeds
    .venv/bin/python bench/async_learning.py --arms grpo --seeds 0 --iterations 10
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
ARMS = {"ppo": ("ppo.yaml", {}), "grpo": ("ppo.yaml", {"estimator": "grpo"}), "onpolicy_dpo": ("onpolicy_dpo.yaml", {})}


def first_last(points: list[tuple[int, float]]) -> tuple[float, float]:
    values = [v for _, v in sorted(points)]
    return statistics.fmean(values[:3]), statistics.fmean(values[-5:])


def summarize(stage, seconds: float) -> dict:
    m = stage.metrics
    start, end = first_last(m["objective/scores"])
    exact = [v for _, v in sorted(m["eval/exact_match"])]
    row = {"scores_start": start, "scores_end": end, "exact_match_start": exact[0], "exact_match_end": exact[-1],
           "staleness_mean": statistics.fmean(v for _, v in m["rollout/staleness_mean"]), "seconds": seconds,
           "step_s": statistics.fmean(v for _, v in m["timing/step_s"]), "mlflow_run_id": stage.run_id}
    for name in ("is/weight_mean", "is/clip_frac"):
        if name in m:
            row[name] = statistics.fmean(v for _, v in m[name])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--iterations", type=int, default=None, help="default: the shipped YAML's")
    parser.add_argument("--out", default="bench/out/async_learning.json")
    parser.add_argument("--runs", default="runs/bench_async")
    args = parser.parse_args()

    from orchestrator.config import validate_pipeline
    from orchestrator.runner import run_pipeline

    tracking = {"experiment": "async_learning", "log_checkpoints": False}
    shipped = {name: yaml.safe_load((ROOT / "pipelines" / name).read_text())
               for name in ("ppo.yaml", "onpolicy_dpo.yaml")}
    base_raw = {**shipped["ppo.yaml"], "name": "bench_async_sft", "run_dir": args.runs, "tracking": tracking}
    base = run_pipeline(validate_pipeline({**base_raw, "stages": base_raw["stages"][:2]}), quiet=True)
    task, sft = base.stages[0].outputs, base.stages[1].outputs["model"]
    results: dict = {"arms": {}}
    for arm in args.arms:
        file, algorithm = ARMS[arm]
        raw = shipped[file]
        for staleness in (0, 1):
            rows = []
            for seed in args.seeds:
                stage = copy.deepcopy(raw["stages"][2])
                stage.update(name=arm, policy=sft, data={**stage["data"], "train": task["prompts_train"],
                                                        "eval": task["prompts_eval"]})
                if algorithm:
                    stage["algorithm"] = {**stage["algorithm"], **algorithm}
                stage["schedule"]["seed"] = seed
                if args.iterations:
                    stage["schedule"]["iterations"] = args.iterations
                stage["rollout"]["max_staleness"] = staleness
                start = time.perf_counter()
                result = run_pipeline(validate_pipeline({**raw, "name": f"bench_async_{arm}_{staleness}", "seed": seed,
                                                         "run_dir": args.runs, "tracking": tracking,
                                                         "stages": [stage]}), quiet=True)
                row = {"seed": seed} | summarize(result.stages[0], time.perf_counter() - start)
                rows.append(row)
                print(f"{arm} max_staleness {staleness} seed {seed}: scores {row['scores_start']:.3f} -> "
                      f"{row['scores_end']:.3f}, exact match {row['exact_match_start']:.3f} -> "
                      f"{row['exact_match_end']:.3f}, staleness {row['staleness_mean']:.2f}", flush=True)
            ends = [r["scores_end"] for r in rows]
            exact = [r["exact_match_end"] for r in rows]
            results["arms"][f"{arm}/max_staleness={staleness}"] = {
                "runs": rows, "scores_end_mean": statistics.fmean(ends),
                "scores_end_spread": (min(ends), max(ends)), "exact_match_end_mean": statistics.fmean(exact),
                "exact_match_end_spread": (min(exact), max(exact)),
                "scores_gain_mean": statistics.fmean(r["scores_end"] - r["scores_start"] for r in rows)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print("| arm | max_staleness | scores first 3 → last 5 (mean of seeds) | end spread | exact match start → end | "
          "end spread | staleness | IS weight mean / clip frac | step s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for key, r in results["arms"].items():
        arm, staleness = key.split("/max_staleness=")
        runs = r["runs"]
        mean = lambda name: statistics.fmean(x[name] for x in runs)  # noqa: E731
        weights = (f"{mean('is/weight_mean'):.3f} / {mean('is/clip_frac'):.4f}" if "is/weight_mean" in runs[0]
                   else "–")
        print(f"| {arm} | {staleness} | {mean('scores_start'):.3f} → {mean('scores_end'):.3f} | "
              f"{r['scores_end_spread'][0]:.3f}–{r['scores_end_spread'][1]:.3f} | {mean('exact_match_start'):.3f} → "
              f"{mean('exact_match_end'):.3f} | "
              f"{r['exact_match_end_spread'][0]:.3f}–{r['exact_match_end_spread'][1]:.3f}"
              f" | {mean('staleness_mean'):.2f} | {weights} | {mean('step_s'):.2f} |")


if __name__ == "__main__":
    main()
