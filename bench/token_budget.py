"""Micro-batches by a token budget (``trainer.tokens_per_microbatch``) against fixed row counts.

One policy trainer (DeepSpeed, one rank, no Ray) on a locally built model takes PPO steps and runs
log-prob passes over the same batches of sampled sequences whose responses vary in length, as an
online iteration's do (prompts of ``--prompt-min``..``--prompt-max`` tokens, responses uniform in
``--response-min``..``--response-max``). Two trainers, one per arm, alternate on each batch:

  rows     ``--rows`` consecutive rows per micro-batch (``*_per_microbatch``); each micro-batch
           drops the columns that are padding in all of its rows
  tokens   rows sorted by length, packed while rows x longest row <= ``--tokens``

Measured per arm: the median update step (``train_step``: forward + backward + Adam over the
batch) and log-prob pass (``evaluate`` with the response log-probs the online loop computes), and
the padding share of what the forward computed (the trainer's ``data/pad_fraction``); beside them
the padding share of the batch padded to its longest row (no trimming at all). Ratios come from
one run; both arms see identical batches, and the update losses agree (checked).

    .venv/bin/python bench/token_budget.py --size 85m --steps 6 --out bench/out/token_budget.json
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.common import write_result  # noqa: E402


def sampled_batch(rng: random.Random, args: argparse.Namespace, vocab: int):
    """A PPO batch of ``--batch`` sequences, right-padded, with made-up old log-probs and advantages."""
    from pipelines.data.batches import PPOBatch

    rows = []
    for _ in range(args.batch):
        prompt, response = rng.randint(args.prompt_min, args.prompt_max), rng.randint(args.response_min,
                                                                                      args.response_max)
        rows.append((prompt, response))
    width = max(p + r for p, r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    attn = torch.zeros_like(ids)
    action = torch.zeros(len(rows), width - 1)
    for i, (p, r) in enumerate(rows):
        ids[i, : p + r] = torch.tensor([rng.randrange(3, vocab) for _ in range(p + r)])
        attn[i, : p + r] = 1
        action[i, p - 1 : p + r - 1] = 1
    old = -torch.rand(len(rows), width - 1) * 4 * action
    adv = torch.randn(len(rows), width - 1) * action
    return PPOBatch(ids, attn, action, old, adv)


def make_trainer(model_dir: str, args: argparse.Namespace, port: int, tokens: int | None):
    from actors.policy_trainer import PolicyTrainer, TrainerSpec

    spec = TrainerSpec(model_path=model_dir, examples_per_step=args.batch, examples_per_microbatch=args.rows,
                       lr=1e-6, total_steps=args.steps + 1, schedule="constant", zero_stage=2,
                       num_threads=args.threads, tokens_per_microbatch=tokens)
    trainer = PolicyTrainer(0, 1, spec)
    saved = dict(os.environ)
    trainer.setup("127.0.0.1", port)
    os.environ.clear()
    os.environ.update(saved)
    return trainer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--steps", type=int, default=6, help="batches (each: one update and one log-prob pass per arm)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rows", type=int, default=16, help="rows per micro-batch of the rows arm")
    ap.add_argument("--tokens", type=int, default=None, help="token budget (default: rows x the mean row length)")
    ap.add_argument("--prompt-min", type=int, default=8)
    ap.add_argument("--prompt-max", type=int, default=24)
    ap.add_argument("--response-min", type=int, default=4)
    ap.add_argument("--response-max", type=int, default=96)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.tokens is None:  # the same work per micro-batch on average as the rows arm
        mean = (args.prompt_min + args.prompt_max + args.response_min + args.response_max) / 2
        args.tokens = int(args.rows * mean)

    from actors.net import free_port
    from orchestrator.runtime.weight_sync import probe_token_logps
    from pipelines.data.batches import SFTBatch
    from pipelines.losses import PolicyGradientLoss
    from pipelines.tasks.tiny_model import build_tiny_model

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(build_tiny_model(Path(tmp) / "model", size=args.size, max_position_embeddings=256))
        port = free_port()
        arms = {"rows": make_trainer(model_dir, args, port, None), "tokens": make_trainer(model_dir, args, port,
                                                                                        args.tokens)}
        vocab = arms["rows"].engine.module.config.vocab_size
        rng = random.Random(args.seed)
        times: dict[str, dict[str, list[float]]] = {a: {"update_s": [], "logprob_s": []} for a in arms}
        pads: dict[str, list[float]] = {a: [] for a in arms}
        untrimmed, losses = [], {a: [] for a in arms}
        for step in range(args.steps + 1):  # step 0 warms up (allocator, kernels) and is not counted
            batch = sampled_batch(rng, args, vocab)
            probe = SFTBatch(batch.input_ids, batch.attention_mask, torch.nn.functional.pad(batch.action_mask, (1, 0)))
            for name, trainer in arms.items():
                t0 = time.perf_counter()
                metrics = trainer.train_step(batch, PolicyGradientLoss(clip_eps=0.2))
                t1 = time.perf_counter()
                trainer.evaluate(probe, probe_token_logps)
                t2 = time.perf_counter()
                if step:
                    times[name]["update_s"].append(t1 - t0)
                    times[name]["logprob_s"].append(t2 - t1)
                    pads[name].append(metrics["data/pad_fraction"])
                    losses[name].append(metrics["loss"])
            if step:
                untrimmed.append(1 - batch.num_tokens() / batch.positions())
            print(f"step {step}: " + ", ".join(f"{a} update {times[a]['update_s'][-1]:.2f}s" for a in arms if step),
                  flush=True)
        arms["rows"].shutdown()

    for a, b in zip(losses["rows"], losses["tokens"], strict=True):
        assert abs(a - b) <= 1e-3 * max(1.0, abs(a)), (a, b)  # the same step: only the micro-batching differs
    res = {"args": vars(args), "untrimmed_pad_fraction": statistics.mean(untrimmed)}
    for name in arms:
        res[name] = {k: statistics.median(v) for k, v in times[name].items()} | {"pad_fraction": statistics.mean(
            pads[name])}
    res["speedup"] = {k: res["rows"][k] / res["tokens"][k] for k in ("update_s", "logprob_s")}
    print(f"padding: untrimmed {res['untrimmed_pad_fraction']:.3f}, rows {res['rows']['pad_fraction']:.3f}, "
          f"tokens {res['tokens']['pad_fraction']:.3f}")
    for k in ("update_s", "logprob_s"):
        print(f"{k}: rows {res['rows'][k]:.3f}s tokens {res['tokens'][k]:.3f}s -> {res['speedup'][k]:.2f}x")
    write_result(args.out, res)


if __name__ == "__main__":
    main()
