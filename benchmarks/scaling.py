"""Multi-process scaling on Redis: K worker processes draining one queue of no-op tasks.

    python benchmarks/scaling.py                       # 100 000 tasks, K = 1, 2, 4
    python benchmarks/scaling.py -n 2000 -k 1 2

For each K (``--repeat`` times, default 3; the median run by wall time is shown):
pre-fill N tasks with ``add_tasks`` (timed separately) under a fresh NAME,
then start K real OS processes (``sys.executable`` running this file's ``--worker``
entry), each ``serve(slave=True, idle_exit=0.5)`` at concurrency 32, and time from
the first start until every process has exited with the queue empty. The wall time
includes interpreter start-up and the idle-exit wait, so the parent also polls the
queue (every 10 ms) and reports the drain rate: from the first task taken to the
queue empty. Every run checks that all N tasks ran once, none is left or dead.

Baseline, in the same run: the "Redis ceiling", N task payloads through raw redis-py
(``redis.asyncio``, the client our backend uses) with none of our logic: RPUSH in
pipelines of 100, then ``LPOP key 100`` loops with one DEL per popped batch (a
push / pop / ack shaped round trip). Redis uses ``--redis-url`` (default
``$REDIS_URL`` or redis://127.0.0.1:6379/0); every key is removed at the end.

``--cluster`` (instead of the above): three loops at once, one worker process each, on one
Redis server against a 3-primary Redis Cluster (each loop on its own primary), both started
here from ``redis-server`` and ``redis-cli`` on free ports, in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from _common import (
    DEFAULT_REDIS_URL,
    free_port,
    machine,
    make_loop,
    start_redis,
    store_of,
    table,
    unique_name,
    write_config,
)

from achihuo_mini import Task
from achihuo_mini.codec import encode_task

HERE = Path(__file__).resolve()


# -- the worker process -------------------------------------------------------------


async def worker(name: str, config: Path, concurrency: int, idle_exit: float) -> dict[str, Any]:
    loop = make_loop(name, config, concurrency)
    summary = await loop.serve(slave=True, idle_exit=idle_exit)
    return {"succeeded": summary.succeeded, "fenced": summary.fenced, "exit_code": summary.exit_code}


# -- the parent ---------------------------------------------------------------------


async def prefill(name: str, config: Path, n: int) -> float:
    loop = make_loop(name, config)
    started = time.perf_counter()
    await loop.add_tasks(Task("noop", i) for i in range(n))
    return time.perf_counter() - started


async def queue_state(name: str, config: Path) -> tuple[int, int]:
    """(active, dead) tasks of the loop."""
    async with store_of(make_loop(name, config)) as store:
        stats = await store.stats()
    return stats.active, stats.dead


async def cleanup(name: str, config: Path, redis_url: str) -> int:
    """Clear the loop's data; return how many of its keys are left (should be 0)."""
    await make_loop(name, config).clear_data("all")
    import redis.asyncio as aredis

    client = aredis.from_url(redis_url)
    try:
        left = [k async for k in client.scan_iter(match=f"*{{{name}}}*", count=1000)]
        if left:
            await client.unlink(*left)
    finally:
        await client.aclose()
    return len(left)


async def redis_cpu(redis_url: str) -> float:
    """CPU seconds the Redis server has used so far (INFO cpu)."""
    import redis.asyncio as aredis

    client = aredis.from_url(redis_url)
    try:
        info = await client.info("cpu")
    finally:
        await client.aclose()
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


async def watch(name: str, config: Path, n: int, started: float, interval: float = 0.01) -> tuple[float, float]:
    """Poll the queue: seconds from ``started`` until the first task is taken, and until the queue is empty."""
    first = None
    async with store_of(make_loop(name, config)) as store:
        while True:
            stats = await store.stats()
            now = time.perf_counter()
            if first is None and stats.ready < n:
                first = now - started
            if stats.active == 0:
                return (first if first is not None else now - started), now - started
            await asyncio.sleep(interval)


