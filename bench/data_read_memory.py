"""Peak memory and time of reading a preference file of 1M rows against one of 10k.

Each read runs in a fresh subprocess that reports its peak RSS (``ru_maxrss``) and wall time, so the
two sizes are measured side by side under the same conditions:

  check       ``formats.check_pairs``: every check the stage's read makes, streamed batch by batch
              (the pre-flight check ``rlhf run`` makes before any actor starts)
  read        ``formats.read_pairs``: the rows materialized as Python values
  tokenize    read, render and tokenize every pair in memory (the stages' path for held-out pairs,
              and for every pair before the store)
  store       what offline DPO and reward-model training do with their training pairs:
              ``data.write_pair_store`` reads, renders and tokenizes batch by batch into a
              memory-mapped Arrow file, then 100 random batches of 32 pairs are taken and collated
              as training steps take them

Rendering and tokenizing use the byte-level BPE tokenizer with its ChatML template (built before
the clock starts).

Files: standard pairs as Parquet, conversational pairs as JSON Lines, both written here.

    .venv/bin/python bench/data_read_memory.py --rows 10000 1000000 --out bench/out/data_memory.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROBE = """
import json, resource, sys, time
sys.path.insert(0, {root!r})
from pipelines.data import formats
from pipelines.data.lengths import LengthPolicy, LengthTally
from pipelines.data.tokens import EpochSampler, collate_pairs, tokenize_pairs, write_pair_store
from pipelines.tasks.tiny_model import build_bpe_tokenizer
tok = build_bpe_tokenizer()
path = {path!r}
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
{call}
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"seconds": seconds, "peak_rss_mib": peak / 1024, "baseline_rss_mib": before / 1024}}))
"""


def write_files(directory: Path, rows: int) -> dict[str, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    prompts = [f"{i % 97}+{i % 89}=" for i in range(rows)]
    chosen = [str(i % 97 + i % 89) for i in range(rows)]
    rejected = [str(i % 97 + i % 89 + 1) for i in range(rows)]
    text = directory / f"text_{rows}.parquet"
    pq.write_table(pa.table({"prompt": prompts, "chosen": chosen, "rejected": rejected}), text, row_group_size=65536)
    conv = directory / f"conversational_{rows}.jsonl"
    with conv.open("w") as f:
        for p, c, r in zip(prompts, chosen, rejected, strict=True):
            f.write(json.dumps({"prompt": [{"role": "user", "content": p}],
                                "chosen": [{"role": "assistant", "content": c}],
                                "rejected": [{"role": "assistant", "content": r}]}) + "\n")
    return {"standard parquet": text, "conversational jsonl": conv}


CALLS = {
    "check": "formats.check_pairs(path)",
    "read": "rows = formats.read_pairs(path)",
    "tokenize": "pairs = tokenize_pairs(formats.pair_texts(formats.read_pairs(path), tok, path), tok, max_length=128, "
                "source=path)",
    "store": "lengths = LengthTally(path, LengthPolicy(128))\n"
             "store = write_pair_store(path, None, tok, path + '.arrow', lengths=lengths)\n"
             "sampler = EpochSampler(len(store), 32, 0)\n"
             "for step in range(100):\n"
             "    collate_pairs([store[i] for i in sampler.indices(step)], tok.pad_token_id)",
}


def measure(call: str, path: Path) -> dict:
    code = PROBE.format(root=str(ROOT), path=str(path), call=CALLS[call])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs=2, default=[10_000, 1_000_000], metavar=("SMALL", "LARGE"))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    small, large = args.rows
    report: dict = {"rows": [small, large], "results": {}}
    with tempfile.TemporaryDirectory() as tmp:
        files = {n: write_files(Path(tmp), n) for n in (small, large)}
        for kind in files[small]:
            for call in CALLS:
                a, b = measure(call, files[small][kind]), measure(call, files[large][kind])
                report["results"][f"{kind} {call}"] = {
                    str(small): a, str(large): b,
                    "peak_rss_ratio": b["peak_rss_mib"] / a["peak_rss_mib"],
                    "file_mib": [files[n][kind].stat().st_size / 2**20 for n in (small, large)]}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"| read | file MiB ({small:,} / {large:,} rows) | peak RSS MiB | ratio | seconds |")
    print("|---|---|---|---|---|")
    for name, r in report["results"].items():
        a, b = r[str(small)], r[str(large)]
        print(f"| {name} | {r['file_mib'][0]:.1f} / {r['file_mib'][1]:.1f} | {a['peak_rss_mib']:.0f} / "
              f"{b['peak_rss_mib']:.0f} | {r['peak_rss_ratio']:.2f} | {a['seconds']:.2f} / {b['seconds']:.2f} |")


if __name__ == "__main__":
    main()
