"""The reward role backed by a trained reward-model checkpoint (a ``reward_model`` stage output).

Texts are tokenized exactly as the reward-model stage tokenized its training pairs (prompt with the
tokenizer's special tokens, response + EOS) and scored at the last token. With ``normalize`` the
scores are standardised with the mean/std stored next to the checkpoint at training time.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from actors.modeling import load_reward_model, pick_device, resolve_dtype, sequence_scores
from pipelines.data.formats import render_completion, render_prompt
from pipelines.data.judges import JudgeSpec
from pipelines.data.rewards import FunctionReward, load_reward_function
from pipelines.data.tokens import encode_completions, pad_token_id
from pipelines.errors import RewardError

STATS_FILE = "reward_stats.json"


class RewardModelScorer:
    """One rank of a reward group over a checkpoint. Cheap ``__init__``; ``setup`` loads the model."""

    def __init__(self, rank: int, world_size: int, model_path: str, *, normalize: bool = False,
                 precision: str = "auto", num_threads: int = 1, rows_per_chunk: int = 64,
                 trust_remote_code: bool = False) -> None:
        self.rank = rank
        self.world_size = world_size
        self.model_path = model_path
        self.normalize = normalize
        self.precision = precision
        self.num_threads = num_threads
        self.rows_per_chunk = rows_per_chunk
        self.trust_remote_code = trust_remote_code
        self.model: Any = None
        self.tokenizer: Any = None
        self.stats: dict[str, float] | None = None
        self.device = torch.device("cpu")

    def setup(self) -> dict[str, Any]:
        if self.model is not None:  # a group kept alive for the next stage
            return {"rank": self.rank, "device": str(self.device), "stats": self.stats, "reused": True}
        from transformers import AutoTokenizer

        torch.set_num_threads(self.num_threads)
        self.device = pick_device()
        dtype = resolve_dtype(self.precision, self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path, trust_remote_code=self.trust_remote_code)
        self.model = load_reward_model(self.model_path, dtype=dtype, trust_remote_code=self.trust_remote_code)
        self.model.to(self.device).eval()
        stats_path = Path(self.model_path) / STATS_FILE
        if stats_path.is_file():
            self.stats = json.loads(stats_path.read_text())
        if self.normalize and self.stats is None:
            raise RewardError(f"reward model {self.model_path}: normalize is on but {STATS_FILE} is missing")
        return {"rank": self.rank, "device": str(self.device), "stats": self.stats}

    def score(self, prompts: list[Any], responses: list[str]) -> list[float]:
        """One scalar reward per (prompt, response); raises RewardError naming a non-finite item. A
        conversation prompt and its response are rendered with the reward model's chat template."""

        if self.model is None:
            self.setup()
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        if any(not isinstance(p, str) for p in prompts):  # conversations: rendered as at training
            responses = [r if isinstance(p, str) else
                         render_completion(self.tokenizer, p, [{"role": "assistant", "content": r}], f"item {i}")
                         for i, (p, r) in enumerate(zip(prompts, responses, strict=True))]
            prompts = [render_prompt(self.tokenizer, p, f"item {i}") for i, p in enumerate(prompts)]
        prompt_ids, response_ids = encode_completions(self.tokenizer, list(prompts), list(responses))
        seqs = [p + r for p, r in zip(prompt_ids, response_ids, strict=True)]
        pad = pad_token_id(self.tokenizer)
        scores: list[float] = []
        with torch.no_grad():
            for i in range(0, len(seqs), self.rows_per_chunk):
                chunk = seqs[i : i + self.rows_per_chunk]
                width = max(len(s) for s in chunk)
                ids = torch.tensor([s + [pad] * (width - len(s)) for s in chunk], device=self.device)
                attn = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in chunk], device=self.device)
                scores += sequence_scores(self.model, ids, attn).cpu().tolist()
        if self.normalize:
            assert self.stats is not None
            scores = [(s - self.stats["mean"]) / max(self.stats["std"], 1e-6) for s in scores]
        for i, s in enumerate(scores):
            if not math.isfinite(s):
                raise RewardError(f"reward model {self.model_path} scored item {i} as {s} "
                                  f"(prompt {prompts[i]!r}, response {responses[i]!r})")
        return scores


