"""Small helpers the benchmark scripts share."""

from __future__ import annotations

import json
from pathlib import Path


def write_result(path: str | Path | None, res: dict) -> None:
    """The results as JSON at ``path`` (nothing without one), its folder made if needed."""
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(res, indent=1))
