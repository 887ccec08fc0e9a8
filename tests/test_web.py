"""The status page, ``achihuo web NAME``: served over real TCP from the loop's backend.

What it shows must match ``status --json``; actions need the token; nothing it serves needs
another origin, and nothing a backend holds (hostile names, errors, a Redis password) gets
out as anything but inert, masked text. The page in a real browser: tests/test_web_browser.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from achihuo_mini import AsyncLoop, ConfigError
from achihuo_mini.__main__ import main
from achihuo_mini._store import Store
from achihuo_mini._web import StatusPage
from achihuo_mini.testing import wait_until

from .conftest import RedisServer, SpiderFactory, _free_port, write_backend_config
from .test_no_loss import FAST_LOOP

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:prometheus_client")


class Crawled(AsyncLoop):
    """Five good tasks (each counts an item) and two that always fail with hostile text."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(debug=False, max_retries=0, **{**FAST_LOOP, **kwargs})

    async def good(self, i: int) -> None:
        self.stats.inc("items")
        self.task_done(f"good-{i}")

    async def bad(self, i: int) -> None:
        raise LookupError(f"<script>alert({i})</script> fails on purpose")


async def crawl(loop: AsyncLoop) -> None:
    for i in range(5):
        loop.add_task("good", i, task_name=f"good-{i}")
    for i in range(2):
        loop.add_task("bad", i, task_name=f"<img src=x onerror=alert({i})>")
    summary = await asyncio.wait_for(loop.serve(idle_exit=0), 60)
    assert summary.succeeded == 5 and summary.failed == 2


@pytest.fixture(params=["sqlite", "redis"])
def shared(request: pytest.FixtureRequest, backend_options_for: Any, tmp_path: Path) -> Any:
    """Like ``spiders``, on the backends other processes share (the page of a memory loop shows one process)."""
    factory = SpiderFactory(request.param, backend_options_for(request.param), tmp_path)
    yield factory
    factory.cleanup()


Serve = Callable[..., Awaitable[tuple[str, StatusPage]]]


@pytest.fixture
async def serve_page() -> AsyncIterator[Serve]:
    """``await serve_page(loop, token=..., bound_host=...)``: the page of ``loop`` on a free port."""
    from aiohttp import web

    cleanups: list[Callable[[], Awaitable[None]]] = []

    async def serve(loop: AsyncLoop, **kwargs: Any) -> tuple[str, StatusPage]:
        store = Store(loop.name, loop.settings, call_timeout=5.0)
        await store.open()
        page = StatusPage(loop.name, store, **kwargs)
        runner = web.AppRunner(page.app(), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]

        async def cleanup() -> None:
            await runner.cleanup()
            await store.close()

        cleanups.append(cleanup)
        return f"http://127.0.0.1:{port}", page

    yield serve
    for cleanup in reversed(cleanups):
        await cleanup()


async def get(url: str, **kwargs: Any) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as http, http.get(url, **kwargs) as resp:
        return resp.status, dict(resp.headers), await resp.read()


async def post(url: str, body: Any, token: str | None = None, raw: bytes | None = None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    data = raw if raw is not None else json.dumps(body).encode()
    async with aiohttp.ClientSession() as http, http.post(url, data=data, headers=headers) as resp:
        return resp.status, await resp.json()


# -- what it shows ------------------------------------------------------------------------------


async def test_api_status_is_what_status_json_prints(
    spiders: SpiderFactory, serve_page: Serve, capsys: pytest.CaptureFixture[str]
) -> None:
    loop = spiders(Crawled)
    await crawl(loop)
    base, _ = await serve_page(loop)
    status, headers, body = await get(base + "/api/status")
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    capsys.readouterr()
    assert await asyncio.to_thread(main, ["status", loop.name, "--config", str(spiders.config), "--json"]) == 0
    assert json.loads(body) == json.loads(capsys.readouterr().out)
    assert json.loads(body)["stats"]["custom"] == {"items": 5}


async def test_the_page_data_has_dead_letters_counters_and_a_rate_history(
    spiders: SpiderFactory, serve_page: Serve
) -> None:
    loop = spiders(Crawled)
    await crawl(loop)
    base, page = await serve_page(loop, interval=0.5)
    await wait_until(lambda: asyncio.sleep(0, len(page.history) >= 2), timeout=10)
    status, _, body = await get(base + "/api/page")
    data = json.loads(body)
    assert status == 200 and data["actions"] is False and data["interval"] == 0.5
    assert data["status"]["queue"]["dead"] == 2 and data["status"]["done"]["count"] == 5
    reasons = sorted(d["reason"] for d in data["dead"])
    assert reasons == [f"LookupError: <script>alert({i})</script> fails on purpose" for i in range(2)]
    assert {d["handler"] for d in data["dead"]} == {"bad"} and all(d["failures"] == 1 for d in data["dead"])
    assert {d["name"] for d in data["dead"]} == {f"<img src=x onerror=alert({i})>" for i in range(2)}
    t, tasks, pages = data["history"][-1]
    assert tasks == 7 and pages == 0 and t <= data["now"]


async def test_metrics_are_the_loops_totals(spiders: SpiderFactory, serve_page: Serve) -> None:
    loop = spiders(Crawled)
    await crawl(loop)
    base, _ = await serve_page(loop)
    status, headers, body = await get(base + "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples = {
        (s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k not in ("loop", "worker")))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
        if s.labels.get("loop") == loop.name and s.labels.get("worker") == "all"
    }
    assert samples[("achihuo_tasks_total", (("outcome", "ok"),))] == 5
    assert samples[("achihuo_tasks_total", (("outcome", "dead"),))] == 2
    assert samples[("achihuo_custom_total", (("name", "items"),))] == 5
    assert samples[("achihuo_queue_tasks", (("state", "dead"),))] == 2
    assert samples[("achihuo_done_names", ())] == 5


