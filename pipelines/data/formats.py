"""What a dataset's rows hold, and how they become the text a model sees.

Each field of a row is either **text** (a string) or a **conversation** (a list of ``{role, content}``
messages); which one is read from the column's type, for the whole file:

* preference pairs: ``prompt`` / ``chosen`` / ``rejected``, all text (standard) or all conversations
  (conversational: the prompt's turns, then the chosen and rejected assistant turns). Without a
  ``prompt`` column the prompt is implicit: ``chosen`` and ``rejected`` are whole conversations (or
  texts) sharing a beginning, and the prompt is the longest shared prefix (whole messages for
  conversations; for texts, up to the first differing character, a space there going to the
  completions, and back to the last assistant-turn marker, such as HH-RLHF's ``\\n\\nAssistant:``,
  where the shared text runs past it into the answers: a count of such rows is logged);
* prompts (online stages): one ``prompt`` column, text or a conversation;
* unpaired preferences: ``prompt``, ``completion`` and a boolean ``label`` (desirable or not);
* SFT: a ``messages`` conversation, or ``prompt`` and ``completion`` (``response`` is accepted for
  ``completion``), text or conversations; or a preference file (``chosen``: each pair's prompt with
  its chosen response). An online stage's prompts may also come from a preference file.

A ``columns:`` mapping in the stage's ``data`` section names the file's column for each field
(``{prompt: question, chosen: good}``). Checks run on Arrow arrays, batch by batch: a column of
another type, a null, an empty text, a malformed message, a completion that does not start with an
assistant turn, all fail with the file, field and row named.

Conversations are rendered with the model's chat template: a prompt with ``add_generation_prompt``,
a completion as what the template adds after that prompt (so its tokens are exactly what the model
generates after the prompt's tokens, ending with the template's end of turn); texts are used as they
are. ``pipelines.data.tokens`` tokenizes the rendered text.

Rows are numbered from 1 in errors (a JSON Lines file's line number).

Size: about 450 lines, over the 400-line budget on purpose: the data contract is read in one place,
every row shape with its checks and then how each renders.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipelines.data import sources
from pipelines.errors import DataError

LOG = logging.getLogger("rlhf.data")

Message = dict[str, str]
Field = str | list[Message]
TEXT, CONVERSATION = "text", "conversation"
PAIR_FIELDS = ("prompt", "chosen", "rejected")


def column_kind(source: str, name: str, type_: pa.DataType) -> str:
    """``text`` for a string column, ``conversation`` for a list of {role, content} strings."""
    if pa.types.is_string(type_) or pa.types.is_large_string(type_):
        return TEXT
    if pa.types.is_list(type_) or pa.types.is_large_list(type_):
        item = type_.value_type
        if pa.types.is_struct(item) and {"role", "content"} <= {item.field(i).name for i in range(item.num_fields)}:
            return CONVERSATION
    raise DataError(f"{source}: field {name} must hold strings or lists of "
                    f"{{role, content}} messages; found type {type_}")


def _first(mask: pa.Array) -> int | None:
    """Index of the first true value of a boolean array, or None."""
    index = pc.index(pc.fill_null(mask, False), True).as_py()
    return None if index < 0 else index


def check_array(source: str, name: str, kind: str, array: pa.Array, offset: int, *, may_be_empty: bool = False,
                completion: bool = False) -> None:
    """Nulls, empty texts, malformed messages; with ``completion``, a first turn not by the assistant.
    ``name`` is how errors name the field (``label``)."""
    def fail(row: int, why: str) -> None:
        raise DataError(f"{source}: field {name}, row {offset + row + 1}: {why}")

    if (row := _first(pc.is_null(array))) is not None:
        fail(row, "value is null")
    if kind == TEXT:
        if not may_be_empty and (row := _first(pc.equal(array, ""))) is not None:
            fail(row, "value is empty")
        return
    if (row := _first(pc.equal(pc.list_value_length(array), 0))) is not None:
        fail(row, "the conversation has no messages")
    flat = pc.list_flatten(array)
    parents = pc.list_parent_indices(array)
    for part in ("role", "content"):
        values = flat.field(part)
        if pa.types.is_null(values.type):  # no message of the batch has one
            fail(parents[0].as_py(), f"a message has no {part!r}")
        if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
            fail(0, f"message {part!r} must be a string, found type {values.type}")
        if (i := _first(pc.is_null(values))) is not None:
            fail(parents[i].as_py(), f"a message has no {part!r}")
    if completion:
        first_roles = pc.list_element(array, 0).field("role")
        if (row := _first(pc.not_equal(first_roles, "assistant"))) is not None:
            fail(row, f"a completion must start with an assistant turn, not {first_roles[row].as_py()!r}")


def resolve(source: str, fields: tuple[str, ...], mapping: dict[str, str], what: str,
            optional: tuple[str, ...] = (), setting: str = "data.columns") -> dict[str, str]:
    """field → the file's column, for the fields present (optional ones may be absent)."""
    names = sources.column_names(source, what)
    unknown = sorted(set(mapping) - set(fields) - set(optional))
    if unknown:
        raise DataError(f"{source}: columns mapping names unknown field(s) {unknown}; {what} have "
                        f"{list(fields) + list(optional)}")
    found = {f: mapping.get(f, f) for f in (*fields, *optional) if mapping.get(f, f) in names}
    missing = [f"{f!r}" + (f" (column {mapping[f]!r})" if f in mapping else "") for f in fields if f not in found]
    if missing:
        raise DataError(f"{source}: {what} need field(s) {list(fields)}; missing {', '.join(missing)} (the file has "
                        f"columns {names}; name yours with {setting})")
    return found


