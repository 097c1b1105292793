"""`rlhf cluster restart`'s checks, on a recorded cluster (no Ray started)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from deploy import local_cluster
from orchestrator.cli import main
from pipelines.errors import UserError


def _record(tmp_path, worker_pid: int, head_pid: int) -> None:
    token = tmp_path / "token"
    token.write_text("t")
    nodes = [local_cluster.Node("head", head_pid, str(tmp_path / "h"), 0),
             local_cluster.Node("node_a", worker_pid, str(tmp_path / "a"), 2, {"node_a": 1.0})]
    local_cluster.LocalCluster(str(tmp_path), "127.0.0.1:1", "http://127.0.0.1:2", str(token), nodes).save()


def _exited_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_restart_names_the_nodes_there_are(tmp_path):
    _record(tmp_path, os.getpid(), os.getpid())
    with pytest.raises(UserError, match=r"no worker node 'node_z' \(there are node_a\)"):
        local_cluster.restart_node(tmp_path, "node_z")


def test_restart_refuses_a_running_node_and_a_cluster_without_its_head(tmp_path, capsys):
    _record(tmp_path, os.getpid(), os.getpid())
    assert main(["cluster", "restart", "node_a", "--dir", str(tmp_path)]) == 2
    assert f"node_a is running (pid {os.getpid()})" in capsys.readouterr().err
    (tmp_path / local_cluster.STATE_FILE).unlink()
    _record(tmp_path, _exited_pid(), _exited_pid())
    with pytest.raises(UserError, match="the head is not running"):
        local_cluster.restart_node(tmp_path, "node_a")
