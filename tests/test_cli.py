"""The command line, with real worker processes: start, status, stop by alias, clear, exit codes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from achihuo_mini.testing import wait_until

from .test_examples import serve_in_thread
from .test_no_loss import SPIDER, Crawl, names

pytestmark = pytest.mark.processes


def cli(c: Crawl, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SPIDER_NAME": c.name, "ACHIHUO_CONFIG": str(c.config)}
    return subprocess.run(
        [sys.executable, str(SPIDER), *args], env=env, capture_output=True, text=True, timeout=120, input=stdin
    )


def status(c: Crawl) -> dict[str, Any]:
    done = cli(c, "status", "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


@pytest.fixture(params=["sqlite", "redis"])
def crawl(request: pytest.FixtureRequest, backend_options_for: Any, tmp_path: Path) -> Any:
    def make(**loop: Any) -> Crawl:
        return Crawl(request.param, backend_options_for(request.param), tmp_path, **loop)

    return make


async def _aliases(c: Crawl) -> list[str]:
    return [w["alias"] for w in status(c)["workers"]]


async def test_master_and_two_slaves_stop_by_alias(crawl: Any) -> None:
    site = serve_in_thread()  # a local site the three workers crawl together
    async with crawl(concurrency=4) as c:
        env = {"TASKS": 400, "SLEEP": 0.05, "SITE_URL": site}
        master = c.start(**env)
        await wait_until(lambda: c.registered(master), timeout=30)
        s1 = c.start("-s", **env)
        await wait_until(lambda: c.registered(s1), timeout=30)
        s2 = c.start("--slave", **env)
        await wait_until(lambda: c.registered(s2), timeout=30)

        data = status(c)
        rows = {w["alias"]: w for w in data["workers"]}
        assert sorted(rows) == ["m1", "s1", "s2"]
        assert rows["m1"]["role"] == "master" and rows["s1"]["role"] == rows["s2"]["role"] == "slave"
        assert {rows[a]["pid"] for a in rows} == {master.pid, s1.pid, s2.pid}
        assert rows["s1"]["pid"] == s1.pid, "aliases are claimed in start order"
        text = cli(c, "status")
        assert text.returncode == 0 and "s2" in text.stdout and "ready" in text.stdout
        assert "tasks/s" in text.stdout and "running" in text.stdout and "throughput:" in text.stdout

        stopped = cli(c, "stop", "s1", "--timeout", "30")
        assert stopped.returncode == 0, stopped.stderr
        assert "s1: stopped" in stopped.stdout
        assert s1.wait(30) == 0
        assert master.poll() is None and s2.poll() is None, "only s1 stopped"
        assert await _aliases(c) == ["m1", "s2"]

        again = c.start("-s", **env)
        await wait_until(lambda: c.registered(again), timeout=30)
        assert await _aliases(c) == ["m1", "s1", "s2"], "the lowest free alias is reused"

        unknown = cli(c, "stop", "s9")
        assert unknown.returncode == 1 and "s9: no such worker" in unknown.stderr

        refused = cli(c, "clear", "all", "--yes")
        assert refused.returncode == 1 and "workers are registered" in refused.stderr

        stop_all = cli(c, "stop", "all", "--timeout", "60")
        assert stop_all.returncode == 0, stop_all.stdout + stop_all.stderr
        for p in (master, s2, again):
            assert p.wait(30) == 0
        assert await _aliases(c) == []
        assert status(c)["queue"]["leased"] == 0, "a graceful stop releases every lease"

        finish = c.start("--idle-exit", "0.5", TASKS=400, SITE_URL=site)
        assert await c.wait_exit(finish, 120) == 0
        await c.assert_all_done(names(400))


async def test_clear_needs_confirmation(crawl: Any) -> None:
    async with crawl() as c:
        done = c.start("--idle-exit", "0", TASKS=5)
        assert await c.wait_exit(done, 60) == 0
        assert status(c)["done"]["count"] == 5
        no_tty = cli(c, "clear", "done")
        assert no_tty.returncode == 1 and "--yes" in no_tty.stderr
        assert status(c)["done"]["count"] == 5, "nothing cleared without confirmation"
        cleared = cli(c, "clear", "cache", "--yes")  # the seed's name for the done set
        assert cleared.returncode == 0, cleared.stderr
        assert status(c)["done"]["count"] == 0 and status(c)["stats"]["tasks"]["ok"] == 5, "the statistics stay"
        assert cli(c, "clear", "stats", "--yes").returncode == 0
        cleared_view = cli(c, "status")  # nothing else was there: the loop has no data now
        assert cleared_view.returncode == 1 and "no data for loop" in cleared_view.stderr


async def test_dead_letters_listed_and_requeued(crawl: Any) -> None:
    async with crawl(max_retries=1) as c:
        run = c.start("--idle-exit", "0", TASKS=3, FAIL="always:1")
        assert await c.wait_exit(run, 60) == 0
        listing = cli(c, "dead")
        assert listing.returncode == 0
        assert "work('t1')" in listing.stdout and "task 1 failed on purpose" in listing.stdout
        assert "failures=2" in listing.stdout
        assert cli(c, "dead", "--requeue").stdout.strip() == "requeued 1 dead letters"
        fixed = c.start("--idle-exit", "0", TASKS=3)
        assert await c.wait_exit(fixed, 60) == 0
        await c.assert_all_done(names(3))


@pytest.mark.parametrize(
    ("args", "code"),
    [
        ((), 2),
        (("bogus",), 2),
        (("stop",), 2),
        (("start", "--concurrency", "x"), 2),
        (("clear", "everything"), 2),
        (("start", "-s", "--no-run"), 2),
        (("--help",), 0),
        (("start", "--help"), 0),
        (("stop", "--help"), 0),
    ],
)
def test_usage_errors_exit_2(args: tuple[str, ...], code: int, tmp_path: Path) -> None:
    c = Crawl("sqlite", {"path": tmp_path / "x.sqlite3"}, tmp_path)
    done = cli(c, *args)
    assert done.returncode == code, done.stderr
    if code == 2:
        assert "usage:" in done.stderr


def test_bad_config_exits_1(tmp_path: Path) -> None:
    c = Crawl("sqlite", {"path": tmp_path / "x.sqlite3"}, tmp_path)
    c.config.write_text("[loop]\nconcurrency = 'lots'\n")
    done = cli(c, "status")
    assert done.returncode == 1
    # the constructor raises (as the design asks), so Python prints the traceback; its last line says it all
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("achihuo_mini.errors.ConfigError: ")
    assert "'concurrency'" in last and str(c.config) in last and "expected an integer" in last


def test_achihuo_script_without_the_spider(tmp_path: Path) -> None:
    exe = shutil.which("achihuo", path=os.path.dirname(sys.executable))
    assert exe, "the achihuo console script is installed with the package"
    listing = subprocess.run([exe, "backends"], capture_output=True, text=True, timeout=60)
    assert listing.returncode == 0
    for name in ("memory", "sqlite", "redis"):
        assert name in listing.stdout
    c = Crawl("sqlite", {"path": tmp_path / "x.sqlite3"}, tmp_path)
    run = subprocess.run(
        [sys.executable, str(SPIDER), "start", "--idle-exit", "0"],
        env={**os.environ, "SPIDER_NAME": c.name, "ACHIHUO_CONFIG": str(c.config), "TASKS": "7"},
        capture_output=True,
        timeout=120,
    )
    assert run.returncode == 0
    shown = subprocess.run(
        [exe, "status", c.name, "--config", str(c.config), "--json"], capture_output=True, text=True, timeout=60
    )
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["done"]["count"] == 7
    stop = subprocess.run(
        [exe, "stop", c.name, "m1", "--config", str(c.config)], capture_output=True, text=True, timeout=60
    )
    assert stop.returncode == 1 and "m1: no such worker" in stop.stderr
