"""No-op task throughput per backend, against a bare asyncio loop in the same run.

    python benchmarks/throughput.py                    # 100 000 tasks, every builtin backend
    python benchmarks/throughput.py -n 2000 --backends memory sqlite

Each backend: add N tasks with ``add_tasks`` (timed separately), then run them to idle
with no-op handlers at the given concurrency. The baseline is an ``asyncio.Queue`` with
the same number of worker coroutines running the same no-op coroutine (awaiting a no-op
coroutine never suspends: this measures a bare function call). A second reference runs
each no-op call in its own ``asyncio.Task``, as the loop runs each handler (its own
context, cancellation and task_timeout), at the same concurrency. Redis uses
``--redis-url`` (default ``$REDIS_URL`` or redis://127.0.0.1:6379/0) and its own NAME.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from achihuo_mini import AsyncLoop, Task
from achihuo_mini.plugins import registry


async def bare_asyncio(n: int, concurrency: int) -> float:
    """The baseline: asyncio.Queue + ``concurrency`` workers calling a no-op coroutine."""

    async def noop(i: int) -> None:
        pass

    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)
    started = time.perf_counter()

    async def worker() -> None:
        while True:
            try:
                i = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            await noop(i)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - started


async def bare_tasks(n: int, concurrency: int) -> float:
    """A second reference: each no-op call in its own ``asyncio.Task`` (what isolating a
    handler costs: its own context, cancellation and timeout), ``concurrency`` at a time."""

    async def noop(i: int) -> None:
        pass

    slots = asyncio.Semaphore(concurrency)
    running: set[asyncio.Task[None]] = set()

    def finished(task: asyncio.Task[None]) -> None:
        running.discard(task)
        slots.release()

    started = time.perf_counter()
    for i in range(n):
        await slots.acquire()
        task = asyncio.create_task(noop(i))
        running.add(task)
        task.add_done_callback(finished)
    while running:
        await asyncio.gather(*running)
    return time.perf_counter() - started


class NoOp(AsyncLoop):
    NAME = "bench"

    async def noop(self, i: int) -> None:
        pass


def make_loop(backend: str, concurrency: int, redis_url: str, tmp: Path) -> AsyncLoop:
    config = tmp / f"{backend}.toml"
    opts = {"redis": f'url = "{redis_url}"', "sqlite": f'path = "{tmp / "bench.sqlite3"}"'}.get(backend, "")
    config.write_text(f'[queue]\nbackend = "{backend}"\n{opts}\n[done]\nbackend = "{backend}"\n{opts}\n')
    cls = type("NoOp", (NoOp,), {"NAME": f"bench-{uuid.uuid4().hex[:8]}"})
    loop: AsyncLoop = cls(concurrency=concurrency, config_file=config, debug=False, progress_interval=0)
    return loop


async def run_backend(backend: str, n: int, concurrency: int, redis_url: str, tmp: Path) -> dict[str, Any]:
    loop = make_loop(backend, concurrency, redis_url, tmp)
    started = time.perf_counter()
    await loop.add_tasks(Task("noop", i) for i in range(n))
    add_s = time.perf_counter() - started
    started = time.perf_counter()
    cpu = time.process_time()
    summary = await loop.serve(slave=True, idle_exit=0)
    run_s = time.perf_counter() - started
    cpu_s = time.process_time() - cpu
    assert summary.succeeded == n, f"{backend}: {summary.succeeded} of {n} ran"
    await loop.clear_data()
    return {"backend": backend, "add_s": add_s, "run_s": run_s, "cpu_s": cpu_s}


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--tasks", type=int, default=100_000)
    parser.add_argument("-c", "--concurrency", type=int, default=32)
    parser.add_argument(
        "--backends", nargs="+", default=[b for b in ("memory", "sqlite", "redis") if b in registry.names()]
    )
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    args = parser.parse_args()
    n, c = args.tasks, args.concurrency
    base = await bare_asyncio(n, c)
    per_task = await bare_tasks(n, c)
    rows = [["backend", "tasks", "add tasks/s", "run tasks/s", "run CPU s", "vs bare asyncio", "vs a Task each"]]
    rows.append(["bare asyncio.Queue", str(n), "-", f"{n / base:,.0f}", "-", "1.00", "-"])
    rows.append(["bare, a Task each", str(n), "-", f"{n / per_task:,.0f}", "-", f"{base / per_task:.3f}", "1.00"])
    with tempfile.TemporaryDirectory() as tmp:
        for backend in args.backends:
            r = await run_backend(backend, n, c, args.redis_url, Path(tmp))
            rows.append(
                [
                    backend,
                    str(n),
                    f"{n / r['add_s']:,.0f}",
                    f"{n / r['run_s']:,.0f}",
                    f"{r['cpu_s']:.2f}",
                    f"{base / r['run_s']:.3f}",
                    f"{per_task / r['run_s']:.2f}",
                ]
            )
    print(
        f"no-op throughput, concurrency {c}; {platform.python_implementation()} {platform.python_version()}, "
        f"{os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}"
    )
    print(table(rows))


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
