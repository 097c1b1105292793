"""Learning-rate schedule, atomic checkpoint directories, typed batches."""

import pytest
import torch

from actors.fsutil import atomic_directory
from actors.policy_trainer import lr_multiplier
from pipelines.data.batches import PreferenceBatch


def test_lr_schedule_shapes():
    kw = dict(warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert lr_multiplier(0, schedule="cosine", **kw) == pytest.approx(0.1)
    assert lr_multiplier(9, schedule="cosine", **kw) == pytest.approx(1.0)
    assert lr_multiplier(10, schedule="cosine", **kw) == pytest.approx(1.0)
    assert lr_multiplier(60, schedule="cosine", **kw) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_multiplier(110, schedule="cosine", **kw) == pytest.approx(0.1)
    assert lr_multiplier(60, schedule="linear", **kw) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_multiplier(100, schedule="constant", **kw) == 1.0


def test_atomic_directory_keeps_good_copy_on_crash(tmp_path):
    target = tmp_path / "model"
    with atomic_directory(target) as tmp:
        (tmp / "weights").write_text("good")
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            (tmp / "weights").write_text("half")
            raise RuntimeError("crash mid-write")
    assert (target / "weights").read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temp leftovers
    with atomic_directory(target) as tmp:
        (tmp / "weights").write_text("new")
    assert (target / "weights").read_text() == "new"


def test_preference_batch_slicing():
    ids = torch.arange(12).reshape(4, 3)
    batch = PreferenceBatch(ids, ids, ids, ids + 1, ids, ids, torch.arange(4.0), None)
    parts = batch.split(2)
    assert [len(p) for p in parts] == [2, 2]
    assert parts[1].ref_chosen_logps.tolist() == [2.0, 3.0] and parts[1].ref_rejected_logps is None
    assert [len(c) for c in batch.chunks(3)] == [3, 1]
    with pytest.raises(ValueError, match="4 rows into 3"):
        batch.split(3)