def run_workers(
    name: str, config: Path, k: int, concurrency: int, idle_exit: float, n: int = 0
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Start K worker processes and wait for all to exit: timings (wall; with ``n``, also when the
    first task was taken and when the queue was empty, polled every 10 ms) and the workers' reports."""
    cmd = [sys.executable, str(HERE), "--worker", name, "--config", str(config)]
    cmd += ["-c", str(concurrency), "--idle-exit", str(idle_exit)]
    started = time.perf_counter()
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(k)]
    timings: dict[str, float] = {}
    if n:
        timings["first"], timings["empty"] = asyncio.run(watch(name, config, n, started))
    outputs = [p.communicate() for p in procs]
    timings["wall"] = time.perf_counter() - started
    reports = []
    for p, (out, err) in zip(procs, outputs, strict=True):
        if p.returncode != 0 or not out.strip():
            raise SystemExit(f"worker exited with {p.returncode}:\n{err}")
        reports.append(json.loads(out.strip().splitlines()[-1]))
    return timings, reports


async def redis_ceiling(redis_url: str, n: int, batch: int = 100) -> tuple[float, float]:
    """Raw redis-py: (push seconds, pop + ack seconds) for N payloads."""
    import redis.asyncio as aredis

    payloads = [encode_task("noop", None, [i]) for i in range(n)]
    key = f"bench-ceiling-{uuid.uuid4().hex[:8]}"
    client = aredis.from_url(redis_url)
    try:
        started = time.perf_counter()
        for i in range(0, n, batch):
            pipe = client.pipeline(transaction=False)
            for p in payloads[i : i + batch]:
                pipe.rpush(key, p)
            await pipe.execute()
        push_s = time.perf_counter() - started
        started = time.perf_counter()
        popped = 0
        j = 0
        while True:
            got = await client.lpop(key, batch)
            if not got:
                break
            popped += len(got)
            await client.delete(f"{key}:ack:{j}")
            j += 1
        run_s = time.perf_counter() - started
        assert popped == n, f"ceiling popped {popped} of {n}"
    finally:
        await client.delete(key)
        await client.aclose()
    return push_s, run_s


# -- --cluster: three loops on one server against three loops on three primaries -------------------


