"""Attacks on the spill file (writes kept locally when the backend was unreachable at exit).

Real processes, real SIGKILL, a real SQLite file.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest

from achihuo_mini._outbox import Outbox
from achihuo_mini._spill import spill, spill_path
from achihuo_mini.backend import NewTask
from achihuo_mini.codec import encode_task, name_key
from achihuo_mini.testing import wait_until

from .test_no_loss import Crawl

pytestmark = pytest.mark.processes


def _spill_tasks(name: str, n: int) -> Path:
    """What a stop through an outage leaves behind: one record per flush that could not be written."""
    path = None
    for i in range(n):
        outbox = Outbox()
        outbox.add([NewTask(encode_task("work", f"t{i}", [i]), name_key(f"t{i}"), True, False, 0.0)])
        path = spill(name, outbox)
    assert path is not None
    return path


async def test_a_replay_killed_midway_is_finished_by_the_next_start(
    backend_options_for: Any, tmp_path: Path
) -> None:
    """The replaying process renames the spill file to ``<name>.spill.<pid>.replaying`` and then
    writes it record by record. If it is killed meanwhile (SIGKILL, OOM, power loss), the
    renamed file is never looked at again: the next start only replays ``<name>.spill``.
    Every spilled task not yet written is lost for good."""
    total = 3000
    async with Crawl("sqlite", backend_options_for("sqlite"), tmp_path) as c:
        path = _spill_tasks(c.name, total)
        assert path == spill_path(c.name)
        first = c.start("--no-run", "--idle-exit", "30")
        replaying = list(path.parent.glob(f"{path.name}.*.replaying"))

        async def replay_started() -> bool:
            replaying[:] = list(path.parent.glob(f"{path.name}.*.replaying"))
            return bool(replaying) and (await c.queue.stats()).ready > 0

        await wait_until(replay_started, timeout=60, interval=0.002, describe=c.logs)
        first.send_signal(signal.SIGKILL)
        first.wait()
        written = (await c.queue.stats()).ready
        assert written < total, "the replay finished before the kill: make the file longer"
        # the next start of the same loop must write what the first could not
        second = c.start("--no-run", "--idle-exit", "0.5")
        assert await c.wait_exit(second, timeout=120) == 0, c.logs()
        ran = set(c.executions())
        missing = sorted(set(range(total)) - ran)
        assert not missing, (
            f"{len(missing)} of {total} spilled tasks never ran (e.g. {missing[:5]}); they are stranded in "
            f"{[p.name for p in path.parent.glob('*.replaying')]}, which no start reads"
        )


def _append_garbage(path: Path) -> None:
    with open(path, "ab") as f:
        f.write(b"\xc1")  # a byte msgpack never uses: the rest of the file cannot be read


async def test_every_damaged_spill_file_is_kept_for_a_person(
    memory_spiders: Any,
) -> None:
    """A damaged spill file is replayed up to the damage and then "kept as ``….bad`` for a person to
    look at" -- the records after the damage (tasks nobody replayed) live only there. The next
    damaged file is moved to the same name with ``os.replace`` (_spill.py ``replay``), which
    silently overwrites the first: the tasks it kept are gone."""
    from .test_attack_producer import Pages

    loop = memory_spiders(Pages)
    for rounds, (before, after) in enumerate([("a", "b"), ("c", "d")]):
        _one(loop.name, before)
        _append_garbage(spill_path(loop.name))
        _one(loop.name, after)  # appended behind the damage: never replayed, kept for a person
        await loop.serve(idle_exit=0)
        assert loop.got[rounds] == before
    kept = b"".join(p.read_bytes() for p in spill_path(loop.name).parent.iterdir())
    unreplayed = [label for label in ("b", "d") if encode_task("page", label, [label]) not in kept]
    assert not unreplayed, f"the spilled tasks {unreplayed} are neither replayed nor kept in any file"


def _one(name: str, label: str) -> None:
    outbox = Outbox()
    outbox.add([NewTask(encode_task("page", label, [label]), name_key(label), False, False, 0.0)])
    spill(name, outbox)
