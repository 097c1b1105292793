"""Where a PPO step's time goes: each phase (rollout, scoring, reference and policy log-probs, critic
values, advantages, update, weight sync) on the tiny and the ~85M model, in three modes side by side
in one run: ``sequential`` (the forwards that only read the samples one after another:
``rollout.overlap_phases: false``), ``overlapped`` (concurrent, and each chunk of ``--prompts-per-chunk``
prompts scored as it is generated: the default) and ``async`` (overlapped,
and the next batch generated while the trainer learns: ``rollout.max_staleness: 1``). Reported: the
step time of each, its ratio to the sequential one, and each phase's mean span (start–end, seconds from
the iteration's start; an asynchronous rollout starts before its iteration) from the stage's timeline.

Both models start untrained (the task stage's fresh weights; no SFT), so both sample
``max_new_tokens`` tokens for nearly every response and do the same work per step; the critic is
on (``estimator: ppo``). The first iteration is warm-up and left out of the means.

    .venv/bin/python bench/ppo_phases.py                      # tiny and 85m, both modes
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


MODES = {"sequential": (False, 0), "overlapped": (True, 0), "async": (True, 1)}  # (overlap_phases, max_staleness)


def pipeline(size: str, mode: tuple[bool, int], args: argparse.Namespace) -> dict:
    raw = yaml.safe_load((ROOT / "pipelines" / "ppo.yaml").read_text())
    task, ppo = raw["stages"][0], raw["stages"][2]
    task.update(model_size=size, num_sft=16, num_prompts=512, num_eval=16)
    ppo["policy"] = {"from": "task"}
    ppo["data"].pop("eval")
    ppo["sampling"]["max_new_tokens"] = args.max_new_tokens
    ppo["schedule"] = {"iterations": args.iterations, "prompts_per_iteration": args.prompts, "ppo_epochs": 1,
                       "minibatches_per_epoch": 1, "samples_per_microbatch": 16}
    ppo["rollout"]["max_model_len"] = 16 + args.max_new_tokens
    ppo["rollout"]["overlap_phases"], ppo["rollout"]["max_staleness"] = mode
    ppo["rollout"]["prompts_per_chunk"] = args.prompts_per_chunk
    ppo["eval"]["table_rows"] = 0
    return {**raw, "name": f"bench_ppo_phases_{size}", "run_dir": args.runs, "stages": [task, ppo],
            "tracking": {"experiment": "ppo_phases", "log_checkpoints": False}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "85m"])
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=16, help="prompts per iteration (x 4 samples)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--prompts-per-chunk", type=int, default=4, help="rollout dispatch unit (scored as it arrives)")
    parser.add_argument("--runs", default="runs/bench_ppo_phases")
    parser.add_argument("--out", default="bench/out/ppo_phases.json")
    args = parser.parse_args()

    from orchestrator.config import validate_pipeline
    from orchestrator.runner import run_pipeline

    results: dict[str, dict[str, dict]] = {}
    for size in args.sizes:
        for mode, settings in MODES.items():
            stage = run_pipeline(validate_pipeline(pipeline(size, settings, args)), quiet=True).stages[1]
            results.setdefault(size, {})[mode] = summarize(stage)
        r = results[size]
        for mode in ("overlapped", "async"):
            r[f"step_ratio_sequential_over_{mode}"] = r["sequential"]["step_s"] / r[mode]["step_s"]
    print_table(results)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))


def summarize(stage) -> dict:
    """Means over iterations 2.. of the step, the phase times and the phase spans (the timeline)."""
    def mean(name: str) -> float:
        return statistics.mean(v for step, v in stage.metrics[name] if step >= 2)

    lines = (Path(stage.outputs["model"]).parent / "timeline.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines][1:]
    spans = {p: [statistics.mean(r["spans"][p][i] for r in rows) for i in (0, 1)] for p in PHASES}
    return {"step_s": mean("timing/step_s"), "response_tokens_mean": mean("rollout/response_length_mean"),
            "staleness_mean": mean("rollout/staleness_mean"),
            "samples": mean("rollout/samples"), "sync_bytes": mean("sync/bytes"),
            "phases": {p: {"s": mean(f"timing/{p}_s"), "span": spans[p]} for p in PHASES},
            "mlflow_run_id": stage.run_id}


def print_table(results: dict) -> None:
    cols = [(size, mode) for size in results for mode in MODES]
    print("| phase | " + " | ".join(f"{size} {mode}: span s" for size, mode in cols) + " |")
    print("|---|" + "---|" * len(cols))
    for p in PHASES:
        cells = [results[size][mode]["phases"][p]["span"] for size, mode in cols]
        print(f"| {p} | " + " | ".join(f"{a:.2f}–{b:.2f}" for a, b in cells) + " |")
    print("| step | " + " | ".join(f"{results[size][mode]['step_s']:.2f} s" for size, mode in cols) + " |")
    for size, r in results.items():
        print(f"{size}: sequential / overlapped step time = {r['step_ratio_sequential_over_overlapped']:.2f}x, "
              f"sequential / async = {r['step_ratio_sequential_over_async']:.2f}x "
              f"(async staleness mean {r['async']['staleness_mean']:.2f})")


if __name__ == "__main__":
    main()
