"""``async_web_request``: one HTTP request described by an ``Item``, on aiohttp.

Item fields (missing ones read as ``None`` and take the default):

``method``            ``'GET'``; any case
``url``               required
``headers``           dict (or list of pairs); merged over the loop's default headers
``params``            dict or list of pairs, added to the query (``None`` values are dropped)
``data``              form fields (dict or list of pairs) or a str/bytes body
``json``              a JSON body (not together with ``data``)
``cookies``           dict, sent with this request only (the session keeps no cookie jar)
``timeout``           seconds for one try, connect to last body byte (default: the
                      ``request_timeout`` loop option, 30 s)
``proxy``             ``http://user:password@host:port``; credentials are masked in errors and logs
``allow_redirects``   True; with False a 3xx comes back as the response
``max_retry``         total tries, as in the seed's code (default: the ``request_tries`` loop
                      option, 3; 0 or 1: one try)
``encoding``          forces the encoding of ``Response.text``

One :class:`aiohttp.ClientSession` per loop, created inside the running event loop on the
first request, its connection pool sized to the loop's ``concurrency``, closed when the loop
stops. It sends ``User-Agent`` (the ``user_agent`` loop option) and ``Accept``; a spider
class may add defaults of its own in an ``HTTP_HEADERS`` dict class attribute. It keeps no
cookies between requests (tasks never see each other's); a caller that wants a cookie jar
passes its own session (the seed-era ``session=`` keyword; then that session's defaults
apply, and it stays open). One try is one request: aiohttp's silent resend of an
idempotent request on a dropped connection is turned off, our retries do that.

Retries: connection errors, timeouts, truncated bodies and 408/429/5xx answers (not 501)
are retried with exponential backoff and jitter (:data:`BACKOFF_BASE` doubling, capped at
:data:`BACKOFF_MAX`); a ``Retry-After`` header replaces the backoff, capped at
:data:`RETRY_AFTER_MAX`. A ``check_html(text)`` method on the loop (or the seed-era
``check_html=`` keyword) that returns a false value rejects a body: that try failed too.
When the last try fails, :class:`~achihuo_mini.errors.RequestError` names the URL and the
last error; the task then fails, so the loop's task retries and dead letters apply. The two
budgets multiply: a URL that always fails is requested ``max_retry`` x (``max_retries`` + 1)
times (3 x 4 = 12 with the defaults). ``request_tries = 1`` makes each attempt one request,
so that ``max_retries`` alone bounds the total (``max_retries`` + 1 requests, spaced by the
task backoff). A request no try can send -- no URL, a URL that does not parse or is not
http(s), a redirect loop, a certificate error, a body over ``max_body_size`` -- raises
:class:`~achihuo_mini.errors.InvalidRequest` at once, and its task becomes a dead letter at
once (it is a :class:`~achihuo_mini.errors.Reject`).

Politeness: the ``per_host_limit`` loop option caps the requests in flight to one host name
(the item URL's; redirects stay in its slot); ``per_host_delay`` spaces the starts of
requests to one host (a larger ``Crawl-delay`` of its robots.txt wins, with
``obey_robots``). Both hold one try (request and body), never a backoff sleep. While the
loop serves on a queue with the ``HostSlots`` ability they hold for the whole loop, across
every worker (see :mod:`achihuo_mini._hosts`); otherwise, and with ``per_host_scope =
"process"``, within this process.

robots.txt: with ``obey_robots``, a URL its site's robots.txt disallows for the loop's
user agent raises :class:`~achihuo_mini.errors.RobotsDisallowed` before any request
(see :mod:`achihuo_mini._robots` for fetching, caching and failures).

Bodies are streamed and counted: a body over the ``max_body_size`` loop option (0: no
limit) fails at once, whether or not it declares its length, and also after decompression.

Secrets: user info in URLs (proxy passwords), and ``Cookie``/``Authorization`` values, are
masked in every error message and log line this module writes (:func:`mask_secrets`).

``Response.text`` is decoded lazily: ``item.encoding``, else a byte-order mark, else the
``Content-Type`` charset, else a ``<meta charset>`` / ``http-equiv`` / XML declaration, else
detection (:func:`decode_body`). Labels map as browsers map them: GB2312/GBK to GB18030,
Big5 to Big5-HKSCS, ISO-8859-1/ASCII to windows-1252.
"""

