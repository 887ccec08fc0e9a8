"""``achihuo loops``: the loops that have data in a backend, found without their source."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from achihuo_mini import AsyncLoop
from achihuo_mini.__main__ import main
from achihuo_mini.config import build_backend_options
from achihuo_mini.plugins import BackendSpec, hookimpl, registry


class _Loop(AsyncLoop):
    async def h(self, i: int) -> None:
        pass


def _seed(name: str, **kwargs: Any) -> None:
    """Give loop ``name`` one queued task, from a plain script (written before add_task returns)."""
    loop = type("Seeded", (_Loop,), {"NAME": name})(debug=False, **kwargs)
    try:
        loop.add_task("h", 1)
    finally:
        loop.close()


def _listed(backend: str, **options: Any) -> list[str]:
    spec = registry.get(backend)
    assert spec.list_loops is not None
    return asyncio.run(spec.list_loops(build_backend_options(spec, options, source="test")))


ODD = ["plain", "with space", "b{r}aces%25", "%", "名字"]


def test_sqlite_lists_the_loops_in_the_data_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    for name in ODD:
        _seed(name, cache_backend="sqlite")
    (tmp_path / "achihuo_mini" / "not-ours.sqlite3").write_bytes(b"not a database at all" * 100)
    assert _listed("sqlite") == sorted(ODD)


def test_sqlite_lists_the_loops_sharing_one_file(tmp_path: Path) -> None:
    db = tmp_path / "shared.sqlite3"
    config = tmp_path / "c.toml"
    config.write_text(f'[queue]\nbackend = "sqlite"\npath = "{db}"\n[done]\nbackend = "sqlite"\npath = "{db}"\n')
    for name in ("one", "two"):
        _seed(name, config_file=config)
    before = db.stat().st_mtime_ns
    assert _listed("sqlite", path=db) == ["one", "two"]
    assert db.stat().st_mtime_ns == before, "listing opens the file read-only"
    asyncio.run(type("Clear", (_Loop,), {"NAME": "one"})(config_file=config, debug=False).clear_data())
    assert _listed("sqlite", path=db) == ["two"], "a cleared loop has no data left"
    assert _listed("sqlite", path=tmp_path / "missing.sqlite3") == []
    assert not (tmp_path / "missing.sqlite3").exists()


def test_redis_lists_its_loops_by_their_exact_names(redis_url: str, tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:8]
    names = [f"{n}-{tag}" for n in ODD]
    config = tmp_path / "r.toml"
    side = f'backend = "redis"\nurl = "{redis_url}"\n'
    config.write_text(f"[queue]\n{side}[done]\n{side}")
    try:
        for name in names:
            _seed(name, config_file=config)
        listed = _listed("redis", url=redis_url)
        assert sorted(n for n in listed if n.endswith(tag)) == sorted(names)
    finally:
        for name in names:
            asyncio.run(type("Clear", (_Loop,), {"NAME": name})(config_file=config, debug=False).clear_data())
    assert not [n for n in _listed("redis", url=redis_url) if n.endswith(tag)], "cleared loops are gone"


def test_memory_lists_this_process_s_loops() -> None:
    name = f"mem-{uuid.uuid4().hex[:8]}"
    _seed(name, cache_backend="memory")
    try:
        assert name in _listed("memory")
    finally:
        from achihuo_mini_backends.memory import drop_namespace

        drop_namespace(name)


class _NoListing:
    @hookimpl
    def achihuo_register_backends(self, register: Any) -> None:
        from achihuo_mini_backends.memory import MemoryDoneSet, MemoryQueue

        register(
            BackendSpec(
                name="nolisting",
                scope="process",
                description="a backend without list_loops",
                create_queue=lambda namespace, options: MemoryQueue(namespace),
                create_done_set=lambda namespace, options: MemoryDoneSet(namespace),
            )
        )


def test_a_backend_without_a_listing_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    registry.register_plugin(_NoListing(), "nolisting-plugin")
    try:
        assert main(["loops", "--backend", "nolisting"]) == 1
        assert "the nolisting backend cannot list its loops" in capsys.readouterr().err
        assert main(["loops", "--backend", "no-such-backend"]) == 1
        assert "no-such-backend" in capsys.readouterr().err
    finally:
        registry.unregister_plugin("nolisting-plugin")


def test_the_console_script_lists_loops(tmp_path: Path) -> None:
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path)}
    subprocess.run(
        [
            sys.executable,
            "-c",
            f"import sys; sys.path.insert(0, {str(Path(__file__).parent.parent)!r}); "
            "from tests.test_loops_listing import _seed; _seed('crawler-a', cache_backend='sqlite'); "
            "_seed('crawler-b', cache_backend='sqlite')",
        ],
        env=env,
        check=True,
        timeout=60,
    )
    exe = shutil.which("achihuo", path=os.path.dirname(sys.executable))
    assert exe
    listing = subprocess.run([exe, "loops", "--backend", "sqlite"], env=env, capture_output=True, text=True, timeout=60)
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.split() == ["crawler-a", "crawler-b"]
