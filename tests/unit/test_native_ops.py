"""A lock file left by a killed op loader no longer stalls the next trainer (actors/native_ops.py).

torch's JIT loader waits forever while ``<build dir>/lock`` exists; a CI run once hung in setup
on one left by a process killed mid-load. The last test loads the real op from a copy of its build
directory holding such a file, in a subprocess with a deadline.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from actors.native_ops import build_lock

ROOT = Path(__file__).resolve().parents[2]


def test_a_stale_lock_file_is_removed_under_the_flock(tmp_path):
    build_dir = tmp_path / "py311_cpu" / "deepspeed_shm_comm"
    build_dir.mkdir(parents=True)
    (build_dir / "lock").touch()
    with build_lock(build_dir, deadline_s=5, who="policy trainer rank 0"):
        assert not (build_dir / "lock").exists()
    with build_lock(build_dir, deadline_s=5, who="policy trainer rank 0"):  # released on exit
        pass


def test_a_held_flock_fails_at_its_deadline_naming_who_and_phase(tmp_path):
    build_dir = tmp_path / "deepspeed_shm_comm"
    with build_lock(build_dir, deadline_s=5, who="policy trainer rank 0"):
        (build_dir / "lock").parent.mkdir(parents=True, exist_ok=True)
        (build_dir / "lock").touch()  # a live loader's lock: not ours to remove while it holds the flock
        with pytest.raises(TimeoutError, match=r"policy trainer rank 1: phase 'load deepspeed_shm_comm'"):
            with build_lock(build_dir, deadline_s=1, who="policy trainer rank 1"):
                pass
        assert (build_dir / "lock").exists()


def test_the_real_op_loads_past_a_stale_lock(tmp_path, monkeypatch):
    from actors.native_ops import build_directory

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    built = build_directory("deepspeed_shm_comm")  # this environment's: `make setup` built the op there
    copy = tmp_path / built.name  # with TORCH_EXTENSIONS_DIR set, torch builds in <dir>/<op name>
    if built.is_dir():  # `make setup` built it: the copy loads without compiling
        shutil.copytree(built, copy, ignore=shutil.ignore_patterns("lock"))
    copy.mkdir(parents=True, exist_ok=True)
    (copy / "lock").touch()
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "actors.native_ops"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "deepspeed_shm_comm: loaded" in done.stdout
    assert "left by a process killed while loading the op" in done.stderr
    assert not (copy / "lock").exists()
