"""Listening sockets for listener processes (no DICOM or HTTP here: both listeners use it)."""

from __future__ import annotations

import socket


def listening_socket(
    host: str, port: int, *, reuse_port: bool = False, backlog: int = 128
) -> socket.socket:
    """A TCP socket bound to ``host:port`` and listening.

    ``reuse_port``: other sockets with SO_REUSEPORT may bind the same port, and the kernel
    spreads connections over them. Without it the socket may be inherited by other
    processes (``pass_fds``), which then take connections from its one queue.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


def port_is_free(host: str, port: int) -> bool:
    """Nobody listens on ``host:port`` (sockets sharing it with SO_REUSEPORT included)."""
    try:
        listening_socket(host, port).close()
    except OSError:
        return False
    return True
