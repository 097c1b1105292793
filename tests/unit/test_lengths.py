"""The length policy (``data.truncation``, pipelines/data/lengths.py): the cut by hand values; every
reader under it (pairs, SFT rows, KTO rows, prompts) with a real tokenizer; the one error that counts
the rows over the limit; and the checks before Ray (`rlhf validate` reads data with 1-based rows,
a limit over the model's positions)."""

from __future__ import annotations

import json

import pytest

from pipelines.data.lengths import Cut, LengthPolicy, LengthTally, Truncation
from pipelines.data.sft import tokenize_sft
from pipelines.data.tokens import tokenize_pairs
from pipelines.errors import DataError
from pipelines.tasks.tiny_model import build_bpe_tokenizer

BPE = build_bpe_tokenizer()
KEEP_END, KEEP_START = Truncation.KEEP_END, Truncation.KEEP_START


def _tally(max_length, truncation, **limits):
    return LengthTally("data.jsonl", LengthPolicy(max_length, truncation, **limits))


def test_the_cut_by_hand():
    # keep_end: the prompt keeps its end, the completions their start
    assert LengthPolicy(10, KEEP_END).cut(8, (3, 2)) == Cut(0, 1, 8, 3)  # 7 + 3 = 10
    # the prompt keeps at least half of the limit when the completion would take more
    assert LengthPolicy(10, KEEP_END).cut(8, (6, 4)) == Cut(0, 3, 8, 5)
    assert LengthPolicy(10, KEEP_END).cut(8, (30,)) == Cut(0, 3, 8, 5)
    assert LengthPolicy(10, KEEP_END).cut(4, (30,)) == Cut(0, 0, 4, 6)
    # BOS stays in front of the prompt's kept end
    assert LengthPolicy(10, KEEP_END).cut(8, (3,), keep_first=True) == Cut(1, 2, 8, 3)
    assert Cut(1, 2, 8, 3).prompt(list(range(8))) == [0, 2, 3, 4, 5, 6, 7]
    # keep_start: the sequence keeps its start; a completion keeps at least one token
    assert LengthPolicy(10, KEEP_START).cut(8, (6,)) == Cut(0, 0, 8, 2)
    assert LengthPolicy(10, KEEP_START).cut(30, (6,)) == Cut(0, 0, 9, 1)
    # prompt and completion limits of their own
    assert LengthPolicy(100, KEEP_END, max_prompt_length=3, max_completion_length=4).cut(8, (6, 2)) == Cut(0, 5, 8, 4)
    assert LengthPolicy(20, KEEP_START).cut(30, ()) == Cut(0, 0, 20, 0)  # a prompt alone (online stages)


def test_error_counts_every_row_over_the_limit_and_names_the_longest_1_based():
    tally = _tally(10, Truncation.ERROR)
    for row, (p, c) in enumerate([(3, 4), (9, 5), (2, 2), (12, 1)]):
        tally.fit(row, p, (c,))
    with pytest.raises(DataError, match=r"data.jsonl: 2 of 4 rows exceed data.max_length=10 \(the longest: row 2, "
                                        r"14 tokens\); raise the limit, or set data.truncation"):
        tally.finish()


def test_drop_counts_and_all_dropped_is_an_error():
    tally = _tally(10, Truncation.DROP)
    assert tally.fit(0, 3, (4,)) == Cut(0, 0, 3, 4) and tally.fit(1, 9, (5,)) is None
    assert tally.finish().params() == {"data.train.rows": 2, "data.train.rows_truncated": 0,
                                       "data.train.rows_dropped": 1, "data.train.longest_row_tokens": 14}
    tally = _tally(4, Truncation.DROP)
    tally.fit(0, 9, (5,))
    with pytest.raises(DataError, match="all 1 rows were dropped"):
        tally.finish()


def test_pairs_truncate_to_the_limit_and_a_pair_cut_to_equal_sides_is_dropped():
    long = " ".join(["word"] * 60)
    rows = {"prompt": [long + " question", "short"], "chosen": ["yes indeed " + long, long + " a"],
            "rejected": ["no " + long, long + " b"]}
    tally = _tally(32, KEEP_END)
    pairs = tokenize_pairs(rows, BPE, lengths=tally, source="data.jsonl")
    (pair,) = pairs  # the second pair differs only past the limit: no preference left
    assert pair.row == 0 and len(pair.prompt) + max(len(pair.chosen), len(pair.rejected)) <= 32
    full = BPE(rows["prompt"][0])["input_ids"]
    assert pair.prompt[-3:] == full[-3:] and pair.chosen != pair.rejected  # the prompt's end is kept
    assert (tally.truncated, tally.dropped) == (1, 1)
    assert "data.jsonl: 2 rows, 1 truncated, 1 dropped (data.truncation=keep_end" in tally.finish().line()


def test_sft_rows_keep_their_trained_tokens_under_truncation():
    rows = [(" ".join(["ctx"] * 50) + " 12+3=", "15"), ("1+1=", " ".join(["long"] * 80))]
    tally = _tally(24, KEEP_END)
    kept = tokenize_sft(rows, BPE, lengths=tally, source="sft.jsonl")
    assert [len(e.input_ids) <= 24 for e in kept] == [True, True]
    first, second = kept
    assert first.input_ids[-len(first.prompt_ids) - 2:][-2:] == first.input_ids[-2:] and sum(first.loss_mask) >= 2
    assert first.input_ids[: len(first.prompt_ids)] == first.prompt_ids  # the generation prompt is the cut prompt
    assert second.prompt_ids == BPE("1+1=")["input_ids"] and sum(second.loss_mask) == 24 - len(second.prompt_ids)
    assert tally.finish().truncated == 2
    with pytest.raises(DataError, match=r"sft.jsonl: 2 of 2 rows exceed data.max_length=24"):
        tokenize_sft(rows, BPE, max_length=24, source="sft.jsonl")


