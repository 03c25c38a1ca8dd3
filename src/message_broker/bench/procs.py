"""Processes the benchmark starts and watches: the real server, and what /proc says about it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from pathlib import Path

import aiohttp

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
    return found


def process_tree(pid: int) -> list[int]:
    """The process and its descendants (a server may run several worker processes)."""
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(_children(current))
    return tree


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process tree so far."""
    total = 0
    for member in process_tree(pid):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / _TICKS


def cpu_seconds_of_local(pids: list[int]) -> dict[int, float]:
    """cpu_seconds of each process of `pids` that runs on this machine (a database server's pids
    may be another machine's)."""
    return {pid: cpu_seconds(pid) for pid in pids if Path(f"/proc/{pid}").exists()}


def rss_bytes(pid: int) -> int:
    """Resident memory of a process tree (sum of VmRSS)."""
    total = 0
    for member in process_tree(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total


class Server:
    """`python -m message_broker serve` as a subprocess on a free port."""

    def __init__(self, database_url: str, log_path: Path, extra_env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._env = {
            **os.environ,
            "DATABASE_URL": database_url,
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            "LOG_LEVEL": os.environ.get("BENCH_SERVER_LOG_LEVEL", "WARNING"),
            **(extra_env or {}),
        }
        self._log_path = log_path
        self.process: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    async def start(self, timeout: float = 30.0) -> float:
        """Start the server and wait until /ready answers 200; returns the seconds that took."""
        started = time.monotonic()
        log = self._log_path.open("ab")
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "message_broker", "serve", env=self._env, stdout=log, stderr=log
        )
        log.close()
        async with aiohttp.ClientSession() as session:
            while time.monotonic() - started < timeout:
                if self.process.returncode is not None:
                    raise RuntimeError(f"server exited with {self.process.returncode}; see {self._log_path}")
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(self.url + "/ready") as response:
                        if response.status == 200:
                            return time.monotonic() - started
                await asyncio.sleep(0.05)
        await self.stop()
        raise RuntimeError(f"server not ready within {timeout}s; see {self._log_path}")

    async def stop(self, timeout: float = 15.0) -> None:
        if self.process is None or self.process.returncode is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.process.wait(), timeout)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()
            raise RuntimeError(f"server did not stop on SIGTERM within {timeout}s") from None
