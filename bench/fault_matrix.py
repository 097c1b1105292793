"""Fault matrix: each fault the platform recovers from, injected on real processes (SIGKILL by pid),
measured against the uninterrupted run's seed spread.

Local part (one Ray node, 2 CPUs, in this process): synthetic arithmetic task, then on-policy DPO
(``--iterations`` iterations, a checkpoint after each). It runs uninterrupted once per seed in
``--seeds``. Then, with the first seed, it runs once per fault:

  rollout    the RolloutWorker killed in ``generate_chunk`` (after the first weight sync)
  reward     the RewardSet actor killed (after the first weight sync)
  reference  the ReferenceModel killed in ``evaluate`` (after the first weight sync)
  trainer    the PolicyTrainer killed in ``train_step`` once an in-stage checkpoint exists

Node part (``rlhf cluster up``: a head with no CPUs, node_a with 1 CPU for the trainer, node_b and
node_c with 2): the same pipeline goes in with ``rlhf submit``. It runs uninterrupted once per seed,
then once with the first seed while the node that holds the rollout worker is killed at the first
sync (raylet, object store and workers).

Each faulty run reports:
- whether it completed;
- the iterations logged against the plan, and whether the steps are contiguous;
- the number of child runs;
- the final ``objective/scores``, ``loss`` and ``objective/kl``, and whether each lies within the
  uninterrupted runs' [min, max] over seeds (and how far it is from the same seed's run);
- the restarts and the recovery seconds.

    .venv/bin/python bench/fault_matrix.py --seeds 0 1 2 --out bench/out/faults.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FINAL = ("objective/scores", "loss", "objective/kl")  # at the last iteration
ROLE_KEYS = {"RolloutWorker": "rollout", "PolicyTrainer": "policy_trainer", "RewardSet": "reward",
             "ReferenceModel": "reference"}
FAULTS = {"rollout": ("RolloutWorker", "generate_chunk"), "reward": ("RewardSet", ""),
          "reference": ("ReferenceModel", "evaluate"), "trainer": ("PolicyTrainer", "train_step")}


def pipeline(work: Path, name: str, seed: int, iterations: int, nodes: dict[str, str] | None = None) -> dict:
    dpo = {"name": "dpo", "kind": "onpolicy_dpo", "policy": {"from": "task"},
           "reward": {"function": "pipelines.tasks.arithmetic:terse"},
           "data": {"train": {"from": "task", "output": "prompts_train"}, "max_prompt_length": 16,
                    "eval": {"from": "task", "output": "prompts_eval"}},
           "sampling": {"samples_per_prompt": 4, "max_new_tokens": 8},
           "schedule": {"iterations": iterations, "prompts_per_iteration": 32, "pairs_per_update": 8,
                        "pairs_per_microbatch": 8},
           "optim": {"lr": 1.0e-3}, "eval": {"table_rows": 0}, "checkpoint": {"every": 1},
           "trainer": {"cpus_per_worker": 0.5}, "reference_group": {"cpus_per_worker": 0.25},
           "reward_group": {"cpus_per_worker": 0.25},
           "rollout": {"cpus_per_worker": 1, "max_model_len": 64, "kv_cache_gib": 1, "prompts_per_chunk": 8}}
    if nodes:
        dpo["placement"] = {"nodes": nodes}
    return {"name": name, "seed": seed, "run_dir": str(work / "runs"),
            "tracking": {"uri": f"sqlite:///{work}/mlflow.db", "log_checkpoints": False},
            "stages": [{"name": "task", "kind": "synthetic_task", "num_sft": 16, "num_pairs": 16,
                        "num_prompts": 16 * iterations * 2, "num_eval": 32}, dpo]}


def summarize(tracking_uri: str, parent_id: str) -> dict:
    """What the faulty-run table needs from one pipeline run's MLflow records."""
    from mlflow.tracking import MlflowClient

    from tests.e2e.mlflow_reads import metric_history

    client = MlflowClient(tracking_uri)
    experiment = client.get_run(parent_id).info.experiment_id
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent_id}'")
    (dpo,) = [r for r in children if r.info.run_name == "dpo"]
    m = metric_history(client, dpo.info.run_id)
    steps = [x.step for x in client.get_metric_history(dpo.info.run_id, "objective/scores")]
    restarts = {k.split("/")[-1]: v[-1] for k, v in m.items() if k.startswith("faults/restarts/")}
    return {"children": len(children), "steps": steps, "final": {k: m[k][-1] for k in FINAL},
            "restarts": restarts, "recovery_s": m.get("faults/recovery_s", []),
            "parity_max": max(m.get("sync/logprob_max_abs_diff", [0.0]))}


