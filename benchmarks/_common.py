"""Helpers shared by the benchmark scripts (not a benchmark itself)."""

from __future__ import annotations

import os
import platform
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

from achihuo_mini import AsyncLoop
from achihuo_mini._store import Store

DEFAULT_REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


class NoOp(AsyncLoop):
    NAME = "bench"

    async def noop(self, i: int) -> None:
        pass


def unique_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def write_config(
    path: Path,
    backend: str,
    redis_url: str = DEFAULT_REDIS_URL,
    sqlite_path: Path | None = None,
    extra: str = "",
) -> Path:
    """A config file with ``backend`` on both sides (so ``$ACHIHUO_CONFIG`` cannot change the run);
    ``extra``: more lines for both sections (backend options)."""
    opts = {"redis": f'url = "{redis_url}"', "sqlite": f'path = "{sqlite_path}"'}.get(backend, "")
    opts = f"{opts}\n{extra}" if extra else opts
    path.write_text(f'[queue]\nbackend = "{backend}"\n{opts}\n[done]\nbackend = "{backend}"\n{opts}\n')
    return path


def make_loop(name: str, config: Path, concurrency: int = 32) -> AsyncLoop:
    """A no-op loop with its own NAME, no progress lines and no debug logging."""
    cls = type("NoOp", (NoOp,), {"NAME": name})
    loop: AsyncLoop = cls(concurrency=concurrency, config_file=config, debug=False, progress_interval=0)
    return loop


def store_of(loop: AsyncLoop) -> Store:
    """The loop's queue and done set (as its settings say), opened to look at or clear."""
    return Store(loop.name, loop.settings)  # an async context manager: opened on entry, closed on exit


def machine() -> str:
    return (
        f"{platform.python_implementation()} {platform.python_version()}, {platform.machine()}, "
        f"{os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}"
    )


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def free_port(bus: bool = False) -> int:
    """A free local port; ``bus``: one whose Cluster bus port (port + 10000) is free too."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if not bus:
            return port
        if port + 10000 < 65536:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port + 10000))
                    return port
                except OSError:
                    pass


def start_redis(folder: Path, port: int, *extra: str) -> subprocess.Popen[bytes]:
    """A redis-server of the benchmark's own on ``port`` (nothing on disk), once it answers PING."""
    exe = shutil.which("redis-server") or sys.exit("this benchmark needs redis-server on PATH")
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder), "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen([*cmd, *extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return proc
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"redis-server did not start on port {port}")
        time.sleep(0.02)
