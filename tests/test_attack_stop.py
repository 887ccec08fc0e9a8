"""Attacks on stopping and starting: what happens to buffered writes when serve() cannot even open."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from achihuo_mini import AsyncLoop
from achihuo_mini._spill import spill_path

from .conftest import RedisServer, write_backend_config


class Feed(AsyncLoop):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(concurrency=2, progress_interval=0, **kwargs)
        self.ran: list[int] = []

    async def work(self, i: int) -> None:
        self.ran.append(i)


async def test_tasks_added_before_a_serve_that_cannot_open_are_spilled(tmp_path: Path) -> None:
    """An embedding program adds tasks in its event loop, then ``await serve()``; the backend is
    unreachable, so serve() fails at ``store.open()`` and returns exit code 1. ``_shutdown`` writes
    and spills only ``if self.store.opened`` (_worker.py ``_shutdown``): the buffered tasks are
    neither written nor spilled, and the log does not mention them. When the program then exits,
    they are gone -- the next start of the loop (here: a fresh instance, as a new process would
    be) never sees them. The contract: writes that could not be flushed are never dropped
    silently, they are kept locally and replayed by the next start."""
    server = RedisServer()  # a free port with nothing listening yet
    config = write_backend_config(tmp_path / "redis.toml", "redis", {"url": server.url, "connect_timeout": 1.0})
    cls = type("Feed", (Feed,), {"NAME": f"attack-open-{uuid.uuid4().hex[:8]}"})
    first = cls(config_file=config)
    for i in range(5):
        first.add_task("work", i, task_name=f"w{i}")
    summary = await first.serve(idle_exit=0)
    assert summary.exit_code == 1, "the backend is unreachable"
    del first  # the embedding program gives up and exits
    server.start()
    try:
        second = cls(config_file=config)
        await second.serve(idle_exit=0)
        assert sorted(second.ran) == list(range(5)), (
            f"the 5 tasks added before the failed serve() never ran (spill file exists: "
            f"{spill_path(cls.NAME).exists()})"
        )
    finally:
        server.remove()
