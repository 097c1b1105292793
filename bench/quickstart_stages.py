"""The quickstart's held-out exact match, stage by stage, over seeds: does each policy stage hold or
raise the previous one's? And, for the on-policy DPO stage, variants measured side by side from the
same offline-DPO checkpoint.

Per seed, ``pipelines/quickstart.yaml``'s ``task``, ``sft``, ``rm`` and ``offline_dpo`` stages run
once (the pipeline's ``seed`` set to it); then, for every variant, its ``onpolicy_dpo`` stage (with
the variant's keys changed) and the ``ppo`` stage after it. Each number is the stage's own last
``eval/exact_match``: greedy decoding of the same 200 held-out problems, the quickstart summary's
line. The on-policy stage's pair supply is logged beside it (``pairs/count`` per iteration, as a
fraction of the pairs its updates consume).

    .venv/bin/python bench/quickstart_stages.py --seeds 0 1 2 \\
        --variant shipped= --variant lr_1e-4=optim.lr=1.0e-4
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

from bench.common import write_result  # noqa: E402

POLICY_STAGES = ("sft", "offline_dpo", "onpolicy_dpo", "ppo")


def _variant(text: str) -> tuple[str, dict[str, Any]]:
    """``NAME=key=value,key=value`` (keys of the on-policy stage, values read as YAML)."""
    name, _, rest = text.partition("=")
    changes = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        changes[key] = yaml.safe_load(value)
    return name, changes


def _set(stage: dict, key: str, value: Any) -> None:
    *path, last = key.split(".")
    for part in path:
        stage = stage.setdefault(part, {})
    stage[last] = value


def _last(stage: Any, metric: str) -> float:
    return stage.metrics[metric][-1][1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variant", action="append", type=_variant, default=None,
                        help="NAME=key=value,... on the onpolicy_dpo stage (repeatable; default: shipped=)")
    parser.add_argument("--base-runs", nargs="+", default=None,
                        help="run directories of earlier base runs (task ... offline_dpo), one per seed in --seeds "
                             "order: their outputs and MLflow metrics are reused instead of training again")
    parser.add_argument("--out", default="bench/out/quickstart_stages.json")
    parser.add_argument("--runs", default="runs/bench_quickstart")
    args = parser.parse_args()
    variants = dict(args.variant or [("shipped", {})])

    from orchestrator.config import validate_pipeline
    from orchestrator.runner import run_pipeline

    raw = yaml.safe_load((ROOT / "pipelines" / "quickstart.yaml").read_text())
    raw.update(run_dir=args.runs, tracking={"experiment": "bench_quickstart_stages", "log_checkpoints": False})
    stages = {s["name"]: s for s in raw["stages"]}
    results: dict[str, Any] = {"variants": {n: c for n, c in variants.items()}, "seeds": {}}
    if args.base_runs and len(args.base_runs) != len(args.seeds):
        parser.error(f"--base-runs: {len(args.base_runs)} run directories for {len(args.seeds)} seeds")
    for i, seed in enumerate(args.seeds):
        started = time.perf_counter()
        if args.base_runs:
            out = _earlier_base(Path(args.base_runs[i]))
        else:
            base = run_pipeline(validate_pipeline({**raw, "name": "bench_qs_base", "seed": seed, "stages": [
                stages[n] for n in ("task", "sft", "rm", "offline_dpo")]}), quiet=True)
            out = {s.name: s for s in base.stages}
        task, rm = out["task"].outputs, out["rm"].outputs["reward_model"]
        row: dict[str, Any] = {name: _last(out[name], "eval/exact_match") for name in ("sft", "offline_dpo")}
        row["base_s"] = time.perf_counter() - started
        row["base_run"] = str(Path(out["task"].outputs["model"]).parents[2])
        for name, changes in variants.items():
            online, ppo = copy.deepcopy(stages["onpolicy_dpo"]), copy.deepcopy(stages["ppo"])
            online["policy"] = out["offline_dpo"].outputs["model"]
            for stage in (online, ppo):
                stage["data"].update(train=task["prompts_train"], eval=task["prompts_eval"])
            for key, value in changes.items():
                _set(online, key, value)
            ppo["policy"] = {"from": "onpolicy_dpo"}
            ppo["critic"]["model"] = rm
            started = time.perf_counter()
            result = run_pipeline(validate_pipeline({**raw, "name": f"bench_qs_{name}", "seed": seed,
                                                     "stages": [online, ppo]}), quiet=True)
            on, after = result.stages
            s = online["schedule"]
            consumed = s["updates_per_iteration"] * s["pairs_per_update"]
            counts = [v for _, v in on.metrics["pairs/count"]]
            row[name] = {"onpolicy_dpo": _last(on, "eval/exact_match"), "ppo": _last(after, "eval/exact_match"),
                         "pairs_per_iteration_mean": statistics.mean(counts),
                         "pairs_supplied_over_consumed": statistics.mean(counts) / consumed,
                         "seconds": time.perf_counter() - started,
                         "mlflow_run_ids": [on.run_id, after.run_id]}
            print(f"seed {seed} {name}: sft {row['sft']:.3f} -> offline_dpo {row['offline_dpo']:.3f} -> "
                  f"onpolicy_dpo {row[name]['onpolicy_dpo']:.3f} -> ppo {row[name]['ppo']:.3f} "
                  f"(pairs/iteration {statistics.mean(counts):.1f} of {consumed} consumed)", flush=True)
        results["seeds"][seed] = row
    results["summary"] = _summary(results["seeds"], variants)
    write_result(args.out, results)
    for name, summary in results["summary"].items():
        print(name, " ".join(f"{k} {v['mean']:.3f}±{v['std']:.3f}" for k, v in summary.items()))


def _earlier_base(run_dir: Path) -> dict[str, Any]:
    """The stages of an earlier base run (its ``state.json``), with their MLflow metric histories."""
    import json

    from mlflow.tracking import MlflowClient

    from orchestrator.runner import StageResult

    state = json.loads((run_dir / "state.json").read_text())
    client = MlflowClient(state["tracking_uri"])
    out = {}
    for name, stage in state["stages"].items():
        history = {"eval/exact_match": [(m.step, m.value) for m in
                                        client.get_metric_history(stage["mlflow_run_id"], "eval/exact_match")]}
        out[name] = StageResult(name, name, stage["mlflow_run_id"], stage["outputs"], history)
    return out


def _summary(rows: dict[int, dict], variants: dict[str, dict]) -> dict[str, dict[str, dict[str, float]]]:
    def stat(values: list[float]) -> dict[str, float]:
        return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}

    out = {}
    for name in variants:
        per = {k: [r[k] for r in rows.values()] for k in ("sft", "offline_dpo")}
        per |= {k: [r[name][k] for r in rows.values()] for k in ("onpolicy_dpo", "ppo", "pairs_per_iteration_mean")}
        out[name] = {k: stat(v) for k, v in per.items()}
    return out


if __name__ == "__main__":
    main()
