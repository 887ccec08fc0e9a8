"""Test helper: one OS process using an SQLite queue (run with ``sys.executable``).

``sqlite_worker.py consume PATH NAMESPACE OUT BATCH``
    open the queue, print ``ready``, wait for a line on stdin (the start signal),
    then loop reserve(BATCH) -> append the payloads to OUT -> commit, until nothing
    is ready or delayed. Exit 0; 3 when a commit of a held lease was refused.
``sqlite_worker.py push PATH NAMESPACE COUNT``
    push COUNT tasks (payloads ``pushed-<i>``) in one batch and exit.
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import TextIO

from achihuo_mini.backend import Commit, NewTask
from achihuo_mini_backends.sqlite import SqliteQueue


async def consume(path: str, namespace: str, out: TextIO, batch: int) -> int:
    queue = SqliteQueue(namespace, path=path)
    await queue.open()
    worker = f"proc-{os.getpid()}"
    try:
        print("ready", flush=True)
        sys.stdin.readline()  # the start signal: every process begins at once
        while True:
            leases = await queue.reserve(worker, batch)
            if not leases:
                stats = await queue.stats()
                if stats.ready == 0 and stats.delayed == 0:
                    return 0
                continue
            out.write("".join(lease.payload.decode() + "\n" for lease in leases))
            out.flush()
            if await queue.commit([Commit(lease) for lease in leases]) != len(leases):
                print("a commit of a held lease was fenced", file=sys.stderr)
                return 3
    finally:
        await queue.close()


async def push(path: str, namespace: str, count: int) -> int:
    queue = SqliteQueue(namespace, path=path)
    await queue.open()
    try:
        await queue.push([NewTask(f"pushed-{i}".encode()) for i in range(count)])
    finally:
        await queue.close()
    return 0


def main(argv: list[str]) -> int:
    if argv[1] == "consume":
        with open(argv[4], "w", encoding="utf-8") as out:
            return asyncio.run(consume(argv[2], argv[3], out, int(argv[5])))
    if argv[1] == "push":
        return asyncio.run(push(argv[2], argv[3], int(argv[4])))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