from __future__ import annotations

import asyncio
import inspect
import json as jsonlib
import logging
import random
import time
import traceback
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import aiohttp
from multidict import CIMultiDictProxy

from ._charsets import decode as _decode
from ._charsets import decode_body, detect_encoding
from ._robots import ROBOTS_MAX_BYTES, Robots
from ._stats import Stats
from .errors import InvalidRequest, RequestError
from .masking import mask_secrets, mask_url

if TYPE_CHECKING:
    from ._hosts import LoopHosts

__all__ = [
    "BACKOFF_BASE",
    "BACKOFF_MAX",
    "DEFAULT_HEADERS",
    "DEFAULT_TRIES",
    "DEFAULT_USER_AGENT",
    "RETRY_AFTER_MAX",
    "HttpClient",
    "Response",
    "decode_body",
    "detect_encoding",
    "mask_secrets",
    "mask_url",
    "request",
]

log = logging.getLogger("achihuo_mini.http")

DEFAULT_USER_AGENT = "achihuo_mini/0.1 (+https://pypi.org/project/achihuo_mini/)"
"""``User-Agent`` when the ``user_agent`` loop option is not set."""

DEFAULT_HEADERS: dict[str, str] = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}
"""Headers every request sends unless the spider's ``HTTP_HEADERS`` or the item's headers override them."""

DEFAULT_TRIES = 3
"""Total tries when ``item.max_retry`` is not set."""

BACKOFF_BASE = 0.5
"""Seconds before the second try; doubles per try, times a random factor in [0.5, 1]."""

BACKOFF_MAX = 30.0
"""Cap of the backoff between two tries, seconds."""

RETRY_AFTER_MAX = 60.0
"""Cap of a server's ``Retry-After``, seconds: a handler does not hold its slot longer than this."""

_CHUNK = 65536
_MAX_FIELD_SIZE = 32768  # response header lines: big Set-Cookie headers are common
_PRUNE_AT = 1024  # per-host entries kept before idle ones are dropped


# -- secrets ---------------------------------------------------------------------------

def _describe(exc: BaseException) -> str:
    message = str(exc)
    text = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    return mask_secrets(text)[:1000]


def _shows_no_secret(exc: BaseException) -> bool:
    text = "".join(traceback.format_exception(exc))
    return mask_secrets(text) == text


# -- response --------------------------------------------------------------------------


class Response:
    """A fetched response.

    ``status``, ``reason``, ``headers`` (case-insensitive), ``url`` (after redirects),
    ``history`` (the redirect URLs), ``cookies`` (``Set-Cookie`` names and values),
    ``content`` (bytes), ``text`` (decoded lazily, see :func:`decode_body`), ``encoding``
    (the codec ``text`` used) and ``json()``.
    """

    def __init__(
        self,
        status: int,
        headers: CIMultiDictProxy[str],
        url: str,
        content: bytes,
        charset: str | None = None,
        encoding: str | None = None,
        history: tuple[str, ...] = (),
        reason: str = "",
        cookies: dict[str, str] | None = None,
    ) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.url = url
        self.content = content
        self.history = history
        self.cookies: dict[str, str] = cookies or {}
        self._charset = charset
        self._forced = encoding
        self._decoded: tuple[str, str] | None = None

    def _decode(self) -> tuple[str, str]:
        if self._decoded is None:
            self._decoded = _decode(self.content, self._charset, self._forced)
        return self._decoded

    @property
    def text(self) -> str:
        """The body as text (decoded once, on first use)."""
        return self._decode()[0]

    @property
    def encoding(self) -> str:
        """The codec ``text`` is decoded with, e.g. ``'utf-8'``, ``'gb18030'``, ``'big5hkscs'``."""
        return self._decode()[1]

    def json(self, **kwargs: Any) -> Any:
        """The body parsed as JSON (``kwargs`` go to :func:`json.loads`)."""
        return jsonlib.loads(self.text, **kwargs)

    def __repr__(self) -> str:
        return f"<Response [{self.status}] {mask_url(self.url)}>"


# -- the loop's client -----------------------------------------------------------------


class _NoGate:
    """The gate when there are no per-host limits: nothing to hold."""

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc: object) -> None:
        return None


_NO_GATE = _NoGate()


