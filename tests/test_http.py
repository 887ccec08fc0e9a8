"""async_web_request against a local aiohttp site (tests/http_site): no mocks of aiohttp."""

from __future__ import annotations

import asyncio
import base64
import itertools
import logging
import re
import socket
import sys
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

import achihuo_mini.http as http
from achihuo_mini import AsyncLoop, Item
from achihuo_mini.errors import RequestError
from achihuo_mini.http import HttpClient, decode_body, detect_encoding, mask_secrets, mask_url
from achihuo_mini_backends.memory import drop_namespace

from .http_site import PAGE_TEXTS, Proxy, Site, page_html

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

from demo_site import PAGES, make_app


class Fetcher(AsyncLoop):
    """A loop used for its ``async_web_request`` only."""


MakeLoop = Callable[..., Any]


def client_of(loop: AsyncLoop) -> HttpClient | None:
    """The loop's HTTP client, if it made one (white box: the loop keeps it in its core)."""
    client: HttpClient | None = loop._AsyncLoop__core.http  # type: ignore[attr-defined]
    return client


async def close_http(loop: AsyncLoop) -> None:
    """Close the loop's HTTP client, as serve() does when it ends."""
    core = loop._AsyncLoop__core  # type: ignore[attr-defined]
    http, core.http = core.http, None
    if http is not None:
        await http.close()


@pytest.fixture(autouse=True)
def _fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http, "BACKOFF_BASE", 0.001)
    monkeypatch.setattr(http, "RETRY_AFTER_MAX", 0.2)


@pytest.fixture
async def proxy() -> AsyncIterator[Proxy]:
    p = Proxy()
    await p.start()
    yield p
    await p.stop()


@pytest.fixture
async def make_loop() -> AsyncIterator[MakeLoop]:
    """``make_loop(cls=Fetcher, **options)``: a uniquely named loop on the memory backend."""
    made: list[AsyncLoop] = []

    def make(cls: type[AsyncLoop] = Fetcher, **options: Any) -> Any:
        sub = type(cls.__name__, (cls,), {"NAME": f"t-http-{uuid.uuid4().hex[:8]}"})
        loop = sub(cache_backend="memory", **options)
        made.append(loop)
        return loop

    yield make
    for loop in made:
        await close_http(loop)
        drop_namespace(loop.name)


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A port bound but not listening: connecting to it is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield int(s.getsockname()[1])


# -- Item fields reach the server as sent ------------------------------------------------


async def test_item_fields_reach_the_server(site: Site, make_loop: MakeLoop) -> None:
    loop = make_loop()
    resp = await loop.async_web_request(
        Item(
            method="post",
            url=site.url + "echo?fixed=1",
            headers={"X-Test": "yes", "X-Number": 7, "X-Dropped": None},
            params={"q": "中文 & more", "n": 2, "skip": None},
            data={"a": "1", "b": "二"},
            cookies={"sid": "abc123"},
        )
    )
    echo = resp.json()
    assert resp.status == 200
    assert echo["method"] == "POST"
    assert echo["query"] == [["fixed", "1"], ["q", "中文 & more"], ["n", "2"]]
    assert echo["headers"]["X-Test"] == "yes" and echo["headers"]["X-Number"] == "7"
    assert "X-Dropped" not in echo["headers"]
    assert echo["form"] == {"a": "1", "b": "二"}
    assert echo["cookies"] == {"sid": "abc123"}
    assert echo["headers"]["User-Agent"] == http.DEFAULT_USER_AGENT
    assert echo["headers"]["Accept"] == http.DEFAULT_HEADERS["Accept"]

    resp = await loop.async_web_request(
        Item(
            method="PUT", url=site.url + "echo", json={"k": ["v", 1, None], "中": True}, params=[["a", "1"], ["a", "2"]]
        )
    )
    echo = resp.json()
    assert echo["method"] == "PUT" and echo["content_type"] == "application/json"
    assert echo["json"] == {"k": ["v", 1, None], "中": True}
    assert echo["query"] == [["a", "1"], ["a", "2"]]

    resp = await loop.async_web_request(Item(method="PATCH", url=site.url + "echo", data=b"\x00raw bytes"))
    assert resp.json()["body"] == "\x00raw bytes"
    resp = await loop.async_web_request(Item(method="delete", url=site.url + "echo", data=[["x", "1"], ["x", "2"]]))
    assert resp.json()["method"] == "DELETE" and resp.json()["body"] == "x=1&x=2"
    resp = await loop.async_web_request(Item(method="HEAD", url=site.url + "echo"))
    assert resp.status == 200 and resp.content == b""


