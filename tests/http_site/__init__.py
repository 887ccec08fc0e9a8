# ruff: noqa: RUF001  (Chinese text has fullwidth punctuation)
"""A local aiohttp site for the HTTP tests: it records what reaches it and misbehaves on request.

Routes (``{key}`` names a hit counter, so each test counts its own requests):

- ``* /echo``: the request as JSON (method, query, headers, cookies, body, form, json)
- ``/status/{key}?code=503&fail=N&retry_after=S``: ``code`` for the first N hits (all if no
  ``fail``), then 200
- ``/reset/{key}?fail=N``: closes the connection without an answer for the first N hits
- ``/check/{key}?bad=N``: ``bad page`` for the first N hits, then ``good page``
- ``/slow/{key}``: answers only when the test ends (:attr:`Site.release`)
- ``/big?size=N``, ``/stream?size=N`` (chunked), ``/gzip?size=N`` (N bytes once decompressed)
- ``/redirect`` (302 to ``/echo?from=redirect``), ``/redirect-loop``
- ``/page/{encoding}/{mode}``: :func:`page_html` encoded; ``mode`` is ``header`` (charset in
  Content-Type), ``none`` (no declaration), ``meta`` or ``http-equiv`` (declared in the page only)
- ``/limited/{key}?expect=N``: takes 20 ms of simulated work; with ``expect``, the first
  requests also wait (2 s at most) until N are in flight at once, so the peak is reached
  for sure. The peak of concurrent requests per Host header is in :attr:`Site.peak`,
  arrival times in :attr:`Site.arrivals`
- ``/cookie``: sets a cookie
- ``/robots.txt``: :attr:`Site.robots_txt` (404 when None); the first :attr:`Site.robots_fail` hits
  answer :attr:`Site.robots_fail_code` instead (0: the connection is closed without an answer).
  Hits are counted under ``robots.txt``
- ``/site/{path}``: a small page; every hit is recorded in :attr:`Site.pages` as
  ``(arrival time, path, X-Worker header)``; ``/site/hold/...`` answers only at :attr:`Site.release`

:class:`Proxy` is a forward proxy stand-in: it records the absolute URI of each request and
its ``Proxy-Authorization`` header, and answers ``proxied`` itself.
"""

from __future__ import annotations

import asyncio
import gzip
import time
from collections import Counter, defaultdict
from typing import Any

from aiohttp import web

__all__ = ["PAGE_TEXTS", "Proxy", "Site", "page_html"]

PAGE_TEXTS: dict[str, str] = {
    "gbk": (
        "今天天气很好，我们一起去公园散步。这个网站提供最新的新闻和资讯，欢迎大家阅读并留下宝贵的意见。"
        "北京、上海和广州是中国最大的城市，每年都有很多人来这里工作和学习。"
    ),
    "gb18030": (
        "今天天气很好，我们一起去公园散步。这个网站提供最新的新闻和资讯，欢迎大家阅读。"
        "表情符号😀与扩展汉字𠀀𪚥，以及藏文ཀ和蒙古文ᠮ都只有四字节编码。"
    ),
    "big5": (
        "今天天氣很好，我們一起去公園散步。這個網站提供最新的新聞和資訊，歡迎大家閱讀並留下寶貴的意見。"
        "臺北、高雄和臺中是臺灣最大的城市，每年都有很多人來這裡工作和學習。"
    ),
    "utf-8": "简体与繁體：我们的網站 😀 — café, Größe, ελληνικά, русский.",
}


def page_html(encoding: str, mode: str) -> str:
    """The page ``/page/{encoding}/{mode}`` serves, as text."""
    declaration = {
        "meta": f'<meta charset="{encoding}">',
        "http-equiv": f'<meta http-equiv="Content-Type" content="text/html; charset={encoding}">',
    }.get(mode, "")
    text = PAGE_TEXTS[encoding]
    return (
        f"<!DOCTYPE html>\n<html><head>{declaration}<title>{text[:6]}</title></head>\n"
        f"<body><h1>{text[:6]}</h1><p>{text}</p></body></html>\n"
    )


