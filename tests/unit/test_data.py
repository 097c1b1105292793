"""Dataset checks name the file, column and row; tokenization and collation masks are right."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoTokenizer

from pipelines.data.formats import PAIR_FIELDS, read_pairs
from pipelines.data.tokens import EpochSampler, collate_pairs, tokenize_pairs
from pipelines.errors import DataError


def _write(tmp_path, name, table):
    path = tmp_path / name
    pq.write_table(table, path)
    return path


def _read(path):
    return read_pairs(str(path))


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nope.parquet: preference pairs file not found"):
        _read(tmp_path / "nope.parquet")


def test_not_parquet(tmp_path):
    path = tmp_path / "x.parquet"
    path.write_text("prompt,chosen,rejected\n")
    with pytest.raises(DataError, match="not a readable parquet file"):
        _read(path)


def test_wrong_columns(tmp_path):
    path = _write(tmp_path, "cols.parquet", pa.table({"prompt": ["a"], "good": ["b"], "rejected": ["c"]}))
    with pytest.raises(DataError, match=r"cols.parquet: .*missing 'chosen' .*name yours with data.columns"):
        _read(path)


def test_empty(tmp_path):
    empty = pa.table({c: pa.array([], type=pa.string()) for c in PAIR_FIELDS})
    with pytest.raises(DataError, match=r"empty.parquet: preference pairs dataset is empty"):
        _read(_write(tmp_path, "empty.parquet", empty))


def test_non_string_column(tmp_path):
    path = _write(tmp_path, "num.parquet", pa.table({"prompt": ["1+1="], "chosen": [2], "rejected": ["3"]}))
    with pytest.raises(DataError, match=r"num.parquet: field 'chosen' must hold strings or lists of \{role, content\} "
                                        r"messages; found type int64"):
        _read(path)


def test_null_and_empty_rows_named(tmp_path):
    path = _write(tmp_path, "null.parquet", pa.table({"prompt": ["a", "b", "c"], "chosen": ["x", None, "z"],
                                                      "rejected": ["1", "2", "3"]}))
    with pytest.raises(DataError, match=r"field 'chosen', row 2: value is null"):
        _read(path)
    path = _write(tmp_path, "blank.parquet", pa.table({"prompt": ["a", ""], "chosen": ["x", "y"],
                                                       "rejected": ["1", "2"]}))
    with pytest.raises(DataError, match=r"field 'prompt', row 2: value is empty"):
        _read(path)


def test_tokenize_and_collate(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = {"prompt": ["12+3=", "1+1="], "chosen": ["15", "2"], "rejected": ["16", "11"]}
    pairs = tokenize_pairs(rows, tok, max_length=16, source="mem")
    assert pairs[0].chosen[-1] == tok.eos_token_id and tok.decode(pairs[0].chosen[:-1]) == "15"
    batch = collate_pairs(pairs, tok.pad_token_id, torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -4.0]))
    assert batch.chosen_input_ids.shape == (2, 8)  # "12+3=" + "15" + EOS
    assert batch.chosen_loss_mask[0].tolist() == [0, 0, 0, 0, 0, 1, 1, 1]
    assert batch.chosen_loss_mask[1].tolist() == [0, 0, 0, 0, 1, 1, 0, 0]
    assert batch.chosen_attention_mask[1].tolist() == [1, 1, 1, 1, 1, 1, 0, 0]
    assert batch.chosen_lengths().tolist() == [3.0, 2.0]
    assert batch.rejected_lengths().tolist() == [3.0, 3.0]
    halves = batch.split(2)
    assert len(halves) == 2 and halves[1].ref_rejected_logps.tolist() == [-4.0]
    with pytest.raises(DataError, match=r"mem: 2 of 2 rows exceed data.max_length=6 \(the longest: row 1, 8 tokens\)"):
        tokenize_pairs(rows, tok, max_length=6, source="mem")


def test_epoch_sampler_is_deterministic_and_covers_epoch():
    sampler = EpochSampler(10, 3, seed=1)
    first_epoch = [i for step in range(3) for i in sampler.indices(step)]
    assert len(set(first_epoch)) == 9
    assert sampler.indices(4) == EpochSampler(10, 3, seed=1).indices(4)
    assert sampler.indices(0) != sampler.indices(3)  # next epoch, new permutation
    with pytest.raises(DataError, match="fewer than one batch"):
        EpochSampler(2, 3, seed=0)


def test_margin_column_errors_name_the_file_column_and_row(tmp_path):
    from pipelines.data.tokens import read_float_column

    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"m": [0.5, None], "s": ["a", "b"], "ok": [1, 2]}), path)
    assert read_float_column(path, "ok") == [1.0, 2.0]
    with pytest.raises(DataError, match=r"pairs.parquet: column 'm', row 2: value is None"):
        read_float_column(path, "m")
    with pytest.raises(DataError, match=r"column 's' must hold numbers"):
        read_float_column(path, "s")
    with pytest.raises(DataError, match=r"margin column 'zz' not found"):
        read_float_column(path, "zz")


def test_an_empty_response_is_a_valid_pair_side(tmp_path, tiny_model_dir):
    """A sampled policy can answer with EOS alone (on-policy DPO's pairs output has such rows)."""
    from transformers import AutoTokenizer

    from pipelines.data.lengths import LengthTally
    from pipelines.stages.pairs import load_pairs

    path = _write(tmp_path, "eos_only.parquet", pa.table({"prompt": ["1+1="], "chosen": ["2"], "rejected": [""]}))
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    (pair,) = load_pairs(str(path), tok, LengthTally.strict(str(path), 16))
    assert pair.rejected == [tok.eos_token_id] and pair.chosen[-1] == tok.eos_token_id