class _Host:
    """Per-host state of the per-process gate."""

    __slots__ = ("next_start", "semaphore", "users")

    def __init__(self, limit: int) -> None:
        self.semaphore = asyncio.Semaphore(limit) if limit > 0 else None
        self.next_start = 0.0
        self.users = 0


class HttpClient:
    """The loop's HTTP state: its session, its defaults and its per-host gates.

    The session is created on the first request, inside the running event loop, and
    closed by :meth:`close` (the loop calls it when it stops).
    """

    def __init__(
        self,
        name: str,
        options: Mapping[str, Any],
        *,
        stats: Stats | None = None,
        pool_size: int = 10,
        headers: Mapping[str, str] | None = None,
        check_html: Callable[[str], Any] | None = None,
        hosts: LoopHosts | None = None,
    ) -> None:
        """``options``: the loop options ``user_agent``, ``request_timeout``, ``request_tries``,
        ``max_body_size``, ``per_host_limit``, ``per_host_delay`` and ``obey_robots``; ``headers``:
        the spider's defaults (``HTTP_HEADERS``); ``check_html``: a function of the text that may
        reject a body; ``stats``: the loop's counters (requests, statuses, retries, errors, bytes,
        times); ``hosts``: the loop-wide per-host gate of the serve (None: per process)."""
        self.name = name
        self.stats = stats if stats is not None else Stats()
        self.user_agent: str = options.get("user_agent") or DEFAULT_USER_AGENT
        self.timeout: float = float(options.get("request_timeout") or 30.0)
        self.tries: int = max(1, int(options.get("request_tries") or DEFAULT_TRIES))
        self.max_body: int = int(options.get("max_body_size") or 0)
        self.per_host_limit: int = max(0, int(options.get("per_host_limit") or 0))
        self.per_host_delay: float = max(0.0, float(options.get("per_host_delay") or 0.0))
        self.pool_size: int = max(1, pool_size)
        self.headers: dict[str, str] = {**DEFAULT_HEADERS, **_clean_headers(headers or {})}
        if options.get("user_agent") or "user-agent" not in {k.lower() for k in self.headers}:
            self.headers["User-Agent"] = self.user_agent
        self._session: aiohttp.ClientSession | None = None
        self._session_loop: asyncio.AbstractEventLoop | None = None
        self._hosts: dict[str, _Host] = {}
        self._prune_at = _PRUNE_AT
        self._timeouts: dict[float, aiohttp.ClientTimeout] = {}
        self.check_html = check_html
        self.hosts = hosts
        self.robots: Robots | None = Robots(self) if options.get("obey_robots") else None
        self._polite = self.per_host_limit > 0 or self.per_host_delay > 0 or self.robots is not None

    def session(self) -> aiohttp.ClientSession:
        """The loop's session; created now if there is none in the running event loop."""
        running = asyncio.get_running_loop()
        session = self._session
        if session is not None and self._session_loop is running and not session.closed:
            return session
        if self._session is not None and (self._session.closed or self._session_loop is not running):
            if not self._session.closed:
                # it cannot be closed from here: its connections belong to the other event loop
                log.warning("%s: an HTTP session of an earlier event loop was left open; starting anew", self.name)
                self._session.detach()
            self._session = None
            self._hosts.clear()  # their semaphores belong to the old event loop
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=self.pool_size, ttl_dns_cache=300)
            session = aiohttp.ClientSession(
                connector=connector,
                headers=self.headers,
                cookie_jar=aiohttp.DummyCookieJar(),  # tasks never see each other's cookies
                max_field_size=_MAX_FIELD_SIZE,
            )
            # one try is one request: aiohttp would silently resend an idempotent request
            # once on a dropped connection, which our own retries already do
            if hasattr(session, "_retry_connection"):
                session._retry_connection = False
            self._session, self._session_loop = session, running
        return self._session

    async def request(self, item: Mapping[str, Any], **kwargs: Any) -> Response:
        """:func:`request` through this client (the keywords are the same)."""
        return await request(self, item, **kwargs)

    @property
    def session_open(self) -> bool:
        """Whether a session exists and is not closed."""
        return self._session is not None and not self._session.closed

    def gate(self, url: str) -> AbstractAsyncContextManager[None]:
        """Hold one of the ``per_host_limit`` slots of ``url``'s host and wait its turn
        (``per_host_delay``, or a larger ``Crawl-delay``): for the whole loop, or in this process."""
        if not self._polite:
            return _NO_GATE
        key = _host_key(url)
        delay = self.per_host_delay
        if self.robots is not None:
            delay = max(delay, self.robots.delay(key))
        if self.per_host_limit <= 0 and delay <= 0:
            return _NO_GATE
        if self.hosts is not None:
            return self.hosts.gate(key, delay)
        return self._gate(key, delay)

    def client_timeout(self, seconds: float) -> aiohttp.ClientTimeout:
        """One ``ClientTimeout`` per distinct timeout (they are immutable; most items use the default)."""
        timeout = self._timeouts.get(seconds)
        if timeout is None:
            if len(self._timeouts) >= 64:
                self._timeouts.clear()
            timeout = self._timeouts[seconds] = aiohttp.ClientTimeout(total=seconds)
        return timeout

    @asynccontextmanager
    async def _gate(self, key: str, delay: float) -> AsyncIterator[None]:
        host = self._hosts.get(key)
        if host is None:
            if len(self._hosts) >= self._prune_at:
                self._prune()
            host = self._hosts[key] = _Host(self.per_host_limit)
        host.users += 1
        try:
            if host.semaphore is not None:
                async with host.semaphore:
                    await self._take_turn(host, delay)
                    yield
            else:
                await self._take_turn(host, delay)
                yield
        finally:
            host.users -= 1
            if host.users == 0 and host.next_start <= time.monotonic() and self._hosts.get(key) is host:
                del self._hosts[key]

    async def _take_turn(self, host: _Host, delay: float) -> None:
        if delay <= 0:
            return
        now = time.monotonic()
        start = max(now, host.next_start)
        host.next_start = start + delay
        if start > now:
            await asyncio.sleep(start - now)

    def _prune(self) -> None:
        now = time.monotonic()
        for key in [k for k, h in self._hosts.items() if h.users == 0 and h.next_start <= now]:
            del self._hosts[key]
        self._prune_at = max(_PRUNE_AT, 2 * len(self._hosts))

    async def close(self) -> None:
        """Close the session (and its connections); a later request opens a new one."""
        session, self._session = self._session, None
        owner, self._session_loop = self._session_loop, None
        self._hosts.clear()
        if self.robots is not None:
            await self.robots.close()
        if session is None or session.closed:
            return
        if owner is asyncio.get_running_loop():
            await session.close()
        else:
            session.detach()


