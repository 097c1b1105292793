"""What a stage does with a row longer than its token limits: the length policy (``data.truncation``).

A row is a prompt and one or more completions (a preference pair's two, an SFT row's trained
answer, none for an online stage's prompt). Limits: ``max_length`` (prompt + the longest completion),
and optionally ``max_prompt_length`` and ``max_completion_length``. A row over any of them is, by
``truncation``:

* ``error``: counted; once every row was read, one error gives how many rows exceed the limits, and
  the longest (its 1-based row number and length), so the limit is raised once, not row by row;
* ``drop``: left out (TRL's reward trainer drops over-long pairs);
* ``keep_end``: the prompt keeps its end (its first token kept when it is BOS) and the completions
  their start, cut at the limit (TRL's ``truncation_mode="keep_end"``, its DPO default): the prompt
  keeps at least half of ``max_length`` when a completion alone would fill it;
* ``keep_start``: the sequence keeps its start: the prompt its first tokens (up to
  ``max_prompt_length`` and ``max_length - 1``), then the completions up to the limit.

A truncated pair whose two completions became the same tokens is dropped (no preference is left).
Each read counts its rows, drops and truncations (``LengthTally``): the stage logs them as its MLflow
params ``data.<file>.rows``, ``.rows_truncated``, ``.rows_dropped``, ``.longest_row_tokens`` (``<file>``:
``train``, ``eval``, ``prompts``) and prints one line when rows were cut or dropped.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from pipelines.errors import DataError

LOG = logging.getLogger("rlhf.data")  # shown on the console (one line) and in the stage's log


class Truncation(str, enum.Enum):
    ERROR = "error"
    DROP = "drop"
    KEEP_END = "keep_end"
    KEEP_START = "keep_start"


@dataclass(frozen=True)
class Cut:
    """Which tokens of a row stay: the prompt's first ``head`` tokens, then ``prompt[start:end]``;
    each completion's first ``completion`` tokens."""

    head: int
    start: int
    end: int
    completion: int

    def prompt(self, ids: Sequence[int]) -> list[int]:
        return [*ids[: self.head], *ids[self.start : self.end]]