def label(field: str, found: dict[str, str]) -> str:
    """``'chosen'``, or ``'chosen' (column 'good')`` where the file's column is mapped."""
    return repr(field) if found[field] == field else f"{field!r} (column {found[field]!r})"


def _columns(source: str, found: dict[str, str], what: str) -> Iterator[tuple[int, dict[str, pa.Array]]]:
    """(row offset, field → array) per record batch."""
    offset = 0
    fields = list(found)
    for batch in sources.batches(source, [found[f] for f in fields], what):
        yield offset, dict(zip(fields, batch.columns, strict=True))
        offset += batch.num_rows


def _read(source: str, found: dict[str, str], what: str, *, completions: tuple[str, ...] = (),
          may_be_empty: tuple[str, ...] = (), sink=None) -> tuple[dict[str, list[Any]], bool]:
    """Every row of the mapped fields, checked batch by batch (``check_array``; the ``completions``
    fields must start with an assistant turn, the ``may_be_empty`` ones may be ""), conversations
    kept as {role, content}; and whether the fields are conversations (all fields are one kind or
    the other). With a ``sink``, each checked batch goes to ``sink(row offset, field → array,
    conversational)`` instead (``values`` makes the rows of it) and nothing is kept: memory stays
    within one batch whatever the file's length."""
    kinds: dict[str, str] = {}
    out: dict[str, list[Any]] = {f: [] for f in found}
    rows = 0
    for offset, arrays in _columns(source, found, what):
        if not kinds:
            kinds = {f: column_kind(source, label(f, found), a.type) for f, a in arrays.items()}
            if len(set(kinds.values())) > 1:
                raise DataError(f"{source}: fields mix texts and conversations ({kinds}); all must be one or the other")
        for f, array in arrays.items():
            check_array(source, label(f, found), kinds[f], array, offset, may_be_empty=f in may_be_empty,
                        completion=f in completions and kinds[f] == CONVERSATION)
        if sink is None:
            for f, column in values(arrays, CONVERSATION in kinds.values()).items():
                out[f] += column
        else:
            sink(offset, arrays, CONVERSATION in kinds.values())
        rows += len(next(iter(arrays.values())))
    if not kinds or not rows:
        raise DataError(f"{source}: {what} dataset is empty (0 rows)")
    return out, CONVERSATION in kinds.values()


