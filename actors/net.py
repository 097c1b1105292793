"""Ports: one free TCP port, for a rendezvous (trainer ranks, weight-broadcast groups) or a local node."""

from __future__ import annotations

import socket


def free_port(host: str = "") -> int:
    """A TCP port free on ``host`` ("" = every interface) now; the caller binds it soon after."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
