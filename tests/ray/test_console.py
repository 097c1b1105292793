"""The quiet console on real Ray: what actors print reaches the stage's log file, not the console;
``verbose`` shows it on both; a failed stage prints what failed, the log's path and its tail; after
the run, Ray prints worker output again."""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from orchestrator.console import RunConsole, error_message, format_worker_lines


@pytest.fixture(scope="module")
def ray_forwarding():
    """A local Ray that forwards worker output to the driver (as ``rlhf run`` starts it)."""
    import ray

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=True)
    yield ray
    ray.shutdown()


def _chatty_actor(ray):
    @ray.remote(num_cpus=0.1)
    class Chatty:
        def say(self, text: str) -> str:
            import sys

            print(f"stdout {text}", flush=True)
            print(f"stderr {text}", file=sys.stderr, flush=True)
            return text

        def fail(self, text: str) -> None:
            print(f"about to fail {text}", flush=True)
            raise ValueError(f"broken {text}")

    return Chatty.remote()


def _wait_for(path: Path, text: str, timeout_s: float = 20.0) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        content = path.read_text() if path.exists() else ""
        if text in content:
            return content
        time.sleep(0.1)
    raise AssertionError(f"{text!r} not in {path} within {timeout_s} s: {content[-2000:]!r}")


def _wait_for_console(capfd, text: str, timeout_s: float = 20.0) -> str:
    deadline = time.monotonic() + timeout_s
    seen = ""
    while text not in seen and time.monotonic() < deadline:
        time.sleep(0.2)
        out = capfd.readouterr()
        seen += out.out + out.err
    return seen


@contextmanager
def _attached(tmp_path, verbose: bool = False):
    """A run's console, attached (Ray's printer swapped for the log writer) while the body runs."""
    console = RunConsole(tmp_path / "pipeline.log", verbose=verbose)
    console.attach()
    try:
        yield console
    finally:
        console.detach()


def test_actor_output_goes_to_the_stage_log_not_the_console(ray_forwarding, tmp_path, capfd):
    ray = ray_forwarding
    actor = _chatty_actor(ray)
    with _attached(tmp_path) as console:
        with console.stage(tmp_path / "stages/one/stage.log") as log:
            ray.get(actor.say.remote("in-stage-one"))
            content = _wait_for(log, "stderr in-stage-one")
            logging.getLogger("transformers.modeling_utils").warning("driver-side library warning")
        assert "(Chatty pid=" in content and "[out] stdout in-stage-one" in content
        assert "driver-side library warning" in log.read_text()
        ray.get(actor.say.remote("between-stages"))
        _wait_for(tmp_path / "pipeline.log", "stdout between-stages")
    shown = capfd.readouterr()
    assert "in-stage-one" not in shown.out + shown.err
    assert "driver-side library warning" not in shown.out + shown.err

    # Detached: Ray's own printer is back, so a later driver in this process sees worker output.
    ray.get(actor.say.remote("after-the-run"))
    assert "stdout after-the-run" in _wait_for_console(capfd, "stdout after-the-run")


def test_verbose_shows_actor_output_on_the_console_and_in_the_log(ray_forwarding, tmp_path, capfd):
    ray = ray_forwarding
    actor = _chatty_actor(ray)
    with _attached(tmp_path, verbose=True) as console, console.stage(tmp_path / "stage.log") as log:
        ray.get(actor.say.remote("verbose-run"))
        _wait_for(log, "stdout verbose-run")
        assert "stdout verbose-run" in _wait_for_console(capfd, "stdout verbose-run")


def test_a_failed_stage_names_the_failure_the_log_and_its_tail(ray_forwarding, tmp_path, capsys):
    ray = ray_forwarding
    actor = _chatty_actor(ray)
    with _attached(tmp_path) as console, console.stage(tmp_path / "stages/ppo/stage.log") as log:
        with pytest.raises(ray.exceptions.RayTaskError) as failure:
            ray.get(actor.fail.remote("reward-fn"))
        _wait_for(log, "about to fail reward-fn")
        console.stage_failed("ppo", log, failure.value)
    err = capsys.readouterr().err
    assert "stage 'ppo' failed: RayTaskError(ValueError): broken reward-fn\n" in err
    assert f"its log (actors' output, the traceback): {log}" in err
    assert "about to fail reward-fn" in err  # the tail shows what the actor printed
    assert "ValueError: broken reward-fn" in log.read_text()  # the full traceback is in the log
    assert failure.value.rlhf_reported is True
    assert error_message(failure.value) == "broken reward-fn"  # what `rlhf` prints of a UserError raised in an actor


def test_worker_lines_are_prefixed_like_rays_console():
    data = {"pid": 41, "actor_name": "RolloutWorker", "ip": "10.0.0.2", "localhost": "10.0.0.1",
            "is_err": True, "lines": ["INFO vllm started", "second"]}
    assert format_worker_lines(data) == ["(RolloutWorker pid=41, ip=10.0.0.2) [err] INFO vllm started",
                                         "(RolloutWorker pid=41, ip=10.0.0.2) [err] second"]
    local = {"pid": 7, "task_name": "score", "ip": "1.2.3.4", "localhost": "1.2.3.4", "lines": ["x"]}
    assert format_worker_lines(local) == ["(score pid=7) [out] x"]


def test_of_the_autoscaler_only_its_events_reach_the_log(ray_forwarding):
    # The monitor's raw log lines, as Ray forwards them: housekeeping and (autoscaler v1) one event.
    data = {"pid": "autoscaler", "ip": "1.2.3.4", "localhost": "1.2.3.4",
            "lines": ["2026-12-02 05:19:00,657\tINFO autoscaler.py:469 -- The autoscaler took 0.004 seconds",
                      "INFO monitor.py:1 -- :event_summary:Adding 1 node(s) of type worker."]}
    lines = format_worker_lines(data)
    assert not any("The autoscaler took" in line for line in lines)
    assert all(line.startswith("(autoscaler) ") for line in lines)


def test_before_ray_starts_its_lines_deepspeeds_and_progress_bars_stay_off_the_console(tmp_path, capfd):
    """Attached before ``ray.init`` (as ``rlhf run`` does): Ray's and DeepSpeed's loggers, which print
    through console handlers of their own, reach the log only; transformers' progress bars are off;
    detach puts all of it back."""
    import os

    import ray  # noqa: F401  (installs the console handler of Ray's logger)

    ray_logger, ds_logger = logging.getLogger("ray"), logging.getLogger("DeepSpeed")
    before = list(ray_logger.handlers)
    assert any(isinstance(h, logging.StreamHandler) for h in before)
    ds_handler = logging.StreamHandler()
    try:
        with _attached(tmp_path):
            ds_logger.addHandler(ds_handler)  # as DeepSpeed does at its import, after the console attached
            logging.getLogger("ray._private.authentication").warning("token auth is on")
            ds_logger.warning("Setting accelerator to CPU")
            assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
        seen = capfd.readouterr()
        assert "token auth is on" not in seen.out + seen.err and "accelerator" not in seen.out + seen.err
        log = (tmp_path / "pipeline.log").read_text()
        assert "WARNING ray._private.authentication: token auth is on" in log
        assert "WARNING DeepSpeed: Setting accelerator to CPU" in log
        assert ray_logger.handlers == before and not ds_logger.filters
        assert "HF_HUB_DISABLE_PROGRESS_BARS" not in os.environ
    finally:
        ds_logger.removeHandler(ds_handler)