async def test_loop_level_defaults_and_spider_headers(site: Site, make_loop: MakeLoop) -> None:
    class WithHeaders(AsyncLoop):
        HTTP_HEADERS = {"Accept-Language": "zh-CN,zh;q=0.9", "Accept": "text/html"}

    loop = make_loop(WithHeaders, user_agent="MyCrawler/2.0")
    echo = (await loop.async_web_request(Item(url=site.url + "echo"))).json()
    assert echo["headers"]["User-Agent"] == "MyCrawler/2.0"
    assert echo["headers"]["Accept-Language"] == "zh-CN,zh;q=0.9"
    assert echo["headers"]["Accept"] == "text/html"
    echo = (await loop.async_web_request(Item(url=site.url + "echo", headers={"User-Agent": "one-off"}))).json()
    assert echo["headers"]["User-Agent"] == "one-off", "the item's headers win"


async def test_proxy_field_and_its_credentials(site: Site, proxy: Proxy, make_loop: MakeLoop) -> None:
    loop = make_loop()
    proxy_url = proxy.url.replace("http://", "http://alice:s3cret@")
    resp = await loop.async_web_request(Item(url="http://crawl.example/a/b?x=1", proxy=proxy_url))
    assert resp.text == "proxied"
    expected_auth = "Basic " + base64.b64encode(b"alice:s3cret").decode()
    assert proxy.seen == [("GET", "http://crawl.example/a/b?x=1", expected_auth)]


async def test_legacy_keywords(site: Site, make_loop: MakeLoop) -> None:
    loop = make_loop()
    async with aiohttp.ClientSession(headers={"X-Own": "session"}) as own:
        resp = await loop.async_web_request(Item(url=site.url + "echo"), session=own)
        assert resp.json()["headers"]["X-Own"] == "session"
        assert not own.closed
    assert client_of(loop) is not None and not client_of(loop).session_open, "the loop's session was not needed"
    echo = (await loop.async_web_request(Item(url=site.url + "echo"), keep_alive=False)).json()
    assert echo["headers"]["Connection"] == "close"
    resp = await loop.async_web_request(Item(url=site.url + "check/legacy?bad=1"), check_html=lambda t: "good" in t)
    assert resp.text == "good page" and site.hits["legacy"] == 2
    with pytest.raises(TypeError, match=r"aiohttp\.ClientSession"):
        await loop.async_web_request(Item(url=site.url + "echo"), session=object())


async def test_response_object(site: Site, make_loop: MakeLoop) -> None:
    loop = make_loop()
    resp = await loop.async_web_request(Item(url=site.url + "cookie"))
    assert resp.status == 200 and resp.reason == "OK"
    assert resp.headers["content-type"].startswith("text/plain")
    assert resp.cookies == {"token": "t0k3n"}
    assert resp.content == b"cookie set" and resp.text == "cookie set" and resp.encoding == "utf-8"
    assert repr(resp) == f"<Response [200] {site.url}cookie>"
    resp = await loop.async_web_request(Item(url=site.url + "echo?x=1"))
    assert resp.json()["query"] == [["x", "1"]]


async def test_bad_items_fail_before_any_request(site: Site, make_loop: MakeLoop) -> None:
    loop = make_loop()
    with pytest.raises(ValueError, match="no url") as err:
        await loop.async_web_request(Item(method="GET", headers={"Authorization": "Bearer TOPSECRET"}))
    assert "TOPSECRET" not in str(err.value), "the message names the item's keys, not its values"
    with pytest.raises(ValueError, match="data or json"):
        await loop.async_web_request(Item(url=site.url + "echo", data="a", json={"b": 1}))
    with pytest.raises(ValueError, match="timeout"):
        await loop.async_web_request(Item(url=site.url + "echo", timeout=0))
    assert site.hits["/echo"] == 0
    with pytest.raises(RequestError, match=re.escape("ftp://example.com/")):
        await loop.async_web_request(Item(url="ftp://example.com/"))


