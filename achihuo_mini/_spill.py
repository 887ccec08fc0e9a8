"""Writes that could not reach the backend at exit, kept in a local file until the next start.

A graceful stop flushes what was added outside handlers (tasks added in ``run()``,
``task_done``/``uncache_task`` made outside handlers). When the backend stays
unreachable, those writes are appended to ``<data dir>/spill/<NAME>.spill`` (the data
dir is ``$XDG_DATA_HOME/achihuo_mini``; folders 0700, file 0600) and the log says so.
The next start of a loop with the same ``NAME`` — on any backend — replays the file
before it does anything else, then deletes it.

The file is a sequence of msgpack records ``[1, tasks, marks]``: ``tasks`` as
``[payload, key or b"", unique, head, delay]``, ``marks`` as ``[key, name, done]``.
Nothing in it is trusted at replay: a record that does not have that shape is skipped
with a warning, and the file is kept beside as ``….bad`` for a person to look at.
"""

from __future__ import annotations

import asyncio
import logging
import os
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
            [[key, name_, done] for (key, done), name_ in zip(outbox.done.items(), _names_for(outbox), strict=True)],
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


def _names_for(outbox: Outbox) -> list[str]:
    """The name of each done-set change, in the order of ``outbox.done`` (names kept for the cache)."""
    by_order = list(outbox.names)
    return by_order if len(by_order) == len(outbox.done) else [""] * len(outbox.done)


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
    for key, name, done in marks:
        if type(key) is not bytes or len(key) != 16 or type(name) is not str or type(done) is not bool:
            raise ValueError("bad done-set change")
        outbox.mark(key, name or key.hex(), done)
    return outbox


async def replay(name: str, store: Store) -> int:
    """Write what earlier runs of loop ``name`` spilled; returns the writes replayed.

    The file is renamed before it is read, so a process spilling at the same moment
    starts a new one. A write that fails here puts the rest back for the next start.
    """
    path = spill_path(name)
    if not path.exists():
        return 0
    taken = path.with_name(f"{path.name}.{os.getpid()}.replaying")
    try:
        os.replace(path, taken)
    except FileNotFoundError:
        return 0  # another process took it
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
        os.replace(taken, path.with_name(f"{path.name}.bad"))
        log.warning("%s: kept the damaged spill file as %s", name, path.with_name(f"{path.name}.bad"))
    else:
        os.unlink(taken)
    if replayed:
        log.warning("%s: replayed %d writes that an earlier run could not write (%s)", name, replayed, path)
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
