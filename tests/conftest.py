"""Shared fixtures: backend parametrisation from the plugin registry, a real Redis."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from achihuo_mini._store import Store
from achihuo_mini.plugins import registry

from .http_site import Site

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
    """A redis-server started by the tests on a free port; ``start()`` again restarts it on the same port.

    ``args`` are extra server options (e.g. persistence for the restart test).
    """

    def __init__(self, data_dir: str | os.PathLike[str] | None = None, args: tuple[str, ...] = ()) -> None:
        exe = os.environ.get("REDIS_SERVER") or shutil.which("redis-server")
        if not exe:
            pytest.fail(
                "no Redis for the tests: set REDIS_URL, or install redis-server "
                "(apt-get install redis-server) so the tests can start their own",
                pytrace=False,
            )
        self.exe = exe
        self.args = args
        self.port = _free_port()
        self.own_dir = data_dir is None
        self.dir = str(data_dir) if data_dir is not None else tempfile.mkdtemp(prefix="achihuo-redis-")
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisServer:
        cmd = [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir, "--daemonize", "no",
               "--loglevel", "warning", "--save", "", "--appendonly", "no", *self.args]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"redis-server {self.exe} did not start on port {self.port}", pytrace=False)
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)

    def remove(self) -> None:
        self.stop()
        if self.own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """``REDIS_URL`` when set (tests use unique names there and clean up), else a server of our own."""
    env_url = os.environ.get("REDIS_URL")
    if env_url:
        yield env_url
        return
    server = RedisServer().start()
    yield server.url
    server.remove()


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


def store_of(loop: Any) -> Store:
    """The backends of ``loop`` (its queue and done set, as its settings say), opened for a test to look at."""
    return Store(loop.name, loop.settings)  # an async context manager: opened on entry, closed on exit


def write_backend_config(path: Path, backend: str, options: dict[str, Any], loop: dict[str, Any] | None = None) -> Path:
    """A TOML config file putting both sides on ``backend`` with ``options``."""
    lines = []
    if loop:
        lines.append("[loop]")
        lines += [f"{k} = {_toml(v)}" for k, v in loop.items()]
    for side in ("queue", "done"):
        lines.append(f"[{side}]")
        lines.append(f'backend = "{backend}"')
        lines += [f"{k} = {_toml(v)}" for k, v in options.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


class SpiderFactory:
    """Makes spider instances with a unique NAME on one backend, and clears their data afterwards."""

    def __init__(self, backend: str, options: dict[str, Any], tmp_path: Path) -> None:
        self.backend = backend
        self.options = options
        self.tmp_path = tmp_path
        self.names: list[str] = []
        self.config = write_backend_config(tmp_path / f"{backend}.toml", backend, options)

    def subclass(self, cls: type, name: str | None = None) -> type:
        name = name or f"t-{cls.__name__}-{uuid.uuid4().hex[:8]}"
        self.names.append(name)
        return type(cls.__name__, (cls,), {"NAME": name})

    def __call__(self, cls: type, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("config_file", self.config)
        return self.subclass(cls)(*args, **kwargs)

    def cleanup(self) -> None:
        import asyncio

        from achihuo_mini.backend import WorkerRegistry
        from achihuo_mini.config import build_backend_options

        spec = registry.get(self.backend)

        async def clear(name: str) -> None:
            opts = build_backend_options(spec, self.options, source="test")
            assert spec.create_queue is not None and spec.create_done_set is not None
            q = spec.create_queue(name, dict(opts))
            d = spec.create_done_set(name, dict(opts))
            await q.open()
            await d.open()
            try:
                if isinstance(q, WorkerRegistry):
                    for w in await q.workers():
                        await q.unregister(w.worker)
                await q.clear("queue")
                await q.clear("dead")
                await d.clear()
            finally:
                await q.close()
                await d.close()

        for name in self.names:
            asyncio.run(clear(name))
            if self.backend == "memory":
                from achihuo_mini_backends.memory import drop_namespace

                drop_namespace(name)


BUILTIN = ("memory", "sqlite", "redis")


@pytest.fixture(params=[p for p in backend_params() if p.values[0] in BUILTIN])
def spiders(request: pytest.FixtureRequest, backend_options_for: Any, tmp_path: Path) -> Iterator[SpiderFactory]:
    """``spiders(SpiderClass, **kwargs)`` builds a uniquely named instance on each builtin backend in turn.

    (Installed third-party backends run the contract suite; the loop tests stay on the builtins.)"""
    factory = SpiderFactory(request.param, backend_options_for(request.param), tmp_path)
    yield factory
    factory.cleanup()


@pytest.fixture
def memory_spiders(tmp_path: Path) -> Iterator[SpiderFactory]:
    """Like ``spiders``, on the memory backend only (for loop logic that no backend changes)."""
    factory = SpiderFactory("memory", {}, tmp_path)
    yield factory
    factory.cleanup()


@pytest.fixture
async def site() -> AsyncIterator[Site]:
    """The local test site (tests/http_site), started for one test."""
    s = Site()
    await s.start()
    yield s
    await s.stop()
