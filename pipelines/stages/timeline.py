"""Per-iteration records of the online stages: which phases ran when (the timeline), which prompts
were trained on; the forwards of an iteration run concurrently, and its scoring while it generates.

A phase's span is (start, end) in seconds from its iteration's start; phases overlap when they run
at the same time (the reference, policy and critic forwards and the scoring of the same samples).
``timeline.jsonl`` keeps one line per iteration, and ``timeline.png`` draws them (MLflow artifacts).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from orchestrator.runtime import faults

if TYPE_CHECKING:
    from orchestrator.runtime.actor_group import Pending
    from orchestrator.runtime.stage_log import StageLog


class IterationLines:
    """One JSON line per iteration in ``path``. Lines of iterations after the point a stage continues
    from are dropped (those iterations run again), so after any recovery the file equals an
    uninterrupted run's."""

    def __init__(self, path: Path, done: int) -> None:
        self.path = path
        self.keep(done)

    def keep(self, done: int) -> None:
        lines = self.path.read_text().splitlines() if self.path.exists() else []
        kept = [line for line in lines if json.loads(line)["iteration"] <= done]
        self.path.write_text("".join(f"{line}\n" for line in kept))

    def add(self, iteration: int, **fields: Any) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"iteration": iteration, **fields}) + "\n")

    def read(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.path.read_text().splitlines()] if self.path.exists() else []


class Submitted(Protocol):
    """Work sent to a group and not collected: ``pending`` the calls, ``get()`` their result."""

    pending: Pending

    def get(self) -> Any: ...


def run_forwards(log: StageLog, jobs: dict[str, Callable[[], Submitted]], m: dict[str, float], *,
                 overlap: bool, meanwhile: Callable[[], Any], timeout_s: float) -> tuple[dict[str, Any], Any]:
    """Run independent forwards over the same samples: each job submits one (``jobs``: phase →
    submit), and ``meanwhile`` (the scoring) runs on the driver's side.

    With ``overlap`` every job is submitted first, ``meanwhile`` runs while they compute, and each is
    collected when its groups answer (its span ends then; none answering within ``timeout_s`` is the
    deadline error). Otherwise each runs alone, in order, after ``meanwhile``. Returns ({phase:
    result}, meanwhile's result).
    """
    if not overlap:
        done = meanwhile()
        results = {}
        for phase, submit in jobs.items():
            with log.timed(phase, m):
                results[phase] = submit().get()
        return results, done
    # Ray is imported when a stage runs, never when a pipeline is validated.
    from orchestrator.runtime.actor_group import wait_any

    start = time.perf_counter()
    waiting: dict[str, Submitted] = {}
    for phase, submit in jobs.items():
        with faults.at(phase=phase):
            waiting[phase] = submit()
    done = meanwhile()
    results = {}
    while waiting:
        names = list(waiting)
        ready = wait_any([waiting[n].pending for n in names], timeout_s)
        for phase in [names[i] for i in ready] or names[:1]:  # none in time: its get() raises the deadline error
            with faults.at(phase=phase):
                results[phase] = waiting.pop(phase).get()
            log.span(phase, start, time.perf_counter(), m)
    return results, done


class ScoreStream:
    """The ``score`` phase started while generation continues: each rollout chunk is scored on a
    driver thread as soon as the workers return it (``submit``, the ``generate`` callback), one
    chunk after another; ``result()`` waits for the last. ``score(i, samples)`` scores chunk i and
    returns its (rewards, auxiliary scores or None)."""

    def __init__(self, score: Callable[[int, list[Any]], tuple[list[float], Any]]) -> None:
        self.score = score
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="score-stream")
        self.chunks: dict[int, Future[tuple[list[float], Any]]] = {}
        self.start: float | None = None
        self.end = 0.0

    def submit(self, index: int, samples: list[Any]) -> None:
        self.chunks[index] = self.pool.submit(self._run, index, samples)

    def _run(self, index: int, samples: list[Any]) -> tuple[list[float], Any]:
        if self.start is None:
            self.start = time.perf_counter()
        out = self.score(index, samples)
        self.end = time.perf_counter()
        return out

    def scores(self) -> tuple[list[float], Any]:
        """``result()`` with the chunks' auxiliary scores joined: (rewards, (N, K) tensor or None)."""
        rewards, parts = self.result()
        return rewards, None if not parts or parts[0] is None else torch.cat(parts)

    def result(self) -> tuple[list[float], list[Any]]:
        """Every chunk's rewards in chunk order, and the list of the chunks' auxiliary scores."""
        try:
            parts = [self.chunks[i].result() for i in sorted(self.chunks)]
        finally:
            self.pool.shutdown(wait=False)
        return [r for rewards, _ in parts for r in rewards], [aux for _, aux in parts]


class ScoredAlready:
    """Scores computed before the batch was handed over (dynamic sampling scores each round to filter
    it), behind ``ScoreStream``'s interface: ``result()``, ``start``, ``end``."""

    def __init__(self, rewards: list[float], aux: Any, start: float, end: float) -> None:
        self.rewards, self.aux, self.start, self.end = rewards, aux, start, end

    def result(self) -> tuple[list[float], list[Any]]:
        return self.rewards, [self.aux]

    def scores(self) -> tuple[list[float], Any]:
        return self.rewards, self.aux


def plot_timeline(rows: list[dict[str, Any]], out: Path) -> Path | None:
    """Draw the mean span of every phase (iterations after the first, a warm-up, when there are more)
    as a Gantt chart, one bar per phase, with each iteration's spans as thin lines; None without rows."""
    rows = [r for r in rows if r.get("spans")]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steady = rows[1:] if len(rows) > 1 else rows
    phases = list(dict.fromkeys(p for r in rows for p in r["spans"]))
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(phases) + 1.5))
    for y, phase in enumerate(phases):
        spans = [r["spans"][phase] for r in steady if phase in r["spans"]]
        if not spans:
            continue
        start = statistics.fmean(s for s, _ in spans)
        end = statistics.fmean(e for _, e in spans)
        ax.barh(y, end - start, left=start, height=0.6, color=f"C{y % 10}", alpha=0.8)
        for s, e in spans:
            ax.plot([s, e], [y + 0.38, y + 0.38], color=f"C{y % 10}", linewidth=0.8)
    ax.set_yticks(range(len(phases)), phases)
    ax.invert_yaxis()
    step = statistics.fmean(r["step_s"] for r in steady)
    ax.set_xlabel("seconds from the iteration's start")
    ax.set_title(f"phase timeline: mean of {len(steady)} iteration(s), step {step:.2f}s (bars: mean span; "
                 "lines: each iteration)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