# -- retries -----------------------------------------------------------------------------


@pytest.mark.parametrize("code", [500, 502, 503, 504, 429, 408])
async def test_retryable_statuses_are_retried(site: Site, make_loop: MakeLoop, code: int) -> None:
    loop = make_loop()
    resp = await loop.async_web_request(Item(url=site.url + f"status/k?code={code}&fail=2", max_retry=3))
    assert resp.status == 200 and resp.text == "ok"
    assert site.hits["k"] == 3


@pytest.mark.parametrize("code", [404, 403, 400, 501])
async def test_other_statuses_are_answers(site: Site, make_loop: MakeLoop, code: int) -> None:
    loop = make_loop()
    resp = await loop.async_web_request(Item(url=site.url + f"status/k?code={code}", max_retry=3))
    assert resp.status == code and resp.text == "failing"
    assert site.hits["k"] == 1


async def test_gives_up_after_max_retry_tries(site: Site, make_loop: MakeLoop) -> None:
    loop = make_loop()
    url = site.url + "status/always?code=500"
    with pytest.raises(RequestError) as err:
        await loop.async_web_request(Item(url=url, max_retry=4))
    assert site.hits["always"] == 4
    assert err.value.url == url and err.value.tries == 4
    assert str(err.value) == f"{url}: gave up after 4 tries: HTTP 500 Internal Server Error"
    # the seed's defaults: no max_retry means 3 tries; 0 or 1 means one
    with pytest.raises(RequestError):
        await loop.async_web_request(Item(url=site.url + "status/default?code=503"))
    assert site.hits["default"] == http.DEFAULT_TRIES == 3
    with pytest.raises(RequestError, match="after 1 try:"):
        await loop.async_web_request(Item(url=site.url + "status/once?code=503", max_retry=0))
    assert site.hits["once"] == 1


async def test_retry_after_is_honoured_and_capped(site: Site, make_loop: MakeLoop) -> None:
    loop = make_loop()
    # the server asks for 30 s; RETRY_AFTER_MAX is 0.2 s in these tests, the backoff ~1 ms
    resp = await loop.async_web_request(Item(url=site.url + "status/ra?code=429&fail=1&retry_after=30"))
    assert resp.status == 200 and site.hits["ra"] == 2
    gap = site.times["ra"][1] - site.times["ra"][0]
    assert 0.19 <= gap < 5, f"waited {gap:.3f} s between tries"


def test_retry_after_values() -> None:
    assert http._retry_after("0.1") == pytest.approx(0.1)
    assert http._retry_after("-5") == 0.0
    assert http._retry_after("3600") == http.RETRY_AFTER_MAX
    assert http._retry_after("soon") is None and http._retry_after(None) is None
    in_a_while = format_datetime(datetime.now(UTC) + timedelta(seconds=100), usegmt=True)
    assert http._retry_after(in_a_while) == http.RETRY_AFTER_MAX
    long_ago = format_datetime(datetime.now(UTC) - timedelta(days=1), usegmt=True)
    assert http._retry_after(long_ago) == 0.0


async def test_connection_resets_are_retried(site: Site, make_loop: MakeLoop) -> None:
    loop = make_loop()
    resp = await loop.async_web_request(Item(url=site.url + "reset/r?fail=2", max_retry=3))
    assert resp.text == "ok" and site.hits["r"] == 3
    with pytest.raises(RequestError, match="ServerDisconnectedError") as err:
        await loop.async_web_request(Item(url=site.url + "reset/dead", max_retry=2))
    assert site.hits["dead"] == 2, "one try is one request: aiohttp's own silent resend is off"
    assert err.value.tries == 2


