"""The status page in a real browser: headless Chromium loads ``achihuo web`` while a master and a
slave crawl, and the DOM shows the workers and counts that change.

Marked ``browser``: the README's test command leaves it out (a fresh machine has no Chromium);
``python -m pytest -m browser`` runs it, and fails, never skips, when no Chromium is found.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from achihuo_mini.testing import wait_until

from .conftest import _free_port, write_backend_config
from .test_examples import serve_in_thread
from .test_no_loss import FAST_LOOP
from .test_stats import STATS_SPIDER

pytestmark = [pytest.mark.browser, pytest.mark.processes]

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def chromium() -> str:
    for name in (os.environ.get("CHROMIUM", ""), *BROWSERS):
        found = shutil.which(name) if name else None
        if found:
            return found
    pytest.fail(
        "the browser tests need Chromium: apt-get install chromium (or set CHROMIUM to its path)", pytrace=False
    )


def browse(url: str, *extra: str) -> str:
    """What Chromium has in the DOM after the page's script ran (3 s of virtual time)."""
    args = [chromium(), "--headless", "--disable-gpu", "--no-first-run", "--hide-scrollbars", "--mute-audio",
            "--window-size=1200,1600", "--virtual-time-budget=3000", *extra]  # fmt: skip
    if os.geteuid() == 0:
        args.append("--no-sandbox")  # Chromium's sandbox refuses to run as root (a CI container)
    done = subprocess.run([*args, url], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def cell(dom: str, element_id: str) -> str:
    match = re.search(rf'id="{element_id}"[^>]*>([^<]*)<', dom)
    assert match, f"no #{element_id} in the page"
    return match.group(1)


def worker_rows(dom: str) -> list[str]:
    body = re.search(r'<table id="workers">.*?<tbody>(.*?)</tbody>', dom, re.S)
    assert body, "no workers table"
    return re.findall(r'data-alias="([^"]+)"', body.group(1))


async def test_the_page_shows_a_running_crawl_in_chromium(tmp_path: Path, backend_options_for: Any) -> None:
    chromium()  # fail at once, before starting anything, when there is none
    name = f"t-browser-{uuid.uuid4().hex[:8]}"
    config = write_backend_config(tmp_path / "c.toml", "sqlite", backend_options_for("sqlite"),
                                  {**FAST_LOOP, "max_retries": 1, "concurrency": 2})  # fmt: skip
    env = {**os.environ, "SPIDER_NAME": name, "ACHIHUO_CONFIG": str(config), "SITE_URL": serve_in_thread(),
           "PAGES": "70", "BROKEN": "2", "SLEEP": "0.5"}  # fmt: skip
    logs = [tmp_path / "slave.log", tmp_path / "master.log", tmp_path / "web.log"]
    port = _free_port()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with open(logs[0], "wb") as out:
            procs.append(subprocess.Popen([sys.executable, str(STATS_SPIDER), "start", "-s", "--idle-exit", "2"],
                                          env=env, stdout=out, stderr=out))  # fmt: skip
        await wait_until(lambda: asyncio.sleep(0, "registered as" in logs[0].read_text()), timeout=30)
        with open(logs[1], "wb") as out:
            procs.append(subprocess.Popen([sys.executable, str(STATS_SPIDER), "start", "--idle-exit", "2"],
                                          env=env, stdout=out, stderr=out))  # fmt: skip
        with open(logs[2], "wb") as out:
            procs.append(subprocess.Popen(
                [sys.executable, str(STATS_SPIDER), "web", "--bind", f"127.0.0.1:{port}", "--interval", "0.5"],
                env=env, stdout=out, stderr=out))  # fmt: skip
        url = f"http://127.0.0.1:{port}/"
        describe = lambda: "\n".join(p.read_text(errors="replace") for p in logs)  # noqa: E731
        await wait_until(lambda: asyncio.sleep(0, "status page of loop" in logs[2].read_text()), timeout=30,
                         describe=describe)  # fmt: skip

        seen: list[str] = [""]
        describe_dom = lambda: describe() + "\n--- the last page seen:\n" + seen[0]  # noqa: E731

        async def both_workers() -> bool:
            dom = seen[0] = await asyncio.to_thread(browse, url, "--dump-dom")
            return sorted(worker_rows(dom)) == ["m1", "s1"] and int(cell(dom, "done-count").replace(",", "")) > 0

        await wait_until(both_workers, timeout=60, interval=0.2, describe=describe_dom)
        first = await asyncio.to_thread(browse, url, "--dump-dom")
        done_first = int(cell(first, "done-count").replace(",", ""))
        assert cell(first, "loop-name") == name and "updated" in cell(first, "health")
        assert "<polyline" in first, "the chart is drawn"

        async def counted_more() -> bool:
            dom = await asyncio.to_thread(browse, url, "--dump-dom")
            return int(cell(dom, "done-count").replace(",", "")) > done_first

        await wait_until(counted_more, timeout=60, interval=0.2, describe=describe)
        for p in procs[:2]:
            assert await asyncio.to_thread(p.wait, 120) == 0, describe()
        # the page refreshes every 0.5 s from what the workers published: the last figures
        # reach it a refresh after the workers exited, so wait for them (not one snapshot)
        async def settled() -> bool:
            dom = seen[0] = await asyncio.to_thread(browse, url, "--dump-dom")
            return cell(dom, "done-count") == "70" and "<td>items</td><td>120</td>" in dom

        await wait_until(settled, timeout=30, interval=0.2, describe=describe_dom)
        final = seen[0]
        assert cell(final, "done-count") == "70" and cell(final, "q-dead") == "2"
        assert re.search(r"<td>404</td><td>10</td>", final), "the 404s among the responses by status"
        assert re.search(r"<td>items</td><td>120</td>", final), "the spider's own counter, summed"
        assert final.count("LookupError: broken task") == 2, "dead letters with their reasons"
        shot = tmp_path / "status-page.png"
        await asyncio.to_thread(browse, url, f"--screenshot={shot}")
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
        subprocess.run([sys.executable, str(STATS_SPIDER), "clear", "--yes", "--force"], env=env,
                       capture_output=True, timeout=60)  # fmt: skip
