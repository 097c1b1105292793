"""On-policy distillation against GRPO from the same student, at equal samples: does the teacher's
per-token signal reach the teacher's level in fewer samples than the task reward?

The start is ``pipelines/distill.yaml``'s first four stages, run once: the task, a 4-layer teacher
trained long (SFT), the tiny student trained briefly. Then per seed, from that student, on the same
prompts for the same iterations and samples (the shipped ``distill`` stage's settings):

  distill   the per-token reverse KL to the teacher (``distill.kl_weight: 1``), the task reward only measured
  grpo      the task reward alone: ``kind: distill`` with ``kl_weight: 0, reward_weight: 1`` is GRPO's group
            advantage ((r − mean) / std over the prompt's K samples) with the same clipped loss and no
            reference KL (= ``kind: ppo, estimator: grpo, kl.coef: 0``), so the teacher still measures the
            reverse KL of its samples
  ppo_grpo  (``--ppo-grpo``) the real ``kind: ppo`` GRPO stage (k3 KL to the student start, β 0.05), held-out
            exact match only (no teacher role)

Per iteration: ``distill/reverse_kl`` (sampled, per sequence) and, every ``--eval-every`` iterations,
held-out greedy ``eval/exact_match`` on the task's 200 held-out problems.

    .venv/bin/python bench/distill_vs_grpo.py --seeds 0 1 2 --out bench/results/distill_vs_grpo.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import write_result  # noqa: E402


def start_stages(raw: dict, workdir: Path) -> dict[str, str]:
    """Run the task, teacher and student stages once; their outputs by name."""
    from orchestrator.config import validate_pipeline
    from orchestrator.runner import run_pipeline

    raw = copy.deepcopy(raw)
    raw["stages"] = raw["stages"][:4]
    raw.update(run_dir=str(workdir / "runs"),
               tracking={"uri": f"sqlite:///{workdir}/start.db", "log_checkpoints": False})
    task, _, teacher, student = run_pipeline(validate_pipeline(raw), quiet=True).stages
    return {"teacher": teacher.outputs["model"], "student": student.outputs["model"],
            "prompts_train": task.outputs["prompts_train"], "prompts_eval": task.outputs["prompts_eval"],
            "teacher_exact_match": (teacher.first_last("eval/exact_match") or (0.0, 0.0))[1],
            "student_exact_match": (student.first_last("eval/exact_match") or (0.0, 0.0))[1]}


def arm_stage(raw: dict, arm: str, start: dict[str, str], seed: int, args: argparse.Namespace) -> dict:
    stage = copy.deepcopy(raw["stages"][4])
    stage.update(policy=start["student"], teacher=start["teacher"])
    stage["data"] = {"train": start["prompts_train"], "eval": start["prompts_eval"], "max_prompt_length": 16}
    stage["schedule"] = stage["schedule"] | {"seed": seed, "eval_every": args.eval_every}
    if args.iterations:
        stage["schedule"]["iterations"] = args.iterations
    if args.lr:
        stage["optim"] = stage["optim"] | {"lr": args.lr}
    if args.warmup is not None:
        stage["optim"] = stage["optim"] | {"warmup_steps": args.warmup}
    for item in args.set or ():  # dotted keys under the stage, e.g. distill.discount=1
        key, _, value = item.partition("=")
        node = stage
        *path, last = key.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[last] = yaml.safe_load(value)
    if arm == "grpo":
        stage["distill"] = stage.get("distill", {}) | {"kl_weight": 0.0, "reward_weight": 1.0}
    elif arm == "ppo_grpo":
        stage = {k: v for k, v in stage.items() if k not in ("teacher", "distill", "teacher_group")}
        stage.update(kind="ppo", algorithm={"estimator": "grpo", "kl": {"coef": 0.05}})
    return stage


def run_arm(raw: dict, arm: str, start: dict[str, str], seed: int, args: argparse.Namespace, workdir: Path
            ) -> dict:
    from mlflow.tracking import MlflowClient

    from orchestrator.config import validate_pipeline
    from orchestrator.runner import run_pipeline

    stage = arm_stage(raw, arm, start, seed, args) | {"name": arm}
    config = {"name": f"distill_bench_{arm}_{seed}", "seed": seed, "ray": raw.get("ray", {}),
              "run_dir": str(workdir / "runs"), "stages": [stage],
              "tracking": {"uri": f"sqlite:///{workdir}/{arm}_{seed}.db", "log_checkpoints": False}}
    began = time.perf_counter()
    result = run_pipeline(validate_pipeline(config), quiet=True)
    client = MlflowClient(result.tracking_uri)
    run_id = result.stages[0].run_id

    def series(name: str) -> list[tuple[int, float]]:
        return sorted((m.step, m.value) for m in client.get_metric_history(run_id, name))

    samples = stage["schedule"]["prompts_per_iteration"] * stage["sampling"]["samples_per_prompt"]
    return {"arm": arm, "seed": seed, "wall_s": time.perf_counter() - began, "samples_per_iteration": samples,
            "reverse_kl": series("distill/reverse_kl"), "exact_match": series("eval/exact_match"),
            "scores": series("objective/scores")}


def samples_to_reach(run: dict, level: float) -> int | None:
    """Samples trained on when held-out exact match first reached ``level`` (None: never)."""
    for step, value in run["exact_match"]:
        if value >= level:
            return step * run["samples_per_iteration"]
    return None


def report(runs: list[dict], start: dict) -> None:
    teacher = start.get("teacher_exact_match") or 0.0
    print(f"\nteacher held-out exact match {teacher:.3f}, student start {start.get('student_exact_match') or 0:.3f}")
    for arm in dict.fromkeys(r["arm"] for r in runs):
        mine = [r for r in runs if r["arm"] == arm]
        print(f"\n{arm}:  per seed, held-out exact match by iteration (samples), then reverse KL first → last")
        for r in mine:
            em = "  ".join(f"{s}:{v:.3f}" for s, v in r["exact_match"])
            kl = r["reverse_kl"]
            kl_text = f"{kl[0][1]:.2f} → {kl[-1][1]:.2f}" if kl else "-"
            print(f"  seed {r['seed']}: {em}   reverse KL {kl_text}   {r['wall_s']:.0f} s")
        for level in (0.9 * teacher, teacher):
            reached = [samples_to_reach(r, level) for r in mine]
            print(f"  samples to reach {level:.3f}: {reached}")
        finals = [r["exact_match"][-1][1] for r in mine if r["exact_match"]]
        if finals:
            print(f"  final exact match mean {statistics.mean(finals):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--arms", nargs="+", default=["distill", "grpo"], choices=["distill", "grpo", "ppo_grpo"])
    parser.add_argument("--iterations", type=int, default=None, help="default: the shipped stage's")
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--lr", type=float, default=None, help="default: the shipped stage's")
    parser.add_argument("--warmup", type=int, default=None, help="warmup steps (default: the shipped stage's)")
    parser.add_argument("--set", nargs="*", help="KEY=VALUE under the stage of every arm (e.g. distill.discount=1)")
    parser.add_argument("--start", help="a JSON of a previous run's start outputs (skips the start stages)")
    parser.add_argument("--out", help="write the results here (JSON)")
    args = parser.parse_args()
    raw = yaml.safe_load((ROOT / "pipelines" / "distill.yaml").read_text())
    workdir = Path(tempfile.mkdtemp(prefix="distill_bench_"))
    start = json.loads(Path(args.start).read_text()) if args.start else start_stages(raw, workdir)
    (workdir / "start.json").write_text(json.dumps(start))
    print(f"start: {workdir / 'start.json'}", flush=True)
    runs = []
    for seed in args.seeds:
        for arm in args.arms:
            runs.append(run_arm(raw, arm, start, seed, args, workdir))
            print(f"{arm} seed {seed}: {runs[-1]['exact_match']}  {runs[-1]['wall_s']:.0f} s", flush=True)
    report(runs, start)
    write_result(args.out, {"start": start, "runs": runs, "args": vars(args)})


if __name__ == "__main__":
    main()
