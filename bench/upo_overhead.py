"""What UPO's auxiliary term costs over plain DPO, side by side in one pipeline run.

``pipelines/upo.yaml``'s task and SFT stages run once (shortened: their quality does not matter for
timing); then plain offline DPO (no auxiliary rewards at all) and UPO (one function reward, λ > 0)
train from that SFT checkpoint on the same pairs for the same steps, one after the other in the
same Ray instance. Printed: the median driver-side step time (``timing/update_s``) and in-trainer
compute time (``timing/trainer_compute_s``) of each, their ratio UPO / DPO, and UPO's one-off
scoring of every training response (``timing/score_auxiliary_s``) as a share of its training time.

    .venv/bin/python bench/upo_overhead.py                  # 200 steps of 32 pairs
    .venv/bin/python bench/upo_overhead.py --steps 50
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=5, help="first steps of each stage left out of the medians")
    parser.add_argument("--out", default=None, help="write the numbers as JSON here")
    args = parser.parse_args()

    from orchestrator.config import load_pipeline
    from orchestrator.runner import run_pipeline

    work = Path(tempfile.mkdtemp(prefix="bench_upo_"))
    per_stage = [f"stages.{s}.{k}" for s in ("dpo", "upo") for k in (
        f"schedule.steps={args.steps}", "schedule.eval_every=0", "generation.enabled=false", "checkpoint.every=0")]
    config = load_pipeline(ROOT / "pipelines" / "upo.yaml", [
        f"run_dir={work / 'runs'}", f"tracking.uri=sqlite:///{work}/mlflow.db", "tracking.log_checkpoints=false",
        "tracking.system_metrics=false", "stages.sft.schedule.steps=50", "stages.sft.schedule.eval_every=0",
        "stages.dpo.auxiliary=[]", "stages.dpo.upo=null", *per_stage,
    ])
    stages = {s.name: s for s in run_pipeline(config, quiet=True).stages}

    def median(stage: str, metric: str) -> float:
        return statistics.median(v for step, v in stages[stage].metrics[metric] if step > args.warmup)

    result: dict[str, float] = {}
    for metric in ("timing/update_s", "timing/trainer_compute_s"):
        dpo, upo = median("dpo", metric), median("upo", metric)
        result |= {f"dpo {metric}": dpo, f"upo {metric}": upo, f"ratio {metric}": upo / dpo}
    scoring = stages["upo"].metrics["timing/score_auxiliary_s"][0][1]
    training = sum(v for _, v in stages["upo"].metrics["timing/update_s"])
    result |= {"upo timing/score_auxiliary_s": scoring, "score_auxiliary / training": scoring / training}
    print(json.dumps(result, indent=1))
    print(f"UPO / DPO step time: {result['ratio timing/update_s']:.3f} (driver), "
          f"{result['ratio timing/trainer_compute_s']:.3f} (trainer); scoring every training and held-out "
          f"response once: {scoring:.2f} s = {100 * scoring / training:.1f}% of the {training:.1f} s of training")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
