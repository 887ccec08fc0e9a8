"""Test helper: open the SQLite backend on a (new) file at an agreed moment, use it, exit.

``sqlite_opener.py PATH NAMESPACE``
    import everything, print ``ready``, read a line ``go <unix time>`` from stdin, sleep
    until that time (so that every process of a round opens the file at the same
    moment), then open a queue and a done set on PATH, register a worker, push a task,
    reserve and commit it, unregister; print ``ok`` and exit 0. An exception is
    printed (type, message, and the statement its cause came from) and the exit code
    is 1.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
import traceback

from achihuo_mini.backend import Commit, NewTask
from achihuo_mini_backends.sqlite import SqliteDoneSet, SqliteQueue


async def main(path: str, namespace: str) -> int:
    queue = SqliteQueue(namespace, path=path, busy_timeout=20.0)
    done = SqliteDoneSet(namespace, path=path, busy_timeout=20.0)
    print("ready", flush=True)
    word, _, start_at = sys.stdin.readline().partition(" ")
    assert word == "go", word
    time.sleep(max(0.0, float(start_at) - time.time()))
    try:
        await queue.open()
        await done.open()
        worker = f"opener-{os.getpid()}"
        await queue.register(worker, "slave", {"pid": os.getpid()}, 30.0)
        assert await queue.push([NewTask(f"task-{os.getpid()}".encode())]) == 1
        leases = await queue.reserve(worker, 1)
        assert len(leases) == 1, leases
        assert await queue.commit([Commit(leases[0])]) == 1
        await queue.unregister(worker)
    except Exception as exc:  # reported to the test, which shows every process's outcome
        cause = exc.__cause__
        frames = traceback.extract_tb(cause.__traceback__) if cause is not None else []
        where = f" (at {frames[-1].name}: {frames[-1].line})" if frames else ""
        print(f"{type(exc).__name__}: {exc}{where}", flush=True)
        return 1
    finally:
        await queue.close()
        await done.close()
    print("ok", flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(asyncio.run(main(sys.argv[1], sys.argv[2])))