@dataclass(frozen=True)
class LengthPolicy:
    """The limits in tokens and what happens over them; ``setting`` is how errors name the limit."""

    max_length: int
    truncation: Truncation = Truncation.KEEP_END
    max_prompt_length: int | None = None
    max_completion_length: int | None = None
    setting: str = "data.max_length"

    def over(self, prompt: int, completions: Sequence[int]) -> bool:
        longest = max(completions, default=0)
        return (prompt + longest > self.max_length
                or (self.max_prompt_length is not None and prompt > self.max_prompt_length)
                or (self.max_completion_length is not None and longest > self.max_completion_length))

    def cut(self, prompt: int, completions: Sequence[int], *, keep_first: bool = False) -> Cut:
        """The truncation of a row of ``prompt`` tokens and these completion lengths (``keep_end``
        or ``keep_start``); ``keep_first``: the prompt's first token (BOS) stays whatever is cut."""
        longest = max(completions, default=0)
        if self.max_completion_length is not None:
            longest = min(longest, self.max_completion_length)
        room = min(prompt, self.max_prompt_length or prompt)
        if self.truncation is Truncation.KEEP_END:
            if room + longest > self.max_length:
                room = max(self.max_length - longest, min(room, self.max_length // 2))
            head = 1 if keep_first and room < prompt and room > 1 else 0
            return Cut(head, prompt - room + head, prompt, min(longest, self.max_length - room))
        if completions:
            room = min(room, self.max_length - 1)  # a completion keeps at least its first token
        room = min(room, self.max_length)
        return Cut(0, 0, room, min(longest, self.max_length - room))


@dataclass
class LengthTally:
    """Rows read under a ``LengthPolicy``: how many, dropped, truncated; the longest seen.
    Row numbers are 0-based here and printed 1-based (an editor's line number in a JSON Lines file)."""

    source: str
    policy: LengthPolicy
    rows: int = 0
    dropped: int = 0
    truncated: int = 0
    over: int = 0
    longest: int = 0
    longest_row: int = 0
    unknown: int = 0  # tokens that are the tokenizer's <unk>: characters it cannot encode
    last_truncated: bool = False  # whether the row ``fit`` returned last was cut
    _reasons: dict[str, int] = field(default_factory=dict)

    @classmethod
    def strict(cls, source: str, max_length: int) -> LengthTally:
        """A count under ``truncation: error`` at ``max_length`` (a row over it fails the read)."""
        return cls(source, LengthPolicy(max_length, Truncation.ERROR))

    def fit(self, row: int, prompt: int, completions: Sequence[int], *, keep_first: bool = False) -> Cut | None:
        """The row's ``Cut`` (everything when it fits), or None when it is dropped (or, under
        ``error``, over: ``finish`` raises once every row was seen)."""
        self.rows += 1
        self.last_truncated = False
        total = prompt + max(completions, default=0)
        if total > self.longest:
            self.longest, self.longest_row = total, row
        if not self.policy.over(prompt, completions):
            return Cut(0, 0, prompt, max(completions, default=0))
        self.over += 1
        if self.policy.truncation is Truncation.ERROR:
            return None
        if self.policy.truncation is Truncation.DROP:
            self.drop("over the length limits")
            return None
        self.truncated += 1
        self.last_truncated = True
        return self.policy.cut(prompt, completions, keep_first=keep_first)

    def drop(self, reason: str) -> None:
        """Count a row left out (a truncated pair whose sides became equal, say)."""
        self.dropped += 1
        self._reasons[reason] = self._reasons.get(reason, 0) + 1

    def reject(self, reason: str) -> None:
        """The row ``fit`` returned last is left out after all: counted as dropped, not as truncated."""
        if self.last_truncated:
            self.truncated, self.last_truncated = self.truncated - 1, False
        self.drop(reason)

    def finish(self) -> LengthTally:
        """Raise under ``error`` when rows were over; raise when every row was dropped."""
        p = self.policy
        if p.truncation is Truncation.ERROR and self.over:
            limits = [f"{p.setting}={p.max_length}"]
            limits += [f"data.max_prompt_length={p.max_prompt_length}"] if p.max_prompt_length else []
            limits += [f"data.max_completion_length={p.max_completion_length}"] if p.max_completion_length else []
            raise DataError(
                f"{self.source}: {self.over} of {self.rows} rows exceed {', '.join(limits)} (the longest: row "
                f"{self.longest_row + 1}, {self.longest} tokens); raise the limit, or set data.truncation to "
                "keep_end, keep_start or drop")
        if self.rows and self.dropped == self.rows:
            raise DataError(f"{self.source}: all {self.rows} rows were dropped ({self.reasons()}); the longest is "
                            f"{self.longest} tokens, over {p.setting}={p.max_length}")
        return self

    def reasons(self) -> str:
        return ", ".join(f"{n} {why}" for why, n in self._reasons.items()) or "none"

    def report(self, name: str = "train") -> dict[str, int]:
        """``params``, after a console line when rows were truncated or dropped."""
        if self.truncated or self.dropped:
            LOG.info("%s", self.line())
        if self.unknown:
            LOG.warning("%s: %d tokens are the tokenizer's <unk>, characters it cannot encode (the char tokenizer "
                        "has printable ASCII only: a byte-level BPE from init_model encodes every character)",
                        self.source, self.unknown)
        return self.params(name)

    def params(self, name: str = "train") -> dict[str, int]:
        """The counts as the stage's MLflow params ``data.<name>.rows``, ``.rows_truncated``,
        ``.rows_dropped``, ``.longest_row_tokens`` (and ``.unknown_tokens``): one value per file, where
        metrics would each be a one-point chart before the stage's curves."""
        counts = {"rows": self.rows, "rows_truncated": self.truncated, "rows_dropped": self.dropped,
                  "longest_row_tokens": self.longest} | ({"unknown_tokens": self.unknown} if self.unknown else {})
        return {f"data.{name}.{key}": value for key, value in counts.items()}

    def line(self) -> str:
        """One line for the stage log and the console."""
        return (f"{self.source}: {self.rows} rows, {self.truncated} truncated, {self.dropped} dropped "
                f"(data.truncation={self.policy.truncation.value}, {self.policy.setting}={self.policy.max_length}; "
                f"longest row {self.longest} tokens)"
                + (f"; {self.unknown} <unk> tokens: characters the tokenizer cannot encode" if self.unknown else ""))


def report_lengths(lengths: dict[str, LengthTally]) -> dict[str, int]:
    """The length policy's counts of a stage's files (``train``, ``eval``) as params
    ``data.<name>.…`` (a console line for each file that had rows cut or dropped)."""
    out: dict[str, int] = {}
    for name, tally in lengths.items():
        out |= tally.report(name)
    return out