def values(arrays: dict[str, pa.Array], conversational: bool) -> dict[str, list[Any]]:
    """Field → Python values of one checked batch; conversations as {role, content} messages."""
    return {f: [_strip(v) for v in a.to_pylist()] if conversational else a.to_pylist() for f, a in arrays.items()}


def _strip(messages: list[dict[str, Any]]) -> list[Message]:
    """Arrow structs come back with every field any row has; keep role and content."""
    return [{"role": m["role"], "content": m["content"]} for m in messages]


@dataclass
class PairRows:
    """Preference pairs as read: each field text or a conversation (all rows alike)."""

    prompt: list[Field]
    chosen: list[Field]
    rejected: list[Field]
    conversational: bool
    implicit_prompt: bool
    moved_to_marker: int = 0  # implicit text prompts moved back to an assistant-turn marker

    def __len__(self) -> int:
        return len(self.chosen)


def read_pairs(source: str, mapping: dict[str, str] | None = None, limit: int | None = None) -> PairRows:
    """Preference pairs of any of the pair formats (see the module docstring)."""
    rows, conversational, implicit = _pairs(source, mapping)
    pairs = _pair_rows(source, {f: column[:limit] for f, column in rows.items()}, conversational, implicit)
    _report_moved(source, pairs.moved_to_marker, len(pairs))
    return pairs


def _report_moved(source: str, moved: int, rows: int) -> None:
    if moved:
        LOG.info("%s: the implicit prompt of %d of %d rows ran into the answers; moved back to the last "
                 "assistant-turn marker", source, moved, rows)


def stream_pairs(source: str, mapping: dict[str, str] | None,
                 each: Callable[[int, PairRows], None]) -> None:
    """Every pair as ``read_pairs`` reads and checks it, handed to ``each(row offset, rows)`` one
    record batch at a time: memory stays within a batch however long the file is."""
    found = _pair_fields(source, mapping)
    seen = [0, 0]  # rows, moved to a marker

    def sink(offset: int, arrays: dict[str, pa.Array], conversational: bool) -> None:
        rows = _pair_rows(source, values(arrays, conversational), conversational, "prompt" not in found, offset)
        seen[0], seen[1] = seen[0] + len(rows), seen[1] + rows.moved_to_marker
        each(offset, rows)

    _pairs(source, mapping, sink)
    _report_moved(source, seen[1], seen[0])


def check_pairs(source: str, mapping: dict[str, str] | None = None) -> None:
    """Every check ``read_pairs`` makes, streamed: memory stays flat in the file's length (the
    pre-flight check of a file before any actor starts)."""
    stream_pairs(source, mapping, lambda offset, rows: None)


def _pair_fields(source: str, mapping: dict[str, str] | None) -> dict[str, str]:
    return resolve(source, ("chosen", "rejected"), mapping or {}, "preference pairs", optional=("prompt",))


def _pairs(source: str, mapping: dict[str, str] | None, sink=None) -> tuple[dict[str, list[Any]], bool, bool]:
    """(rows, conversational, implicit prompt) of a pair file; an explicit prompt's completions may
    be empty (EOS alone) and, as conversations, start with an assistant turn."""
    found = _pair_fields(source, mapping)
    implicit = "prompt" not in found
    sides = () if implicit else ("chosen", "rejected")
    rows, conversational = _read(source, found, "preference pairs", completions=sides, may_be_empty=sides, sink=sink)
    return rows, conversational, implicit


def _pair_rows(source: str, rows: dict[str, list[Any]], conversational: bool, implicit: bool,
               offset: int = 0) -> PairRows:
    """``PairRows`` of read rows (the first is row ``offset`` of the file); an implicit prompt is split off."""
    if implicit:
        split = [split_shared_prompt(c, r, f"{source}: row {offset + i + 1}") for i, (c, r) in
                 enumerate(zip(rows["chosen"], rows["rejected"], strict=True))]
        rows = {"prompt": [s[0] for s in split], "chosen": [s[1] for s in split], "rejected": [s[2] for s in split]}
        moved = sum(s[3] for s in split)
        return PairRows(rows["prompt"], rows["chosen"], rows["rejected"], conversational, implicit, moved)
    return PairRows(rows["prompt"], rows["chosen"], rows["rejected"], conversational, implicit)


