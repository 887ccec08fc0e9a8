"""What ``wait_replicas`` costs: no-op tasks on a Redis primary with one replica, waiting for it
(``wait_replicas = 1``) or not (0), in alternating rounds of the same run.

    python benchmarks/replicas.py                 # 20 000 tasks, 3 rounds, concurrency 64
    python benchmarks/replicas.py -n 5000 --rounds 1

It starts its own primary and replica from ``redis-server`` (free local ports, nothing on
disk), adds the tasks (timed: each push waits too), runs them to idle, and reports the median
tasks/s of each setting and their ratio. On one machine the replica is a loopback round trip
away; across a network, each write waits one network round trip more.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _common import free_port, machine, make_loop, start_redis, table, unique_name

from achihuo_mini import Task


def synced(port: int) -> bool:
    import redis

    client = redis.Redis(port=port)
    try:
        return bool(client.info("replication").get("master_link_status") == "up")
    finally:
        client.close()


async def one_run(url: str, wait: int, n: int, concurrency: int, tmp: Path) -> tuple[float, float]:
    config = tmp / f"wait{wait}.toml"
    opts = f'url = "{url}"\nwait_replicas = {wait}\n'
    config.write_text(f'[queue]\nbackend = "redis"\n{opts}[done]\nbackend = "redis"\n{opts}')
    loop = make_loop(unique_name("bench-replicas"), config, concurrency)
    started = time.perf_counter()
    await loop.add_tasks(Task("noop", i) for i in range(n))
    add_s = time.perf_counter() - started
    started = time.perf_counter()
    summary = await loop.serve(slave=True, idle_exit=0)
    run_s = time.perf_counter() - started
    assert summary.succeeded == n, f"wait_replicas={wait}: {summary.succeeded} of {n} ran"
    await loop.clear_data()
    return add_s, run_s


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=20_000, help="tasks per run")
    parser.add_argument("-c", "--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of both settings")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        port, replica_port = free_port(), free_port()
        primary = start_redis(tmp / "p", port)
        replica = start_redis(tmp / "r", replica_port, "--replicaof", "127.0.0.1", str(port))
        try:
            deadline = time.monotonic() + 30
            while not synced(replica_port):
                if time.monotonic() > deadline:
                    raise SystemExit("the replica did not sync")
                await asyncio.sleep(0.05)
            url = f"redis://127.0.0.1:{port}/0"
            results: dict[int, list[tuple[float, float]]] = {0: [], 1: []}
            for _ in range(args.rounds):
                for wait in (0, 1):
                    results[wait].append(await one_run(url, wait, args.n, args.concurrency, tmp))
        finally:
            for proc in (replica, primary):
                proc.terminate()
                proc.wait(10)
    rows = [["wait_replicas", "add tasks/s", "run tasks/s", "run vs wait_replicas=0"]]
    base = statistics.median(args.n / r for _, r in results[0])
    for wait, runs in results.items():
        add = statistics.median(args.n / a for a, _ in runs)
        run = statistics.median(args.n / r for _, r in runs)
        rows.append([str(wait), f"{add:,.0f}", f"{run:,.0f}", f"{run / base:.2f}"])
    print(f"{args.n} no-op tasks, concurrency {args.concurrency}, median of {args.rounds} rounds; "
          f"a primary and one replica on this machine; {machine()}")  # fmt: skip
    print(table(rows))


if __name__ == "__main__":
    asyncio.run(main())
