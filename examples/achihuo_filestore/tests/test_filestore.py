"""filestore behaviour beyond the contract suite: the journal, its files, locking, the plugin."""

from __future__ import annotations

import asyncio
import fcntl
import importlib.metadata
import logging
import os
import shutil
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from achihuo_mini import AsyncLoop
from achihuo_mini.backend import Commit, NewTask, Notifier, QueueStats, WorkerRegistry
from achihuo_mini.codec import name_key
from achihuo_mini.config import build_backend_options
from achihuo_mini.errors import BackendError, BackendUnavailable, ConfigError
from achihuo_mini.plugins import registry, safe_filename

from achihuo_filestore import FileDoneSet, FileQueue
from achihuo_filestore.journal import Journal

K = name_key


@pytest.fixture
async def opened() -> AsyncIterator[list[FileQueue | FileDoneSet]]:
    backends: list[FileQueue | FileDoneSet] = []
    yield backends
    for b in backends:
        await b.close()


async def _open(opened: list[Any], cls: type[Any], root: Path, namespace: str = "ns", **kw: Any) -> Any:
    b = cls(namespace, root=root, **kw)
    await b.open()
    opened.append(b)
    return b


def _normal(dump: list[Any]) -> list[Any]:
    """A state dump with the done set in a fixed order (set order is not part of the state)."""
    return [*dump[:5], sorted(dump[5]), dump[6]]


def _replayed(directory: Path, namespace: str) -> list[Any]:
    """The state a fresh reader gets from the files alone."""
    journal = Journal(directory, namespace, lock_timeout=5, compact_bytes=1 << 30)
    journal.open()
    try:
        return _normal(journal.read(lambda s: s.dump()))
    finally:
        journal.close()
        journal.executor.shutdown()


async def _busy_namespace(q: FileQueue, d: FileDoneSet) -> list[Any]:
    """Drive every kind of record into the journal; return leases still held."""
    await q.push([NewTask(f"t{i}".encode(), key=K(f"t{i}"), unique=True) for i in range(10)])
    await q.push([NewTask(b"head", head=True), NewTask(b"later", delay=3600)])
    await q.register("w1", "master", {"host": "h", "n": [1, 2]}, 30)
    await q.register("w2", "slave", {}, 30)
    leases = await q.reserve("w1", 6)
    await q.commit([Commit(leases[0], done=[K("x")], children=[NewTask(b"child", key=K("c"), unique=True)])])
    await q.retry([(leases[1], 3600)])
    await q.bury([(leases[2], "boom 🕷")])
    await q.release([leases[3]])
    await d.add([K("a"), K("b")])
    await d.remove([K("b")])
    await q.send(["s1"], "stop")
    await q.heartbeat("w1", {"n": 3}, 30)
    await q.reserve("w2", 2)
    await q.unregister("w2")
    return leases[4:6]


async def test_reopen_replays_everything(tmp_path: Path, opened: list[Any]) -> None:
    q, d = await _open(opened, FileQueue, tmp_path), await _open(opened, FileDoneSet, tmp_path)
    held = await _busy_namespace(q, d)
    stats, letters, workers = await q.stats(), await q.dead_letters(), await q.workers()
    live = _normal(await q._read(lambda s: s.dump()))
    for b in opened:
        await b.close()
    opened.clear()
    assert _replayed(q.directory, "ns") == live, "replaying the journal gives the state the writer had"
    q2, d2 = await _open(opened, FileQueue, tmp_path), await _open(opened, FileDoneSet, tmp_path)
    assert await q2.stats() == stats
    assert await q2.dead_letters() == letters
    assert [(w.worker, w.alias, w.info) for w in await q2.workers()] == [(w.worker, w.alias, w.info) for w in workers]
    assert await d2.contains([K("a"), K("b"), K("x")]) == [True, False, True]
    assert await q2.commit([Commit(lease) for lease in held]) == 2, "leases survive a restart"
    assert await q2.heartbeat("w2", {}, 30) is None


async def test_two_readers_in_one_process_catch_up(tmp_path: Path) -> None:
    """Two Journal objects on one directory behave like two processes (separate flocks, separate state)."""
    directory = tmp_path / "ns"
    j1 = Journal(directory, "ns", lock_timeout=5, compact_bytes=2048)
    j2 = Journal(directory, "ns", lock_timeout=5, compact_bytes=2048)
    j1.open()
    j2.open()
    try:
        for i in range(60):  # many compactions by both sides
            j1.write(lambda s, now, i=i: s.push([NewTask(b"p" * 50, key=K(str(i)), unique=True)], now))
            (lease,) = j2.write(lambda s, now: s.reserve("w2", 1, now))
            assert lease.payload == b"p" * 50
            j1.write(lambda s, now, lease=lease: s.commit([Commit(lease, done=[lease.key or b""])], now))
            assert j2.read(lambda s: s.stats()) == QueueStats(0, 0, 0, 0)
        assert j1.read(lambda s: len(s.done)) == j2.read(lambda s: len(s.done)) == 60
        assert _normal(j1.read(lambda s: s.dump())) == _normal(j2.read(lambda s: s.dump()))
        assert (directory / "journal").stat().st_size < 3 * 2048, "the journal is compacted"
    finally:
        for j in (j1, j2):
            j.close()
            j.executor.shutdown()