class Site:
    """The test site and what it saw."""

    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()
        self.times: defaultdict[str, list[float]] = defaultdict(list)
        self.active: Counter[str] = Counter()
        self.peak: Counter[str] = Counter()
        self.arrivals: defaultdict[str, list[float]] = defaultdict(list)
        self.filled: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self.streamed = 0
        self.release = asyncio.Event()
        self.robots_txt: str | None = None
        self.robots_fail = 0
        self.robots_fail_code = 503
        self.pages: list[tuple[float, str, str]] = []
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._hit_event = asyncio.Event()

    def _hit(self, request: web.Request) -> int:
        key = request.match_info.get("key", request.path)
        self.hits[key] += 1
        self.times[key].append(time.monotonic())
        event, self._hit_event = self._hit_event, asyncio.Event()
        event.set()
        return self.hits[key]

    async def wait_hits(self, key: str, n: int, timeout: float = 5.0) -> None:
        """Return once ``key`` has had ``n`` hits (TimeoutError after ``timeout`` seconds)."""
        async with asyncio.timeout(timeout):
            while self.hits[key] < n:
                await self._hit_event.wait()

    async def echo(self, request: web.Request) -> web.Response:
        self._hit(request)
        body = await request.read()
        form: dict[str, str] | None = None
        if request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
            form = {k: str(v) for k, v in (await request.post()).items()}
        parsed: Any = None
        if request.content_type == "application/json":
            parsed = await request.json()
        return web.json_response(
            {
                "method": request.method,
                "path": request.path,
                "query": [[k, v] for k, v in request.query.items()],
                "headers": dict(request.headers),
                "cookies": dict(request.cookies),
                "body": body.decode("utf-8", "replace"),
                "content_type": request.content_type,
                "form": form,
                "json": parsed,
            }
        )

    async def status(self, request: web.Request) -> web.Response:
        n = self._hit(request)
        fail = int(request.query.get("fail", 10**9))
        if n > fail:
            return web.Response(text="ok")
        headers = {}
        if "retry_after" in request.query:
            headers["Retry-After"] = request.query["retry_after"]
        return web.Response(status=int(request.query.get("code", 503)), text="failing", headers=headers)

    async def reset(self, request: web.Request) -> web.StreamResponse:
        n = self._hit(request)
        if n <= int(request.query.get("fail", 10**9)):
            assert request.transport is not None
            request.transport.close()
        return web.Response(text="ok")

    async def check(self, request: web.Request) -> web.Response:
        n = self._hit(request)
        bad = n <= int(request.query.get("bad", 10**9))
        return web.Response(text="bad page" if bad else "good page", content_type="text/html")

    async def slow(self, request: web.Request) -> web.Response:
        self._hit(request)
        await self.release.wait()
        return web.Response(text="late")

    async def big(self, request: web.Request) -> web.Response:
        self._hit(request)
        return web.Response(body=b"x" * int(request.query["size"]))

    async def stream(self, request: web.Request) -> web.StreamResponse:
        self._hit(request)
        size = int(request.query["size"])
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        chunk = b"y" * 4096
        try:
            while self.streamed < size:
                await resp.write(chunk)
                self.streamed += len(chunk)
            await resp.write_eof()
        except (ConnectionError, RuntimeError):
            pass  # the client hung up, as it should
        return resp

    async def gzipped(self, request: web.Request) -> web.Response:
        self._hit(request)
        body = gzip.compress(b"\0" * int(request.query["size"]))
        return web.Response(body=body, headers={"Content-Encoding": "gzip"})

    async def redirect(self, request: web.Request) -> web.Response:
        self._hit(request)
        raise web.HTTPFound("/echo?from=redirect")

    async def redirect_loop(self, request: web.Request) -> web.Response:
        self._hit(request)
        raise web.HTTPFound("/redirect-loop")

    async def page(self, request: web.Request) -> web.Response:
        self._hit(request)
        encoding, mode = request.match_info["encoding"], request.match_info["mode"]
        body = page_html(encoding, mode).encode(encoding)
        if mode == "header":
            return web.Response(body=body, content_type="text/html", charset=encoding)
        return web.Response(body=body, headers={"Content-Type": "text/html"})

    async def limited(self, request: web.Request) -> web.Response:
        self._hit(request)
        host = request.host
        self.arrivals[host].append(time.monotonic())
        self.active[host] += 1
        self.peak[host] = max(self.peak[host], self.active[host])
        expect = int(request.query.get("expect", 0))
        try:
            if expect:
                if self.active[host] >= expect:
                    self.filled[host].set()
                await asyncio.wait_for(self.filled[host].wait(), 2.0)
            await asyncio.sleep(0.02)  # simulated work, so that requests would overlap
        finally:
            self.active[host] -= 1
        return web.Response(text="done")

    async def robots(self, request: web.Request) -> web.StreamResponse:
        n = self._hit(request)  # counted as "/robots.txt"
        if n <= self.robots_fail:
            if self.robots_fail_code == 0:
                assert request.transport is not None
                request.transport.close()
                return web.Response(text="")
            return web.Response(status=self.robots_fail_code, text="unavailable")
        if self.robots_txt is None:
            return web.Response(status=404, text="no robots.txt here")
        return web.Response(text=self.robots_txt, content_type="text/plain")

    async def site_page(self, request: web.Request) -> web.Response:
        self.pages.append((time.monotonic(), request.path, request.headers.get("X-Worker", "")))
        self._hit(request)
        if request.path.startswith("/site/hold/"):
            await self.release.wait()
        return web.Response(text=f"<html><body><h1>{request.path}</h1></body></html>", content_type="text/html")

    async def cookie(self, request: web.Request) -> web.Response:
        self._hit(request)
        resp = web.Response(text="cookie set")
        resp.set_cookie("token", "t0k3n")
        return resp

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/echo", self.echo)
        app.router.add_get("/status/{key}", self.status)
        app.router.add_get("/reset/{key}", self.reset)
        app.router.add_get("/check/{key}", self.check)
        app.router.add_get("/slow/{key}", self.slow)
        app.router.add_get("/big", self.big)
        app.router.add_get("/stream", self.stream)
        app.router.add_get("/gzip", self.gzipped)
        app.router.add_get("/redirect", self.redirect)
        app.router.add_get("/redirect-loop", self.redirect_loop)
        app.router.add_get("/page/{encoding}/{mode}", self.page)
        app.router.add_get("/limited/{key}", self.limited)
        app.router.add_get("/cookie", self.cookie)
        app.router.add_get("/robots.txt", self.robots)
        app.router.add_get("/site/{tail:.*}", self.site_page)
        return app

    async def start(self) -> str:
        """Serve on 127.0.0.1 (a free port); return the base URL, ending in ``/``."""
        self._runner = await _start(self.app())
        self.url = _base_url(self._runner)
        return self.url

    async def stop(self) -> None:
        """Let slow handlers answer, then stop."""
        self.release.set()
        if self._runner is not None:
            await self._runner.cleanup()


class Proxy:
    """A forward-proxy stand-in that records ``(method, absolute URI, Proxy-Authorization)``."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str | None]] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append((request.method, request.raw_path, request.headers.get("Proxy-Authorization")))
        return web.Response(text="proxied")

    async def start(self) -> str:
        """Serve on 127.0.0.1; return ``http://127.0.0.1:PORT``."""
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self._runner = await _start(app)
        self.url = _base_url(self._runner).rstrip("/")
        return self.url

    async def stop(self) -> None:
        """Stop serving."""
        if self._runner is not None:
            await self._runner.cleanup()


async def _start(app: web.Application) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner


def _base_url(runner: web.AppRunner) -> str:
    for addr in runner.addresses:
        return f"http://127.0.0.1:{addr[1]}/"
    raise RuntimeError("the site is not listening")