# Where an assistant's turn starts in common text layouts (HH-RLHF's, ChatML's, Zephyr's, Llama 2's):
# an implicit text prompt ends at the last of them within the shared prefix.
ASSISTANT_MARKERS = ("\n\nAssistant:", "<|im_start|>assistant\n", "<|assistant|>\n", "[/INST]")


def split_shared_prompt(chosen: Field, rejected: Field, where: str) -> tuple[Field, Field, Field, bool]:
    """(prompt, chosen completion, rejected completion, moved) of an implicit-prompt pair. A text's
    shared prefix that runs past an assistant-turn marker into the answers (both answers starting
    "I ...") is moved back to end at the marker (``moved``)."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    moved = False
    if isinstance(chosen, str):
        ends = [chosen.rfind(m, 0, n) + len(m) for m in ASSISTANT_MARKERS if chosen.rfind(m, 0, n) >= 0]
        if ends and max(ends) < n:
            n, moved = max(ends), chosen[max(ends):n].strip() != ""
        elif n and n < len(chosen) and chosen[n - 1] == " ":
            n -= 1  # the space belongs to the word after it, as a tokenizer sees it
    elif (n >= len(chosen) or n >= len(rejected) or chosen[n]["role"] != "assistant"
          or rejected[n]["role"] != "assistant"):
        raise DataError(f"{where}: chosen and rejected must share their prompt turns and then differ in an "
                        f"assistant turn (they share {n} message(s))")
    if n == 0:
        raise DataError(f"{where}: chosen and rejected share no prompt; give a 'prompt' field")
    if chosen == rejected:
        raise DataError(f"{where}: chosen and rejected are the same")
    return chosen[:n], chosen[n:], rejected[n:], moved


def read_prompts(source: str, field: str = "prompt", mapping: dict[str, str] | None = None,
                 limit: int | None = None, check_only: bool = False) -> list[Field]:
    """A prompt column: texts or conversations (``check_only``: checked, streamed, nothing kept). A
    preference file without that column gives its pairs' prompts (explicit or implicit)."""
    names = sources.column_names(source, "prompts")
    if field == "prompt" and "prompt" not in names and {"chosen", "rejected"} <= set(names):
        if check_only:
            check_pairs(source)
            return []
        return read_pairs(source, limit=limit).prompt
    found = resolve(source, (field,), mapping or {}, "prompts", setting="data.column")
    rows, _ = _read(source, found, "prompts", sink=(lambda *_: None) if check_only else None)
    return rows[field][:limit]


@dataclass
class UnpairedRows:
    """Unpaired preference rows: a completion of a prompt, labelled desirable (True) or not;
    ``file_rows`` is the file row each came from (two rows share one when a pair was split)."""

    prompt: list[Field]
    completion: list[Field]
    label: list[bool]
    file_rows: list[int] = dataclasses.field(default_factory=list)

    def __len__(self) -> int:
        return len(self.completion)


UNPAIRED_FIELDS = ("prompt", "completion", "label")


def _only(mapping: dict[str, str] | None, fields: tuple[str, ...]) -> dict[str, str]:
    """The part of a ``columns:`` mapping for one format (a KTO stage's may name both formats' fields)."""
    return {k: v for k, v in (mapping or {}).items() if k in fields}


def check_preferences(source: str, mapping: dict[str, str] | None = None) -> None:
    """The pre-flight check of a file ``read_preferences`` reads: every row of either format."""
    if is_unpaired(source, mapping):
        read_unpaired(source, _only(mapping, UNPAIRED_FIELDS))
    else:
        check_pairs(source, _only(mapping, PAIR_FIELDS))