async def test_torn_tail_is_cut_off(tmp_path: Path, opened: list[Any], caplog: pytest.LogCaptureFixture) -> None:
    q = await _open(opened, FileQueue, tmp_path)
    await q.push([NewTask(b"a"), NewTask(b"b")])
    await q.close()
    journal = q.directory / "journal"
    good = journal.stat().st_size
    with open(journal, "ab") as f:
        f.write(b"\x00\x00\x10\x00\x12\x34")  # a frame header promising 4 KiB that never came
    q2 = await _open(opened, FileQueue, tmp_path)
    with caplog.at_level(logging.WARNING, logger="achihuo_filestore"):
        assert await q2.stats() == QueueStats(2, 0, 0, 0)
    assert "unfinished write" in caplog.text
    assert journal.stat().st_size == good
    await q2.push([NewTask(b"c")])
    assert _replayed(q2.directory, "ns")[2] != [], "the journal stays readable after the cut"
    assert [lease.payload for lease in await q2.reserve("w", 5)] == [b"a", b"b", b"c"]


async def test_files_are_private(tmp_path: Path, opened: list[Any]) -> None:
    q = await _open(opened, FileQueue, tmp_path / "deep" / "root", "名字/..")
    assert q.directory.parent == tmp_path / "deep" / "root"
    assert q.directory.name == safe_filename("名字/..")
    assert stat.S_IMODE(q.directory.stat().st_mode) & 0o077 == 0
    for name in ("journal", "lock"):
        assert stat.S_IMODE((q.directory / name).stat().st_mode) & 0o077 == 0


async def test_foreign_files_are_refused(tmp_path: Path, opened: list[Any]) -> None:
    q = await _open(opened, FileQueue, tmp_path, "loop-a")
    await q.close()
    shutil.copytree(q.directory, tmp_path / safe_filename("loop-b"))
    with pytest.raises(BackendError, match="holds the data of loop 'loop-a'"):
        await FileQueue("loop-b", root=tmp_path).open()
    (tmp_path / "loop-c").mkdir()
    (tmp_path / "loop-c" / "journal").write_bytes(b"SQLite format 3\x00")
    with pytest.raises(BackendError, match="not a filestore journal"):
        await FileQueue("loop-c", root=tmp_path).open()


async def test_lock_wait_does_not_block_the_event_loop(tmp_path: Path, opened: list[Any]) -> None:
    q = await _open(opened, FileQueue, tmp_path, lock_timeout=0.3)
    fd = os.open(q.directory / "lock", os.O_RDWR)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    task = asyncio.ensure_future(ticker())
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # "another process" holds the lock
        with pytest.raises(BackendUnavailable, match="still locked"):
            await q.push([NewTask(b"x")])
        assert ticks >= 10, "the event loop ran while the operation waited for the lock"
        fcntl.flock(fd, fcntl.LOCK_UN)
        assert await q.push([NewTask(b"x")]) == 1
    finally:
        task.cancel()
        os.close(fd)


async def test_bad_worker_info_changes_nothing(tmp_path: Path, opened: list[Any]) -> None:
    q = await _open(opened, FileQueue, tmp_path)
    with pytest.raises(TypeError, match="JSON-compatible"):
        await q.register("w", "master", {"x": object()}, 30)
    assert await q.workers() == []
    assert await q.register("w", "master", {"x": 1}, 30) == "m1"


def test_declares_every_ability() -> None:
    """The contract suite SKIPS registry tests for a queue that is not a WorkerRegistry, and the
    loop then silently runs without recovery or ``stop``: fail loudly here if the protocol grew."""
    q = FileQueue("x")
    assert isinstance(q, WorkerRegistry)
    assert isinstance(q, Notifier)


def test_registered_through_the_entry_point_only() -> None:
    (ep,) = [ep for ep in importlib.metadata.entry_points(group="achihuo_mini") if ep.name == "filestore"]
    assert ep.value == "achihuo_filestore.plugin"
    spec = registry.get("filestore")
    assert spec.plugin == "filestore" and spec.scope == "host"


def test_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = registry.get("filestore")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert spec.create_queue is not None
    q = spec.create_queue("loop", build_backend_options(spec, {}, source="test"))
    assert q.location == str(tmp_path / "achihuo_mini" / "filestore" / "loop")
    assert not (tmp_path / "achihuo_mini").exists(), "the factory does no I/O"
    with pytest.raises(ConfigError, match="poll_interval"):
        spec.create_queue("loop", build_backend_options(spec, {"poll_interval": 0}, source="test"))
    with pytest.raises(ConfigError, match="unknown option 'path'"):
        build_backend_options(spec, {"path": "x"}, source="test")


class Spider(AsyncLoop):
    NAME = "filestore-spider"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(concurrency=4, **kwargs)
        self.ran: list[int] = []

    async def page(self, i: int) -> None:
        self.ran.append(i)
        if i < 20:
            self.add_task("page", i + 20, task_name=f"page-{i + 20}", repeat=False)
        self.task_done(f"page-{i}")


async def test_a_loop_runs_on_filestore(tmp_path: Path) -> None:
    config = tmp_path / "spider.toml"
    config.write_text('[queue]\nbackend = "filestore"\nroot = "data"\n[done]\nbackend = "filestore"\nroot = "data"\n')
    loop = Spider(config_file=config)
    for i in range(20):
        loop.add_task("page", i, task_name=f"page-{i}", repeat=False)
    summary = await loop.serve(idle_exit=0)
    assert sorted(loop.ran) == list(range(40)) and summary.exit_code == 0
    assert (tmp_path / "data" / "filestore-spider" / "journal").exists(), "root is relative to the config file"
    d = FileDoneSet("filestore-spider", root=tmp_path / "data")
    await d.open()
    try:
        assert await d.count() == 40
    finally:
        await d.close()
