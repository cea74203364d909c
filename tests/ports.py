"""Free TCP ports on 127.0.0.1 for tests that must tell a child process (Envoy) a port."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port the kernel just handed out and released; a tiny reuse race, fine for tests."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