class RewardWorker:
    """One rank of the ``reward`` role: a function reward or a reward-model checkpoint, scored in batches.

    Exactly one of ``function`` (``module:function``) and ``model_path``. Cheap ``__init__``;
    ``setup`` imports the function or loads the model. Frozen: replaced in place, kept for the next stage.
    """

    REPLACEABLE = True
    STATELESS = True

    def __init__(self, rank: int, world_size: int, *, function: str | None = None,
                 model_path: str | JudgeSpec | None = None, normalize: bool = False, precision: str = "auto",
                 num_threads: int = 1, trust_remote_code: bool = False) -> None:
        if (function is None) == (model_path is None):
            raise RewardError("a reward needs exactly one of a function (module:function), a reward-model checkpoint "
                              "or a judge")
        self.rank = rank
        self.name = function or (model_path.model_path if isinstance(model_path, JudgeSpec) else model_path)
        self.function = function
        self.scorer: Any = None
        if isinstance(model_path, JudgeSpec):  # a generative judge: a vLLM engine and a verdict parser
            from actors.judge import JudgeScorer

            self.scorer = JudgeScorer(rank, world_size, model_path, num_threads=num_threads,
                                      trust_remote_code=trust_remote_code)
        elif model_path is not None:
            self.scorer = RewardModelScorer(rank, world_size, model_path, normalize=normalize, precision=precision,
                                            num_threads=num_threads, trust_remote_code=trust_remote_code)

    def setup(self) -> dict[str, Any]:
        """Import the function or load the model (once: a reused group's second setup is a no-op)."""
        if self.function is not None:

            if self.scorer is not None:
                return {"rank": self.rank, "reward": self.function, "reused": True}
            self.scorer = FunctionReward(self.function)
            _ = self.scorer.fn  # a bad spec fails at setup, before any rollout
            return {"rank": self.rank, "reward": self.function}
        return self.scorer.setup()

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        return self.scorer.score(prompts, responses)

    def score_chunk(self, chunk: tuple[list[str], list[str]]) -> list[float]:
        """``score`` on a (prompts, responses) pair: the shape balanced dispatch sends."""
        prompts, responses = chunk
        return self.score(prompts, responses)

    def take_counts(self) -> dict[str, int]:
        """A judge's verdict counts since the last call (verdicts, unparsable, truncated); {} for others."""
        take = getattr(self.scorer, "take_counts", None)
        return take() if take is not None else {}


class RewardSet:
    """One rank of a reward group holding several named rewards (a designer's auxiliary rewards, UPO):
    every item gets one score per reward. Cheap ``__init__``; ``setup`` loads each reward.

    ``rewards``: per reward, (name, function or None, model path or a ``JudgeSpec`` or None, normalize).
    Frozen: replaced
    in place, kept for the next stage.
    """

    REPLACEABLE = True
    STATELESS = True

    def __init__(self, rank: int, world_size: int,
                 rewards: tuple[tuple[str, str | None, str | JudgeSpec | None, bool], ...], *,
                 precision: str = "auto", num_threads: int = 1, trust_remote_code: bool = False) -> None:
        self.rank = rank
        self.names = tuple(name for name, *_ in rewards)
        self.workers = [RewardWorker(rank, world_size, function=function, model_path=model, normalize=normalize,
                                     precision=precision, num_threads=num_threads, trust_remote_code=trust_remote_code)
                        for _, function, model, normalize in rewards]

    def setup(self) -> dict[str, Any]:
        return {"rank": self.rank, "rewards": dict(zip(self.names, (w.setup() for w in self.workers), strict=True))}

    def take_counts(self) -> dict[str, int]:
        """The stage reward's judge counts since the last call ({} when it is not a judge)."""
        return self.workers[0].take_counts()

    def score_chunk(self, chunk: tuple[list[str], list[str]]) -> list[list[float]]:
        """Per (prompt, response) of the chunk, its score under each reward, in ``rewards`` order."""
        prompts, responses = chunk
        per_reward = []
        for name, worker in zip(self.names, self.workers, strict=True):
            try:
                per_reward.append(worker.score(prompts, responses))
            except RewardError as exc:
                what = "the stage reward" if name == "reward" else f"auxiliary reward {name!r}"
                raise RewardError(f"{what}: {exc}") from None
        return [list(row) for row in zip(*per_reward, strict=True)]


def build_reward(*, function: str | None = None, model_path: str | None = None, normalize: bool = False,
                 trust_remote_code: bool = False) -> Any:
    """The reward named by a stage's ``reward`` config: anything with ``score(prompts, responses)``.

    Exactly one of ``function`` (``module:function``) and ``model_path`` (a reward-model checkpoint).
    """
    if (function is None) == (model_path is None):
        raise RewardError("a reward needs exactly one of a function (module:function) or a reward-model checkpoint")
    if function is not None:
        load_reward_function(function)  # a bad spec fails here, before anything is scored
        return FunctionReward(function)
    return RewardModelScorer(0, 1, model_path, normalize=normalize, trust_remote_code=trust_remote_code)
