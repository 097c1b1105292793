"""The evaluate stage's records: every generation of every policy with its scores, as one Arrow table
(the stage's ``generations`` output)."""

from __future__ import annotations

from typing import Any

import pyarrow as pa


def generations_table(names: list[str], prompt_texts: list[str], results: dict[str, dict[str, Any]], k: int
                       ) -> pa.Table:
    cols: dict[str, list[Any]] = {c: [] for c in ("policy", "prompt_index", "prompt", "mode", "sample", "response",
                                                  "reward", "check", "response_tokens", "finish_reason",
                                                  "logprob_sum", "ref_logprob_sum")}
    for name in names:
        r = results[name]
        for mode, samples, rewards, checks, per in (("greedy", r["greedy"], r["greedy_rewards"], r["greedy_checks"], 1),
                                                    ("sampled", r["sampled"], r["rewards"], r["checks"], k)):
            for j, x in enumerate(samples):
                cols["policy"].append(name)
                cols["prompt_index"].append(j // per)
                cols["prompt"].append(prompt_texts[j // per])
                cols["mode"].append(mode)
                cols["sample"].append(j % per)
                cols["response"].append(x.text)
                cols["reward"].append(float(rewards[j]))
                cols["check"].append(None if checks is None else float(checks[j]))
                cols["response_tokens"].append(len(x.response_ids))
                cols["finish_reason"].append(x.finish_reason)
                cols["logprob_sum"].append(float(sum(x.logprobs)))
                cols["ref_logprob_sum"].append(float(sum(r["ref_logps"][j])) if mode == "sampled" else None)
    return pa.table(cols)