def local_part(args: argparse.Namespace, work: Path) -> tuple[dict, dict]:
    import ray

    from orchestrator.config import validate_pipeline
    from orchestrator.runner import run_pipeline
    from tests.e2e.killers import AfterFirstSync, Killer

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    clean, faulty = {}, {}
    try:
        for seed in args.seeds:
            start = time.perf_counter()
            result = run_pipeline(validate_pipeline(pipeline(work / f"clean{seed}", "clean", seed, args.iterations)),
                                  quiet=True)
            clean[seed] = summarize(result.tracking_uri, result.mlflow_run_id) | {"wall_s": time.perf_counter() - start}
            print(f"clean seed {seed}: {clean[seed]['final']}", flush=True)
        for fault in args.faults:
            if fault == "node":
                continue
            role, method = FAULTS[fault]
            out = work / f"fault_{fault}"
            ready = ((lambda t, out=out: any((out / "runs").glob("*/*/stages/dpo/checkpoint/state.json")))
                     if fault == "trainer" else AfterFirstSync())
            killer = Killer(role, method, ready)
            killer.start()
            start = time.perf_counter()
            try:
                result = run_pipeline(validate_pipeline(pipeline(out, "faulty", args.seeds[0], args.iterations)),
                                      quiet=True)
                faulty[fault] = summarize(result.tracking_uri, result.mlflow_run_id) | {"completed": True}
            except Exception as exc:  # a failed recovery is a row of the table, not the end of the benchmark
                faulty[fault] = {"completed": False, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            killer.stop.set()
            faulty[fault] |= {"killed": killer.killed, "wall_s": time.perf_counter() - start}
            print(f"fault {fault}: {faulty[fault].get('final')} killed={killer.killed}", flush=True)
    finally:
        ray.shutdown()
    return clean, faulty


def node_part(args: argparse.Namespace, work: Path) -> tuple[dict, dict]:
    from deploy import local_cluster
    from tests.e2e.killers import kill_rollout_node_at_sync

    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    cluster = local_cluster.up(work / "cluster", worker_cpus=(1, 2, 2))
    clean, faulty = {}, {}
    try:
        def submit(name: str, seed: int, kill: bool) -> dict:
            out = work / f"node_{name}{seed}"
            out.mkdir()
            path = out / "pipeline.yaml"
            path.write_text(json.dumps(pipeline(out, name, seed, args.iterations, {"policy_trainer": "node_a"})))
            start = time.perf_counter()
            proc = subprocess.Popen(
                [sys.executable, "-m", "orchestrator.cli", "submit", str(path), "--address", cluster.dashboard,
                 "--token-file", cluster.token_file, "--follow"], cwd=ROOT, env=env | {"RAY_AUTH_MODE": "token"},
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            killed = kill_rollout_node_at_sync(cluster, lambda: proc.poll() is None) if kill else None
            log, _ = proc.communicate(timeout=1800)
            (out / "submit.log").write_text(log)
            parent = re.search(r"mlflow.run_id: ([0-9a-f]{32})", log)
            row = {"completed": proc.returncode == 0, "killed": killed, "wall_s": time.perf_counter() - start}
            if proc.returncode == 0 and parent:
                row |= summarize(f"sqlite:///{out}/mlflow.db", parent.group(1))
            else:
                row["error"] = log[-600:]
            return row

        for seed in args.seeds:
            clean[seed] = submit("clean", seed, kill=False)
            print(f"node clean seed {seed}: {clean[seed].get('final')}", flush=True)
        faulty["node"] = submit("faulty", args.seeds[0], kill=True)
        print(f"fault node: {faulty['node'].get('final')} killed={faulty['node']['killed']}", flush=True)
    finally:
        local_cluster.down(work / "cluster")
    return clean, faulty


def table(clean: dict, faulty: dict, iterations: int, seed: int) -> list[dict]:
    spread = {k: (min(c["final"][k] for c in clean.values()), max(c["final"][k] for c in clean.values()))
              for k in FINAL}
    rows = []
    for fault, r in faulty.items():
        row = {"fault": fault, "completed": r["completed"], "killed": r.get("killed")}
        if r["completed"]:
            row |= {"iterations": f"{len(r['steps'])}/{iterations}",
                    "contiguous": r["steps"] == list(range(1, iterations + 1)), "child_runs": r["children"],
                    "restarts": r["restarts"], "recovery_s": [round(x, 1) for x in r["recovery_s"]],
                    "parity_max": r["parity_max"]}
            for k in FINAL:
                lo, hi = spread[k]
                row[k] = {"final": round(r["final"][k], 4), "clean_spread": [round(lo, 4), round(hi, 4)],
                          "within": lo - 1e-9 <= r["final"][k] <= hi + 1e-9,
                          "diff_vs_same_seed": abs(r["final"][k] - clean[seed]["final"][k])}
        else:
            row["error"] = r.get("error")
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    head = ("| fault | completed | iterations | contiguous | child runs | restarts | recovery s | "
            + " | ".join(f"final {k} (clean spread)" for k in FINAL) + " | same-seed diff |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        if not r["completed"]:
            lines.append(f"| {r['fault']} | no: {(r.get('error') or '')[:80]} |" + " |" * (len(FINAL) + 6))
            continue
        cells = [f"{r[k]['final']} ({r[k]['clean_spread'][0]}–{r[k]['clean_spread'][1]}) "
                 f"{'within' if r[k]['within'] else 'OUTSIDE'}" for k in FINAL]
        diff = max(r[k]["diff_vs_same_seed"] for k in FINAL)
        lines.append(f"| {r['fault']} | yes | {r['iterations']} | {r['contiguous']} | {r['child_runs']} | "
                     f"{', '.join(f'{k} {v:g}' for k, v in r['restarts'].items())} | {r['recovery_s']} | "
                     + " | ".join(cells) + f" | {diff:.1e} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--faults", nargs="+", default=[*FAULTS, "node"], choices=[*FAULTS, "node"])
    parser.add_argument("--work-dir", default=None, help="keep the runs here (default: a temp dir)")
    parser.add_argument("--out", default=None, help="write the JSON here")
    args = parser.parse_args()
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="fault_matrix_")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    report: dict = {"seeds": args.seeds, "iterations": args.iterations}
    rows = []
    if any(f != "node" for f in args.faults):
        clean, faulty = local_part(args, work / "local")
        report["local"] = {"clean": clean, "faulty": faulty}
        rows += table(clean, faulty, args.iterations, args.seeds[0])
    if "node" in args.faults:
        clean, faulty = node_part(args, work / "nodes")
        report["nodes"] = {"clean": clean, "faulty": faulty}
        rows += table(clean, faulty, args.iterations, args.seeds[0])
    report["table"] = rows
    text = json.dumps(report, indent=1, default=str)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    print(markdown(rows))


if __name__ == "__main__":
    main()
