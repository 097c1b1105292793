"""``rlhf submit / status / logs / stop``: a pipeline as a Ray job, through Ray's ``JobSubmissionClient``.

What travels: the working directory (default: the current one; the user's reward modules and data
live there, and in a checkout of this repository the product code too) as ``runtime_env.working_dir``,
plus the resolved pipeline at ``.rlhf_job/pipeline.yaml`` inside it. Python dependencies come from the
cluster's image. The driver runs ``python -m orchestrator.cli run`` on the cluster.

Identity: the submission id is derived from the pipeline run id (``rlhf-<pipeline>-<run id>``), so
re-sending the same submission cannot start the run twice. The MLflow parent run is created here,
before submitting, and the job adopts it: the job's metadata carries the experiment and run ids,
and the user has the MLflow link at once.

Token auth: when the cluster has Ray token auth on, set ``RAY_AUTH_MODE=token`` and the token
(``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``), as for any Ray client;
``--token-file`` sets both for this call.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from orchestrator.config import PipelineConfig, dump_pipeline, redact
from pipelines.errors import UserError

JOB_DIR = ".rlhf_job"
JOB_PIPELINE = f"{JOB_DIR}/pipeline.yaml"
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "0.0.0.0"}
# Never uploaded: environments, VCS data, caches and what runs write locally.
EXCLUDES = (".git", ".venv", "venv", "__pycache__", "*.pyc", ".pytest_cache", ".ruff_cache", "*.egg-info",
            "mlruns", "mlartifacts", "mlflow.db", "mlflow.db-journal", "*.db", "bench/out", ".whl", JOB_DIR,
            ".rlhf-cluster")  # `rlhf cluster up`: its token file must not travel with a job
MAX_UPLOAD_BYTES = 400 * 2**20  # Ray refuses working dirs over 500 MiB; fail earlier, clearly
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


@dataclass(frozen=True)
class JobSpec:
    """Everything sent with one submission."""

    submission_id: str
    run_id: str
    entrypoint: str
    runtime_env: dict[str, Any]
    metadata: dict[str, str]


def submission_id_for(pipeline: str, run_id: str, resume_attempt: int = 0) -> str:
    """``rlhf-<pipeline>-<run id>``; the n-th resubmission of a run (``--resume``) adds ``-resume<n>``."""
    base = f"rlhf-{pipeline}-{run_id}"
    return f"{base}-resume{resume_attempt}" if resume_attempt else base


def is_local_address(address: str | None) -> bool:
    host = urlparse(address if address and "://" in address else f"http://{address or '127.0.0.1'}").hostname
    return host in LOCAL_HOSTS


def cluster_view(config: PipelineConfig, tracking_uri: str, *, local: bool, cwd: Path) -> tuple[PipelineConfig, str]:
    """The config and tracking URI as the job on the cluster must see them.

    The job runs in a temporary copy of the working directory, so a relative ``run_dir`` or a
    file-based MLflow store would vanish with it. On a cluster on this machine they become absolute
    paths here; on a remote cluster they are an error that says what to set instead.
    """
    uri = tracking_uri
    if redact("tracking.uri", uri) != uri:
        raise UserError(f"tracking URI {redact('tracking.uri', uri)}: credentials in the URI would be visible in the "
                        "Ray dashboard (job runtime_env); set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD "
                        "on the cluster instead (a Kubernetes Secret, see README)")
    file_store = _local_store_path(uri)
    run_dir = Path(config.run_dir)
    if not local:
        if file_store is not None:
            raise UserError(f"tracking URI {uri} is a file on this machine, which a job on a remote cluster "
                            "cannot write: set MLFLOW_TRACKING_URI (or tracking.uri) to an MLflow server, "
                            "e.g. http://mlflow.example:5000")
        if not run_dir.is_absolute():
            raise UserError(f"run_dir {config.run_dir!r} is relative: on a remote cluster it would land in the "
                            "job's temporary working directory; set it to storage every node mounts, e.g. "
                            "--set run_dir=/mnt/shared/runs")
        return config, uri
    if file_store is not None:
        store = (cwd / file_store).resolve()
        uri = f"sqlite:///{store}" if uri.startswith("sqlite:") else str(store)
    if not run_dir.is_absolute():
        config = config.model_copy(update={"run_dir": str((cwd / run_dir).resolve())})
    return config, uri


def _local_store_path(uri: str) -> str | None:
    """The file path of a local MLflow store (SQLite file or directory), None for a server URI."""
    if uri.startswith("sqlite:///"):
        return uri.removeprefix("sqlite:///")
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return parsed.path
    if parsed.scheme in ("", None) or len(parsed.scheme) == 1:  # a plain path (or a Windows drive)
        return uri
    return None


def stage_working_dir(source: Path, dest: Path, pipeline_yaml: str, extra_excludes: tuple[str, ...] = ()) -> Path:
    """Copy ``source`` (minus EXCLUDES and ``extra_excludes``) to ``dest`` and add the resolved pipeline."""
    source = source.resolve()
    excludes = EXCLUDES + tuple(extra_excludes)

    def ignore(directory: str, names: list[str]) -> set[str]:
        rel = Path(directory).resolve().relative_to(source)
        return {n for n in names if any(Path(n).match(p) or (rel / n).match(p) for p in excludes)}

    shutil.copytree(source, dest, ignore=ignore, symlinks=True)
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file() and not p.is_symlink())
    if size > MAX_UPLOAD_BYTES:
        biggest = sorted(((_tree_size(p), p.name) for p in dest.iterdir()), reverse=True)[:3]
        listing = ", ".join(f"{name} ({bytes_ / 2**20:.0f} MiB)" for bytes_, name in biggest)
        raise UserError(f"working directory {source} is {size / 2**20:.0f} MiB to upload (limit "
                        f"{MAX_UPLOAD_BYTES // 2**20} MiB); largest: {listing}. Move data to shared storage "
                        "or pass --working-dir")
    (dest / JOB_DIR).mkdir()
    (dest / JOB_PIPELINE).write_text(pipeline_yaml)
    return dest


def _tree_size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def job_spec(config: PipelineConfig, run_id: str, tracking_uri: str, *, mlflow_ids: tuple[str, str] | None,
             submission_id: str, resume: bool, working_dir: str) -> JobSpec:
    """The entrypoint, runtime env and metadata of one submission (pure: no I/O)."""
    args = ["python", "-m", "orchestrator.cli", "run", JOB_PIPELINE]
    args += ["--resume", run_id] if resume else ["--run-id", run_id]
    metadata = {"rlhf.pipeline": config.name, "rlhf.run_id": run_id, "mlflow.tracking_uri": tracking_uri}
    if mlflow_ids is not None:
        experiment_id, parent_run_id = mlflow_ids
        metadata |= {"mlflow.experiment_id": experiment_id, "mlflow.run_id": parent_run_id}
        if not resume:
            args += ["--mlflow-run-id", parent_run_id]
    runtime_env = {"working_dir": working_dir,
                   "env_vars": {"MLFLOW_TRACKING_URI": tracking_uri, "PYTHONUNBUFFERED": "1"}}
    return JobSpec(submission_id, run_id, " ".join(args), runtime_env, metadata)


def pipeline_yaml(config: PipelineConfig, tracking_uri: str | None = None) -> str:
    """The resolved pipeline as YAML, its tracking URI set to ``tracking_uri`` when given."""
    if tracking_uri is not None:
        config = config.model_copy(update={"tracking": config.tracking.model_copy(update={"uri": tracking_uri})})
    return dump_pipeline(config)


# ---------------------------------------------------------------- the client side


def client(address: str | None, token_file: str | None = None) -> Any:
    """A JobSubmissionClient for ``address`` (default: $RAY_ADDRESS, else http://127.0.0.1:8265)."""
    if token_file:
        if not Path(token_file).is_file():
            raise UserError(f"--token-file {token_file}: no such file")
        os.environ["RAY_AUTH_MODE"] = "token"
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(Path(token_file).resolve())
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except AuthenticationError as exc:
        raise UserError(f"the Ray cluster at {address} refused the request: {str(exc).splitlines()[0]}. It has Ray "
                        "token auth on: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH), or "
                        "pass --token-file") from None
    except (ConnectionError, RuntimeError, ValueError) as exc:
        dashboard = address or os.environ.get("RAY_ADDRESS") or "http://127.0.0.1:8265"
        raise UserError(f"cannot reach the Ray dashboard at {dashboard}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def call(what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """One client call; Ray's errors become UserErrors naming what failed."""
    try:
        return fn(*args, **kwargs)
    except (RuntimeError, ValueError, ConnectionError) as exc:
        raise UserError(f"{what}: {_first_line(exc)}") from None


# What a Ray head answers while its job agent is still registering (seconds after `ray start --head`,
# longer under load): worth another try, unlike every other refusal.
TRANSIENT_REFUSALS = ("No available agent to submit job", "please try again later")
SUBMIT_DEADLINE_S = 60.0


def call_retrying(what: str, fn: Any, *args: Any, deadline_s: float = SUBMIT_DEADLINE_S, **kwargs: Any) -> Any:
    """``call``, tried again (1 s, 2 s, then every 4 s) while the cluster gives a transient refusal,
    until ``deadline_s``; then the refusal as a UserError naming the wait."""
    give_up, pause = time.monotonic() + deadline_s, 1.0
    while True:
        try:
            return fn(*args, **kwargs)
        except (RuntimeError, ValueError, ConnectionError) as exc:
            transient = any(t in str(exc) for t in TRANSIENT_REFUSALS)
            if not transient:
                raise UserError(f"{what}: {_first_line(exc)}") from None
            if time.monotonic() + pause > give_up:
                raise UserError(f"{what}: the cluster still refused after {deadline_s:.0f} s: "
                                f"{_first_line(exc)}") from None
            time.sleep(pause)
            pause = min(pause * 2, 4.0)


def submit(config: PipelineConfig, *, address: str | None, working_dir: Path, resume_run_id: str | None,
           token_file: str | None = None, cluster_tracking_uri: str | None = None) -> JobSpec:
    """Validate, stage and submit ``config``; returns what was sent. The MLflow parent run of a new
    run is created first (and marked FAILED if the submission is refused).

    Args:
        cluster_tracking_uri: the same MLflow store as this machine's tracking URI, as the cluster
            reaches it (e.g. ``http://rayrlhf-mlflow:5000`` in Kubernetes while this machine uses a
            port-forward at ``http://127.0.0.1:5000``). Default: the same URI.
    """
    from orchestrator.runtime.tracking import resolve_tracking_uri

    local = is_local_address(address or os.environ.get("RAY_ADDRESS"))
    here = resolve_tracking_uri(config.tracking.uri)
    config, uri = cluster_view(config, cluster_tracking_uri or here, local=local, cwd=Path.cwd())
    if not cluster_tracking_uri:
        here = uri  # made absolute for a local cluster
    # After the checks above, so bad input fails fast and without the network.
    from orchestrator.runner import new_run_id
    from orchestrator.runtime.tracking import close_if_running, create_parent_run, find_parent_run

    jobs = client(address, token_file)
    experiment = config.tracking.experiment or config.name
    if resume_run_id:
        run_id = resume_run_id
        earlier = call("listing jobs", jobs.list_jobs)
        base = submission_id_for(config.name, run_id)
        attempt = 1 + sum(1 for j in earlier if (j.submission_id or "").startswith(base + "-resume"))
        sid = submission_id_for(config.name, run_id, attempt)
        mlflow_ids = find_parent_run(here, experiment, run_id)
    else:
        run_id = new_run_id()
        sid = submission_id_for(config.name, run_id)
        mlflow_ids = create_parent_run(here, experiment, run_id, tags={
            "rlhf.pipeline": config.name, "rlhf.submission_id": sid,
            "rlhf.run_dir": str(Path(config.run_dir) / config.name / run_id)})
    with tempfile.TemporaryDirectory(prefix="rlhf-job-") as tmp:
        run_dir = Path(config.run_dir)
        extra = (str(run_dir),) if not run_dir.is_absolute() else ()
        staged = stage_working_dir(working_dir, Path(tmp) / "pkg", pipeline_yaml(config, uri), extra)
        spec = job_spec(config, run_id, uri, mlflow_ids=mlflow_ids, submission_id=sid,
                        resume=bool(resume_run_id), working_dir=str(staged))
        try:
            call_retrying("submitting the job", jobs.submit_job, entrypoint=spec.entrypoint,
                          submission_id=spec.submission_id, runtime_env=spec.runtime_env, metadata=spec.metadata)
        except UserError:
            if mlflow_ids and not resume_run_id:
                close_if_running(here, mlflow_ids[1], "FAILED")
            raise
    return spec


def follow(jobs: Any, submission_id: str, out: Any = None) -> str:
    """Stream the job's logs until it ends; returns its final status."""
    out = out or sys.stdout

    async def tail() -> None:
        async for chunk in jobs.tail_job_logs(submission_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(tail())
    except KeyboardInterrupt:
        print(f"\nstopped following; the job goes on. `rlhf stop {submission_id}` ends it.", file=sys.stderr)
        raise
    status = wait(jobs, submission_id, timeout_s=60)
    reconcile(call(f"job {submission_id}", jobs.get_job_info, submission_id))
    return status


def reconcile(info: Any) -> str | None:
    """Close the MLflow parent run of a job that ended without its driver closing it (the driver
    failed to start, or was killed outright): FAILED, or KILLED for a stopped job. Returns the
    status set, if any."""
    from orchestrator.runtime.tracking import close_if_running

    status = str(info.status.value)
    meta = info.metadata or {}
    if status not in TERMINAL or status == "SUCCEEDED" or "mlflow.run_id" not in meta:
        return None
    final = "KILLED" if status == "STOPPED" else "FAILED"
    uri = os.environ.get("MLFLOW_TRACKING_URI") or meta["mlflow.tracking_uri"]  # the cluster's URI may not resolve here
    return final if close_if_running(uri, meta["mlflow.run_id"], final) else None


def wait(jobs: Any, submission_id: str, timeout_s: float) -> str:
    """Poll until the job is in a terminal state (or ``timeout_s`` passes); its status."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = str(call(f"job {submission_id}", jobs.get_job_status, submission_id).value)
        if status in TERMINAL or time.monotonic() > deadline:
            return status
        time.sleep(1.0)


def describe(jobs: Any, submission_id: str) -> str:
    """A few lines on one job: status, message, times, run ids."""
    info = call(f"job {submission_id}", jobs.get_job_info, submission_id)
    lines = [f"job {submission_id}: {info.status.value}"]
    closed = reconcile(info)
    if closed:
        lines.append(f"  MLflow run {info.metadata['mlflow.run_id']} was left running by the job; marked {closed}")
    if info.message:
        lines.append(f"  message: {info.message}")
    for label, ms in (("started", info.start_time), ("ended", info.end_time)):
        if ms:
            lines.append(f"  {label}: {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(ms / 1000))}")
    for key, value in sorted((info.metadata or {}).items()):
        lines.append(f"  {key}: {value}")
    return "\n".join(lines)
