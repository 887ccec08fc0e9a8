"""Writes that could not reach the backend at exit, kept in a local file until the next start.

A graceful stop flushes what was added outside handlers (tasks added in ``run()``,
``task_done``/``uncache_task`` made outside handlers). When the backend stays
unreachable, those writes are appended to ``<data dir>/spill/<NAME>.spill`` (the data
dir is ``$XDG_DATA_HOME/achihuo_mini``; folders 0700, file 0600) and the log says so.
The next start of a loop with the same ``NAME`` — on any backend — replays the file
before it does anything else, then deletes it.

The file is a sequence of msgpack records ``[1, tasks, marks]``: ``tasks`` as
``[payload, key or b"", unique, head, delay]``, ``marks`` as ``[key, name, done]``, or
``[key, name, True, ttl]`` for a name done for ``ttl`` seconds (from when it is written).
Nothing in it is trusted at replay: a record that does not have that shape is skipped
with a warning, and the file is kept beside as ``….bad`` for a person to look at.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any

import msgpack

from ._outbox import Outbox
from ._store import Store
from .backend import NewTask
from .backend_kit import default_data_dir, private_dir, safe_filename

__all__ = ["keep", "replay", "spill", "spill_path"]

log = logging.getLogger("achihuo_mini")

_VERSION = 1


def spill_path(name: str) -> Path:
    """Where the writes of loop ``name`` that could not be written wait for its next start."""
    return default_data_dir() / "spill" / f"{safe_filename(name)}.spill"


def spill(name: str, outbox: Outbox) -> Path:
    """Append ``outbox`` to the loop's spill file (fsynced); returns the file."""
    path = spill_path(name)
    private_dir(path.parent)
    record = msgpack.packb(
        [
            _VERSION,
            [[t.payload, t.key or b"", t.unique, t.head, t.delay] for t in outbox.tasks],
            [
                [key, name_, done, outbox.ttls[key]] if key in outbox.ttls else [key, name_, done]
                for key, (done, name_, _) in outbox.marks.items()
            ],
        ],
        use_bin_type=True,
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, record)
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def keep(name: str, outbox: Outbox) -> None:
    """Spill what a stop could not write, and say so in the log (loudly if even that fails)."""
    try:
        path = spill(name, outbox)
    except OSError as exc:
        log.critical("%s: LOST %d writes made outside handlers: the backend was unreachable and the spill "
                     "file could not be written: %s", name, len(outbox), exc)  # fmt: skip
    else:
        log.error("%s: kept %d writes made outside handlers (tasks added in run(), task_done) in %s; "
                  "the next start of this loop writes them", name, len(outbox), path)  # fmt: skip


def _outbox(record: Any) -> Outbox:
    if not (isinstance(record, list) and len(record) == 3 and record[0] == _VERSION):
        raise ValueError("not a spill record")
    _, tasks, marks = record
    outbox = Outbox()
    new: list[NewTask] = []
    for t in tasks:
        payload, key, unique, head, delay = t
        if type(payload) is not bytes or type(key) is not bytes or len(key) not in (0, 16):
            raise ValueError("bad task")
        if (
            type(unique) is not bool
            or type(head) is not bool
            or type(delay) not in (int, float)
            or not 0 <= delay < 1e9
        ):
            raise ValueError("bad task flags")
        new.append(NewTask(payload, key or None, unique, head, float(delay)))
    outbox.tasks = new
    for mark in marks:
        key, name, done, *rest = mark
        if type(key) is not bytes or len(key) != 16 or type(name) is not str or type(done) is not bool:
            raise ValueError("bad done-set change")
        ttl: float | None = None
        if rest:
            if len(rest) > 1 or type(rest[0]) not in (int, float) or not 0 < rest[0] <= 1e9 or not done:
                raise ValueError("bad done-set ttl")
            ttl = float(rest[0])
        outbox.mark(key, name or key.hex(), done, ttl)
    return outbox


async def replay(name: str, store: Store) -> int:
    """Write what earlier runs of loop ``name`` spilled; returns the writes replayed.

    A file is renamed before it is read, so a process spilling at the same moment starts a
    new one; a file left renamed by a replay that was killed (its process is gone) is taken
    over. A write that fails puts the rest back for the next start. Records replayed twice
    (a replay killed midway) are duplicates, never losses.
    """
    path = spill_path(name)
    replayed = 0
    for taken in _take(path):
        replayed += await _replay_file(name, store, path, taken)
    if replayed:
        log.warning("%s: replayed %d writes that an earlier run could not write (%s)", name, replayed, path)
    return replayed


def _take(path: Path) -> list[Path]:
    """Rename the spill file, and the leftovers of killed replays, to names of this process."""
    if not path.parent.is_dir():
        return []
    mine = f"{path.name}.{os.getpid()}.replaying"
    taken: list[Path] = []
    candidates = [path] + [p for p in path.parent.glob(f"{path.name}.*.replaying") if p.name != mine]
    for i, candidate in enumerate(candidates):
        if candidate != path and _pid_alive(candidate.name[len(path.name) + 1 : -len(".replaying")]):
            continue  # another process is replaying it right now
        target = path.with_name(f"{mine}.{i}" if i else mine)
        try:
            os.replace(candidate, target)
        except FileNotFoundError:
            continue  # another process took it
        taken.append(target)
    return taken


def _pid_alive(text: str) -> bool:
    pid = text.split(".", 1)[0]
    if not pid.isascii() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


async def _replay_file(name: str, store: Store, path: Path, taken: Path) -> int:
    records, damaged = await asyncio.to_thread(_read, taken)
    bad = 0
    if damaged:
        bad += 1
        log.warning("%s: the spill file %s is damaged after %d records: %s", name, taken, len(records), damaged)
    replayed = 0
    for i, record in enumerate(records):
        try:
            outbox = _outbox(record)
        except (ValueError, TypeError) as exc:
            bad += 1
            log.warning("%s: skipping record %d of the spill file: %s", name, i, exc)
            continue
        try:
            await store.write(outbox)
        except BaseException:
            _put_back(name, records[i:])  # the written ones may be written again: a duplicate, never a loss
            os.unlink(taken)
            raise
        replayed += len(outbox)
    if bad:
        kept = path.with_name(f"{path.name}.bad-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}")
        os.replace(taken, kept)  # never over an earlier one: each may hold what a person must look at
        log.warning("%s: kept the damaged spill file as %s", name, kept)
    else:
        os.unlink(taken)
    return replayed


def _read(path: Path) -> tuple[list[Any], str]:
    """The records of a spill file, and what was wrong with the rest of it (or '')."""
    records: list[Any] = []
    try:
        with open(path, "rb") as f:
            for record in msgpack.Unpacker(f, raw=False, strict_map_key=True, max_buffer_size=64 * 1024 * 1024):
                records.append(record)
    except Exception as exc:  # a torn last record, garbage: keep what was read
        return records, f"{type(exc).__name__}: {exc}"
    return records, ""


def _put_back(name: str, records: list[Any]) -> None:
    for record in records:
        try:
            spill(name, _outbox(record))
        except (ValueError, TypeError):
            continue
