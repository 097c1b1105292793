"""Datasets from Parquet: read, check (naming file, column and row), tokenize and collate.

Checks run in the driver before any actor starts, so bad data fails fast and clearly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipelines.batches import PreferenceBatch
from pipelines.errors import DataError

PAIR_COLUMNS = ("prompt", "chosen", "rejected")
RESPONSE_COLUMNS = ("chosen", "rejected")  # an empty response is the EOS token alone: valid


def read_string_table(path: str | Path, columns: tuple[str, ...], *, what: str,
                      may_be_empty: tuple[str, ...] = ()) -> dict[str, list[str]]:
    """Read the named string columns of a Parquet file; every value must be a non-empty string.

    Args:
        path: the Parquet file.
        columns: required columns (others are ignored).
        what: what the dataset is for, used in error messages ("preference pairs").
        may_be_empty: columns where "" is a valid value (a preference response that is only EOS,
            as a sampled policy can give).

    Raises:
        DataError: the file is missing or unreadable, is empty, lacks a column, or a value is null,
            empty or not a string (the message names the file, column and row).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {what} file not found")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise DataError(
            f"{path}: {what} need column(s) {list(columns)}; missing {missing} (found {table.column_names})"
        )
    if table.num_rows == 0:
        raise DataError(f"{path}: {what} dataset is empty (0 rows)")
    out: dict[str, list[str]] = {}
    for name in columns:
        col = table.column(name)
        if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
            raise DataError(f"{path}: column {name!r} must hold strings, found type {col.type}")
        values = col.to_pylist()
        for row, value in enumerate(values):
            if value is None or (value == "" and name not in may_be_empty):
                raise DataError(f"{path}: column {name!r}, row {row}: value is {'null' if value is None else 'empty'}")
        out[name] = values
    return out


@dataclass(frozen=True)
class TokenizedPair:
    """Token ids of one preference pair; responses end with EOS."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]


def tokenize_pairs(
    rows: dict[str, list[str]], tokenizer: Any, *, max_length: int, source: str
) -> list[TokenizedPair]:
    """Tokenize prompts (with the tokenizer's special tokens) and responses (+ EOS).

    Raises:
        DataError: a row is longer than ``max_length`` tokens (names the file and row).
    """
    prompts, chosen = encode_completions(tokenizer, rows["prompt"], rows["chosen"])
    _, rejected = encode_completions(tokenizer, [], rows["rejected"])
    pairs = []
    for row, (p, c, r) in enumerate(zip(prompts, chosen, rejected, strict=True)):
        longest = len(p) + max(len(c), len(r))
        if longest > max_length:
            raise DataError(
                f"{source}: row {row} is {longest} tokens (prompt + response + EOS), over "
                f"data.max_length={max_length}"
            )
        pairs.append(TokenizedPair(p, c, r))
    return pairs


def encode_completions(tokenizer: Any, prompts: list[str], responses: list[str]) -> tuple[list[list[int]], list[list[int]]]:
    """The one tokenization of (prompt, response) text: prompts with the tokenizer's special tokens,
    responses without them and ending in EOS. Training and scoring both use it."""
    if tokenizer.eos_token_id is None:
        raise DataError("tokenizer of the model has no EOS token; cannot mark the end of responses")
    prompt_ids = tokenizer(prompts, add_special_tokens=True)["input_ids"] if prompts else []
    response_ids = tokenizer(responses, add_special_tokens=False)["input_ids"] if responses else []
    return prompt_ids, [r + [tokenizer.eos_token_id] for r in response_ids]


def _pad(seqs: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([s + [value] * (width - len(s)) for s in seqs], dtype=torch.long)


def _side(pairs: list[TokenizedPair], side: str, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    seqs = [p.prompt + getattr(p, side) for p in pairs]
    masks = [[0] * len(p.prompt) + [1] * len(getattr(p, side)) for p in pairs]
    return _pad(seqs, pad_id), _pad([[1] * len(s) for s in seqs], 0), _pad(masks, 0)


def collate_pairs(
    pairs: list[TokenizedPair],
    pad_id: int,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
) -> PreferenceBatch:
    """Right-pad pairs into a PreferenceBatch; reference log-probs are (B,) when given."""
    c_ids, c_attn, c_mask = _side(pairs, "chosen", pad_id)
    r_ids, r_attn, r_mask = _side(pairs, "rejected", pad_id)
    return PreferenceBatch(c_ids, c_attn, c_mask, r_ids, r_attn, r_mask, ref_chosen_logps, ref_rejected_logps)


class EpochSampler:
    """Deterministic shuffled batches: epoch e uses permutation seed (seed, e); position is resumable."""

    def __init__(self, num_rows: int, batch_size: int, seed: int) -> None:
        if num_rows < batch_size:
            raise DataError(f"dataset has {num_rows} rows, fewer than one batch of {batch_size}")
        self.num_rows = num_rows
        self.batch_size = batch_size
        self.seed = seed
        self.batches_per_epoch = num_rows // batch_size  # the ragged tail is dropped each epoch

    def indices(self, step: int) -> list[int]:
        """Row indices of the batch for 0-based optimizer step ``step``."""
        epoch, pos = divmod(step, self.batches_per_epoch)
        gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        perm = torch.randperm(self.num_rows, generator=gen)
        return perm[pos * self.batch_size : (pos + 1) * self.batch_size].tolist()


def check_model_source(source: str) -> None:
    """A local model directory must exist and hold config.json; other strings are treated as hub ids.

    Raises:
        DataError: a path-like source that is missing or not an HF model directory.
    """
    path = Path(source).expanduser()
    looks_like_path = source.startswith(("/", "./", "../", "~")) or path.exists()
    if not looks_like_path:
        return
    if not path.is_dir():
        raise DataError(f"{source}: model directory not found")
    if not (path / "config.json").is_file():
        raise DataError(f"{source}: not a Hugging Face model directory (no config.json)")


def load_tokenizer(source: str, *, trust_remote_code: bool = False) -> Any:
    """AutoTokenizer with a clear error when the model cannot be found or loaded."""
    from transformers import AutoTokenizer

    check_model_source(source)
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise DataError(f"{source}: cannot load tokenizer ({str(exc).splitlines()[0]})") from None


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, or EOS when it has none (padding is masked out either way)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def read_float_column(path: str | Path, column: str) -> list[float]:
    """A numeric column with a finite value in every row (errors name the file, column and row)."""
    import math

    table = pq.read_table(path)
    if column not in table.column_names:
        raise DataError(f"{path}: margin column {column!r} not found (found {table.column_names})")
    col = table.column(column)
    if not (pa.types.is_floating(col.type) or pa.types.is_integer(col.type)):
        raise DataError(f"{path}: column {column!r} must hold numbers, found type {col.type}")
    values = col.to_pylist()
    for row, value in enumerate(values):
        if value is None or not math.isfinite(value):
            raise DataError(f"{path}: column {column!r}, row {row}: value is {value}")
    return [float(v) for v in values]