_HTTP_PREFIXES = ("http://", "https://")


def _check_url(url: str) -> None:
    """An :class:`InvalidRequest` unless ``url`` parses as an http(s) URL with a host."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError for a port that is not a number
    except ValueError as exc:
        raise InvalidRequest(mask_url(url), f"the URL does not parse: {exc}") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise InvalidRequest(mask_url(url), f"not an http(s) URL (scheme {parts.scheme or 'missing'!r})")
    if not parts.hostname:
        raise InvalidRequest(mask_url(url), "the URL has no host")


def _host_key(url: str) -> str:
    try:
        return urlsplit(url).hostname or ""
    except ValueError:
        return ""


def _clean_headers(headers: Any) -> dict[str, str]:
    """Headers as a dict of str (from a dict or a list of pairs); ``None`` values dropped."""
    if not headers:
        return {}
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    try:
        return {str(k): str(v) for k, v in pairs if v is not None}
    except (TypeError, ValueError):
        raise TypeError(f"headers must be a dict or a list of pairs, not {type(headers).__name__}") from None


def _retry_after(value: str | None) -> float | None:
    """Seconds a ``Retry-After`` header asks for (seconds or an HTTP date), or None."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError, IndexError):
            return None
    if seconds != seconds:  # NaN
        return None
    return min(max(0.0, seconds), RETRY_AFTER_MAX)


def _backoff(try_no: int) -> float:
    return float(min(BACKOFF_MAX, BACKOFF_BASE * 2.0 ** (try_no - 1)) * random.uniform(0.5, 1.0))


def _retry_status(status: int) -> bool:
    return status in (408, 429) or (status >= 500 and status != 501)


# Errors no retry can mend: they fail the request at once.
_FATAL: tuple[type[BaseException], ...] = (
    aiohttp.InvalidURL,
    aiohttp.TooManyRedirects,
    aiohttp.ClientConnectorCertificateError,
    *(
        cls
        for cls in (getattr(aiohttp, name, None) for name in ("NonHttpUrlClientError", "RedirectClientError"))
        if isinstance(cls, type)
    ),
)


