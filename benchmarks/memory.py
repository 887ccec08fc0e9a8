"""Memory per queued task (memory backend) and per done-set entry (SQLite, Redis).

    python benchmarks/memory.py                        # 1 000 000 tasks / names
    python benchmarks/memory.py -n 2000                # the CI smoke test

(a) Peak RSS (``VmHWM`` from /proc/self/status, else ``ru_maxrss``) of a fresh
subprocess holding N tasks queued in the ``memory`` backend (``add_tasks`` of
``Task("noop", i)``), against the baseline of a fresh subprocess holding just the
list of the N encoded payloads (``encode_task``). Both subtract a third fresh
subprocess that imports the same modules and opens an empty loop, so the bytes per
task are what the N tasks cost.

(b) Bytes per done-set entry after adding N names (16-byte digests, ``name_key``)
in batches of 10 000: SQLite (``SqliteDoneSet``, the database file in a temporary
directory, after close) and Redis (``INFO memory`` ``used_memory`` before/after,
and ``MEMORY USAGE`` summed over the done set's keys: its hash buckets and counter;
``--redis-url``, default ``$REDIS_URL`` or redis://127.0.0.1:6379/0; the keys are
removed at the end). The baseline is the raw
16-byte digest. The Redis figures are server-wide deltas: run it on an idle server.
Each done set is measured twice: names added for ever (``add``), and names added with a
ttl of 7 days (``add_expiring``, what ``task_done(name, ttl=...)`` and ``done_ttl`` write).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import DEFAULT_REDIS_URL, machine, make_loop, store_of, table, unique_name, write_config

from achihuo_mini import Task
from achihuo_mini.codec import encode_task, name_key

HERE = Path(__file__).resolve()
BATCH = 10_000
DIGEST = 16


# -- (a) children: one fresh process per measurement -------------------------------------


def memory_status() -> dict[str, int]:
    """Peak and current RSS in bytes."""
    status: dict[str, int] = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                status[key] = int(value.split()[0]) * 1024  # kB
    except OSError:
        pass
    peak = status.get("VmHWM")
    if peak is None:  # ru_maxrss: KiB on Linux, bytes on macOS
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = maxrss if sys.platform == "darwin" else maxrss * 1024
    return {"peak": peak, "rss": status.get("VmRSS", 0)}


async def child(mode: str, n: int) -> dict[str, int]:
    with tempfile.TemporaryDirectory() as tmp:
        loop = make_loop(unique_name("bench-memory"), write_config(Path(tmp) / "memory.toml", "memory"))
        held: Any = None
        if mode == "tasks":
            async with store_of(loop) as store:  # the memory backend: the data lives in this process
                await loop.add_tasks(Task("noop", i) for i in range(n))
                stats = await store.stats()
            assert stats.ready == n, f"{stats.ready} of {n} queued"
        elif mode == "payloads":
            held = [encode_task("noop", None, (i,)) for i in range(n)]
            assert len(held) == n
        result = memory_status()
        del held
        return result


def run_child(mode: str, n: int) -> dict[str, int]:
    cmd = [sys.executable, str(HERE), "--child", mode, "-n", str(n)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"child {mode} failed ({out.returncode}):\n{out.stderr}")
    result: dict[str, int] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


# -- (b) done sets ---------------------------------------------------------------------


def names(n: int) -> list[bytes]:
    return [name_key(f"https://example.com/item/{i}") for i in range(n)]


def file_bytes(path: Path) -> int:
    """The database file plus any WAL / shared-memory file next to it."""
    return sum(p.stat().st_size for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")) if p.exists())


TTL = 7 * 86400.0
"""The ttl of the names added with one: a weekly re-crawl."""


async def _add(done: Any, keys: list[bytes], ttl: float | None) -> None:
    for i in range(0, len(keys), BATCH):
        if ttl is None:
            await done.add(keys[i : i + BATCH])
        else:
            await done.add_expiring([(k, ttl) for k in keys[i : i + BATCH]])


async def sqlite_done(n: int, tmp: Path, ttl: float | None = None) -> dict[str, float]:
    from achihuo_mini_backends.sqlite import SqliteDoneSet

    path = tmp / f"done-{ttl}.sqlite3"
    done = SqliteDoneSet(unique_name("bench-memory"), path=path)
    await done.open()
    await done.close()
    empty = file_bytes(path)
    await done.open()
    keys = names(n)
    started = time.perf_counter()
    try:
        await _add(done, keys, ttl)
        count = await done.count()
    finally:
        await done.close()
    elapsed = time.perf_counter() - started
    assert count == n, f"sqlite: {count} of {n} names"
    return {"empty": empty, "after": file_bytes(path), "seconds": elapsed}


async def redis_done(n: int, redis_url: str, ttl: float | None = None) -> dict[str, float]:
    import redis.asyncio as aredis

    from achihuo_mini_backends.redis_backend import RedisDoneSet

    done = RedisDoneSet(unique_name("bench-memory"), url=redis_url)
    client = aredis.from_url(redis_url)
    await done.open()
    keys = names(n)
    try:
        before = int((await client.info("memory"))["used_memory"])
        started = time.perf_counter()
        await _add(done, keys, ttl)
        elapsed = time.perf_counter() - started
        after = int((await client.info("memory"))["used_memory"])
        data_keys = [*done._bucket_keys(keys), done._key("dcount")]
        usage, encodings = 0, collections.Counter[str]()
        for i in range(0, len(data_keys), BATCH):
            pipe = client.pipeline(transaction=False)
            for key in data_keys[i : i + BATCH]:
                pipe.memory_usage(key, samples=0)
                pipe.object("encoding", key)
            replies = await pipe.execute()
            usage += sum(int(u or 0) for u in replies[0::2])
            encodings.update(e.decode() if isinstance(e, bytes) else str(e) for e in replies[1::2])
        count = await done.count()
    finally:
        await done.clear()
        await done.close()
        left = await client.exists(*data_keys)
        await client.aclose()
    assert count == n, f"redis: {count} of {n} names"
    assert not left, "redis: done-set keys are still there"
    enc = ", ".join(f"{k} {v}" for k, v in encodings.most_common())
    return {"delta": after - before, "usage": usage, "seconds": elapsed, "encoding": enc}  # type: ignore[dict-item]


# -- the report ------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--count", type=int, default=1_000_000, help="queued tasks and done names")
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    parser.add_argument("--no-redis", action="store_true", help="skip the Redis done set")
    parser.add_argument("--child", choices=["empty", "tasks", "payloads"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    n = args.count
    if args.child:
        print(json.dumps(asyncio.run(child(args.child, n))))
        return

    empty, tasks, payloads = (run_child(mode, n) for mode in ("empty", "tasks", "payloads"))
    per_task = (tasks["peak"] - empty["peak"]) / n
    per_payload = (payloads["peak"] - empty["peak"]) / n
    mib = 1024 * 1024
    rows_a = [
        ["process holding", "N", "peak RSS MiB", "RSS at end MiB", "bytes per task", "vs encoded payloads"],
        [
            "nothing (imports + an empty memory loop)",
            "0",
            f"{empty['peak'] / mib:.1f}",
            f"{empty['rss'] / mib:.1f}",
            "-",
            "-",
        ],
        [
            "list of encoded payloads (baseline)",
            str(n),
            f"{payloads['peak'] / mib:.1f}",
            f"{payloads['rss'] / mib:.1f}",
            f"{per_payload:.0f}",
            "1.00",
        ],
        [
            "tasks queued in the memory backend",
            str(n),
            f"{tasks['peak'] / mib:.1f}",
            f"{tasks['rss'] / mib:.1f}",
            f"{per_task:.0f}",
            f"{per_task / per_payload:.2f}" if per_payload > 0 else "-",
        ],
    ]

    rows_b = [["done set", "names", "bytes per name", "vs 16-byte digest", "how measured", "add names/s"]]
    for ttl in (None, TTL):
        label = "sqlite" if ttl is None else f"sqlite, ttl {ttl / 86400:g} days"
        with tempfile.TemporaryDirectory() as tmp:
            s = asyncio.run(sqlite_done(n, Path(tmp), ttl))
        rows_b.append(
            [label, str(n), f"{s['after'] / n:.1f}", f"{s['after'] / n / DIGEST:.2f}", "file size / N",
             f"{n / s['seconds']:,.0f}"]
        )  # fmt: skip
        rows_b.append(
            [label, str(n), f"{(s['after'] - s['empty']) / n:.1f}", f"{(s['after'] - s['empty']) / n / DIGEST:.2f}",
             f"(file size - empty db {s['empty']:,} B) / N", "-"]
        )  # fmt: skip
    if not args.no_redis:
        for ttl in (None, TTL):
            label = "redis" if ttl is None else f"redis, ttl {ttl / 86400:g} days"
            r = asyncio.run(redis_done(n, args.redis_url, ttl))
            rows_b.append(
                [label, str(n), f"{r['delta'] / n:.1f}", f"{r['delta'] / n / DIGEST:.2f}",
                 "INFO used_memory delta / N", f"{n / r['seconds']:,.0f}"]
            )  # fmt: skip
            rows_b.append(
                [label, str(n), f"{r['usage'] / n:.1f}", f"{r['usage'] / n / DIGEST:.2f}",
                 f"MEMORY USAGE SAMPLES 0 of its keys / N ({r['encoding']})", "-"]
            )  # fmt: skip

    print(f"memory per task and per done name, N = {n}; {machine()}")
    print()
    print(table(rows_a))
    print()
    print(table(rows_b))
    print()
    print(
        "bytes per task = (peak RSS - peak RSS of the empty process) / N, each in a fresh subprocess; "
        "payloads are encode_task('noop', None, (i,)), as add_tasks stores Task('noop', i)."
    )


if __name__ == "__main__":
    main()
