"""SFT datasets: Parquet ``(prompt, response)`` rows or chat-style ``messages``, tokenized with a
loss mask on the tokens the model is trained to produce.

* ``prompt_response``: string columns ``prompt`` and ``response``. The prompt is tokenized with the
  tokenizer's special tokens, the response without them, then EOS is appended (trained on).
* ``messages``: a column of conversations, each a list of ``{role, content}`` with at least one
  ``assistant`` turn. The conversation is rendered with the tokenizer's chat template; every assistant
  turn (and what the template appends to it, such as an end-of-turn token) is trained on, every other
  token is masked. Each segment is tokenized on its own, so a response is tokenized exactly as it is
  generated after its prompt.

Batches are right-padded to the longest row of each micro-batch. No packing: without a varlen
attention kernel (none on CPU), packing needs block-diagonal masks that cost more than the padding
they save on short, even-length rows like the synthetic task's; the padding fraction is logged.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipelines.batches import SFTBatch
from pipelines.data import read_string_table
from pipelines.errors import DataError

SFT_FORMATS = ("auto", "prompt_response", "messages")


@dataclass(frozen=True)
class SFTExample:
    """One tokenized training row, and what evaluation needs of it.

    Fields:
        input_ids: the full sequence.
        loss_mask: 1 on trained tokens (same length as input_ids).
        prompt_ids: the ids before the last trained segment (the generation prompt).
        reference: the text of the last trained segment (the expected answer).
        prompt_text: the text the prompt ids encode (for function checkers).
    """

    input_ids: list[int]
    loss_mask: list[int]
    prompt_ids: list[int]
    reference: str
    prompt_text: str


def detect_format(path: str | Path, fmt: str) -> str:
    """``auto`` → ``messages`` when the file has a ``messages`` column, else ``prompt_response``."""
    if fmt != "auto":
        return fmt
    try:
        names = pq.read_schema(path).names
    except (pa.ArrowInvalid, OSError):
        return "prompt_response"  # read_string_table reports the unreadable file
    return "messages" if "messages" in names else "prompt_response"


def read_conversations(path: str | Path) -> list[list[dict[str, str]]]:
    """Read and check the ``messages`` column (errors name the file, row and turn)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: SFT data file not found")
    try:
        table = pq.read_table(path, columns=["messages"])
    except (pa.ArrowInvalid, OSError, KeyError) as exc:
        raise DataError(f"{path}: cannot read column 'messages' ({exc})") from None
    if table.num_rows == 0:
        raise DataError(f"{path}: SFT dataset is empty (0 rows)")
    conversations = table.column("messages").to_pylist()
    for row, conv in enumerate(conversations):
        if not isinstance(conv, list) or not conv:
            raise DataError(f"{path}: column 'messages', row {row}: expected a non-empty list of turns")
        for turn_index, turn in enumerate(conv):
            where = f"{path}: column 'messages', row {row}, turn {turn_index}"
            if not isinstance(turn, dict) or not isinstance(turn.get("role"), str) or not isinstance(turn.get("content"), str):
                raise DataError(f"{where}: expected {{role: string, content: string}}, got {turn!r}")
        if not any(t["role"] == "assistant" for t in conv):
            raise DataError(f"{path}: column 'messages', row {row}: no 'assistant' turn to train on")
    return conversations


def read_sft_rows(path: str | Path, fmt: str = "auto") -> list[Any]:
    """Rows of an SFT file: conversations, or (prompt, response) tuples."""
    fmt = detect_format(path, fmt)
    if fmt == "messages":
        return read_conversations(path)
    cols = read_string_table(path, ("prompt", "response"), what="SFT examples")
    return list(zip(cols["prompt"], cols["response"], strict=True))


def _conversation_segments(conv: list[dict[str, str]], tokenizer: Any, where: str) -> list[tuple[str, bool]]:
    """Split the rendered conversation into (text, trained) segments at assistant-turn boundaries."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{where}: 'messages' data needs a tokenizer with a chat template; this one has none")
    segments: list[tuple[str, bool]] = []
    done = ""
    for i, turn in enumerate(conv):
        if turn["role"] != "assistant":
            continue
        prefix = tokenizer.apply_chat_template(conv[:i], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(conv[: i + 1], tokenize=False)
        if not prefix.startswith(done) or not full.startswith(prefix):
            raise DataError(f"{where}: the chat template does not render turn {i} as an extension of the earlier turns")
        segments += [(prefix[len(done):], False), (full[len(prefix):], True)]
        done = full
    return segments


def tokenize_sft(rows: list[Any], tokenizer: Any, *, max_length: int, source: str) -> list[SFTExample]:
    """Tokenize rows from ``read_sft_rows``.

    Raises:
        DataError: a row is longer than ``max_length`` tokens (names the file and row).
    """
    if tokenizer.eos_token_id is None:
        raise DataError("tokenizer of the policy has no EOS token; cannot mark the end of responses")
    examples = []
    for row, item in enumerate(rows):
        where = f"{source}: row {row}"
        if isinstance(item, tuple):
            prompt, response = item
            segments, reference = [(prompt, False), (response, True)], response
        else:
            segments = _conversation_segments(item, tokenizer, where)
            reference = [t["content"] for t in item if t["role"] == "assistant"][-1]
        ids: list[int] = []
        mask: list[int] = []
        prompt_len = 0
        for index, (text, trained) in enumerate(segments):
            special = isinstance(item, tuple) and index == 0
            piece = tokenizer(text, add_special_tokens=special)["input_ids"] if text else []
            if isinstance(item, tuple) and trained:
                piece = piece + [tokenizer.eos_token_id]
            if trained:
                prompt_len = len(ids)  # ends up at the start of the last trained segment
            ids += piece
            mask += [int(trained)] * len(piece)
        if len(ids) > max_length:
            raise DataError(f"{where} is {len(ids)} tokens, over data.max_length={max_length}")
        prompt_text = "".join(text for text, _ in segments[:-1])
        examples.append(SFTExample(ids, mask, ids[:prompt_len], reference, prompt_text))
    return examples


def collate_sft(examples: list[SFTExample], pad_id: int) -> SFTBatch:
    """Right-pad examples into an SFTBatch of (B, longest row)."""
    width = max(len(e.input_ids) for e in examples)

    def pad(seq: list[int], value: int) -> list[int]:
        return seq + [value] * (width - len(seq))

    return SFTBatch(
        torch.tensor([pad(e.input_ids, pad_id) for e in examples], dtype=torch.long),
        torch.tensor([pad([1] * len(e.input_ids), 0) for e in examples], dtype=torch.long),
        torch.tensor([pad(e.loss_mask, 0) for e in examples], dtype=torch.long),
    )