async def test_the_page_needs_nothing_from_another_origin(memory_spiders: SpiderFactory, serve_page: Serve) -> None:
    base, _ = await serve_page(memory_spiders(Crawled))
    status, headers, html = await get(base + "/")
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    csp = headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert headers["X-Content-Type-Options"] == "nosniff" and headers["Cache-Control"] == "no-store"
    assert set(re.findall(rb'(?:src|href)="([^"]+)"', html)) == {
        b"/static/app.css", b"/static/app.js", b"/api/status", b"/metrics"
    }
    assert b"<script>" not in html and b"style=" not in html, "no inline script or style: the CSP forbids them"
    for path, kind in (("/static/app.js", "text/javascript"), ("/static/app.css", "text/css")):
        status, headers, body = await get(base + path)
        assert status == 200 and headers["Content-Type"].startswith(kind)
        assert re.findall(rb"https?://[^\s\"'`]+", body) in ([], [b"http://www.w3.org/2000/svg"])
    _, _, js = await get(base + "/static/app.js")
    assert b"innerHTML" not in js and b"insertAdjacentHTML" not in js and b"eval(" not in js
    status, _, _ = await get(base + "/no/such/page")
    assert status == 404


async def test_the_page_answers_only_to_ip_addresses_localhost_and_its_bind_name(
    memory_spiders: SpiderFactory, serve_page: Serve
) -> None:
    """A site whose own name resolves to this server (DNS rebinding) reads nothing through a visitor's browser."""
    loop = memory_spiders(Crawled)
    base, _ = await serve_page(loop, bound_host="127.0.0.1")
    port = base.rpartition(":")[2]
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", "localhost.evil.example"):
        status, _, body = await get(base + "/api/status", headers={"Host": host})
        assert status == 421 and loop.name.encode() not in body, host
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST.:{port}", f"[::1]:{port}",
                 f"192.0.2.10:{port}"):  # fmt: skip
        status, _, _ = await get(base + "/api/status", headers={"Host": host})
        assert status == 200, host
    for bound in ("0.0.0.0", "crawler.example.org"):  # bound everywhere, or to a name: still no other name
        anywhere, _ = await serve_page(loop, bound_host=bound)
        status, _, _ = await get(anywhere + "/api/status", headers={"Host": "rebound.example"})
        assert status == 421, bound
    status, _, _ = await get(anywhere + "/api/status", headers={"Host": "Crawler.Example.org:8080"})
    assert status == 200, "the name it was bound to"