def test_prompts_keep_their_end_or_are_dropped(tmp_path, tiny_model_dir):
    from pipelines.data.tokens import load_tokenizer
    from pipelines.stages.online_rollout import load_prompts

    tok = load_tokenizer(str(tiny_model_dir))
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": p}) for p in ["1+1=", "9" * 40 + "+1=", "2+2="]))
    cut = load_prompts(str(path), tok, "prompt", _tally(8, KEEP_END))
    assert [len(ids) <= 8 for ids in cut.ids] == [True] * 3 and cut.ids[1][-3:] == tok("+1=")["input_ids"][-3:]
    assert cut.texts[1] == "9" * 40 + "+1="  # rewards read the prompt as written
    dropped = load_prompts(str(path), tok, "prompt", tally := _tally(8, Truncation.DROP))
    assert dropped.texts == ["1+1=", "2+2="] and tally.dropped == 1


def test_the_char_tokenizer_counts_what_it_cannot_encode(caplog):
    from pipelines.tasks.tiny_model import build_char_tokenizer

    tally = _tally(256, KEEP_END)
    tokenize_pairs({"prompt": ["It’s “fine”", "café"], "chosen": ["yes 🙂", "ok"], "rejected": ["no", "non"]},
                   build_char_tokenizer(), lengths=tally, source="hh.jsonl")
    assert tally.unknown == 5  # ’ “ ” é 🙂
    with caplog.at_level("WARNING", logger="rlhf.data"):
        assert tally.finish().report()["data.train.unknown_tokens"] == 5
    assert "data.jsonl: 5 tokens are the tokenizer's <unk>" in caplog.text
    assert "5 <unk> tokens" in tally.line()
    bpe = _tally(256, KEEP_END)
    tokenize_pairs({"prompt": ["It’s “fine”"], "chosen": ["yes 🙂"], "rejected": ["no"]}, BPE, lengths=bpe, source="x")
    assert bpe.unknown == 0  # byte-level: every character has bytes


def test_validate_reads_the_data_and_names_a_bad_row_1_based(tmp_path, tiny_model_dir):
    from orchestrator import cli

    data = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "1+1=", "chosen": "2", "rejected": "3"}, {"prompt": "2+2=", "chosen": "4", "rejected": 5}]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(f"name: t\nstages:\n  - name: dpo\n    kind: offline_dpo\n    policy: {tiny_model_dir}\n"
                        f"    data: {{train: {data}, max_length: 8, truncation: error}}\n")
    assert cli.main(["validate", str(pipeline)]) == 2
    rows[1]["rejected"] = "4 but longer than eight tokens by far"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(DataError, match=r"pairs.jsonl: 1 of 2 rows exceed data.max_length=8 \(the longest: row 2, "):
        from orchestrator.config import load_pipeline
        from pipelines.stages.preflight import preflight_pipeline

        preflight_pipeline(load_pipeline(str(pipeline), []).stages, lengths=True)
    assert cli.main(["validate", str(pipeline), "--set", "stages.dpo.data.truncation=drop"]) == 0


def test_a_limit_over_the_models_positions_fails_before_ray(tmp_path, tiny_model_dir, capsys):
    from orchestrator import cli

    positions = json.loads((tiny_model_dir / "config.json").read_text())["max_position_embeddings"]
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(f"name: t\nstages:\n  - name: sft\n    kind: sft\n    policy: {tiny_model_dir}\n"
                        f"    data: {{train: {tmp_path}/x.jsonl, max_length: 4096}}\n"
                        "  - name: dpo\n    kind: offline_dpo\n    policy: {from: sft}\n"
                        f"    data: {{train: {tmp_path}/x.jsonl, max_length: {positions + 1}}}\n")
    (tmp_path / "x.jsonl").write_text(json.dumps({"prompt": "1+1=", "completion": "2", "chosen": "2",
                                                  "rejected": "3"}))
    assert cli.main(["validate", str(pipeline)]) == 2
    err = capsys.readouterr().err
    assert f"stage 'sft': data.max_length is 4096 tokens, over the {positions} positions of the model" in err
    assert cli.main(["validate", str(pipeline), "--set", "stages.sft.data.max_length=64"]) == 2
    assert f"stage 'dpo': data.max_length is {positions + 1} tokens" in capsys.readouterr().err  # through from: sft


def test_a_pair_left_out_after_its_cut_counts_once_and_an_uncut_one_is_kept():
    tally = _tally(64, KEEP_END)
    rows = {"prompt": ["same", "q"], "chosen": ["x", "a " * 80 + "yes"], "rejected": ["x", "a " * 80 + "no"]}
    pairs = tokenize_pairs(rows, BPE, lengths=tally, source="p.jsonl")
    assert [p.row for p in pairs] == [0]  # an uncut pair is the user's, sides equal or not
    assert (tally.rows, tally.truncated, tally.dropped) == (2, 0, 1)  # the cut one: dropped, not also truncated
