"""How many remote calls the driver sends, per role: every actor group counts its calls in ``CALLS``
(no Ray import here: the online loop reads it)."""

from __future__ import annotations

import threading
from collections import Counter


class CallCounter:
    """Remote method calls the driver sent, per role (thread-safe): ``take()`` returns the counts
    since the last ``take`` and starts again (an online iteration's ``driver/calls_*`` metrics)."""

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def add(self, role: str, n: int = 1) -> None:
        with self._lock:
            self._counts[role] += n

    def take(self) -> dict[str, int]:
        with self._lock:
            counts, self._counts = dict(self._counts), Counter()
        return counts


CALLS = CallCounter()  # every group of this driver process counts its calls here
