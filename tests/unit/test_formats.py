"""Dataset sources and formats: every source reads the same rows; standard, conversational and
implicit-prompt pairs, prompt-only and unpaired rows; columns mapping; errors that name the file,
field and row; and the token boundaries the chat template, the trainer and the rollout share."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.data.formats import (
    check_pairs,
    pair_texts,
    plain_completion,
    plain_prompt,
    read_pairs,
    read_prompts,
    read_sft,
    read_unpaired,
    render_completion,
    render_prompt,
    split_shared_prompt,
)
from pipelines.data.lengths import LengthTally
from pipelines.data.sources import read_columns
from pipelines.data.tokens import encode_completions, encode_prompts
from pipelines.errors import DataError
from pipelines.tasks.tiny_model import build_bpe_tokenizer, build_char_tokenizer

BPE = build_bpe_tokenizer()
USER = [{"role": "user", "content": "12+3="}]
CONV_ROWS = [{"prompt": USER, "chosen": [{"role": "assistant", "content": "15"}],
              "rejected": [{"role": "assistant", "content": "16"}]},
             {"prompt": [{"role": "system", "content": "add"}, {"role": "user", "content": "1+1="}],
              "chosen": [{"role": "assistant", "content": "2"}], "rejected": [{"role": "assistant", "content": "11"}]}]


def _jsonl(path, rows, opener=open):
    with opener(path, "wt") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


def _sources(tmp_path, rows) -> dict[str, str]:
    """The same rows as Parquet, JSONL, JSONL.gz, a save_to_disk folder, and through load_dataset."""
    import datasets

    table = pa.Table.from_pylist(rows)
    pq.write_table(table, tmp_path / "d.parquet")
    hub_dir = tmp_path / "hub"
    hub_dir.mkdir()
    _jsonl(hub_dir / "train.jsonl", rows)
    datasets.Dataset(table).save_to_disk(str(tmp_path / "saved"))
    return {"parquet": str(tmp_path / "d.parquet"), "jsonl": _jsonl(tmp_path / "d.jsonl", rows),
            "jsonl.gz": _jsonl(tmp_path / "d.jsonl.gz", rows, gzip.open), "saved": str(tmp_path / "saved"),
            "hub": f"hub:{hub_dir}:train"}


def test_every_source_reads_the_same_conversational_pairs(tmp_path):
    for kind, source in _sources(tmp_path, CONV_ROWS).items():
        pairs = read_pairs(source)
        assert pairs.conversational and not pairs.implicit_prompt, kind
        assert (pairs.prompt, pairs.chosen, pairs.rejected) == tuple(
            [r[f] for r in CONV_ROWS] for f in ("prompt", "chosen", "rejected")), kind


def test_conversational_pairs_render_through_the_chat_template_and_end_at_its_eos(tmp_path):
    texts = pair_texts(read_pairs(_sources(tmp_path, CONV_ROWS)["jsonl"]), BPE, "mem")
    assert texts["prompt"][0] == "<|im_start|>user\n12+3=<|im_end|>\n<|im_start|>assistant\n"
    assert texts["chosen"][0] == "15<|im_end|>\n"
    assert texts["prompt_plain"] == ["12+3=", "1+1="] and texts["chosen_plain"] == ["15", "2"]
    prompts, chosen = encode_completions(BPE, texts["prompt"], texts["chosen"])
    # the "\n" after EOS dropped
    assert chosen[0] == BPE("15", add_special_tokens=False)["input_ids"] + [BPE.eos_token_id]
    # The trainer's sequence is the chat template's own tokenization of the whole conversation, up to its EOS.
    whole = BPE(BPE.apply_chat_template(USER + CONV_ROWS[0]["chosen"], tokenize=False), add_special_tokens=False)
    assert prompts[0] + chosen[0] == whole["input_ids"][: len(prompts[0] + chosen[0])]
    assert whole["input_ids"][len(prompts[0] + chosen[0]) - 1] == BPE.eos_token_id


def test_a_text_prompt_gets_the_tokenizers_bos_and_a_chat_rendered_one_no_second():
    from tokenizers import processors

    char = build_char_tokenizer()  # made to add BOS, as Llama's tokenizer does
    char.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", char.bos_token_id)])
    plain = encode_prompts(char, ["1+1="])[0]
    assert plain[0] == char.bos_token_id and plain.count(char.bos_token_id) == 1
    rendered = "<s>" + "user: 1+1=\nassistant: "  # a template that writes BOS itself
    assert encode_prompts(char, [rendered, "1+1="]) == [char(rendered, add_special_tokens=False)["input_ids"], plain]
    assert encode_prompts(char, [rendered])[0].count(char.bos_token_id) == 1


def test_implicit_prompt_is_the_shared_prefix(tmp_path):
    rows = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in CONV_ROWS]
    pairs = read_pairs(_sources(tmp_path, rows)["parquet"])
    assert pairs.implicit_prompt and pairs.prompt == [r["prompt"] for r in CONV_ROWS]
    assert pairs.chosen == [r["chosen"] for r in CONV_ROWS] and pairs.rejected == [r["rejected"] for r in CONV_ROWS]
    # texts, as HH-RLHF has them: the space before the differing word goes with the completion
    assert split_shared_prompt("Human: hi Assistant: hello", "Human: hi Assistant: go away", "x") == (
        "Human: hi Assistant:", " hello", " go away", False)
    # HH-RLHF's layout: answers that start alike ("I ...") do not pull the prompt into them
    hh = "\n\nHuman: hi\n\nAssistant: ok\n\nHuman: and?\n\nAssistant:"
    assert split_shared_prompt(hh + " I think so.", hh + " I doubt it.", "x") == (
        hh, " I think so.", " I doubt it.", True)
    assert split_shared_prompt(hh + " Yes.", hh + " No.", "x") == (hh, " Yes.", " No.", False)
    with pytest.raises(DataError, match="row 2: chosen and rejected share no prompt"):
        check_pairs(_jsonl(tmp_path / "nope.jsonl", [{"chosen": "ab", "rejected": "ac"},
                                                     {"chosen": "a", "rejected": "b"}]))
    same = [{"chosen": USER + [{"role": "assistant", "content": "1"}], "rejected": USER}]
    with pytest.raises(DataError, match=r"row 1: chosen and rejected must share their prompt turns and then differ"):
        read_pairs(_jsonl(tmp_path / "short.jsonl", same))


def test_columns_mapping_renames_a_users_columns(tmp_path):
    path = _jsonl(tmp_path / "mine.jsonl", [{"question": "1+1=", "good": "2", "bad": "3"}])
    pairs = read_pairs(path, {"prompt": "question", "chosen": "good", "rejected": "bad"})
    assert (pairs.prompt, pairs.chosen, pairs.rejected) == (["1+1="], ["2"], ["3"])
    with pytest.raises(DataError, match=r"missing 'rejected' \(column 'worse'\) .*name yours with data.columns"):
        read_pairs(path, {"prompt": "question", "chosen": "good", "rejected": "worse"})
    with pytest.raises(DataError, match=r"columns mapping names unknown field\(s\) \['answer'\]"):
        read_pairs(path, {"answer": "good"})


@pytest.mark.parametrize("rows, message", [
    ([{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": USER, "chosen": "b", "rejected": "c"}],
     r"mixed.jsonl: .*\(line 2: field 'prompt' is a list, where line 1 has a string\)"),
    ([{"prompt": USER, "chosen": "b", "rejected": "c"}], r"fields mix texts and conversations"),
    ([{"prompt": USER, "chosen": [{"role": "assistant", "content": "1"}], "rejected": USER}],
     r"field 'rejected', row 1: a completion must start with an assistant turn, not 'user'"),
    ([{"prompt": USER, "chosen": [{"role": "assistant", "content": "1"}],
       "rejected": [{"role": "assistant", "content": None}]}], r"field 'rejected', row 1: a message has no 'content'"),
    ([{"prompt": "a", "chosen": 1, "rejected": "c"}], r"field 'chosen' must hold strings or lists of"),
])
def test_bad_pair_files_name_the_file_field_and_row(tmp_path, rows, message):
    path = _jsonl(tmp_path / "mixed.jsonl", rows)
    for read in (read_pairs, check_pairs):  # the streamed pre-flight check finds the same
        with pytest.raises(DataError, match=message):
            read(path)


def test_unknown_and_missing_sources(tmp_path):
    (tmp_path / "d.csv").write_text("a\n")
    with pytest.raises(DataError, match=r"d.csv: unknown data source; give a .parquet, .jsonl"):
        read_pairs(str(tmp_path / "d.csv"))
    with pytest.raises(DataError, match=r"gone.jsonl: preference pairs file not found"):
        read_pairs(str(tmp_path / "gone.jsonl"))
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match=r"plain: a folder but not one written by datasets' save_to_disk"):
        read_pairs(str(tmp_path / "plain"))
    with pytest.raises(DataError, match=r"hub:.*cannot load the dataset"):
        read_pairs(f"hub:{tmp_path / 'absent'}")


def test_prompts_texts_or_conversations(tmp_path):
    assert read_prompts(_jsonl(tmp_path / "p.jsonl", [{"prompt": "1+1="}])) == ["1+1="]
    prompts = read_prompts(_jsonl(tmp_path / "c.jsonl", [{"prompt": USER, "answer": "15"}]))
    assert prompts == [USER] and plain_prompt(prompts[0]) == "12+3="
    assert render_prompt(BPE, prompts[0]).endswith("<|im_start|>assistant\n")
    with pytest.raises(DataError, match=r"e.jsonl: field 'prompt', row 2: the conversation has no messages"):
        read_prompts(_jsonl(tmp_path / "e.jsonl", [{"prompt": [{"role": "user", "content": "x"}]}, {"prompt": []}]))


def test_unpaired_rows(tmp_path):
    rows = [{"prompt": "1+1=", "completion": "2", "label": True}, {"prompt": "1+1=", "completion": "3", "label": False}]
    unpaired = read_unpaired(_jsonl(tmp_path / "u.jsonl", rows))
    assert unpaired.label == [True, False] and unpaired.completion == ["2", "3"]
    with pytest.raises(DataError, match=r"field 'label' must hold booleans, found type int64"):
        read_unpaired(_jsonl(tmp_path / "n.jsonl", [{"prompt": "a", "completion": "b", "label": 1}]))


def test_sft_prompt_completion_conversations_train_only_the_completion(tmp_path):
    from pipelines.data.sft import tokenize_sft

    rows = [{"prompt": USER + [{"role": "assistant", "content": "15"}, {"role": "user", "content": "+1="}],
             "completion": [{"role": "assistant", "content": "16"}]}]
    sft = read_sft(_jsonl(tmp_path / "s.jsonl", rows))
    (example,) = tokenize_sft(sft, BPE, max_length=64, source="s")
    trained = BPE.decode([t for t, m in zip(example.input_ids, example.loss_mask, strict=True) if m])
    assert trained == "16<|im_end|>\n"  # the earlier assistant turn is context, not trained
    assert example.reference == "16" and example.prompt_text == "+1="
    assert plain_completion(rows[0]["completion"]) == "16"
    assert render_completion(BPE, rows[0]["prompt"], rows[0]["completion"], "x") == "16<|im_end|>\n"


def test_reads_stream_in_batches(tmp_path):
    path = tmp_path / "big.parquet"
    pq.write_table(pa.table({"prompt": [f"{i}+1=" for i in range(20_000)]}), path, row_group_size=1000)
    assert read_columns(str(path), ["prompt"], "prompts", limit=1500)["prompt"][-1] == "1499+1="
    assert len(read_prompts(str(path))) == 20_000


def test_pair_store_tokenizes_batch_by_batch_what_the_full_read_does(tmp_path, monkeypatch):
    """A training set tokenized into the memory-mapped store, in record batches smaller than the file,
    holds exactly the pairs the in-memory path makes (conversational and implicit prompts); an error
    in a later batch names the file's row, and leaves no store file behind."""
    from pipelines.data import sources
    from pipelines.data.tokens import PairStore, tokenize_pairs, write_pair_store

    monkeypatch.setattr(sources, "BATCH_ROWS", 3)
    rows = [{"prompt": [{"role": "user", "content": f"{i}+{i}="}],
             "chosen": [{"role": "assistant", "content": str(2 * i)}],
             "rejected": [{"role": "assistant", "content": str(2 * i + 1)}]} for i in range(10)]
    implicit = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in rows]
    for name, data in (("conv", rows), ("implicit", implicit)):
        src = _jsonl(tmp_path / f"{name}.jsonl", data)
        store = write_pair_store(src, {}, BPE, tmp_path / f"{name}.arrow", lengths=LengthTally.strict(src, 64))
        want = tokenize_pairs(pair_texts(read_pairs(src), BPE, src), BPE, max_length=64, source=src)
        assert len(store) == 10 and len(store._table.to_batches()) == 4  # batches of 3 rows
        assert store[:] == want and store[7] == want[7] and store[-1] == want[-1]
        assert [store[i] for i in (4, 1)] == [want[4], want[1]]
        assert PairStore(store.path)[2:5] == want[2:5]  # reopened from disk
    # the implicit prompt is the explicit one: the same token ids, byte for byte; other pairs differ
    assert PairStore(tmp_path / "conv.arrow").digest() == PairStore(tmp_path / "implicit.arrow").digest()
    other = write_pair_store(_jsonl(tmp_path / "other.jsonl", rows[1:]), {}, BPE, tmp_path / "other.arrow",
                             lengths=LengthTally.strict("other", 64))
    assert other.digest() != store.digest()

    bad = [dict(r) for r in rows]
    bad[7]["chosen"] = [{"role": "assistant", "content": "9" * 200}]
    src = _jsonl(tmp_path / "bad.jsonl", bad)
    with pytest.raises(DataError, match=r"bad.jsonl: 1 of 10 rows exceed data.max_length=64 \(the longest: row 8, "):
        write_pair_store(src, {}, BPE, tmp_path / "bad.arrow", lengths=LengthTally.strict(src, 64))
    assert not list(tmp_path.glob("*bad.arrow*"))
