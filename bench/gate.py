"""``make bench-gate``: the throughput comparisons at tiny size, each ratio beside the committed baseline.

Runs, one after the other (about 4 minutes on 2 cores):

- ``offline_dpo_vs_trl.py --steps 40 --threads 1``: offline DPO update and loop pairs/s, ours / TRL;
- ``grpo_vs_trl.py`` short task: synchronous GRPO samples/s, ours / TRL;
- ``grpo_vs_trl.py --response-tokens 64``: the same on the long-response task.

and prints every ratio beside ``bench/baseline.json``'s. It exits 1 when a ratio falls more than
10% below its baseline (``--tolerance``), 2 when TRL is missing. Not part of CI (these machines are
noisy): run it before a closing note that touches a hot path. ``--update-baseline`` writes this
run's ratios as the new baseline (commit it with the change that earned it).

    .venv/bin/python bench/gate.py                      # or: make bench-gate
    .venv/bin/python bench/gate.py --update-baseline
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASELINE = ROOT / "bench" / "baseline.json"
TINY_GRPO = ["--iterations", "8", "--warmup", "2", "--prompts", "16", "--sft-steps", "60", "--arms", "sync,trl"]
# name -> (script, arguments, {ratio name: key in the script's JSON})
RUNS: dict[str, tuple[str, list[str], dict[str, str]]] = {
    "offline_dpo": ("offline_dpo_vs_trl.py", ["--steps", "40", "--warmup", "5", "--threads", "1"],
                    {"offline_dpo_update": "ratio_rayrlhf_over_trl",
                     "offline_dpo_loop": "loop_ratio_rayrlhf_over_trl"}),
    "grpo_short": ("grpo_vs_trl.py", TINY_GRPO, {"grpo_short_samples_per_s": "ratio_samples_per_s"}),
    "grpo_long": ("grpo_vs_trl.py", [*TINY_GRPO, "--response-tokens", "64"],
                  {"grpo_64_tokens_samples_per_s": "ratio_samples_per_s"}),
}


def measure(work: Path) -> dict[str, float]:
    """Every run's ratios (name -> ours / TRL)."""
    ratios: dict[str, float] = {}
    for name, (script, args, keys) in RUNS.items():
        out = work / f"{name}.json"
        start = time.perf_counter()
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {script} {' '.join(args)}", flush=True)
        proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args, "--out", str(out)], cwd=ROOT,
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout[-2000:] + proc.stderr[-4000:])
            raise SystemExit(proc.returncode)
        result = json.loads(out.read_text())
        for ratio, key in keys.items():
            ratios[ratio] = float(result[key])
        print(f"    {time.perf_counter() - start:.0f} s", flush=True)
    return ratios


def compare(ratios: dict[str, float], baseline: dict[str, float], tolerance: float) -> list[str]:
    """Print each ratio beside its baseline; the names of those more than ``tolerance`` below it."""
    failed = []
    print(f"\n{'ratio (ours / TRL)':34}{'now':>8}{'baseline':>10}{'change':>9}")
    for name, now in ratios.items():
        base = baseline.get(name)
        if base is None:
            print(f"{name:34}{now:>8.3f}{'-':>10}{'':>9}  (no baseline)")
            continue
        change = now / base - 1
        low = now < base * (1 - tolerance)
        failed += [name] if low else []
        print(f"{name:34}{now:>8.3f}{base:>10.3f}{change:>+8.1%}{'  BELOW' if low else ''}")
    return failed


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tolerance", type=float, default=0.10, help="allowed fall below the baseline (0.10 = 10%%)")
    p.add_argument("--update-baseline", action="store_true", help="write this run's ratios to bench/baseline.json")
    args = p.parse_args()
    from bench.offline_dpo_vs_trl import INSTALL_HINT, check_trl

    if check_trl(sys.executable) is None:
        print(INSTALL_HINT.format(python=sys.executable), file=sys.stderr)
        return 2
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_gate_") as tmp:
        ratios = measure(Path(tmp))
    saved = json.loads(BASELINE.read_text()) if BASELINE.exists() else {"ratios": {}}
    failed = compare(ratios, saved["ratios"], args.tolerance)
    print(f"\n{len(ratios)} ratios in {time.perf_counter() - start:.0f} s; baseline of {saved.get('measured', '-')} "
          f"at {saved.get('commit', '-')}")
    if args.update_baseline:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=False).stdout.strip()
        BASELINE.write_text(json.dumps({"measured": time.strftime("%Y-%m-%d"), "commit": commit,
                                        "machine": "2 cores, no GPU", "ratios": ratios}, indent=1) + "\n")
        print(f"wrote {BASELINE.relative_to(ROOT)}")
        return 0
    if failed:
        print(f"FAILED: {', '.join(failed)} fell more than {args.tolerance:.0%} below the baseline")
        return 1
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
