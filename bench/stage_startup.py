"""An online stage's start-up with the roles' setups overlapped (the default where no rank shares a
device) against one after the other, side by side in one run.

Each arm runs the shipped ``pipelines/ppo.yaml`` PPO stage (trainer, critic, reference, reward and a
vLLM-CPU rollout engine) for ``--iterations`` iterations from one short SFT checkpoint, in a fresh
local Ray instance; the arms alternate ``--repeats`` times. Reported: the stage's wall time and the
time its iterations took (``timing/step_s``), so start-up = wall − iterations.

    .venv/bin/python bench/stage_startup.py --repeats 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import write_result  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--out", default="bench/out/stage_startup.json")
    parser.add_argument("--runs", default="runs/bench_stage_startup")
    args = parser.parse_args()

    import ray

    from orchestrator.config import validate_pipeline
    from orchestrator.runner import run_pipeline
    from pipelines.stages import online_rollout as online

    raw = yaml.safe_load((ROOT / "pipelines" / "ppo.yaml").read_text())
    raw.update(run_dir=args.runs, tracking={"experiment": "bench_stage_startup", "log_checkpoints": False})
    task, sft, ppo = raw["stages"]
    sft["schedule"]["steps"] = 20
    base = run_pipeline(validate_pipeline({**raw, "name": "bench_startup_base", "stages": [task, sft]}), quiet=True)
    ray.shutdown()
    ppo.update(policy=base.stages[1].outputs["model"],
               data={**ppo["data"], "train": base.stages[0].outputs["prompts_train"],
                     "eval": base.stages[0].outputs["prompts_eval"]})
    ppo["schedule"] |= {"iterations": args.iterations, "eval_every": 0}
    overlap = online.setups_overlap
    rows: dict[str, list[dict[str, float]]] = {"overlapped": [], "sequential": []}
    for _ in range(args.repeats):
        for arm in rows:
            online.setups_overlap = overlap if arm == "overlapped" else (lambda cfg: False)
            start = time.perf_counter()
            result = run_pipeline(validate_pipeline({**raw, "name": f"bench_startup_{arm}", "stages": [ppo]}),
                                  quiet=True)
            wall = time.perf_counter() - start
            ray.shutdown()
            steps = sum(v for _, v in result.stages[0].metrics["timing/step_s"])
            rows[arm].append({"wall_s": wall, "iterations_s": steps, "startup_s": wall - steps})
            print(arm, rows[arm][-1], flush=True)
    online.setups_overlap = overlap
    res = {arm: {k: statistics.median(r[k] for r in runs) for k in ("wall_s", "iterations_s", "startup_s")}
           for arm, runs in rows.items()}
    res["startup_ratio_sequential_over_overlapped"] = res["sequential"]["startup_s"] / res["overlapped"]["startup_s"]
    write_result(args.out, {"runs": rows, "median": res})
    print(yaml.safe_dump(res, sort_keys=False))


if __name__ == "__main__":
    main()
