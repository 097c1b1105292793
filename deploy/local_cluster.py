"""A Ray cluster of several nodes on one machine, for tests and demos (``rlhf cluster up|status|down``).

A head that runs no work (``--num-cpus 0``) and worker nodes, each a raylet of its own with its own
object store, temp dir and a custom resource named after the node (``node_a``, ``node_b``, …) that a
stage's ``placement.nodes`` asks for. Everything binds 127.0.0.1; Ray token auth is on, the token in
a file of the cluster's directory (mode 0600). Every node is a ``ray start --block`` process in a
session of its own, started with this environment's ``bin`` first on PATH (a job's driver runs the
``python`` it finds there); ``down`` stops exactly those processes, never another Ray on the machine.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import string
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from actors.net import free_port
from pipelines.errors import UserError

LOOPBACK = "127.0.0.1"  # every port of a local cluster is bound there

STATE_FILE = "cluster.json"


@dataclass
class Node:
    name: str
    pid: int
    temp_dir: str
    num_cpus: float
    resources: dict[str, float] = field(default_factory=dict)


@dataclass
class LocalCluster:
    """What ``up`` started: addresses, the token file, and one ``Node`` per ``ray start --block``."""

    directory: str
    gcs_address: str
    dashboard: str
    token_file: str
    nodes: list[Node]

    def env(self) -> dict[str, str]:
        """The environment a client (``rlhf submit``, ``ray.init``) of this cluster needs."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": self.token_file}

    def save(self) -> None:
        (Path(self.directory) / STATE_FILE).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, directory: str | Path) -> LocalCluster:
        path = Path(directory) / STATE_FILE
        if not path.is_file():
            raise UserError(f"{path}: no local cluster was started with --dir {directory}")
        raw = json.loads(path.read_text())
        return cls(**{**raw, "nodes": [Node(**n) for n in raw["nodes"]]})


def node_names(count: int) -> list[str]:
    return [f"node_{string.ascii_lowercase[i]}" for i in range(count)]


def _environment(token: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    return env | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}


def _ray_start(args: list[str], env: dict[str, str], log: Path) -> int:
    ray = Path(sys.executable).parent / "ray"
    common = ["--block", "--node-ip-address", "127.0.0.1", "--disable-usage-stats",
              "--dashboard-agent-listen-port", str(free_port(LOOPBACK)),
              "--metrics-export-port", str(free_port(LOOPBACK)),
              "--runtime-env-agent-port", str(free_port(LOOPBACK))]
    proc = subprocess.Popen([str(ray), "start", *common, *args], env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    return proc.pid


def _wait_for_nodes(cluster: LocalCluster, nodes: list[Node], timeout_s: float) -> None:
    """Until Ray reports every one of ``nodes`` alive (asked through a short-lived driver; a node is
    known by its temp dir, in which its object store's socket lives), or a UserError."""
    code = ("import json, ray; ray.init(address='%s', logging_level='ERROR', log_to_driver=False); "
            "print(json.dumps([n['ObjectStoreSocketName'] for n in ray.nodes() if n['Alive']]))" % cluster.gcs_address)
    env = _environment(Path(cluster.token_file).read_text().strip())
    deadline = time.monotonic() + timeout_s
    seen = ""
    while time.monotonic() < deadline:
        for node in nodes:
            if not _alive(node.pid):
                log = Path(cluster.directory) / f"{node.name}.log"
                raise UserError(f"local cluster: {node.name} exited at start; its log {log}:\n"
                                f"{log.read_text()[-2000:]}")
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        seen = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-300:]
        if proc.returncode == 0 and seen.startswith("["):
            sockets = json.loads(seen)
            if all(any(s.startswith(node.temp_dir + os.sep) for s in sockets) for node in nodes):
                return
        time.sleep(1)
    raise UserError(f"local cluster: {', '.join(n.name for n in nodes)} not alive within {timeout_s:.0f}s "
                    f"(last answer: {seen})")


def _alive(pid: int) -> bool:
    try:
        if os.waitpid(pid, os.WNOHANG)[0]:  # a node this process started, exited (and now reaped)
            return False
    except ChildProcessError:  # started by another process (`rlhf cluster up`)
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _temp_dir(index: int) -> Path:
    """A node's temp dir; short, since Ray's socket paths have a length limit."""
    return Path(tempfile.gettempdir()) / f"rlhf-{secrets.token_hex(3)}-{index}"


