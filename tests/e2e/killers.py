"""Fault injection on real processes: SIGKILL, by pid, an actor process (or a whole local-cluster node)
that this test's or benchmark's own Ray instance started, found by the title Ray gives it
(``ray::<Class>.<method>`` while a method runs)."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable

import psutil

from deploy import local_cluster


def actor_titles() -> list[tuple[int, str]]:
    """(pid, title) of every process descending from this one."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            found.append((proc.pid, (proc.cmdline() or [""])[0]))
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


class Killer(threading.Thread):
    """SIGKILL the actor process of class ``role`` while it runs ``method``, once ``ready(title)`` held
    for some process title (it sees every title, so it can wait for an event such as a first sync)."""

    def __init__(self, role: str, method: str, ready: Callable[[str], bool]) -> None:
        super().__init__(daemon=True)
        self.role, self.method, self.ready = role, method, ready
        self.killed: str | None = None
        self.pid: int | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + 600
        while not self.stop.is_set() and time.monotonic() < deadline:
            for pid, title in actor_titles():
                if self.ready(title) and title.startswith(f"ray::{self.role}") and self.method in title:
                    os.kill(pid, signal.SIGKILL)
                    self.killed, self.pid = title, pid
                    return
            time.sleep(0.001)


class AfterFirstSync:
    """Ready once the rollout worker was seen receiving weights (iteration 1 is done)."""

    def __init__(self) -> None:
        self.synced = False

    def __call__(self, title: str) -> bool:
        self.synced = self.synced or "receive_bucket" in title
        return self.synced


def node_of(cluster: local_cluster.LocalCluster, pid: int) -> str | None:
    """The node whose `ray start` process a worker process descends from."""
    starts = {n.pid: n.name for n in cluster.nodes}
    proc = psutil.Process(pid)
    while proc is not None:
        if proc.pid in starts:
            return starts[proc.pid]
        proc = proc.parent()
    return None


def kill_rollout_node_at_sync(cluster: local_cluster.LocalCluster, running: Callable[[], bool],
                              ready: Callable[[], bool] = lambda: True, timeout_s: float = 600) -> str | None:
    """At the first weight sync after ``ready()`` holds (the rollout worker receiving weights), SIGKILL
    the process group of the node it runs on (raylet, object store, workers); returns that node's
    name (None if ``running()`` ended first)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and running():
        if not ready():
            time.sleep(0.05)
            continue
        for pid, title in actor_titles():
            if title.startswith("ray::RolloutWorker.receive_bucket"):
                name = node_of(cluster, pid)
                if name is not None:
                    local_cluster.kill_node(cluster, name)
                    return name
        time.sleep(0.01)
    return None