def is_unpaired(source: str, mapping: dict[str, str] | None = None) -> bool:
    """Whether a preference file is unpaired (it has the ``label`` field) rather than pairs."""
    return (mapping or {}).get("label", "label") in sources.column_names(source, "preferences")


def read_preferences(source: str, mapping: dict[str, str] | None = None, limit: int | None = None) -> UnpairedRows:
    """Unpaired rows of an unpaired file, or of a pair file split in two: the chosen completion
    desirable, the rejected one undesirable (what KTO reads; ``limit`` caps the file rows read)."""
    if is_unpaired(source, mapping):
        rows = read_unpaired(source, _only(mapping, UNPAIRED_FIELDS))
        n = len(rows) if limit is None else min(limit, len(rows))
        return UnpairedRows(rows.prompt[:n], rows.completion[:n], rows.label[:n], list(range(n)))
    pairs = read_pairs(source, _only(mapping, PAIR_FIELDS), limit)
    n = len(pairs)
    return UnpairedRows([p for p in pairs.prompt for _ in range(2)],
                        [c for pair in zip(pairs.chosen, pairs.rejected, strict=True) for c in pair],
                        [True, False] * n, [i for i in range(n) for _ in range(2)])


def read_unpaired(source: str, mapping: dict[str, str] | None = None) -> UnpairedRows:
    what = "unpaired preferences"
    found = resolve(source, ("prompt", "completion", "label"), mapping or {}, what)
    labels = found.pop("label")
    rows, _ = _read(source, found, what, completions=("completion",), may_be_empty=("completion",))
    flags: list[bool] = []
    name = label("label", {"label": labels})
    for offset, arrays in _columns(source, {"label": labels}, what):
        array = arrays["label"]
        if not pa.types.is_boolean(array.type):
            raise DataError(f"{source}: field {name} must hold booleans, found type {array.type}")
        if (row := _first(pc.is_null(array))) is not None:
            raise DataError(f"{source}: field {name}, row {offset + row + 1}: value is null")
        flags += array.to_pylist()
    return UnpairedRows(rows["prompt"], rows["completion"], flags, list(range(len(flags))))


@dataclass(frozen=True)
class WithTools:
    """A conversation and the tool schemas its chat template is given (an SFT file's ``tools`` column)."""

    messages: list[Message]
    tools: list[dict[str, Any]]


def _tool_schemas(value: Any, where: str) -> list[dict[str, Any]]:
    try:
        tools = json.loads(value) if isinstance(value, str) else value
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: not JSON ({exc})") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise DataError(f"{where}: expected a list of tool schemas (JSON objects)")
    return tools


def read_sft(source: str, fmt: str = "auto", mapping: dict[str, str] | None = None,
             limit: int | None = None) -> list[tuple[Field, Field] | list[Message] | WithTools]:
    """SFT rows: conversations (``messages``) or (prompt, completion) pairs of texts or conversations."""
    what = "SFT examples"
    mapping = dict(mapping or {})
    names = sources.column_names(source, what)
    fmt = "prompt_completion" if fmt == "prompt_response" else fmt
    if fmt == "auto":
        has = {f: mapping.get(f, f) in names for f in ("messages", "prompt", "chosen", "completion", "response")}
        if has["messages"] and has["prompt"]:
            raise DataError(f"{source}: has both a 'messages' and a 'prompt' column; set data.format to messages "
                            "or prompt_completion")
        chosen = has["chosen"] and not (has["completion"] or has["response"])
        fmt = "messages" if has["messages"] else "chosen" if chosen else "prompt_completion"
    if fmt == "chosen":  # a preference file: its prompts with their chosen responses
        pairs = read_pairs(source, _only(mapping, PAIR_FIELDS), limit)
        return list(zip(pairs.prompt, pairs.chosen, strict=True))
    if fmt == "messages":
        found = resolve(source, ("messages",), mapping, what)
        rows, conversational = _read(source, found, what)
        if not conversational:
            raise DataError(f"{source}: field 'messages' must hold conversations (lists of {{role, content}})")
        conversations = rows["messages"][:limit]
        for row, conv in enumerate(conversations):
            if not any(m["role"] == "assistant" for m in conv):
                raise DataError(f"{source}: field 'messages', row {row + 1}: no 'assistant' turn to train on")
        if "tools" in names:  # tool schemas for the chat template, per row (JSON text or a list)
            tools = sources.read_columns(source, ["tools"], what, limit=limit)["tools"]
            return [WithTools(c, _tool_schemas(t, f"{source}: field 'tools', row {i + 1}"))
                    for i, (c, t) in enumerate(zip(conversations, tools, strict=True))]
        return conversations
    if "completion" not in mapping and "completion" not in names and "response" in names:
        mapping["completion"] = "response"
    found = resolve(source, ("prompt", "completion"), mapping, what)
    rows, _ = _read(source, found, what, completions=("completion",))
    return list(zip(rows["prompt"][:limit], rows["completion"][:limit], strict=True))