async def test_hostile_requests_get_a_json_answer_and_no_traceback(
    memory_spiders: SpiderFactory, serve_page: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    token = uuid.uuid4().hex
    base, _ = await serve_page(memory_spiders(Crawled), token=token)
    port = int(base.rpartition(":")[2])
    deep = b"[" * 5000 + b"]" * 5000
    for headers, body in (
        (b"Authorization: Bearer \xff\xfe\r\n", b'{"limit": 0}'),
        (f"Authorization: Bearer {token}\r\nContent-Type: application/json; charset=bogus\r\n".encode(), b"[]"),
        (f"Authorization: Bearer {token}\r\n".encode(), deep[:4000]),
        (f"Authorization: Bearer {token}\r\n".encode(), b"\xff\xfe{}"),
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /api/requeue HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n" + headers
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)  # fmt: skip
        answer = await reader.read()
        writer.close()
        await writer.wait_closed()
        status = int(answer.split(b" ", 2)[1])
        assert status in (400, 401) and b"Content-Security-Policy" in answer, answer[:300]
    assert "Traceback" not in caplog.text and "Error handling request" not in caplog.text


# -- actions ------------------------------------------------------------------------------------


async def test_actions_need_a_token_and_the_request_must_carry_it(spiders: SpiderFactory, serve_page: Serve) -> None:
    loop = spiders(Crawled)
    await crawl(loop)
    read_only, _ = await serve_page(loop)
    status, answer = await post(read_only + "/api/requeue", {"limit": None}, token="anything-at-all")
    assert status == 403 and "--token" in answer["error"]
    token = uuid.uuid4().hex
    base, _ = await serve_page(loop, token=token)
    for given in (None, "", "wrong-token-here", token[:-1]):
        status, answer = await post(base + "/api/requeue", {"limit": None}, token=given)
        assert status == 401 and "Authorization: Bearer" in answer["error"], given
    for body, raw in (([1], None), ({"limit": -1}, None), ({"limit": "2"}, None), (None, b"{not json")):
        status, answer = await post(base + "/api/requeue", body, token=token, raw=raw)
        assert status == 400, body
    _, _, data = await get(base + "/api/page")
    assert json.loads(data)["status"]["queue"]["dead"] == 2 and json.loads(data)["actions"] is True
    assert await post(base + "/api/requeue", {"limit": 1}, token=token) == (200, {"requeued": 1})
    assert await post(base + "/api/requeue", {"limit": None}, token=token) == (200, {"requeued": 1})
    _, _, data = await get(base + "/api/status")
    assert json.loads(data)["queue"]["dead"] == 0 and json.loads(data)["queue"]["ready"] == 2
    with pytest.raises(ConfigError, match="at least 8"):
        StatusPage(loop.name, None, token="short")  # type: ignore[arg-type]


async def test_stop_from_the_page_stops_a_running_worker(shared: SpiderFactory, serve_page: Serve) -> None:
    spiders = shared
    loop = spiders(Crawled)
    token = uuid.uuid4().hex
    base, _ = await serve_page(loop, token=token)
    running = asyncio.create_task(loop.serve(slave=True, idle_exit=None))
    try:

        async def registered() -> bool:
            _, _, body = await get(base + "/api/status")
            return len(json.loads(body)["workers"]) == 1

        await wait_until(registered, timeout=30)
        status, answer = await post(base + "/api/stop", {"targets": ["s1", "m7"]}, token=token)
        assert status == 200 and answer == {"sent": ["s1"], "unknown": ["m7"]}
        summary = await asyncio.wait_for(running, 30)
        assert summary.exit_code == 0
    finally:
        running.cancel()
    status, answer = await post(base + "/api/stop", {"targets": "all"}, token=token)
    assert status == 400


# -- what never gets out --------------------------------------------------------------------------


@pytest.fixture
def redis_user(redis_url: str) -> Any:
    """A Redis ACL user with a password on the test server (removed afterwards): (url, password)."""
    import redis

    # quotes, '<' and a space: characters that end a URL in free text, all legal in a password
    user, password = f"achihuo-web-{uuid.uuid4().hex[:8]}", f"pw'{uuid.uuid4().hex[:8]}\"<z {uuid.uuid4().hex[:8]}"
    admin = redis.Redis.from_url(redis_url)
    admin.acl_setuser(user, enabled=True, passwords=[f"+{password}"], keys=["*"], channels=["*"],
                      commands=["+@all"])  # fmt: skip
    host_part = redis_url.split("://", 1)[1].rpartition("@")[2]
    yield f"redis://{user}:{password}@{host_part}", password
    admin.acl_deluser(user)
    admin.close()


async def test_the_redis_password_never_leaves_the_server(
    redis_user: tuple[str, str], tmp_path: Path, serve_page: Serve
) -> None:
    url, password = redis_user
    config = write_backend_config(tmp_path / "c.toml", "redis", {"url": url})
    cls = type("Crawled", (Crawled,), {"NAME": f"t-web-{uuid.uuid4().hex[:8]}"})
    loop = cls(config_file=config)
    await crawl(loop)
    try:
        base, _ = await serve_page(loop)
        seen = b""
        for path in ("/", "/static/app.js", "/api/status", "/api/page", "/metrics"):
            status, headers, body = await get(base + path)
            assert status == 200, path
            seen += body + json.dumps(headers).encode()
        for piece in [password, *password.split()]:
            assert piece.encode() not in seen, piece
        assert "***" in json.loads((await get(base + "/api/status"))[2])["queue"]["location"]
    finally:
        async with Store(loop.name, loop.settings) as store:
            await store.clear("all")


async def test_an_unreachable_backend_answers_503_and_the_page_goes_on(tmp_path: Path, serve_page: Serve) -> None:
    server = RedisServer().start()
    try:
        config = write_backend_config(tmp_path / "c.toml", "redis", {"url": server.url, "connect_timeout": 0.5})
        cls = type("Crawled", (Crawled,), {"NAME": f"t-web-{uuid.uuid4().hex[:8]}"})
        loop = cls(config_file=config)
        await crawl(loop)
        base, page = await serve_page(loop)
        server.stop()
        status, _, body = await get(base + "/api/page")
        assert status == 503 and "Redis at" in json.loads(body)["error"]
        await page.sample()  # a sample that cannot be read is left out, not a crash
        status, _, _ = await get(base + "/")
        assert status == 200, "the page itself still loads and says it cannot read the loop"
        server.start()  # empty: this server keeps nothing on disk
        status, _, body = await get(base + "/api/page")
        assert status == 200 and json.loads(body)["status"]["name"] == loop.name, "back without a restart of the page"
    finally:
        server.remove()


# -- the command --------------------------------------------------------------------------------


def test_web_for_a_loop_without_data_creates_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data_dir = Path(os.environ["XDG_DATA_HOME"])
    before = sorted(data_dir.rglob("*"))
    assert main(["web", "no-such-loop", "--bind", "127.0.0.1:0"]) == 1
    err = capsys.readouterr().err
    assert "no data for loop 'no-such-loop'" in err and "achihuo loops" in err
    assert sorted(data_dir.rglob("*")) == before


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--bind", "localhost"], "web --bind: expected HOST:PORT"),
        (["--bind", "127.0.0.1:99999"], "web --bind: expected HOST:PORT with a port from 0 to 65535"),
        (["--token", "short"], "web --token: use at least 8 characters"),
        (["--token", " padded-token "], "printable ASCII without spaces"),
        (["--token", "sécrét-tökén"], "printable ASCII without spaces"),
        (["--interval", "0"], "web --interval: from 0.5 to 3600 s"),
        (["--interval", "inf"], "web --interval: from 0.5 to 3600 s"),
        (["--bind", "127.0.0.1:\uff11\uff18\uff10\uff19\uff10"], "web --bind: expected HOST:PORT"),  # full-width digits
        (["--bind", "192.0.2.1:8080"], "web --bind 192.0.2.1:8080: cannot listen there"),
    ],
)
async def test_bad_web_options_are_clear_errors(
    argv: list[str], message: str, shared: SpiderFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    spiders = shared
    loop = spiders(Crawled)
    await crawl(loop)
    code = await asyncio.to_thread(main, ["web", loop.name, "--config", str(spiders.config), *argv])
    assert code == 1 and message in capsys.readouterr().err


def test_a_taken_port_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    path = tmp_path / "loop.sqlite3"
    config = write_backend_config(tmp_path / "c.toml", "sqlite", {"path": path})
    cls = type("Crawled", (Crawled,), {"NAME": f"t-web-{uuid.uuid4().hex[:8]}"})
    asyncio.run(crawl(cls(config_file=config)))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["web", cls.NAME, "--config", str(config), "--bind", f"127.0.0.1:{port}"]) == 1
    assert f"web --bind 127.0.0.1:{port}: cannot listen there" in capsys.readouterr().err


@pytest.mark.processes
def test_achihuo_web_serves_until_sigterm(tmp_path: Path) -> None:
    config = write_backend_config(tmp_path / "c.toml", "sqlite", {"path": tmp_path / "loop.sqlite3"})
    cls = type("Crawled", (Crawled,), {"NAME": f"t-web-{uuid.uuid4().hex[:8]}"})
    asyncio.run(crawl(cls(config_file=config)))
    port = _free_port()
    with open(tmp_path / "web.log", "wb") as err, subprocess.Popen(
        [sys.executable, "-m", "achihuo_mini", "web", cls.NAME, "--config", str(config), "--bind",
         f"127.0.0.1:{port}"], stdout=subprocess.PIPE, stderr=err, text=True,
    ) as proc:  # fmt: skip
        try:
            assert proc.stdout is not None
            first = proc.stdout.readline()
            assert f"http://127.0.0.1:{port}/ (read-only)" in first, first + (tmp_path / "web.log").read_text()
            status, _, body = asyncio.run(get(f"http://127.0.0.1:{port}/api/status"))
            assert status == 200 and json.loads(body)["done"]["count"] == 5
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
