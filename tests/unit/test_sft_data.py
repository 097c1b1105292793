"""SFT data: response-only masks for (prompt, response) and chat `messages`, and errors naming the row."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.data.formats import read_sft
from pipelines.data.sft import collate_sft, tokenize_sft
from pipelines.errors import DataError
from pipelines.tasks.tiny_model import build_char_tokenizer

TOK = build_char_tokenizer()
EOS = TOK.eos_token_id


def _write(path, columns):
    pq.write_table(pa.table(columns), path)
    return str(path)


def test_prompt_response_masks_the_prompt_and_trains_response_plus_eos(tmp_path):
    path = _write(tmp_path / "sft.parquet", {"prompt": ["12+3=", "1+1="], "response": ["15", "2"]})
    rows = read_sft(path)
    assert rows == [("12+3=", "15"), ("1+1=", "2")]  # `response` read as the completion
    examples = tokenize_sft(rows, TOK, max_length=16, source=path)
    first = examples[0]
    prompt_ids = TOK("12+3=")["input_ids"]
    assert first.input_ids == prompt_ids + TOK("15", add_special_tokens=False)["input_ids"] + [EOS]
    assert first.loss_mask == [0] * len(prompt_ids) + [1, 1, 1]
    assert first.prompt_ids == prompt_ids and first.reference == "15" and first.prompt_text == "12+3="
    batch = collate_sft(examples, TOK.pad_token_id)
    assert batch.input_ids.shape == (2, 8)
    assert batch.attention_mask[1].tolist() == [1] * 6 + [0] * 2
    assert batch.loss_mask[1].tolist() == [0, 0, 0, 0, 1, 1, 0, 0]
    assert batch.num_tokens() == 8 + 6


def test_messages_train_every_assistant_turn_and_mask_the_rest(tmp_path):
    conv = [
        {"role": "system", "content": "add"},
        {"role": "user", "content": "1+1="},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "2+2="},
        {"role": "assistant", "content": "4"},
    ]
    path = _write(tmp_path / "chat.parquet", {"messages": [conv]})
    assert read_sft(path) == [conv]
    (example,) = tokenize_sft(read_sft(path), TOK, max_length=128, source=path)
    full = TOK.apply_chat_template(conv, tokenize=False)
    assert TOK.decode(example.input_ids) == full
    trained = TOK.decode([t for t, m in zip(example.input_ids, example.loss_mask) if m])
    assert trained == "2</s>\n4</s>\n"  # each assistant turn with what the template appends to it
    assert TOK.decode(example.prompt_ids) == TOK.apply_chat_template(conv[:4], tokenize=False,
                                                                     add_generation_prompt=True)
    assert example.reference == "4"


@pytest.mark.parametrize(
    "columns,message",
    [
        ({"prompt": ["1+1="]}, r"need field\(s\) \['prompt', 'completion'\]; missing 'completion'"),
        ({"prompt": ["1+1=", "2+2="], "response": ["2", ""]},
         r"field 'completion' \(column 'response'\), row 2: value is empty"),
        ({"messages": [[{"role": "user", "content": "hi"}]]}, "row 1: no 'assistant' turn"),
        ({"messages": [[{"role": "assistant", "content": "x"}], []]}, "row 2: the conversation has no messages"),
        ({"messages": [[{"role": "user", "content": "a"}, {"role": "assistant"}]]},
         "row 1: a message has no 'content'"),
        ({"messages": ["hi"]}, r"field 'messages' must hold conversations"),
        ({"messages": [[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]], "prompt": ["a"]},
         "has both a 'messages' and a 'prompt' column"),
    ],
)
def test_bad_sft_files_name_the_row(tmp_path, columns, message):
    path = _write(tmp_path / "bad.parquet", columns)
    with pytest.raises(DataError, match=message):
        read_sft(path)


def test_too_long_row_and_missing_chat_template(tmp_path):
    path = _write(tmp_path / "sft.parquet", {"prompt": ["1+1=", "9" * 40 + "="], "response": ["2", "1"]})
    with pytest.raises(DataError, match=r"1 of 2 rows exceed data.max_length=16 \(the longest: row 2, 43 tokens\)"):
        tokenize_sft(read_sft(path), TOK, max_length=16, source=path)
    no_template = build_char_tokenizer()
    no_template.chat_template = None
    chat = _write(tmp_path / "chat.parquet", {"messages": [[{"role": "user", "content": "a"},
                                                             {"role": "assistant", "content": "b"}]]})
    with pytest.raises(DataError, match="row 1: conversations need a tokenizer with a chat template"):
        tokenize_sft(read_sft(chat), no_template, max_length=64, source=chat)
