"""Loopback port helpers: pick free ports, check an explicit one, wait for a listener."""

from __future__ import annotations

import socket

from pipeline.devtools.stack.errors import StackError

HOST = "127.0.0.1"


class PortInUseError(StackError):
    """An explicitly requested port is already taken by another process."""


def port_is_free(port: int) -> bool:
    """True if nothing listens on 127.0.0.1:`port`.

    SO_REUSEADDR matches what the services themselves set, so a port held only by
    TIME_WAIT sockets of a previous run counts as free (as it is for them).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def free_ports(count: int, avoid: set[int] | None = None) -> list[int]:
    """`count` distinct ports the kernel reports free right now.

    All sockets are held open until every port is chosen, so the kernel cannot hand the
    same port out twice; another process may still grab one before the service binds it.
    """
    avoid = set(avoid or ())
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < count:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            held.append(sock)
            sock.bind((HOST, 0))
            port = int(sock.getsockname()[1])
            if port not in avoid and port not in ports:
                ports.append(port)
    finally:
        for sock in held:
            sock.close()
    return ports


def free_port_pair(offset: int, avoid: set[int]) -> int:
    """A free port `p` such that `p + offset` is free too (for servers that derive one from the other)."""
    for _ in range(200):
        (port,) = free_ports(1, avoid)
        if port + offset <= 65535 and port + offset not in avoid and port_is_free(port + offset):
            return port
        avoid = avoid | {port}
    raise OSError(f"no free port pair (p, p+{offset}) found on {HOST}")


def require_free(port: int, service: str) -> None:
    if not port_is_free(port):
        raise PortInUseError(f"{service}: port {port} on {HOST} is already in use by another process")


def is_listening(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=timeout):
            return True
    except OSError:
        return False
