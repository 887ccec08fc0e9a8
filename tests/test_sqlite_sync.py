"""Which SQLite commits are synced at once (``synchronous``): the ones a power loss could not redo.

A commit written with ``PRAGMA synchronous = NORMAL`` survives a process crash but may be
rolled back by a power loss; that is allowed only for writes whose loss makes a worker
redo work (a handler's ack with its children and done names, a reserve, a release, a
heartbeat). Everything that adds tasks or marks names outside a handler -- a feeder
script's ``add_task``, ``run()``'s seeds, a re-queue of dead letters, a command -- must
be synced before it returns. These tests watch every write transaction the backend's
connection commits (SQLite's own statement trace) and the level it committed at.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from achihuo_mini import AsyncLoop
from achihuo_mini.backend import Commit, NewTask
from achihuo_mini.codec import name_key
from achihuo_mini.errors import ConfigError
from achihuo_mini_backends.sqlite import SqliteDoneSet, SqliteQueue

K = name_key


class Commits:
    """The synchronous level (``"FULL"`` / ``"NORMAL"``) of each write transaction a connection commits."""

    def __init__(self) -> None:
        self.level = "FULL"
        self.writing = False
        self.levels: list[str] = []

    def trace(self, statement: str) -> None:
        text = " ".join(statement.split()).upper()
        if text.startswith("PRAGMA SYNCHRONOUS ="):
            self.level = text.rsplit("=", 1)[1].strip()
        elif text == "BEGIN IMMEDIATE":
            self.writing = True
        elif text == "COMMIT" and self.writing:
            self.levels.append(self.level)
            self.writing = False

    def take(self) -> list[str]:
        levels, self.levels = self.levels, []
        return levels


async def _watch(backend: SqliteQueue | SqliteDoneSet) -> Commits:
    commits = Commits()

    def install(conn: sqlite3.Connection) -> None:
        commits.level = {2: "FULL", 1: "NORMAL"}[conn.execute("PRAGMA synchronous").fetchone()[0]]
        conn.set_trace_callback(commits.trace)

    await backend._call(install, mode="none")
    return commits


@pytest.fixture
async def pair(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[tuple[SqliteQueue, SqliteDoneSet]]:
    synchronous = getattr(request, "param", "auto")
    q = SqliteQueue("sync", path=tmp_path / "q.sqlite3", synchronous=synchronous)
    d = SqliteDoneSet("sync", path=tmp_path / "q.sqlite3", synchronous=synchronous)
    await q.open()
    await d.open()
    yield q, d
    await q.close()
    await d.close()


async def _level(commits: Commits, step: Awaitable[Any]) -> str:
    commits.take()
    await step
    levels = commits.take()
    assert len(levels) == 1, f"one write transaction expected, got {levels}"
    return levels[0]


async def test_writes_only_redone_work_may_wait_for_the_disk(pair: tuple[SqliteQueue, SqliteDoneSet]) -> None:
    q, d = pair
    qc, dc = await _watch(q), await _watch(d)
    synced: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
        ("push", lambda: q.push([NewTask(f"t{i}".encode(), K(f"t{i}"), unique=True) for i in range(6)])),
        ("done add", lambda: d.add([K("a")])),
        ("done add_expiring", lambda: d.add_expiring([(K("b"), 60.0)])),
        ("done remove", lambda: d.remove([K("a")])),
        ("send", lambda: q.send(["m1"], "stop")),
    ]
    for what, step in synced:
        assert await _level(dc if what.startswith("done") else qc, step()) == "FULL", what
    assert await _level(qc, q.register("w1", "master", {}, 30.0)) == "NORMAL"
    leases = await q.reserve("w1", 6)
    assert qc.take() == ["NORMAL"], "reserve"
    redone: list[tuple[str, Awaitable[Any]]] = [
        ("commit", q.commit([Commit(leases[0], done=[K("c")], children=[NewTask(b"child", K("child"), unique=True)])])),
        ("release", q.release([leases[1]])),
        ("retry", q.retry([(leases[2], 5.0)])),
        ("bury", q.bury([(leases[3], "boom")])),
        ("heartbeat", q.heartbeat("w1", {}, 30.0)),
    ]
    for what, lazy in redone:
        assert await _level(qc, lazy) == "NORMAL", what
    assert await _level(qc, q.requeue_dead()) == "FULL", "requeue_dead adds tasks back"
    assert await _level(qc, q.push([NewTask(b"late")])) == "FULL", "a push after lazy commits is synced again"


@pytest.mark.parametrize("pair", ["full"], indirect=True)
async def test_synchronous_full_syncs_every_commit(pair: tuple[SqliteQueue, SqliteDoneSet]) -> None:
    q, d = pair
    qc, dc = await _watch(q), await _watch(d)
    await d.add([K("x")])
    assert dc.take() == ["FULL"]
    await q.push([NewTask(b"t", K("t"))])
    await q.register("w1", "master", {}, 30.0)
    (lease,) = await q.reserve("w1", 1)
    await q.commit([Commit(lease, done=[K("t")])])
    await q.heartbeat("w1", {}, 30.0)
    levels = qc.take()
    assert len(levels) == 5 and set(levels) == {"FULL"}, levels


def test_synchronous_must_be_auto_or_full(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="synchronous must be 'auto' or 'full', got 'normal'"):
        SqliteQueue("x", path=tmp_path / "x.sqlite3", synchronous="normal")
    with pytest.raises(ConfigError, match="got 1"):
        SqliteQueue("x", path=tmp_path / "x.sqlite3", synchronous=1)  # type: ignore[arg-type]
    assert SqliteQueue("x", path=tmp_path / "x.sqlite3", synchronous="FULL").synchronous == "full"


def test_synchronous_from_the_config_file(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text(f'[queue]\nbackend = "sqlite"\npath = "{tmp_path / "a.sqlite3"}"\nsynchronous = "full"\n')

    class Spider(AsyncLoop):
        NAME = "sync_config"

        async def page(self) -> None: ...

    assert Spider(config_file=good, debug=False).settings.queue.options["synchronous"] == "full"
    bad = tmp_path / "bad.toml"
    bad.write_text(f'[queue]\nbackend = "sqlite"\npath = "{tmp_path / "a.sqlite3"}"\nsynchronous = "off"\n')
    with pytest.raises(ConfigError, match="synchronous"):
        Spider(config_file=bad, debug=False)