class _Failed(Exception):
    """One try failed in a way worth another try (``reason``: the retry's name in the statistics)."""

    def __init__(self, message: str, wait: float | None = None, reason: str = "") -> None:
        super().__init__(message)
        self.wait = wait
        self.reason = reason


class _BodyTooLarge(Exception):
    pass


async def _read_limited(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The body, streamed; :class:`_BodyTooLarge` as soon as it passes ``limit`` bytes (0: no limit)."""
    if limit <= 0:
        return await resp.read()
    declared = resp.content_length  # a compressed length: the body will be no smaller
    if declared is not None:
        if declared > limit:
            raise _BodyTooLarge(f"body of {declared} bytes exceeds max_body_size ({limit} bytes)")
        if "Content-Encoding" not in resp.headers:
            return await resp.read()  # the declared length is the most aiohttp will read
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(_CHUNK):
        size += len(chunk)
        if size > limit:
            raise _BodyTooLarge(f"body exceeds max_body_size ({limit} bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


def _request_kwargs(item: Mapping[str, Any], timeout: aiohttp.ClientTimeout, keep_alive: bool | None) -> dict[str, Any]:
    get = item.get
    kwargs: dict[str, Any] = {"timeout": timeout}
    allow_redirects = get("allow_redirects")
    if allow_redirects is not None:
        kwargs["allow_redirects"] = bool(allow_redirects)
    raw_headers = get("headers")
    if raw_headers or keep_alive is False:
        headers = _clean_headers(raw_headers)
        if keep_alive is False and not any(k.lower() == "connection" for k in headers):
            headers["Connection"] = "close"
        kwargs["headers"] = headers
    params = get("params")
    if params:
        if isinstance(params, Mapping):
            params = {str(k): v for k, v in params.items() if v is not None}
        elif isinstance(params, list):
            params = [tuple(pair) for pair in params]
        if params:
            kwargs["params"] = params
    data, body = get("data"), get("json")
    if data is not None and body is not None:
        raise ValueError("async_web_request: an item has either data or json, not both")
    if data is not None:
        if isinstance(data, list):
            data = [tuple(pair) if isinstance(pair, list) else pair for pair in data]
        kwargs["data"] = data
    if body is not None:
        kwargs["json"] = body
    cookies = get("cookies")
    if cookies:
        kwargs["cookies"] = cookies
    proxy = get("proxy")
    if proxy:
        kwargs["proxy"] = proxy
    return kwargs


async def _check(checker: Callable[[str], Any], text: str) -> bool:
    verdict = checker(text)
    if inspect.isawaitable(verdict):
        verdict = await verdict
    return bool(verdict)


async def request(
    client: HttpClient,
    item: Mapping[str, Any],
    *,
    session: aiohttp.ClientSession | None = None,
    keep_alive: bool | None = None,
    check_html: Callable[[str], Any] | None = None,
    _robots: bool = False,
) -> Response:
    """Perform ``item`` with retries and return the :class:`Response` (see the module docstring).

    ``session``: an aiohttp session of the caller's (its cookie jar and defaults apply; it
    is not closed here) instead of the loop's. ``keep_alive=False`` sends
    ``Connection: close``. ``check_html``: a function of the text (sync or async) used
    instead of the loop's ``check_html`` method; an exception in it propagates.

    Raises :class:`~achihuo_mini.errors.RequestError` when no try succeeded,
    :class:`~achihuo_mini.errors.RobotsDisallowed` (``obey_robots``) for a URL the site's
    robots.txt disallows (nothing is sent), and :class:`~achihuo_mini.errors.InvalidRequest`
    (a ``ValueError``) for an item that cannot be sent at all. (``_robots``: the fetch of a
    robots.txt itself.)
    """
    url = item.get("url")
    if not isinstance(url, str) or not url:
        raise InvalidRequest(repr(url), f"the item has no url (its keys: {sorted(map(str, item))})")
    if not url.startswith(_HTTP_PREFIXES):  # the common case costs one call; the rest is aiohttp's to parse
        _check_url(url)
    method = item.get("method")
    method = "GET" if method is None or method == "GET" else str(method or "GET").upper()
    tries = item.get("max_retry")
    try:
        tries = client.tries if tries is None else max(1, int(tries))
        timeout = client.timeout if item.get("timeout") is None else float(item["timeout"])
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidRequest(mask_url(url), f"max_retry and timeout must be numbers: {exc}") from None
    if not timeout > 0 or timeout != timeout:
        raise InvalidRequest(mask_url(url), f"timeout must be a positive number of seconds, not {timeout!r}")
    if session is not None and not isinstance(session, aiohttp.ClientSession):
        raise TypeError(f"session= must be an aiohttp.ClientSession, not {type(session).__name__}")
    try:
        kwargs = _request_kwargs(item, client.client_timeout(timeout), keep_alive)
    except (TypeError, ValueError) as exc:
        raise InvalidRequest(mask_url(url), mask_secrets(str(exc))) from None
    checker = check_html if check_html is not None else client.check_html
    forced = item.get("encoding")
    max_body = client.max_body
    if _robots:
        max_body = ROBOTS_MAX_BYTES
    elif client.robots is not None:
        await client.robots.check(url, _host_key(url))
    http = session if session is not None else client.session()
    last_error = ""
    last_exc: BaseException | None = None
    stats = client.stats
    for try_no in range(1, tries + 1):
        wait: float | None = None
        reason = ""
        began = 0.0  # when the try was sent; 0 again once its answer is counted
        try:
            async with client.gate(url):
                began = time.monotonic()
                async with http.request(method, url, **kwargs) as resp:
                    content = b""
                    try:
                        if _retry_status(resp.status):
                            raise _Failed(
                                f"HTTP {resp.status} {resp.reason or ''}".rstrip(),
                                _retry_after(resp.headers.get("Retry-After")),
                                str(resp.status),
                            )
                        try:
                            content = await _read_limited(resp, max_body)
                        except _BodyTooLarge:
                            resp.close()  # drop the connection rather than drain the rest
                            raise
                    finally:
                        stats.response(time.monotonic() - began, resp.status, len(content), resp.url.raw_host or "")
                        began = 0.0
                    response = _response(resp, content, forced)
            if checker is not None and not await _check(checker, response.text):
                reason = "check_html"
                raise _Failed(f"check_html rejected the body (HTTP {response.status})")
            return response
        except _Failed as exc:
            last_error, last_exc, wait = str(exc), None, exc.wait
            reason = reason or exc.reason
        except _BodyTooLarge as exc:
            raise InvalidRequest(mask_url(url), str(exc), try_no) from None
        except _FATAL as exc:
            _no_answer(stats, began, url, exc)
            why = _describe(exc)
            if isinstance(exc, aiohttp.InvalidURL):
                why = f"the URL does not parse ({why})"
            raise InvalidRequest(mask_url(url), why, try_no) from (exc if _shows_no_secret(exc) else None)
        except TimeoutError as exc:
            _no_answer(stats, began, url, exc)
            last_error, last_exc, reason = f"{type(exc).__name__}: no complete answer within {timeout:g} s", exc, \
                "timeout"  # fmt: skip
        except (aiohttp.ClientError, OSError) as exc:
            _no_answer(stats, began, url, exc)
            last_error, last_exc, reason = _describe(exc), exc, type(exc).__name__
        if try_no < tries:
            stats.add_bounded("http/retries", reason)
            delay = wait if wait is not None else _backoff(try_no)
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "%s %s: %s; try %d of %d, next in %.2f s", method, mask_url(url), last_error, try_no, tries, delay
                )
            await asyncio.sleep(delay)
    cause = last_exc if last_exc is not None and _shows_no_secret(last_exc) else None
    raise RequestError(mask_url(url), tries, last_error) from cause


def _response(resp: aiohttp.ClientResponse, content: bytes, forced: Any) -> Response:
    return Response(
        resp.status,
        resp.headers,
        str(resp.url),
        content,
        resp.charset,
        forced,
        tuple(str(r.url) for r in resp.history) if resp.history else (),
        resp.reason or "",
        {name: morsel.value for name, morsel in resp.cookies.items()} if resp.cookies else None,
    )


def _no_answer(stats: Stats, began: float, url: str, exc: BaseException) -> None:
    """A try that failed with ``exc``: its error type counted; and, when it was sent but its
    answer not counted yet (``began``), the try itself."""
    if began:
        stats.response(time.monotonic() - began, None, 0, _host_key(url))
    stats.add_bounded("http/errors", type(exc).__name__)