def _cluster(folder: Path) -> tuple[list[subprocess.Popen[bytes]], list[int]]:
    import shutil

    ports = [free_port(bus=True) for _ in range(3)]
    procs = [start_redis(folder / str(p), p, "--cluster-enabled", "yes", "--cluster-config-file",
                    str(folder / str(p) / "nodes.conf")) for p in ports]  # fmt: skip
    cli = shutil.which("redis-cli") or sys.exit("--cluster needs redis-cli on PATH")
    done = subprocess.run([cli, "--cluster", "create", *[f"127.0.0.1:{p}" for p in ports], "--cluster-yes"],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    if done.returncode:
        sys.exit(f"redis-cli --cluster create failed: {done.stdout[-500:]}")
    deadline = time.monotonic() + 30
    while not all("cluster_state:ok" in subprocess.run([cli, "-p", str(p), "cluster", "info"], capture_output=True,
                                                       text=True).stdout for p in ports):  # fmt: skip
        if time.monotonic() > deadline:
            sys.exit("the Cluster did not settle")
        time.sleep(0.05)
    return procs, ports


def _names_on_primaries(ports: list[int], run_name: str) -> list[str]:
    """One loop NAME per primary: its hash-tag slot is served by that node."""
    import redis
    from redis.crc import key_slot

    from achihuo_mini_backends.redis_backend.keys import redis_key

    client = redis.Redis(port=ports[0])
    try:
        owners = [(low, high, int(node[1])) for low, high, node, *_ in client.execute_command("CLUSTER", "SLOTS")]
    finally:
        client.close()
    names: dict[int, str] = {}
    i = 0
    while len(names) < len(ports):
        name = f"{run_name}-{i}"
        slot = key_slot(redis_key(name, "seq"))
        names.setdefault(next(port for low, high, port in owners if low <= slot <= high), name)
        i += 1
    return list(names.values())


def _three_loops(url: str, names: list[str], n: int, concurrency: int, idle_exit: float, tmp: Path) -> float:
    """Wall seconds for one worker process per loop to drain ``n`` tasks of each loop."""
    config = tmp / f"{abs(hash(url))}.toml"
    config.write_text(f'[queue]\nbackend = "redis"\nurl = "{url}"\n[done]\nbackend = "redis"\nurl = "{url}"\n')
    for name in names:
        asyncio.run(prefill(name, config, n))
    cmd = [sys.executable, str(HERE), "--config", str(config), "-c", str(concurrency), "--idle-exit", str(idle_exit)]
    started = time.perf_counter()
    procs = [subprocess.Popen([*cmd, "--worker", name], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name in names]  # fmt: skip
    outputs = [p.communicate() for p in procs]
    wall = time.perf_counter() - started
    for p, (out, err) in zip(procs, outputs, strict=True):
        if p.returncode != 0 or json.loads(out.strip().splitlines()[-1])["succeeded"] != n:
            sys.exit(f"a worker failed ({p.returncode}):\n{err[-2000:]}")
    for name in names:
        asyncio.run(make_loop(name, config).clear_data("all"))
    return wall


def cluster_rows(n: int, concurrency: int, idle_exit: float, repeat: int) -> None:
    run_name = unique_name("bench-cluster")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        single_port = free_port()
        single = start_redis(tmp / "single", single_port)
        nodes, ports = _cluster(tmp / "cluster")
        try:
            names = _names_on_primaries(ports, run_name)
            cluster_url = "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in ports)
            setups = [("one server", f"redis://127.0.0.1:{single_port}/0"), ("Cluster, 3 primaries", cluster_url)]
            walls: dict[str, list[float]] = {label: [] for label, _ in setups}
            for _ in range(repeat):  # alternating, so that both see the same machine
                for label, url in setups:
                    walls[label].append(_three_loops(url, names, n, concurrency, idle_exit, tmp))
        finally:
            for proc in [single, *nodes]:
                proc.terminate()
                proc.wait(10)
    base = sorted(walls["one server"])[repeat // 2]
    rows = [["setup", "loops", "tasks", "wall s", "tasks/s (wall)", "vs one server"]]
    for label, _ in setups:
        wall = sorted(walls[label])[repeat // 2]
        rows.append([label, "3", str(3 * n), f"{wall:.2f}", f"{3 * n / wall:,.0f}", f"{base / wall:.2f}"])
    print(f"three loops at once, one worker process each, {n} no-op tasks per loop, concurrency {concurrency}, "
          f"median of {repeat} runs; {machine()}")  # fmt: skip
    print(table(rows))
    print("On this machine the worker processes and all the servers share its cores: a Cluster pays off where "
          "one Redis core is the limit and the primaries have cores (or machines) of their own.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--tasks", type=int, default=100_000)
    parser.add_argument("-k", "--workers", type=int, nargs="+", default=[1, 2, 4], help="process counts to run")
    parser.add_argument("-c", "--concurrency", type=int, default=32, help="per worker process")
    parser.add_argument("--idle-exit", type=float, default=0.5)
    parser.add_argument("-r", "--repeat", type=int, default=3, help="runs per K; the median run (by wall) is shown")
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    parser.add_argument("--worker", metavar="NAME", help=argparse.SUPPRESS)
    parser.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cluster", action="store_true", help="3 loops on one server vs on a 3-primary Cluster")
    args = parser.parse_args()
    if args.worker:
        report = asyncio.run(worker(args.worker, args.config, args.concurrency, args.idle_exit))
        print(json.dumps(report))
        return
    if args.cluster:
        cluster_rows(args.tasks, args.concurrency, args.idle_exit, args.repeat)
        return

    n, c = args.tasks, args.concurrency
    run_name = unique_name("bench-scaling")
    results: list[dict[str, Any]] = []
    leftover = 0
    with tempfile.TemporaryDirectory() as tmp:
        config = write_config(Path(tmp) / "redis.toml", "redis", redis_url=args.redis_url)
        for k in args.workers:
            runs = []
            for rep in range(args.repeat):
                name = f"{run_name}-k{k}-r{rep}"
                add_s = asyncio.run(prefill(name, config, n))
                cpu0, rcpu0 = children_cpu(), asyncio.run(redis_cpu(args.redis_url))
                timings, reports = run_workers(name, config, k, c, args.idle_exit, n)
                cpu, rcpu = children_cpu() - cpu0, asyncio.run(redis_cpu(args.redis_url)) - rcpu0
                active, dead = asyncio.run(queue_state(name, config))
                succeeded = sum(r["succeeded"] for r in reports)
                leftover += asyncio.run(cleanup(name, config, args.redis_url))
                if active or dead or succeeded != n:
                    raise SystemExit(f"K={k}: {succeeded} of {n} ran; {active} left in the queue, {dead} dead")
                drain = max(timings["empty"] - timings["first"], 1e-9)
                runs.append({"k": k, "add_s": add_s, "drain": drain, "cpu": cpu, "rcpu": rcpu, "per": reports})
                runs[-1].update(timings)
            results.append(sorted(runs, key=lambda r: r["wall"])[len(runs) // 2])  # the median run by wall time
    ceilings = sorted((asyncio.run(redis_ceiling(args.redis_url, n)) for _ in range(args.repeat)), key=sum)
    push_s, pop_s = ceilings[len(ceilings) // 2]

    base = results[0]
    rows = [
        [
            "workers (K)",
            "tasks",
            "wall s",
            "tasks/s (wall)",
            f"vs K={base['k']}",
            "1st task taken at s",
            "queue empty at s",
            "tasks/s (drain)",
            f"drain vs K={base['k']}",
            "workers CPU s",
            "redis CPU s",
            "tasks per worker",
        ]
    ]
    for r in results:
        rows.append(
            [
                str(r["k"]),
                str(n),
                f"{r['wall']:.2f}",
                f"{n / r['wall']:,.0f}",
                f"{base['wall'] / r['wall']:.2f}",
                f"{r['first']:.2f}",
                f"{r['empty']:.2f}",
                f"{n / r['drain']:,.0f}",
                f"{base['drain'] / r['drain']:.2f}",
                f"{r['cpu']:.1f}",
                f"{r['rcpu']:.1f}",
                "/".join(str(p["succeeded"]) for p in r["per"]),
            ]
        )
    pairs = [
        ("push (add_tasks vs RPUSH pipelines of 100)", n / base["add_s"], n / push_s),
        ("run, wall (vs LPOP 100 + DEL per batch)", n / base["wall"], n / pop_s),
        ("run, drain (1st task taken to queue empty)", n / base["drain"], n / pop_s),
        ("push + run (wall), end to end", n / (base["add_s"] + base["wall"]), n / (push_s + pop_s)),
    ]
    ceiling = [["phase", f"achihuo_mini K={base['k']} tasks/s", "raw redis-py ceiling tasks/s", "fraction of ceiling"]]
    ceiling += [[phase, f"{ours:,.0f}", f"{raw:,.0f}", f"{ours / raw:.3f}"] for phase, ours, raw in pairs]

    cores = os.cpu_count() or 0
    print(
        f"no-op scaling on Redis ({args.redis_url.split('@')[-1]}), {n} tasks, concurrency {c} per process, "
        f"idle_exit {args.idle_exit} s, median of {args.repeat} runs; {machine()}"
    )
    if max(args.workers) > cores:
        print(
            f"NOTE: this machine has {cores} cores shared by the workers, the Redis server and this script: "
            f"K > {cores} cannot scale, and K = {cores} competes with Redis for CPU."
        )
    print()
    print(table(rows))
    print()
    print(table(ceiling))
    print()
    print(
        "wall: first process start to last process exit (interpreter start-up and the idle_exit wait included); "
        "drain: the first task taken to the queue empty (polled every 10 ms). CPU: user+sys of the worker "
        "processes (getrusage children) and of redis-server (INFO cpu) during the run."
    )
    if leftover:
        print(f"WARNING: {leftover} keys of the benchmark loops were still present after clear() (now removed)")


if __name__ == "__main__":
    main()