def up(directory: str | Path, *, workers: int = 2, cpus_per_worker: float = 2, head_cpus: float = 0,
       worker_cpus: tuple[float, ...] | None = None, timeout_s: float = 180) -> LocalCluster:
    """Start a head and ``workers`` worker nodes of ``cpus_per_worker`` CPUs (or one node per entry of
    ``worker_cpus``); returns the cluster (also saved in ``directory``)."""
    cpus = tuple(worker_cpus) if worker_cpus is not None else (cpus_per_worker,) * workers
    workers = len(cpus)
    directory = Path(directory).resolve()
    if (directory / STATE_FILE).exists():
        raise UserError(f"{directory}: a local cluster is already recorded there; `rlhf cluster down --dir "
                        f"{directory}` first")
    directory.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(16)
    token_file = directory / "token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    env = _environment(token)
    gcs_port, dashboard_port = free_port(LOOPBACK), free_port(LOOPBACK)
    temp = [_temp_dir(i) for i in range(workers + 1)]
    head_pid = _ray_start(["--head", "--port", str(gcs_port), "--dashboard-host", "127.0.0.1",
                           "--dashboard-port", str(dashboard_port),
                           "--ray-client-server-port", str(free_port(LOOPBACK)),
                           "--num-cpus", f"{head_cpus:g}", "--temp-dir", str(temp[0])], env, directory / "head.log")
    nodes = [Node("head", head_pid, str(temp[0]), head_cpus)]
    cluster = LocalCluster(str(directory), f"127.0.0.1:{gcs_port}", f"http://127.0.0.1:{dashboard_port}",
                           str(token_file), nodes)
    cluster.save()
    try:
        _wait_for_nodes(cluster, nodes, timeout_s)
        for name, temp_dir, n_cpus in zip(node_names(workers), temp[1:], cpus, strict=True):
            nodes.append(Node(name, 0, str(temp_dir), n_cpus, {name: 1.0}))
            _start_worker(cluster, nodes[-1], env)
        _wait_for_nodes(cluster, nodes[1:], timeout_s)
    except BaseException:
        down(directory)
        raise
    return cluster


def _start_worker(cluster: LocalCluster, node: Node, env: dict[str, str]) -> None:
    """``ray start`` one worker node of the cluster (its pid recorded, the record saved)."""
    node.pid = _ray_start(["--address", cluster.gcs_address, "--num-cpus", f"{node.num_cpus:g}",
                           "--resources", json.dumps(node.resources), "--temp-dir", node.temp_dir],
                          env, Path(cluster.directory) / f"{node.name}.log")
    cluster.save()


def restart_node(directory: str | Path, name: str, timeout_s: float = 180) -> LocalCluster:
    """Start worker node ``name`` again after it was lost or stopped: a fresh raylet with the same CPUs
    and custom resource, so the bundles pinned to it fit again (then ``--resume`` the run)."""
    cluster = LocalCluster.load(directory)
    workers = {n.name: n for n in cluster.nodes[1:]}
    if name not in workers:
        raise UserError(f"local cluster {directory}: no worker node {name!r} (there are {', '.join(workers)})")
    node = workers[name]
    if _alive(node.pid):
        raise UserError(f"local cluster {directory}: {name} is running (pid {node.pid})")
    if not _alive(cluster.nodes[0].pid):
        raise UserError(f"local cluster {directory}: the head is not running; `rlhf cluster down` and `up` again")
    shutil.rmtree(node.temp_dir, ignore_errors=True)
    node.temp_dir = str(_temp_dir(cluster.nodes.index(node)))  # a new one: the lost node's is not taken for it
    _start_worker(cluster, node, _environment(Path(cluster.token_file).read_text().strip()))
    _wait_for_nodes(cluster, [node], timeout_s)
    return cluster


def down(directory: str | Path, timeout_s: float = 60) -> list[str]:
    """Stop the nodes ``up`` started in ``directory`` (workers first), remove their temp dirs and the
    record; returns the names of the nodes stopped."""
    cluster = LocalCluster.load(directory)
    stopped = []
    for node in reversed(cluster.nodes):
        if _alive(node.pid):
            os.kill(node.pid, signal.SIGTERM)  # `ray start --block` stops its node's processes on SIGTERM
            deadline = time.monotonic() + timeout_s
            while _alive(node.pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            if _alive(node.pid):
                os.killpg(node.pid, signal.SIGKILL)
            stopped.append(node.name)
        shutil.rmtree(node.temp_dir, ignore_errors=True)
    (Path(directory) / STATE_FILE).unlink()
    return stopped


def kill_node(cluster: LocalCluster, name: str) -> int:
    """SIGKILL one worker node's ``ray start`` process group (its raylet and workers): a lost node."""
    node = next(n for n in cluster.nodes if n.name == name)
    os.killpg(node.pid, signal.SIGKILL)
    return node.pid


def describe(cluster: LocalCluster) -> str:
    lines = [f"Ray address:  {cluster.gcs_address}", f"dashboard:    {cluster.dashboard}",
             f"token file:   {cluster.token_file}"]
    for node in cluster.nodes:
        state = "alive" if _alive(node.pid) else "stopped"
        extra = f", resources {node.resources}" if node.resources else ""
        lines.append(f"  {node.name}: {node.num_cpus:g} CPUs{extra}, pid {node.pid} ({state})")
    lines.append(f"submit with:  RAY_AUTH_MODE=token rlhf submit PIPELINE.yaml --address {cluster.dashboard} "
                 f"--token-file {cluster.token_file}")
    return "\n".join(lines)
