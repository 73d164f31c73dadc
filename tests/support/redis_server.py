"""A real redis-server (the bundled binary) that tests can stop, pause and restart."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import redis

from moemesh.cache.embedded import free_port, redis_server_argv


class RedisServer:
    """A redis-server process the test can stop, pause and restart on the same port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self.process = subprocess.Popen(redis_server_argv(self.port), stdout=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_timeout=0.2)
        for _ in range(100):
            try:
                if client.ping():
                    return
            except redis.RedisError:
                time.sleep(0.05)
        raise AssertionError("redis-server did not start")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)  # a paused server cannot exit
            self.process.terminate()
            self.process.wait(timeout=10)

    def pause(self) -> None:
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.process.pid, signal.SIGCONT)
