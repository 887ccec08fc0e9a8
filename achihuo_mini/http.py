"""``async_web_request``: one HTTP request described by an ``Item``, on aiohttp.

Item fields: ``method`` (GET), ``url``, ``headers``, ``params``, ``data``, ``json``,
``cookies``, ``timeout`` (seconds per try), ``proxy``, ``allow_redirects`` (True),
``max_retry`` (total tries, default 3), ``encoding`` (forces the text encoding).

Connection errors, timeouts and 5xx/429 answers are retried with exponential
backoff (``Retry-After`` is honoured, capped at 60 s); a ``check_html(text)`` method
on the loop that returns False rejects a body and retries. After the last try
:class:`~achihuo_mini.errors.RequestError` names the URL and the last error.
"""

from __future__ import annotations

import asyncio
import codecs
import json as jsonlib
import random
import re
import time
from collections.abc import Mapping
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import aiohttp
from multidict import CIMultiDictProxy

from .errors import RequestError

if TYPE_CHECKING:
    from .async_loop import AsyncLoop

__all__ = ["HttpClient", "Response", "decode_body", "request"]

DEFAULT_USER_AGENT = "achihuo_mini/0.1 (+https://pypi.org/project/achihuo_mini/)"
_RETRY_STATUS = frozenset({429, 500, 502, 503, 504, 520, 521, 522, 523, 524})
_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([A-Za-z0-9_.:-]+)""", re.I)
_DETECT_ORDER = ("utf-8", "gb18030", "big5")


def _normalise_encoding(name: str | None) -> str | None:
    if not name:
        return None
    try:
        canonical = codecs.lookup(name.strip().strip("\"'")).name
    except LookupError:
        return None
    # pages labelled gb2312/gbk are routinely gb18030 in practice (a superset)
    return "gb18030" if canonical in ("gb2312", "gbk", "euc_cn") else canonical


def decode_body(content: bytes, header_charset: str | None = None, forced: str | None = None) -> str:
    """Decode a body: forced encoding, then the header charset, then ``<meta>``, then detection."""
    for candidate in (forced, header_charset):
        enc = _normalise_encoding(candidate)
        if enc:
            try:
                return content.decode(enc)
            except UnicodeDecodeError:
                if candidate is forced and forced:
                    return content.decode(enc, errors="replace")
    match = _META_CHARSET.search(content[:4096])
    if match:
        enc = _normalise_encoding(match.group(1).decode("ascii", "ignore"))
        if enc:
            try:
                return content.decode(enc)
            except UnicodeDecodeError:
                pass
    for enc in _DETECT_ORDER:
        try:
            return content.decode(enc)
        except UnicodeDecodeError:
            continue
    return content.decode("utf-8", errors="replace")


class Response:
    """A fetched response: ``status``, ``headers``, ``url`` (after redirects), ``content``,
    ``text`` (decoded lazily) and ``json()``."""

    def __init__(
        self,
        status: int,
        headers: CIMultiDictProxy[str],
        url: str,
        content: bytes,
        charset: str | None,
        encoding: str | None = None,
        history: tuple[str, ...] = (),
    ) -> None:
        self.status = status
        self.headers = headers
        self.url = url
        self.content = content
        self.history = history
        self._charset = charset
        self._encoding = encoding
        self._text: str | None = None

    @property
    def text(self) -> str:
        if self._text is None:
            self._text = decode_body(self.content, self._charset, self._encoding)
        return self._text

    def json(self) -> Any:
        return jsonlib.loads(self.text)

    def __repr__(self) -> str:
        return f"<Response [{self.status}] {self.url}>"


class HttpClient:
    """The loop's shared session, created inside the running event loop on first use."""

    def __init__(self, loop: AsyncLoop) -> None:
        opts = loop.settings.loop
        self.user_agent: str = opts["user_agent"] or DEFAULT_USER_AGENT
        self.timeout: float = opts["request_timeout"]
        self.max_body: int = opts["max_body_size"]
        self.per_host_delay: float = opts["per_host_delay"]
        self._limit = max(loop.concurrency, 1)
        self._per_host: int = opts["per_host_limit"]
        self._host_next: dict[str, float] = {}
        self._host_locks: dict[str, asyncio.Lock] = {}
        self.loop = loop
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self._limit, limit_per_host=self._per_host, ttl_dns_cache=300)
            self._session = aiohttp.ClientSession(
                connector=connector,
                headers={"User-Agent": self.user_agent},
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._session

    async def polite(self, url: str) -> None:
        """Space the starts of requests to one host by ``per_host_delay``."""
        if self.per_host_delay <= 0:
            return
        host = urlsplit(url).hostname or ""
        lock = self._host_locks.setdefault(host, asyncio.Lock())
        async with lock:
            now = time.monotonic()
            wait = self._host_next.get(host, 0.0) - now
            if wait > 0:
                await asyncio.sleep(wait)
            self._host_next[host] = time.monotonic() + self.per_host_delay

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _backoff(try_no: int) -> float:
    return min(30.0, 0.5 * 2.0 ** (try_no - 1)) * random.uniform(0.5, 1.0)


async def _read_limited(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    declared = resp.content_length
    if declared is not None and declared > limit:
        raise _BodyTooLarge(f"body of {declared} bytes exceeds max_body_size ({limit})")
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(65536):
        size += len(chunk)
        if size > limit:
            raise _BodyTooLarge(f"body exceeds max_body_size ({limit} bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


class _BodyTooLarge(Exception):
    pass


class _Rejected(Exception):
    pass


async def request(
    client: HttpClient,
    item: Mapping[str, Any],
    *,
    session: aiohttp.ClientSession | None = None,
    keep_alive: bool | None = None,
    check_html: Any = None,
) -> Response:
    """Perform ``item`` with retries. See the module docstring."""
    url = item.get("url")
    if not isinstance(url, str) or not url:
        raise ValueError(f"async_web_request: item has no url: {item!r}")
    method = str(item.get("method") or "GET").upper()
    tries = item.get("max_retry")
    tries = 3 if tries is None else max(1, int(tries))
    timeout = item.get("timeout")
    timeout = client.timeout if timeout is None else float(timeout)
    checker = check_html if check_html is not None else getattr(client.loop, "check_html", None)
    headers = dict(item.get("headers") or {})
    if keep_alive is False:
        headers.setdefault("Connection", "close")
    kwargs: dict[str, Any] = {
        "headers": headers,
        "params": item.get("params"),
        "data": item.get("data"),
        "json": item.get("json"),
        "cookies": item.get("cookies"),
        "proxy": item.get("proxy"),
        "allow_redirects": True if item.get("allow_redirects") is None else bool(item.get("allow_redirects")),
        "timeout": aiohttp.ClientTimeout(total=timeout),
    }
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    http = session or client.session
    last_error = ""
    for try_no in range(1, tries + 1):
        wait: float | None = None
        await client.polite(url)
        try:
            async with http.request(method, url, **kwargs) as resp:
                if resp.status in _RETRY_STATUS:
                    last_error = f"HTTP {resp.status}"
                    wait = _retry_after(resp.headers.get("Retry-After"))
                    if wait is not None:
                        wait = min(wait, 60.0)
                    raise _Rejected(last_error)
                content = await _read_limited(resp, client.max_body)
                response = Response(
                    resp.status,
                    resp.headers,
                    str(resp.url),
                    content,
                    resp.charset,
                    item.get("encoding"),
                    tuple(str(r.url) for r in resp.history),
                )
            if checker is not None and not checker(response.text):
                last_error = "check_html rejected the body"
                raise _Rejected(last_error)
            return response
        except _BodyTooLarge as exc:
            raise RequestError(url, try_no, str(exc)) from exc
        except _Rejected:
            pass
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            last_error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if try_no < tries:
            await asyncio.sleep(wait if wait is not None else _backoff(try_no))
    raise RequestError(url, tries, last_error)
