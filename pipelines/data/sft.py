"""SFT rows (read by ``pipelines.data.formats.read_sft``) tokenized with a loss mask on the tokens the
model is trained to produce.

* text ``prompt`` / ``completion``: the prompt is tokenized with the tokenizer's special tokens, the
  completion without them, then EOS is appended (trained on).
* conversations (``messages``, or conversational ``prompt`` / ``completion``): rendered with the
  tokenizer's chat template; every assistant turn (of the completion only, for prompt/completion)
  and what the template appends to it, such as an end-of-turn token, is trained on, every other
  token is masked. Each segment is tokenized on its own, so a response is tokenized exactly as it
  is generated after its prompt.

Batches are right-padded to the longest row of each micro-batch. No packing: without a varlen
attention kernel (none on CPU), packing needs block-diagonal masks that cost more than the padding
they save on short, even-length rows like the synthetic task's; the padding fraction is logged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from pipelines.data.batches import SFTBatch
from pipelines.data.formats import WithTools, plain_prompt
from pipelines.data.lengths import LengthTally
from pipelines.data.tokens import count_unknown, starts_with_bos
from pipelines.errors import DataError


@dataclass(frozen=True)
class SFTExample:
    """One tokenized training row, and what evaluation needs of it.

    Fields:
        input_ids: the full sequence.
        loss_mask: 1 on trained tokens (same length as input_ids).
        prompt_ids: the ids before the last trained segment (the generation prompt).
        reference: the text of the last trained segment (the expected answer).
        prompt_text: the prompt as function checkers read it (of a conversation, its last user turn).
    """

    input_ids: list[int]
    loss_mask: list[int]
    prompt_ids: list[int]
    reference: str
    prompt_text: str


def _conversation_segments(conv: list[dict[str, str]], tokenizer: Any, where: str,
                           trained_from: int = 0, tools: list[dict[str, Any]] | None = None) -> list[tuple[str, bool]]:
    """Split the rendered conversation into (text, trained) segments at the boundaries of the
    assistant turns from turn ``trained_from`` on (earlier ones are context); ``tools``: the tool
    schemas the template is given."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{where}: conversations need a tokenizer with a chat template; this one has none")
    segments: list[tuple[str, bool]] = []
    done = ""
    for i, turn in enumerate(conv):
        if turn["role"] != "assistant" or i < trained_from:
            continue
        extra = {"tools": tools} if tools else {}
        prefix = tokenizer.apply_chat_template(conv[:i], tokenize=False, add_generation_prompt=True, **extra)
        full = tokenizer.apply_chat_template(conv[: i + 1], tokenize=False, **extra)
        if not prefix.startswith(done) or not full.startswith(prefix):
            raise DataError(f"{where}: the chat template does not render turn {i} as an extension of the earlier turns")
        segments += [(prefix[len(done):], False), (full[len(prefix):], True)]
        done = full
    return segments


def tokenize_sft(rows: list[Any], tokenizer: Any, *, source: str, max_length: int | None = None,
                 lengths: LengthTally | None = None) -> list[SFTExample]:
    """Tokenize rows from ``formats.read_sft`` under the length policy of ``lengths`` (the caller
    calls its ``finish``; the prompt is what precedes the last trained segment, the completion that
    segment), or, given ``max_length`` instead, with every row over it an error (raised here).

    Raises:
        DataError: rows over the limit under ``truncation: error`` (how many, the longest named).
    """
    if tokenizer.eos_token_id is None:
        raise DataError("tokenizer of the policy has no EOS token; cannot mark the end of responses")
    tally = lengths or LengthTally.strict(source, max_length or 0)
    examples = []
    for row, item in enumerate(rows):
        ids, mask, prompt_len, reference, plain = _tokenize_row(item, tokenizer, f"{source}: row {row + 1}")
        tally.unknown += count_unknown(tokenizer, [ids])
        cut = tally.fit(row, prompt_len, (len(ids) - prompt_len,), keep_first=starts_with_bos(tokenizer, ids))
        if cut is None:
            continue
        end = prompt_len + cut.completion
        head = cut.prompt(ids[:prompt_len])
        ids, mask = head + ids[prompt_len:end], cut.prompt(mask[:prompt_len]) + mask[prompt_len:end]
        if tally.last_truncated and not any(mask):
            tally.reject("with no trained token left once truncated")
            continue
        examples.append(SFTExample(ids, mask, head, reference, plain))
    if lengths is None:
        tally.finish()
    return examples


def _tokenize_row(item: Any, tokenizer: Any, where: str) -> tuple[list[int], list[int], int, str, str]:
    """(ids, loss mask, where the last trained segment starts, the reference answer, the plain prompt)."""
    text_pair = isinstance(item, tuple) and isinstance(item[0], str)
    if text_pair:
        prompt, response = item
        segments, reference, plain = [(prompt, False), (response, True)], response, prompt
    else:
        tools = item.tools if isinstance(item, WithTools) else None
        item = item.messages if isinstance(item, WithTools) else item
        conv, start = ([*item[0], *item[1]], len(item[0])) if isinstance(item, tuple) else (item, 0)
        segments = _conversation_segments(conv, tokenizer, where, trained_from=start, tools=tools)
        last = max(i for i, t in enumerate(conv) if t["role"] == "assistant")
        reference, plain = conv[last]["content"], plain_prompt(conv[:last])
    ids: list[int] = []
    mask: list[int] = []
    prompt_len = 0
    for index, (text, trained) in enumerate(segments):
        special = text_pair and index == 0
        piece = tokenizer(text, add_special_tokens=special)["input_ids"] if text else []
        if text_pair and trained:
            piece = piece + [tokenizer.eos_token_id]
        if trained:
            prompt_len = len(ids)  # ends up at the start of the last trained segment
        ids += piece
        mask += [int(trained)] * len(piece)
    return ids, mask, prompt_len, reference, plain


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
