"""Attacks with hostile data in the backend: one bad registry record must cost that record only."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from achihuo_mini import AsyncLoop

from .conftest import store_of


class Spider(AsyncLoop):
    async def work(self, i: int) -> None:
        pass


@pytest.mark.processes
def test_status_prints_a_lone_surrogate_from_the_registry_escaped(tmp_path: Path) -> None:
    """Worker info is JSON; ``"\\ud800"`` is valid JSON and decodes to a lone surrogate.
    ``printable`` (_report.py) escapes control characters but not surrogates, so ``status``
    prints a string that stdout cannot encode: ``UnicodeEncodeError``, a traceback, exit 1 --
    the whole command fails for one bad registry entry (``status --json`` is fine: json.dumps
    escapes it)."""
    db = tmp_path / "s.sqlite3"
    config = tmp_path / "c.toml"
    config.write_text(f'[queue]\nbackend = "sqlite"\npath = "{db}"\n[done]\nbackend = "sqlite"\npath = "{db}"\n')
    name = f"surrogate-{uuid.uuid4().hex[:8]}"
    cls = type("Spider", (Spider,), {"NAME": name})

    async def register() -> None:
        async with store_of(cls(config_file=config)) as store:
            assert store.registry is not None
            await store.registry.register("w-good", "master", {"host": "good-host", "pid": 1}, 3600)
            await store.registry.register("w-odd", "slave", {"host": "odd\ud800host", "pid": 2}, 3600)

    asyncio.run(register())
    command = [sys.executable, "-m", "achihuo_mini", "status", name, "--config", str(config)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "good-host" in done.stdout
