"""Test helper: one OS process consuming a Redis queue (run with ``sys.executable``).

``redis_worker.py URL NAMESPACE OUT BATCH``
    open the queue, print ``ready``, wait for a line on stdin (the start signal, so
    every process begins at once), then loop reserve(BATCH) -> append the payloads
    to OUT -> commit, until a reserve returns nothing. Exit 0; 3 when a commit of a
    held lease was refused.
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import TextIO

from achihuo_mini.backend import Commit
from achihuo_mini_backends.redis_backend import RedisQueue


async def consume(url: str, namespace: str, out: TextIO, batch: int) -> int:
    queue = RedisQueue(namespace, url=url)
    await queue.open()
    worker = f"proc-{os.getpid()}"
    try:
        print("ready", flush=True)
        sys.stdin.readline()
        while leases := await queue.reserve(worker, batch):
            out.write("".join(lease.payload.decode() + "\n" for lease in leases))
            out.flush()
            if await queue.commit([Commit(lease) for lease in leases]) != len(leases):
                print("a commit of a held lease was fenced", file=sys.stderr)
                return 3
    finally:
        await queue.close()
    return 0


def main(argv: list[str]) -> int:
    if len(argv) != 5:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[3], "w", encoding="utf-8") as out:
        return asyncio.run(consume(argv[1], argv[2], out, int(argv[4])))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