async def test_connection_refused_is_retried(make_loop: MakeLoop, refused_port: int) -> None:
    loop = make_loop()
    url = f"http://127.0.0.1:{refused_port}/x"
    with pytest.raises(RequestError, match=re.escape(url) + ".*after 2 tries: ClientConnectorError"):
        await loop.async_web_request(Item(url=url, max_retry=2))


async def test_check_html_rejects_and_retries(site: Site, make_loop: MakeLoop) -> None:
    class Picky(AsyncLoop):
        def check_html(self, text: str) -> bool:
            return "good" in text

    loop = make_loop(Picky)
    resp = await loop.async_web_request(Item(url=site.url + "check/c?bad=2", max_retry=3))
    assert resp.text == "good page" and site.hits["c"] == 3
    with pytest.raises(RequestError, match="check_html rejected the body") as err:
        await loop.async_web_request(Item(url=site.url + "check/never", max_retry=2))
    assert site.hits["never"] == 2 and err.value.tries == 2

    class AsyncPicky(AsyncLoop):
        async def check_html(self, text: str) -> bool:
            return "good" in text

    loop = make_loop(AsyncPicky)
    resp = await loop.async_web_request(Item(url=site.url + "check/a?bad=1", max_retry=2))
    assert resp.text == "good page" and site.hits["a"] == 2


async def test_redirects(site: Site, make_loop: MakeLoop) -> None:
    loop = make_loop()
    resp = await loop.async_web_request(Item(url=site.url + "redirect"))
    assert resp.status == 200 and resp.url == site.url + "echo?from=redirect"
    assert resp.history == (site.url + "redirect",)
    resp = await loop.async_web_request(Item(url=site.url + "redirect", allow_redirects=False))
    assert resp.status == 302 and resp.headers["Location"] == "/echo?from=redirect"
    assert resp.url == site.url + "redirect" and site.hits["/echo"] == 1
    with pytest.raises(RequestError, match="TooManyRedirects"):
        await loop.async_web_request(Item(url=site.url + "redirect-loop", max_retry=3))
    assert site.hits["/redirect-loop"] <= 11, "a redirect loop is not retried (aiohttp follows 10)"


async def test_timeouts(site: Site, make_loop: MakeLoop) -> None:
    loop = make_loop()
    started = time.monotonic()
    with pytest.raises(RequestError, match=r"TimeoutError: no complete answer within 0\.2 s") as err:
        await loop.async_web_request(Item(url=site.url + "slow/item", timeout=0.2, max_retry=2))
    assert site.hits["item"] == 2 and err.value.tries == 2
    assert 0.4 <= time.monotonic() - started < 3
    loop = make_loop(request_timeout=0.1)
    with pytest.raises(RequestError, match=r"within 0\.1 s"):
        await loop.async_web_request(Item(url=site.url + "slow/loop", max_retry=1))
    assert site.hits["loop"] == 1


# -- body size ---------------------------------------------------------------------------


async def test_body_size_limit(site: Site, make_loop: MakeLoop) -> None:
    loop = make_loop(max_body_size=10_000)
    resp = await loop.async_web_request(Item(url=site.url + "big?size=10000"))
    assert len(resp.content) == 10_000
    with pytest.raises(RequestError, match=r"body of 10001 bytes exceeds max_body_size \(10000 bytes\)") as err:
        await loop.async_web_request(Item(url=site.url + "big?size=10001", max_retry=3))
    assert err.value.tries == 1 and site.hits["/big"] == 2, "a body too large is not retried"
    # chunked, no Content-Length: the client stops reading and hangs up
    with pytest.raises(RequestError, match=r"exceeds max_body_size \(10000 bytes\)"):
        await loop.async_web_request(Item(url=site.url + "stream?size=100000000", max_retry=3))
    assert site.hits["/stream"] == 1
    assert site.streamed < 100_000_000 // 10, f"the server sent {site.streamed} bytes before the client hung up"
    # 1 MB of zeros gzipped is ~1 KB on the wire: the limit counts decompressed bytes
    with pytest.raises(RequestError, match="exceeds max_body_size"):
        await loop.async_web_request(Item(url=site.url + "gzip?size=1000000"))
    resp = await loop.async_web_request(Item(url=site.url + "gzip?size=5000"))
    assert resp.content == b"\0" * 5000


