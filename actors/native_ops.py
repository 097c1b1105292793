"""DeepSpeed's CPU shared-memory collective op, loaded so that a killed process cannot stall the next.

DeepSpeed's gloo path loads ``deepspeed_shm_comm`` through torch's JIT extension loader, which takes
a lock *file* (``<build dir>/lock``) on every load, even when the op is already built, and waits
forever while that file exists. A process killed inside that window (a trainer a fault test
SIGKILLs, a run stopped with ``kill -9``, a CI job cancelled during setup) leaves the file behind,
and every later trainer on the machine hangs in ``deepspeed.init_distributed`` with no error.

The build directory is the Python environment's own (``<sys.prefix>/torch_extensions``, unless
``TORCH_EXTENSIONS_DIR`` is set or the environment is read-only): torch's default, one folder under
``~/.cache`` for every environment, had two checkouts' venvs rebuild the op over each other (its
build file names each one's include paths) on every trainer start.

``load_shm_comm`` loads the op first, under an ``flock`` on a sibling file: the kernel drops an
flock when its holder dies, so while we hold it no loader of ours is alive inside the build
directory, and a ``lock`` file found there is stale and removed. Waiting for the flock has a
deadline. DeepSpeed caches the loaded module, so its own later load returns at once.
Run ``python -m actors.native_ops`` to build the op ahead of the first trainer (``make setup`` does).
"""

from __future__ import annotations

import fcntl
import logging
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger("rlhf.native_ops")

OP = "ShareMemCommBuilder"
DEADLINE_S = 600.0  # a cold compile takes ~30 s on 2 cores; several trainers wait on one compile


@contextmanager
def build_lock(build_dir: Path, *, deadline_s: float, who: str) -> Iterator[None]:
    """Hold an flock beside ``build_dir``; inside it, a torch ``lock`` file left in it is removed."""
    build_dir.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(build_dir.parent / f".{build_dir.name}.rlhf-flock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        give_up = time.monotonic() + deadline_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > give_up:
                    raise TimeoutError(
                        f"{who}: phase 'load {build_dir.name}': another process has held {build_dir} for over "
                        f"{deadline_s:.0f} s; if none is compiling, remove {build_dir} and retry"
                    ) from None
                time.sleep(0.5)
        stale = build_dir / "lock"
        if stale.exists():
            log.warning("%s: removing %s, left by a process killed while loading the op", who, stale)
            stale.unlink(missing_ok=True)
        yield
    finally:
        os.close(fd)  # releases the flock


def build_directory(name: str) -> Path:
    """Where torch builds the JIT op ``name`` for this environment (setting ``TORCH_EXTENSIONS_DIR`` to
    the environment's own folder first, where it is unset and the environment writable)."""
    from torch.utils.cpp_extension import _get_build_directory

    if "TORCH_EXTENSIONS_DIR" not in os.environ and os.access(sys.prefix, os.W_OK):
        os.environ["TORCH_EXTENSIONS_DIR"] = str(Path(sys.prefix) / "torch_extensions")
    return Path(_get_build_directory(name, verbose=False))


def load_shm_comm(*, who: str = "trainer", deadline_s: float = DEADLINE_S) -> Any:
    """Load (compiling on first use) DeepSpeed's CPU shared-memory op; None where the accelerator
    has none (CUDA uses NCCL). ``who`` names the role and rank in a deadline error."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder(OP)
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return None
    build_dir = build_directory(builder.name)
    with build_lock(build_dir, deadline_s=deadline_s, who=who):
        return builder.load(verbose=False)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    op = load_shm_comm(who="setup")
    print(f"deepspeed_shm_comm: {'loaded' if op is not None else 'not used on this accelerator'}")
