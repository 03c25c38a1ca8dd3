"""The real server as a subprocess (`python -m message_broker serve`), for tests about several
processes and restarts: it starts on a free port (the same one again when started after a stop,
so that clients find it where it was), is ready when /ready says so, and stops with SIGTERM like
in production."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import aiohttp

from .pg import free_port


class ServerProcess:
    def __init__(self, database_url: str, log_path: Path, **env: str) -> None:
        self.database_url = database_url
        self.log_path = log_path
        self.env = env
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, timeout: float = 30.0) -> ServerProcess:
        self.launch()
        await self.wait_ready(timeout)
        return self

    def launch(self) -> ServerProcess:
        """Start it without waiting for /ready (it may be waiting for its database)."""
        self.port = self.port or free_port()
        env = {
            **os.environ,
            "DATABASE_URL": self.database_url,
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            "LOG_LEVEL": "INFO",
            # Small pools: several of these may run at once on one test database.
            "POOL_MIN_SIZE": "1",
            "POOL_MAX_SIZE": "5",
            "WORKER_CONCURRENCY": "3",
            **self.env,
        }
        self._spawn(env)
        return self

    def _spawn(self, env: dict[str, str]) -> None:
        self._log = self.log_path.open("ab")
        self._process = subprocess.Popen(
            [sys.executable, "-m", "message_broker", "serve"], env=env, stdout=self._log, stderr=subprocess.STDOUT
        )

    async def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            while True:
                assert self._process is not None
                if self._process.poll() is not None:
                    raise AssertionError(f"server exited with {self._process.returncode}: {self.log_tail()}")
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(self.url + "/ready") as response:
                        if response.status == 200:
                            return
                if time.monotonic() > deadline:
                    raise AssertionError(f"server not ready within {timeout}s: {self.log_tail()}")
                await asyncio.sleep(0.05)

    def signal(self, signum: int) -> None:
        assert self._process is not None
        self._process.send_signal(signum)

    def wait_exit(self, timeout: float) -> int:
        """The exit code, once it has exited (subprocess.TimeoutExpired after `timeout` seconds)."""
        assert self._process is not None
        return self._process.wait(timeout)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, as a process manager would; returns the exit code."""
        if self._process is None:
            return 0
        process, self._process = self._process, None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._log is not None:
            self._log.close()
        return process.returncode

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""
