"""UPO variants against plain DPO on ``pipelines/upo.yaml``'s task: does the designer's objective rise
while the preferences are kept?

One pipeline per seed: the shipped task and SFT stages, then every arm from that SFT model on the
same pairs for the same steps (the shipped ``dpo`` stage's optimizer and schedule):

  dpo                   offline DPO (+ RPO) with λ = 0: the auxiliary reward only measured
  upo_weight@λ          UPO as first shipped: group-mean baseline, tied responses keep weight 1
  upo_skip@λ            the same, tied responses get weight 0 (``upo.ties: skip``)
  upo_value@λ           the value baseline (``upo.baseline: value``, expectile 0.7)
  upo_preferred@λ       the auxiliary likelihood of the chosen responses only (``upo.responses: preferred``)
  upo_preferred_skip@λ  the same with tied responses at weight 0
  kto, kto_upo_preferred@λ   KTO on the pairs split into rows, and UPO on KTO (``--kto``)

Read per arm at the end: ``eval/aux/sentence_mean`` (the designer's metric: share of sentence
answers among greedy generations of 200 held-out problems), ``eval/rewards/accuracies_aux_ties``
(implicit-reward accuracy on held-out pairs that tie on the auxiliary reward, where only the
preference should decide), ``eval/rewards/accuracies`` and ``eval/exact_match``. With several λ the
frontier (designer metric vs tie accuracy) is drawn per variant.

    .venv/bin/python bench/upo_variants.py --seeds 0 --coefs 0.03 0.1 0.3 1.0 --plot upo_frontier.png
    .venv/bin/python bench/upo_variants.py --seeds 0 1 2 --coefs 0.1 0.3 --variants weight preferred --kto
    .venv/bin/python bench/upo_variants.py --merge a.json b.json --variants weight preferred --plot frontier.png
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

METRICS = ("eval/aux/sentence_mean", "eval/rewards/accuracies_aux_ties", "eval/rewards/accuracies", "eval/exact_match")
VARIANTS = {"weight": {"ties": "weight"}, "skip": {"ties": "skip"}, "value": {"baseline": "value", "expectile": 0.7},
            "preferred": {"responses": "preferred"}, "preferred_skip": {"responses": "preferred", "ties": "skip"}}


def arms(coefs: list[float], variants: list[str], kto: bool) -> dict[str, tuple[str, dict]]:
    """arm name → (stage kind, upo settings or {} for none)."""
    out: dict[str, tuple[str, dict]] = {"dpo": ("offline_dpo", {"coef": 0.0})}
    for v in variants:
        for c in coefs:
            out[f"upo_{v}@{c:g}"] = ("offline_dpo", {"coef": c, **VARIANTS[v]})
    if kto:
        out["kto"] = ("kto", {"coef": 0.0})
        for c in coefs:
            out[f"kto_upo_preferred@{c:g}"] = ("kto", {"coef": c, "responses": "preferred"})
    return out


def pipeline(seed: int, run_dir: Path, arms_: dict[str, tuple[str, dict]], steps: int | None) -> dict:
    raw = yaml.safe_load((ROOT / "pipelines" / "upo.yaml").read_text())
    raw.update(seed=seed, name="bench_upo_variants", run_dir=str(run_dir),
               tracking={"uri": f"sqlite:///{run_dir}/mlflow.db", "log_checkpoints": False})
    dpo = next(s for s in raw["stages"] if s["name"] == "dpo")
    upo = next(s for s in raw["stages"] if s["name"] == "upo")
    raw["stages"] = [s for s in raw["stages"] if s["name"] in ("task", "sft")]
    for name, (kind, settings) in arms_.items():
        stage = copy.deepcopy(dpo)
        stage["name"] = name.replace("@", "_").replace(".", "p")
        stage["upo"] = {**upo["upo"], **settings}
        if steps:
            stage["schedule"]["steps"] = steps
        stage["schedule"]["eval_every"] = 0
        if kind == "kto":
            s = stage["schedule"]
            stage.update(kind="kto", kto={"beta": 0.1, "desirable_weight": 1.33})
            stage.pop("dpo")
            stage["schedule"] = {"steps": s["steps"], "examples_per_step": 2 * s["pairs_per_step"],
                                 "examples_per_microbatch": 2 * s["pairs_per_microbatch"]}
            stage["optim"] = {"lr": 5.0e-5, "warmup_steps": 10, "schedule": "constant"}
        raw["stages"].append(stage)
    return raw


def run(seed: int, arms_: dict[str, tuple[str, dict]], steps: int | None, workdir: Path) -> dict[str, dict[str, float]]:
    from orchestrator.config import validate_pipeline
    from orchestrator.runner import run_pipeline

    run_dir = workdir / f"seed{seed}"
    config = validate_pipeline(pipeline(seed, run_dir, arms_, steps))
    result = run_pipeline(config, quiet=True)
    out = {}
    for name in arms_:
        stage = next(s for s in result.stages if s.name == name.replace("@", "_").replace(".", "p"))
        out[name] = {m: stage.metrics[m][-1][1] for m in METRICS if m in stage.metrics}
        out[name]["start_" + METRICS[0]] = stage.metrics[METRICS[0]][0][1]
    return out


def plot(results: dict[int, dict[str, dict[str, float]]], variants: list[str], path: str) -> None:
    """Designer metric against tie accuracy, one line per variant over its λ (every arm of the
    results named ``upo_<variant>@λ``), DPO as a star, and the tie-accuracy bound DPO − 0.03."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    seeds = sorted(results)

    def mean(arm: str, metric: str) -> float:
        return statistics.mean(results[s][arm][metric] for s in seeds)

    x, y = METRICS[1], METRICS[0]
    ax.scatter([mean("dpo", x)], [mean("dpo", y)], marker="*", s=150, color="black", label="DPO (λ = 0)", zorder=3)
    for v in variants:
        coefs = sorted(float(a.split("@")[1]) for a in results[seeds[0]] if a.startswith(f"upo_{v}@"))
        names = [f"upo_{v}@{c:g}" for c in coefs]
        ax.plot([mean(n, x) for n in names], [mean(n, y) for n in names], marker="o", label=f"UPO, {v}")
        for n, c in zip(names, coefs, strict=True):
            ax.annotate(f"λ={c:g}", (mean(n, x), mean(n, y)), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.axvline(mean("dpo", x) - 0.03, color="grey", linestyle=":", label="DPO − 0.03")
    ax.set_xlabel("held-out pair accuracy on auxiliary ties (implicit reward)")
    ax.set_ylabel("held-out share of sentence answers (designer)")
    ax.set_title(f"UPO frontier over λ, pipelines/upo.yaml, seeds {seeds}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--coefs", type=float, nargs="+", default=[0.1])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--kto", action="store_true", help="add KTO and UPO-on-KTO (preferred responses) arms")
    parser.add_argument("--steps", type=int, default=None, help="steps per arm (default: the shipped 240)")
    parser.add_argument("--plot", default=None, help="write the frontier picture here")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--merge", nargs="+", default=None,
                        help="draw --plot from these --out files (their arms merged per seed) instead of running")
    args = parser.parse_args()
    if args.merge:
        merged: dict[int, dict[str, dict[str, float]]] = {}
        for path in args.merge:
            for seed, arms_of_seed in json.loads(Path(path).read_text())["results"].items():
                merged.setdefault(int(seed), {}).update(arms_of_seed)
        plot(merged, args.variants, args.plot)
        print(f"frontier: {args.plot}")
        return
    arms_ = arms(args.coefs, args.variants, args.kto)
    results = {}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            results[seed] = run(seed, arms_, args.steps, Path(tmp))
            print(f"seed {seed}: {json.dumps(results[seed])}", flush=True)
    print(f"\n{len(args.seeds)} seed(s), {time.perf_counter() - start:.0f} s")
    print(f"{'arm':<22}" + "".join(f"{m.removeprefix('eval/'):>34}" for m in METRICS))
    for arm in arms_:
        cells = []
        for m in METRICS:
            values = [results[s][arm][m] for s in args.seeds if m in results[s][arm]]
            cells.append(f"{statistics.mean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0:.3f}"
                         if values else "-")
        print(f"{arm:<22}" + "".join(f"{c:>34}" for c in cells))
    if args.plot:
        plot(results, args.variants, args.plot)
        print(f"frontier: {args.plot}")
    write_result(args.out, {"args": vars(args), "results": {str(s): r for s, r in results.items()}})


if __name__ == "__main__":
    main()
