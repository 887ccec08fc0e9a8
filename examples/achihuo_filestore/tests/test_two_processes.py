"""Real OS processes sharing one namespace directory."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest
from achihuo_mini.backend import NewTask, QueueStats
from achihuo_mini.codec import name_key

from achihuo_filestore import FileDoneSet, FileQueue

WORKER = Path(__file__).parent / "procs" / "worker.py"


async def _spawn(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        str(WORKER),
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def _expect_line(proc: asyncio.subprocess.Process, prefix: bytes) -> bytes:
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 30)
    if not line.startswith(prefix):
        proc.kill()
        _, err = await proc.communicate()
        pytest.fail(f"worker did not start: {err.decode(errors='replace')}")
    return line


async def test_two_processes_deliver_each_task_exactly_once(tmp_path: Path) -> None:
    """Two consumers reserve and commit 1000 tasks while this process is still pushing them.

    The consumers compact the journal every 16 KiB, so compactions replace the file
    under the other two processes many times during the run.
    """
    namespace = "two-procs"
    queue = FileQueue(namespace, root=tmp_path)
    done = FileDoneSet(namespace, root=tmp_path)
    await queue.open()
    await done.open()
    try:
        payloads = [f"task-{i:04}-" + "x" * 100 for i in range(1000)]
        tasks = [NewTask(p.encode(), key=name_key(p), unique=True) for p in payloads]
        assert await queue.push(tasks[:100]) == 100
        procs = [await _spawn("consume", str(tmp_path), namespace, str(tmp_path / f"out-{i}.txt")) for i in range(2)]
        for p in procs:
            await _expect_line(p, b"ready")
        for p in procs:
            assert p.stdin is not None
            p.stdin.write(b"go\n")
            await p.stdin.drain()
        for i in range(100, 1000, 50):
            assert await queue.push(tasks[i : i + 50]) == 50
            await asyncio.sleep(0.002)
        (tmp_path / "all-pushed").touch()
        compactions = 0
        for p in procs:
            out, err = await asyncio.wait_for(p.communicate(), 120)
            assert p.returncode == 0, err.decode(errors="replace")
            compactions += int(out.decode().split()[-1])
        per_process = [(tmp_path / f"out-{i}.txt").read_text().splitlines() for i in range(2)]
        delivered = per_process[0] + per_process[1]
        assert len(delivered) == len(set(delivered)), "a task was delivered twice"
        assert set(delivered) == set(payloads), "a task was lost"
        assert all(per_process), f"the processes did not both work: {[len(p) for p in per_process]}"
        assert await queue.stats() == QueueStats(0, 0, 0, 0)
        assert await done.count() == 1000
        assert all(await done.contains([name_key(p) for p in payloads]))
        assert compactions >= 2, "the workers compacted the journal under each other's feet"
    finally:
        await queue.close()
        await done.close()


async def test_killed_worker_leases_are_recovered(tmp_path: Path) -> None:
    namespace = "crash"
    queue = FileQueue(namespace, root=tmp_path)
    await queue.open()
    try:
        await queue.push([NewTask(f"t{i}".encode()) for i in range(5)])
        proc = await _spawn("hold", str(tmp_path), namespace, "3")
        assert await _expect_line(proc, b"held") == b"held 3\n"
        proc.kill()  # no close, no unregister: a crash
        await proc.wait()
        assert (await queue.stats()).leased == 3
        (victim,) = await queue.workers()
        assert victim.alias == "s1"
        recovered = 0
        for _ in range(200):
            recovered += await queue.recover()
            if recovered:
                break
            await asyncio.sleep(0.05)
        assert recovered == 3
        assert await queue.workers() == []
        leases = await queue.reserve("survivor", 10)
        assert [lease.payload for lease in leases] == [f"t{i}".encode() for i in range(5)], "recovered to the head"
        assert [lease.attempt for lease in leases] == [2, 2, 2, 1, 1]
    finally:
        await queue.close()
