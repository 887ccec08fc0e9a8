"""Throughput of the SQLite backend: push -> reserve -> commit, 10 000 tasks in batches of 100.

usage: python tests/procs/sqlite_bench.py [TASKS] [BATCH]   (prints tasks/s; not a test)

``plain``: unnamed tasks. ``crawler``: unique names, and each commit marks its name
done in the shared done set -- what a crawler's hot path does.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path

from achihuo_mini.backend import Commit, NewTask
from achihuo_mini.codec import name_key
from achihuo_mini_backends.sqlite import SqliteQueue


async def run(path: Path, tasks: int, batch: int, named: bool) -> float:
    queue = SqliteQueue("bench-named" if named else "bench", path=path)
    await queue.open()
    try:
        started = time.perf_counter()
        for start in range(0, tasks, batch):
            names = [f"https://example.com/{i}" for i in range(start, min(start + batch, tasks))]
            await queue.push([NewTask(n.encode(), key=name_key(n) if named else None, unique=named) for n in names])
            leases = await queue.reserve("bench", batch)
            commits = [Commit(lease, done=[lease.key] if lease.key else []) for lease in leases]
            assert await queue.commit(commits) == len(names)
        elapsed = time.perf_counter() - started
        stats = await queue.stats()
        assert stats.active == 0, stats
    finally:
        await queue.close()
    return tasks / elapsed


def main() -> None:
    tasks = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    batch = int(sys.argv[2]) if len(sys.argv) > 2 else 100
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "bench.sqlite3"
        for named in (False, True):
            rate = asyncio.run(run(path, tasks, batch, named))
            label = "crawler (unique names + done)" if named else "plain"
            print(f"{label:32s} {tasks} tasks, batches of {batch}: {rate:,.0f} tasks/s")


if __name__ == "__main__":
    main()