# -- politeness --------------------------------------------------------------------------


async def test_per_host_limit_holds_for_concurrent_requests(site: Site, make_loop: MakeLoop) -> None:
    loop = make_loop(concurrency=50, per_host_limit=3)
    port = site.url.split(":")[2].rstrip("/")
    urls = [f"http://127.0.0.1:{port}/limited/a?expect=3"] * 25 + [f"http://localhost:{port}/limited/b?expect=3"] * 25
    answers = await asyncio.gather(*(loop.async_web_request(Item(url=url)) for url in urls))
    assert [a.text for a in answers] == ["done"] * 50
    assert site.peak[f"127.0.0.1:{port}"] == 3, "the limit was reached, never passed"
    assert site.peak[f"localhost:{port}"] == 3, "each host has its own limit"
    assert client_of(loop)._hosts == {}, "idle per-host state is dropped"


async def test_without_a_limit_requests_overlap(site: Site, make_loop: MakeLoop) -> None:
    loop = make_loop(concurrency=50)
    await asyncio.gather(*(loop.async_web_request(Item(url=site.url + "limited/u?expect=20")) for _ in range(20)))
    assert site.peak[site.url[7:].rstrip("/")] == 20, "the measurement would catch a broken limit"


async def test_a_backoff_does_not_hold_the_host_slot(site: Site, make_loop: MakeLoop) -> None:
    loop = make_loop(per_host_limit=1)
    slow_retry = asyncio.ensure_future(
        loop.async_web_request(Item(url=site.url + "status/wait?code=503&fail=1&retry_after=60"))
    )
    await site.wait_hits("wait", 1)  # the first try is answered: it then waits 0.2 s (capped)
    other = await loop.async_web_request(Item(url=site.url + "limited/other"))
    assert other.text == "done" and site.hits["wait"] == 1, "the other request went while the first backed off"
    assert (await slow_retry).text == "ok" and site.hits["wait"] == 2


async def test_per_host_delay_spaces_request_starts(site: Site, make_loop: MakeLoop) -> None:
    loop = make_loop(concurrency=50, per_host_delay=0.05)
    await asyncio.gather(*(loop.async_web_request(Item(url=site.url + "limited/d")) for _ in range(5)))
    (arrivals,) = site.arrivals.values()
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert len(arrivals) == 5 and min(gaps) >= 0.04, f"gaps between starts: {gaps}"


# -- decoding ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["header", "none", "meta", "http-equiv"])
@pytest.mark.parametrize("encoding", ["gbk", "gb18030", "big5", "utf-8"])
async def test_pages_decode_to_the_same_text(site: Site, make_loop: MakeLoop, encoding: str, mode: str) -> None:
    loop = make_loop()
    resp = await loop.async_web_request(Item(url=site.url + f"page/{encoding}/{mode}"))
    assert resp.text == page_html(encoding, mode)
    assert PAGE_TEXTS[encoding] in resp.text


async def test_item_encoding_forces_the_codec(site: Site, make_loop: MakeLoop) -> None:
    loop = make_loop()
    resp = await loop.async_web_request(Item(url=site.url + "page/big5/header", encoding="big5"))
    assert resp.text == page_html("big5", "header") and resp.encoding == "big5hkscs"
    resp = await loop.async_web_request(Item(url=site.url + "page/gbk/header", encoding="latin-1"))
    assert resp.encoding == "cp1252" and "今天" not in resp.text, "a forced encoding is obeyed, even a wrong one"


async def test_an_encoding_that_is_not_a_label_is_ignored(site: Site, make_loop: MakeLoop) -> None:
    loop = make_loop()
    for junk in (123, ["gbk"], {"a": 1}, b"gbk"):  # an item is the caller's data: detection decides
        resp = await loop.async_web_request(Item(url=site.url + "page/gbk/meta", encoding=junk))
        assert resp.text == page_html("gbk", "meta") and resp.encoding == "gb18030", junk


