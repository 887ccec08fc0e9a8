"""The seed README's spider, unchanged but for its URL, crawling a local site in real processes."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

from demo_site import make_app, serve_in_thread  # noqa: E402, F401 - re-exported for test_cli

from .conftest import store_of  # noqa: E402


@pytest.fixture
async def site() -> AsyncIterator[str]:
    runner = web.AppRunner(make_app(), access_log=None)
    await runner.setup()
    tcp = web.TCPSite(runner, "127.0.0.1", 0)
    await tcp.start()
    port = tcp._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}/"
    await runner.cleanup()


async def run_spider(script: Path, *args: str, env: dict[str, str], timeout: float = 60) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        *args,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.processes
@pytest.mark.parametrize("backend", ["redis", "sqlite"])
async def test_seed_spider_runs_unchanged(
    site: str, backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    config = tmp_path / "spider.toml"
    if backend == "redis":
        url = request.getfixturevalue("redis_url")
        config.write_text(f'[queue]\nurl = "{url}"\n[done]\nurl = "{url}"\n')  # cache_backend='redis' from the code
    else:
        config.write_text('[queue]\nbackend = "sqlite"\n[done]\nbackend = "sqlite"\npath = "done.sqlite3"\n')
    env = {"START_URL": site, "ACHIHUO_CONFIG": str(config)}
    script = ROOT / "examples" / "seed_spider.py"
    code, out, err = await run_spider(script, "clear", "all", "--yes", env=env)
    assert code == 0, err
    try:
        code, out, err = await run_spider(script, "start", "--idle-exit", "0", env=env)
        assert code == 0, err
        assert [line for line in out.splitlines() if line.startswith("title:")] == [
            f"title: Title {i}" for i in range(10)
        ]
        assert "queue: " + backend in err, "the backends in use are logged at start"
        code, out, err = await run_spider(script, "status", "--json", env=env)
        assert code == 0, err
        status = json.loads(out)
        assert status["done"]["count"] == 1
        assert status["queue"]["ready"] == status["queue"]["leased"] == status["queue"]["dead"] == 0
        assert status["workers"] == [], "the master unregistered when it stopped"
        code, out, err = await run_spider(script, "start", "--idle-exit", "0", env=env)
        assert code == 0 and "title:" in out, "run() seeds again with repeat=True, as the seed's code did"
    finally:
        await run_spider(script, "clear", "all", "--yes", env=env)


@pytest.mark.processes
async def test_demo_crawl_on_the_default_backend(tmp_path: Path) -> None:
    """README command (1): the demo crawl on the embedded default backend, twice."""
    env = {"XDG_DATA_HOME": str(tmp_path)}
    script = ROOT / "examples" / "demo_crawl.py"
    code, out, err = await run_spider(script, env=env)
    assert code == 0, err
    assert len(out.splitlines()) == 61, "the index and 60 pages, each once"
    assert "sqlite at " + str(tmp_path) in err
    code, out, err = await run_spider(script, env=env)
    assert code == 0 and out == "", "everything is done already: nothing is fetched again"


async def test_mixed_backends_queue_in_redis_done_set_in_sqlite(
    site: str, tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The config file puts the queue in Redis and the done set in SQLite; a crawl completes."""
    import uuid

    from demo_crawl import DemoSpider

    redis_url = request.getfixturevalue("redis_url")
    config = tmp_path / "mixed.toml"
    config.write_text(
        "[loop]\nallow_local = true\n"
        f'[queue]\nbackend = "redis"\nurl = "{redis_url}"\n'
        '[done]\nbackend = "sqlite"\npath = "done.sqlite3"\n'
    )
    monkeypatch.setenv("ACHIHUO_CONFIG", str(config))  # the spider's code names no backend
    cls = type("MixedSpider", (DemoSpider,), {"NAME": f"mixed-{uuid.uuid4().hex[:8]}"})
    spider = cls(site)
    assert (spider.settings.queue.backend, spider.settings.done.backend) == ("redis", "sqlite")
    try:
        summary = await spider.serve(idle_exit=0)
        assert summary.succeeded == 61 and summary.exit_code == 0
        async with store_of(spider) as store:
            assert not store.shared, "different backends: the loop writes done names before acks"
            assert await store.done.count() == 61, "the index and 60 pages, each done once"
            assert (await store.stats()).active == 0
        assert (tmp_path / "done.sqlite3").exists()
        again = await spider.serve(idle_exit=0)
        assert again.succeeded == 0, "run() seeds '/' with repeat=False: done in SQLite, so skipped"
    finally:
        await spider.clear_data("all")


@pytest.mark.processes
async def test_tasks_added_from_a_separate_script(site: str, tmp_path: Path) -> None:
    config = tmp_path / "spider.toml"
    config.write_text(
        '[queue]\nbackend = "sqlite"\npath = "q.sqlite3"\n[done]\nbackend = "sqlite"\npath = "q.sqlite3"\n'
    )
    env = {"START_URL": site, "ACHIHUO_CONFIG": str(config)}
    code, out, err = await run_spider(ROOT / "examples" / "add_tasks.py", "t/1", "t/2", "t/2", env=env)
    assert code == 0, err
    assert out.splitlines() == [f"added {site}t/1", f"added {site}t/2", f"added {site}t/2"]
    code, out, err = await run_spider(
        ROOT / "examples" / "seed_spider.py", "start", "--no-run", "--idle-exit", "0", env=env
    )
    assert code == 0, err
    titles = [line for line in out.splitlines() if line.startswith("title:")]
    assert len(titles) == 10, "two pages of five links each; the duplicate add was skipped"


@pytest.mark.processes
async def test_polite_spider_example(site: str, tmp_path: Path) -> None:
    """The README's polite, incremental crawl: every page once, and a second run within the week finds nothing to do."""
    config = tmp_path / "polite.toml"
    config.write_text('[queue]\nbackend = "sqlite"\npath = "polite.sqlite3"\n[done]\nbackend = "sqlite"\n'
                      'path = "polite.sqlite3"\n')  # fmt: skip
    env = {"START_URL": site, "ACHIHUO_CONFIG": str(config)}
    script = ROOT / "examples" / "polite_spider.py"
    code, out, err = await run_spider(script, "start", "--idle-exit", "0", env=env, timeout=120)
    assert code == 0, err
    code, out, err = await run_spider(script, "status", "--json", env=env)
    assert code == 0, err
    assert json.loads(out)["done"]["count"] == 61, "the index and its 60 topics, each once"
    code, out, err = await run_spider(script, "start", "--idle-exit", "0", env=env, timeout=120)
    assert code == 0, err
    assert re.search(r"finished in .*: 0 ok", err), "done for a week: the second run fetches nothing"
