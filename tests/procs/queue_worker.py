"""Test helper: one OS process using a queue of any installed backend (run with ``sys.executable``).

``queue_worker.py consume BACKEND OPTIONS_JSON NAMESPACE OUT BATCH``
    open the queue, print ``ready``, wait for a line on stdin (the start signal, so
    every process begins at once), then loop reserve(BATCH) -> append the payloads
    to OUT -> commit, until nothing is ready or delayed. Exit 0; 3 when a commit of a
    held lease was refused.
``queue_worker.py push BACKEND OPTIONS_JSON NAMESPACE COUNT``
    push COUNT tasks (payloads ``pushed-<i>``) in one batch and exit.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import TextIO

from achihuo_mini.backend import Commit, NewTask, QueueBackend
from achihuo_mini.config import build_backend_options
from achihuo_mini.plugins import registry


def open_queue(backend: str, options_json: str, namespace: str) -> QueueBackend:
    spec = registry.get(backend)
    assert spec.create_queue is not None
    options = build_backend_options(spec, json.loads(options_json), source="queue_worker")
    return spec.create_queue(namespace, options)


async def consume(queue: QueueBackend, out: TextIO, batch: int) -> int:
    await queue.open()
    worker = f"proc-{os.getpid()}"
    try:
        print("ready", flush=True)
        sys.stdin.readline()
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


async def push(queue: QueueBackend, count: int) -> int:
    await queue.open()
    try:
        await queue.push([NewTask(f"pushed-{i}".encode()) for i in range(count)])
    finally:
        await queue.close()
    return 0


def main(argv: list[str]) -> int:
    if len(argv) == 7 and argv[1] == "consume":
        with open(argv[5], "w", encoding="utf-8") as out:
            return asyncio.run(consume(open_queue(argv[2], argv[3], argv[4]), out, int(argv[6])))
    if len(argv) == 6 and argv[1] == "push":
        return asyncio.run(push(open_queue(argv[2], argv[3], argv[4]), int(argv[5])))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