def test_labels_are_looked_up_once_and_the_meta_rule_still_applies() -> None:
    # the label lookup is cached: the same label from a header and from a <meta> still differ
    utf16_meta = b'<meta charset="utf-16"><p>caf\xc3\xa9</p>'
    for _ in range(3):
        assert decode_body(utf16_meta) == '<meta charset="utf-16"><p>caf\u00e9</p>', "a meta utf-16 is utf-8"
        assert decode_body("café".encode("utf-16-le"), "utf-16") == "café", "a header's utf-16 is utf-16"
    assert detect_encoding(b"plain", " UTF-8 ") == "utf-8" and detect_encoding(b"plain", "no-such") == "utf-8"


def test_decoding_rules() -> None:
    gbk_page = page_html("gbk", "meta").encode("gbk")
    assert decode_body(gbk_page, "utf-8") == page_html("gbk", "meta"), "a header that does not decode loses to meta"
    gbk_bare = page_html("gbk", "none").encode("gbk")
    assert decode_body(gbk_bare, "iso-8859-1") == page_html("gbk", "none"), "Latin-1 labels are only a guess"
    assert detect_encoding(gbk_bare, "gb2312") == "gb18030"
    truncated = gbk_bare[:-3] + "中".encode("gbk")[:1]
    assert detect_encoding(truncated, "gbk") == "gb18030", "one broken character keeps the declaration"
    assert decode_body(truncated, "gbk").endswith("</htm\ufffd")
    assert decode_body(b"\xef\xbb\xbf\xe4\xb8\xad", "gbk") == "中", "a byte-order mark wins"
    assert decode_body("café crème, Größe".encode("cp1252")) == "café crème, Größe"
    assert decode_body("café".encode()) == "café"
    assert decode_body(b'<?xml version="1.0" encoding="big5"?><a>' + "繁體".encode("big5") + b"</a>").endswith(
        "繁體</a>"
    )
    assert decode_body("中文".encode("gbk"), forced="nonsense-codec") == "中文", "an unknown forced name is ignored"
    assert decode_body(b"abc", "base64") == "abc", "a non-text codec is no charset"
    assert decode_body(b"") == ""


def test_big5_and_gbk_are_told_apart() -> None:
    # traditional text exists in GBK too; bytes of both are valid in either codec
    traditional = PAGE_TEXTS["big5"]
    assert detect_encoding(traditional.encode("big5")) == "big5hkscs"
    assert detect_encoding(traditional.encode("gbk")) == "gb18030"
    assert decode_body(traditional.encode("gbk")) == traditional
    for sentence in ("這是一個測試網頁。", "歡迎光臨我們的網站", "新聞與資訊"):
        assert decode_body(sentence.encode("big5")) == sentence
        assert decode_body(sentence.encode("gbk")) == sentence
    for sentence in ("这是一个测试网页。", "欢迎光临我们的网站", "新闻与资讯"):
        assert decode_body(sentence.encode("gbk")) == sentence


# -- secrets -----------------------------------------------------------------------------


def test_masking() -> None:
    assert mask_url("http://alice:s3cret@proxy:3128/") == "http://alice:***@proxy:3128/"
    assert mask_url("https://tok3n@example.com/x?y=1") == "https://***@example.com/x?y=1"
    assert mask_url("http://u:p@ss@h/") == "http://u:***@h/"
    assert mask_url("http://example.com/a@b") == "http://example.com/a@b"
    text = "url='http://u:pw@h/x', headers={'Cookie': 'sid=abc; k=v', 'Authorization': 'Bearer xyz'}"
    masked = mask_secrets(text)
    assert "pw" not in masked and "sid=abc" not in masked and "xyz" not in masked
    assert "http://u:***@h/x" in masked


