"""Opening an SQLite file: processes that start together on a new file, folder and file modes."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from achihuo_mini.backend import NewTask
from achihuo_mini_backends.sqlite import SqliteQueue, connection

OPENER = Path(__file__).parent / "procs" / "sqlite_opener.py"


# -- start-up races --------------------------------------------------------------------


async def test_open_waits_for_a_writer_of_a_new_file(tmp_path: Path) -> None:
    """Switching a new file to WAL needs a write lock that SQLite does not wait for (it fails at once).

    Another connection holds the write lock of the new file (still in rollback-journal
    mode) for 0.5 s: open() must wait for it, as it waits for any lock, not fail.
    """
    path = tmp_path / "new.sqlite3"
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    release = threading.Timer(0.5, holder.execute, ("ROLLBACK",))
    release.start()
    q = SqliteQueue("x", path=path, busy_timeout=10.0)
    started = time.monotonic()
    try:
        await q.open()
        assert time.monotonic() - started >= 0.4, "it did not wait for the lock"
        assert await q.push([NewTask(b"x")]) == 1
    finally:
        release.join()
        holder.close()
        await q.close()
    with closing(sqlite3.connect(path)) as c, c:
        assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest.fixture
def schema_created_between_reads(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """A new file whose schema another opener commits while our open() is reading it.

    Every connection the backend makes gets a trace callback: the first time it starts
    a statement that reads ``sqlite_master``, another connection tries to create the
    whole schema (and gives up at once if the file is locked).
    """
    path = tmp_path / "new.sqlite3"
    real_connect = sqlite3.connect
    fired: list[bool] = []

    def create_schema_elsewhere(sql: str) -> None:
        if "sqlite_master" not in sql or fired:
            return
        fired.append(True)
        other = real_connect(path, timeout=0, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            for statement in connection.SCHEMA:
                other.execute(statement)
            other.execute(f"PRAGMA application_id = {connection.APPLICATION_ID}")
            other.execute(f"PRAGMA user_version = {connection.SCHEMA_VERSION}")
            other.execute("COMMIT")
        except sqlite3.OperationalError:
            pass  # locked by the open() under test: it will create the schema itself
        finally:
            other.close()

    def traced_connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        conn = real_connect(*args, **kwargs)
        conn.set_trace_callback(create_schema_elsewhere)
        return conn

    monkeypatch.setattr(sqlite3, "connect", traced_connect)
    yield path
    assert fired, "the race was not staged: open() never read sqlite_master"


async def test_schema_committed_by_another_opener_is_not_a_foreign_database(schema_created_between_reads: Path) -> None:
    """open() checks the schema in one snapshot: never "application id 0" from before and tables from after."""
    q = SqliteQueue("x", path=schema_created_between_reads)
    try:
        await q.open()
        assert await q.push([NewTask(b"x")]) == 1
    finally:
        await q.close()


async def _open_together(path: Path, processes: int) -> list[str]:
    """Start ``processes`` openers of ``path``; once all are ready, let them open it at one moment."""
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            str(OPENER),
            str(path),
            "race",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        for _ in range(processes)
    ]
    for p in procs:
        assert p.stdout is not None
        line = await asyncio.wait_for(p.stdout.readline(), 60)
        assert line.strip() == b"ready", line + await p.stdout.read()
    start_at = time.time() + 0.3
    for p in procs:
        assert p.stdin is not None
        p.stdin.write(f"go {start_at}\n".encode())
        await p.stdin.drain()
    outcomes = []
    for p in procs:
        out, _ = await asyncio.wait_for(p.communicate(), 60)
        outcomes.append(out.decode(errors="replace").strip())
    return outcomes


@pytest.mark.processes
async def test_processes_opening_one_new_file_together_all_come_up(tmp_path: Path) -> None:
    """8 processes open one new file at the same moment, 5 rounds: every one of them comes up."""
    for round_ in range(5):
        path = tmp_path / f"round-{round_}" / "loops.sqlite3"
        outcomes = await _open_together(path, 8)
        failed = [o for o in outcomes if o != "ok"]
        assert not failed, f"round {round_}: {len(failed)} of 8 processes failed: {failed}"


# -- folder and file modes ---------------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o277], ids=["umask-000", "umask-022", "umask-277"])
async def test_every_created_folder_is_0700_and_the_file_0600_whatever_the_umask(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, umask: int
) -> None:
    """The default path under a missing $XDG_DATA_HOME, and an explicit path two missing folders deep."""
    data_home = tmp_path / "xdg" / "share"
    monkeypatch.setenv("XDG_DATA_HOME", str(data_home))
    explicit = tmp_path / "a" / "b" / "loops.sqlite3"
    tmp_path.chmod(0o755)  # a folder that exists already keeps its mode
    queues = [SqliteQueue("moded"), SqliteQueue("moded", path=explicit)]
    old = os.umask(umask)  # process-wide: restored before anything else runs
    try:
        for q in queues:
            await q.open()
            assert await q.push([NewTask(b"x")]) == 1  # creates the -wal and -shm files
    finally:
        os.umask(old)
    try:
        files = [Path(q.location) for q in queues]
        assert files[0] == data_home / "achihuo_mini" / "moded.sqlite3"
        for folder in (tmp_path / "xdg", data_home, data_home / "achihuo_mini", tmp_path / "a", tmp_path / "a" / "b"):
            assert _mode(folder) == 0o700, f"{folder}: {oct(_mode(folder))}"
        for file in files:
            for suffix in ("", "-wal", "-shm"):
                path = file.with_name(file.name + suffix)
                assert _mode(path) == 0o600, f"{path}: {oct(_mode(path))}"
    finally:
        for q in queues:
            await q.close()
    assert _mode(tmp_path) == 0o755, "a folder that existed keeps its mode"