# --- rendering -------------------------------------------------------------------------------


def _template(tokenizer: Any, where: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{where}: conversations need a tokenizer with a chat template; this model's has none")


def render_prompt(tokenizer: Any, prompt: Field, where: str = "prompt") -> str:
    """A text prompt as it is; a conversation through the chat template, with the generation prompt."""
    if isinstance(prompt, str):
        return prompt
    _template(tokenizer, where)
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def render_completion(tokenizer: Any, prompt: Field, completion: Field, where: str) -> str:
    """What follows the rendered prompt: a text as it is; for a conversation, what the chat template
    adds to the prompt for the completion's turns (ending with its end-of-turn marks)."""
    if isinstance(completion, str):
        return completion
    _template(tokenizer, where)
    head = render_prompt(tokenizer, prompt, where)
    full = tokenizer.apply_chat_template([*prompt, *completion], tokenize=False)
    if not full.startswith(head):
        raise DataError(f"{where}: the chat template does not render the completion as a continuation of the "
                        "prompt with its generation prompt")
    return full[len(head):]


def render_pairs(rows: PairRows, tokenizer: Any, source: str, offset: int = 0) -> dict[str, list[str]]:
    """prompt, chosen, rejected as the texts the model sees (the first row is row ``offset`` of the file)."""
    out: dict[str, list[str]] = {f: [] for f in PAIR_FIELDS}
    for row, (p, c, r) in enumerate(zip(rows.prompt, rows.chosen, rows.rejected, strict=True), start=offset):
        where = f"{source}: row {row + 1}"
        out["prompt"].append(render_prompt(tokenizer, p, where))
        out["chosen"].append(render_completion(tokenizer, p, c, where))
        out["rejected"].append(render_completion(tokenizer, p, r, where))
    return out


def plain_prompt(prompt: Field) -> str:
    """What a function reward or checker gets as the prompt: a text as it is; of a conversation, its
    last user turn (what a verifier checks the answer against)."""
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m["role"] == "user"]
    return users[-1] if users else prompt[-1]["content"]


def plain_completion(completion: Field) -> str:
    """What a function reward or checker gets as the response: a text as it is; of a conversation,
    its assistant turns' content."""
    if isinstance(completion, str):
        return completion
    return "\n".join(m["content"] for m in completion if m["role"] == "assistant")


def pair_texts(rows: PairRows, tokenizer: Any, source: str) -> dict[str, list[str]]:
    """``prompt``, ``chosen``, ``rejected`` as the model sees them (rendered), and the same three as
    function rewards see them (``prompt_plain``, ``chosen_plain``, ``rejected_plain``)."""
    texts = render_pairs(rows, tokenizer, source)
    texts["prompt_plain"] = [plain_prompt(p) for p in rows.prompt]
    for side in ("chosen", "rejected"):
        texts[f"{side}_plain"] = [plain_completion(c) for c in getattr(rows, side)]
    return texts
