"""Each benchmark still runs (at a small size: speed is measured by the scripts, not asserted here)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"

# slow: each benchmark at a small size (about 30 s in all); .ci/run runs them
pytestmark = [pytest.mark.processes, pytest.mark.slow]


def run(script: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_throughput_benchmark_runs(redis_url: str) -> None:
    out = run("throughput.py", "-n", "500", "--redis-url", redis_url)
    for row in ("bare asyncio.Queue", "| memory", "| sqlite", "| redis"):
        assert row in out


def test_scaling_benchmark_runs(redis_url: str) -> None:
    out = run("scaling.py", "-n", "500", "-k", "1", "2", "-r", "1", "--redis-url", redis_url)
    assert "| 1 " in out and "| 2 " in out and "ceiling" in out


def test_memory_benchmark_runs(redis_url: str) -> None:
    out = run("memory.py", "-n", "2000", "--redis-url", redis_url)
    assert "memory backend" in out and "| sqlite" in out and "| redis" in out


# the peer crawlers of crawl.py (the `bench` extra): pip distribution -> modules it needs, its rows' labels
PEERS = {
    "scrapy": (("scrapy",), ["| Scrapy "]),
    "scrapy-redis": (("scrapy", "scrapy_redis"), ["| scrapy-redis "]),
    "crawlee": (("crawlee",), ["HttpCrawler (memory storage)", "HttpCrawler (file-system storage"]),
}


def test_crawl_benchmark_runs(redis_url: str) -> None:
    out = run("crawl.py", "-n", "300", "--redis-url", redis_url, "--stats-off", "--sqlite-full", "--raw-http")
    for row in ("bare aiohttp", "achihuo_mini memory", "achihuo_mini memory, stats off",
                "achihuo_mini memory, session.get", "achihuo_mini sqlite",
                'achihuo_mini sqlite, synchronous "full"', "achihuo_mini redis",
                "achihuo_mini redis, per_host_limit 64"):  # fmt: skip
        assert row in out
    assert "round trips/page" in out and "Redis CPU µs/page" in out
    assert "achihuo_mini redis: " in out and "workers at this row's rate" in out, out
    # .ci/run installs the bench extra, so CI runs the peers; without it, the script must say what to install
    missing = [dist for dist, (mods, _) in PEERS.items() if not all(importlib.util.find_spec(m) for m in mods)]
    for dist, (_, rows) in PEERS.items():
        for row in rows:
            assert (row in out) == (dist not in missing), (row, out)
    if missing:
        line = next(line for line in out.splitlines() if line.startswith("peers not installed"))
        assert all(dist in line for dist in missing) and 'pip install -e ".[bench]"' in line, line
    else:
        assert "peers not installed" not in out
    assert "[1]" not in out, out  # at this size every peer fetches each page exactly once: no notes


def test_replicas_benchmark_runs() -> None:
    out = run("replicas.py", "-n", "300", "--rounds", "1")
    assert "| wait_replicas |" in out and "| 1 " in out


@pytest.mark.redis_cluster
def test_scaling_benchmark_runs_its_cluster_rows() -> None:
    out = run("scaling.py", "--cluster", "-n", "300", "-r", "1")
    assert "| Cluster, 3 primaries | 3 " in out and "| one server " in out
