"""Test helper: one OS process using a filestore queue (run with ``sys.executable``).

``worker.py consume ROOT NAMESPACE OUT``
    open the queue and done set, print ``ready``, wait for a line on stdin (the
    start signal), then loop: reserve 1-20 tasks -> append their payloads to OUT
    -> commit them (their keys done), until the file ``ROOT/all-pushed`` exists
    and nothing is ready, delayed or leased; print ``compactions N`` (journal
    compactions this process made). Exit 0; 3 when a commit of a held lease was
    refused.
``worker.py hold ROOT NAMESPACE COUNT``
    register as a slave with a 0.5 s ttl, reserve COUNT tasks, print ``held``
    and sleep until killed (a crashed worker).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import sys

from achihuo_mini.backend import Commit

from achihuo_filestore import FileDoneSet, FileQueue

COMPACT_BYTES = 16 * 1024  # small: both processes compact the journal many times during the run


class _Count(logging.Handler):
    compactions = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "compacted" in record.getMessage():
            _Count.compactions += 1


async def consume(root: str, namespace: str, out_path: str) -> int:
    queue = FileQueue(namespace, root=root, compact_bytes=COMPACT_BYTES)
    done = FileDoneSet(namespace, root=root, compact_bytes=COMPACT_BYTES)
    await queue.open()
    await done.open()
    worker = f"proc-{os.getpid()}"
    rng = random.Random(os.getpid())
    logging.getLogger("achihuo_filestore").addHandler(_Count())
    logging.getLogger("achihuo_filestore").setLevel(logging.INFO)
    try:
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.readline)  # every process starts at once
        with open(out_path, "w", encoding="utf-8") as out:
            while True:
                leases = await queue.reserve(worker, rng.randint(1, 20))
                if not leases:
                    if os.path.exists(os.path.join(root, "all-pushed")) and (await queue.stats()).active == 0:
                        print(f"compactions {_Count.compactions}", flush=True)
                        return 0
                    await asyncio.sleep(0.001)
                    continue
                out.write("".join(lease.payload.decode() + "\n" for lease in leases))
                out.flush()
                commits = [Commit(lease, done=[lease.key] if lease.key else []) for lease in leases]
                if await queue.commit(commits) != len(leases):
                    print("a commit of a held lease was fenced", file=sys.stderr)
                    return 3
    finally:
        await queue.close()
        await done.close()


async def hold(root: str, namespace: str, count: int) -> int:
    queue = FileQueue(namespace, root=root)
    await queue.open()
    await queue.register(f"proc-{os.getpid()}", "slave", {"pid": os.getpid()}, 0.5)
    leases = await queue.reserve(f"proc-{os.getpid()}", count)
    print(f"held {len(leases)}", flush=True)
    await asyncio.sleep(3600)
    return 0


def main(argv: list[str]) -> int:
    if argv[1] == "consume":
        return asyncio.run(consume(argv[2], argv[3], argv[4]))
    if argv[1] == "hold":
        return asyncio.run(hold(argv[2], argv[3], int(argv[4])))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
