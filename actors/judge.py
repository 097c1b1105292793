"""A generative judge inside the reward role: a vLLM engine that reads each rendered (prompt,
response) and generates a verdict, which ``pipelines.data.judges.parse_verdict`` turns into a score.

The engine is a ``RolloutWorker``'s (the same start-up, CPU settings and greedy decoding), never
updated: the judge is frozen, so a dead reward rank is replaced in place like any reward. Verdicts
that do not parse score the spec's ``unparsable_score`` and are counted; ``take_counts`` hands the
counts over (and starts new ones).
"""

from __future__ import annotations

import math
from typing import Any

from actors.rollout import RolloutWorker, SamplingSpec
from pipelines.data.judges import JudgeSpec, parse_verdict


class JudgeScorer:
    """One rank's judge. Cheap ``__init__``; ``setup`` starts the engine."""

    def __init__(self, rank: int, world_size: int, spec: JudgeSpec, *, num_threads: int = 1,
                 trust_remote_code: bool = False) -> None:
        self.rank = rank
        self.spec = spec
        self.engine = RolloutWorker(rank, world_size, spec.model_path, max_model_len=spec.max_model_len,
                                    dtype=spec.dtype, kv_cache_gib=spec.kv_cache_gib,
                                    gpu_memory_utilization=spec.gpu_memory_utilization, num_threads=num_threads,
                                    trust_remote_code=trust_remote_code)
        self.tokenizer: Any = None
        self.counts = {"verdicts": 0, "unparsable": 0, "truncated": 0}

    def setup(self) -> dict[str, Any]:
        if self.tokenizer is not None:
            return {"rank": self.rank, "judge": self.spec.model_path, "reused": True}
        report = self.engine.setup()
        self.tokenizer = self.engine.llm.get_tokenizer()
        return report | {"judge": self.spec.model_path}

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        """Each (prompt, response)'s score from the judge's greedy verdict."""
        assert self.tokenizer is not None, "setup() first"
        texts = [self.spec.render(str(p), r) for p, r in zip(prompts, responses, strict=True)]
        room = self.spec.max_model_len - self.spec.max_new_tokens
        full = [self.tokenizer(t)["input_ids"] for t in texts]
        self.counts["truncated"] += sum(len(f) > room for f in full)
        ids = [f[-room:] for f in full]  # an overlong one keeps its end (the question the template asks)
        greedy = SamplingSpec(max_new_tokens=self.spec.max_new_tokens, temperature=0.0)
        verdicts = [s.text for s in self.engine.generate(ids, greedy)]
        scores = []
        for verdict in verdicts:
            value = parse_verdict(verdict, self.spec.verdict)
            self.counts["verdicts"] += 1
            if value is None or not math.isfinite(value):
                self.counts["unparsable"] += 1
                value = self.spec.verdict.unparsable_score
            scores.append(value)
        return scores

    def take_counts(self) -> dict[str, int]:
        counts, self.counts = self.counts, {k: 0 for k in self.counts}
        return counts
