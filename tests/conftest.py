"""Shared fixtures: backend parametrisation from the plugin registry, a real Redis."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from achihuo_mini.plugins import registry

BACKENDS = registry.names()


def pytest_configure(config: pytest.Config) -> None:
    for name in BACKENDS:
        config.addinivalue_line("markers", f"backend_{name}: runs against the {name!r} backend")


def backend_params() -> list[Any]:
    return [pytest.param(name, marks=getattr(pytest.mark, f"backend_{name}"), id=name) for name in BACKENDS]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A redis-server this test session started (or the one REDIS_URL names)."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.dir: str | None = None
        env_url = os.environ.get("REDIS_URL")
        if env_url:
            self.url = env_url
            return
        exe = os.environ.get("REDIS_SERVER") or shutil.which("redis-server")
        if not exe:
            pytest.fail(
                "no Redis for the tests: set REDIS_URL, or install redis-server "
                "(apt-get install redis-server) so the fixture can start one",
                pytrace=False,
            )
        self.port = _free_port()
        self.dir = tempfile.mkdtemp(prefix="achihuo-redis-")
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.dir, "--daemonize", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        self.url = f"redis://127.0.0.1:{self.port}/0"
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"redis-server {exe} did not start on port {self.port}", pytrace=False)
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture
def backend_options_for(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """``options(name)``: options that point a builtin backend at this test's own storage."""

    def options(name: str) -> dict[str, Any]:
        if name == "sqlite":
            return {"path": tmp_path / f"{uuid.uuid4().hex[:8]}.sqlite3"}
        if name == "redis":
            return {"url": request.getfixturevalue("redis_url")}
        return {}

    return options


@pytest.fixture(autouse=True)
def _isolated_data_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Default SQLite files go to a temporary XDG_DATA_HOME, never the user's."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path_factory.mktemp("xdg-data")))
    monkeypatch.delenv("ACHIHUO_CONFIG", raising=False)
