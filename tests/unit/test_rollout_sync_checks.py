"""RolloutWorker's sync bookkeeping (no engine): a version loads only when complete and exact.

The engine is replaced by a recorder here because this tests the refusal logic alone; the real
vLLM path (reload, parity, version served) is tested in tests/e2e/test_rollout_weight_sync.py.
"""

import pytest
import torch

from actors.rollout import RolloutWorker, SyncError


class _Recorder:
    def __init__(self):
        self.loaded = []

    def collective_rpc(self, method, kwargs):
        self.loaded.append((method, dict(kwargs["weights_iterator"])))

    def reset_prefix_cache(self):
        pass


def _worker():
    worker = RolloutWorker(0, 1, "unused")
    worker.llm = _Recorder()
    worker.expected = {"a": (2, 2), "b": (3,)}
    return worker


def test_complete_version_loads_once_from_all_its_buckets():
    worker = _worker()
    out = worker.receive_buckets(1, {"a": torch.zeros(2, 2)}, {"b": torch.ones(3)})
    assert out["loaded"] and out["version"] == 1 and out["bytes"] == 7 * 4
    assert worker.served_version() == 1
    ((method, state),) = worker.llm.loaded
    assert method == "reload_weights" and sorted(state) == ["a", "b"]


@pytest.mark.parametrize(
    "bucket,message",
    [
        ({"a": torch.zeros(2, 2)}, r"missing \['b'\]"),
        ({"a": torch.zeros(2, 2), "b": torch.ones(3), "c": torch.ones(1)}, r"unexpected \['c'\]"),
        ({"a": torch.zeros(2, 3), "b": torch.ones(3)}, r"wrong shape \['a'\]"),
    ],
)
def test_incomplete_or_wrong_sync_is_refused_and_the_old_version_kept(bucket, message):
    worker = _worker()
    with pytest.raises(SyncError, match=message):
        worker.receive_buckets(1, bucket)
    assert worker.served_version() == 0 and worker.llm.loaded == []
