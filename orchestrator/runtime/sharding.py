"""Splitting rows over the ranks of a group (no Ray import: stages and actors use it freely)."""

from __future__ import annotations

from typing import Any


def sharded_rows(items: list[Any], world: int) -> tuple[list[list[Any]], int]:
    """Split rows into ``world`` equal shards (padding with the last row); returns (shards, rows per shard)."""
    per_rank = -(-len(items) // world)
    padded = items + [items[-1]] * (per_rank * world - len(items))
    return [padded[r * per_rank : (r + 1) * per_rank] for r in range(world)], per_rank