async def test_errors_and_logs_mask_credentials(
    site: Site, make_loop: MakeLoop, refused_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    loop = make_loop()
    secrets = ("s3cret", "hunter2", "TOPSECRET", "SIDVALUE")
    failures: list[RequestError] = []
    for item in (
        Item(url="http://crawl.example/", proxy=f"http://alice:s3cret@127.0.0.1:{refused_port}", max_retry=2),
        Item(url=site.url.replace("http://", "http://bob:hunter2@") + "status/s?code=500", max_retry=2),
        Item(
            url=site.url + "reset/h",
            headers={"Authorization": "Bearer TOPSECRET"},
            cookies={"sid": "SIDVALUE"},
            max_retry=2,
        ),
    ):
        with pytest.raises(RequestError) as err:
            await loop.async_web_request(item)
        failures.append(err.value)
    assert "alice" in str(failures[0]) or "127.0.0.1" in str(failures[0])
    assert "bob:***@127.0.0.1" in str(failures[1]) and failures[1].url.startswith("http://bob:***@")
    for failure in failures:
        shown = "".join(traceback.format_exception(failure))
        assert not any(s in shown for s in secrets), shown
    assert caplog.records, "retries are logged"
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert not any(s in logged for s in secrets), logged


# -- session life ------------------------------------------------------------------------


async def test_one_session_per_loop_sized_to_concurrency(site: Site, make_loop: MakeLoop) -> None:
    loop = make_loop(concurrency=7)
    assert client_of(loop) is None, "nothing is created before the first request"
    await loop.async_web_request(Item(url=site.url + "echo"))
    client = client_of(loop)
    assert client is not None
    session = client._session
    assert session is not None and session.connector is not None and session.connector.limit == 7
    assert client._session_loop is asyncio.get_running_loop()
    await asyncio.gather(*(loop.async_web_request(Item(url=site.url + "echo")) for _ in range(10)))
    assert client_of(loop) is client and client._session is session, "one session for every request"
    await close_http(loop)
    assert session.closed and client_of(loop) is None
    await loop.async_web_request(Item(url=site.url + "echo"))
    again = client_of(loop)
    assert again is not None and again._session is not session, "a new session after a close"


class Crawler(AsyncLoop):
    """The seed README's spider, crawling every page of the demo site."""

    START = ""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.titles: dict[str, str] = {}
        self.sessions: set[int] = set()
        self.session: Any = None

    async def run(self) -> None:
        self.add_task("get_page", Item(method="GET", url=self.START), task_name=self.START, repeat=False)

    async def get_page(self, item: Item) -> None:
        resp = await self.async_web_request(item)
        self.session = client_of(self)._session
        self.sessions.add(id(self.session))
        match = re.search(r"<h1>(.+?)</h1>", resp.text)
        assert match is not None
        self.titles[item.url] = match.group(1)
        for path in re.findall(r'<a href="(/t/\d+)">', resp.text):
            url = self.START.rstrip("/") + path
            self.add_task("get_page", Item(method="GET", url=url), task_name=url, repeat=False)
        self.task_done(item.url)


async def test_serve_crawls_a_site_once_and_closes_the_session(make_loop: MakeLoop) -> None:
    hits: dict[str, int] = {}

    @web.middleware
    async def count(request: web.Request, handler: Any) -> web.StreamResponse:
        hits[request.path] = hits.get(request.path, 0) + 1
        return await handler(request)  # type: ignore[no-any-return]

    app = make_app()
    app.middlewares.append(count)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        start = f"http://127.0.0.1:{runner.addresses[0][1]}/"
        Crawler.START = start
        loop = make_loop(Crawler, concurrency=10, per_host_limit=4, progress_interval=0)
        summary = await loop.serve(idle_exit=0)
    finally:
        await runner.cleanup()
    topics = {f"/t/{n}" for n in range(PAGES)}
    assert hits == dict.fromkeys({"/", *topics}, 1), "every page fetched exactly once"
    assert summary.succeeded == PAGES + 1 and summary.failed == 0
    assert loop.titles[start] == "Index"
    for n in range(PAGES):
        assert loop.titles[f"{start}t/{n}"] == f"话题 {n}", "GBK pages (every third) decode too"
    assert len(loop.sessions) == 1, "one session for the whole crawl"
    assert loop.session.closed and client_of(loop) is None, "the session is closed when the loop stops"
