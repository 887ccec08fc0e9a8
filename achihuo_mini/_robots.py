"""robots.txt for ``obey_robots``: fetched once per origin and worker, parsed with Protego, cached.

:class:`Robots` belongs to the loop's HTTP client. Before a request to an http(s) URL, it
makes sure the rules of the URL's origin (scheme, host, port) are known: the first
request to an origin fetches ``/robots.txt`` (the others to that origin wait for that one
fetch), through the same session, per-host limits and delay as every request. Rules are
kept for :data:`ROBOTS_TTL`; a URL they disallow for the loop's user agent raises
:class:`~achihuo_mini.errors.RobotsDisallowed`, and their ``Crawl-delay`` (or
``Request-rate``) becomes the host's delay when it is larger than ``per_host_delay``.

When robots.txt cannot be had, the common convention (RFC 9309, Google's crawlers):

- **2xx**: the rules apply;
- **4xx** (401, 403 and 404 included; 429 aside): no rules: everything is allowed;
- **5xx, 429, a network error, a timeout** (or a body over :data:`ROBOTS_MAX_BYTES`): tried
  again :data:`ROBOTS_TRIES` times in all with the usual backoff (the requests to that
  origin wait meanwhile); then everything is allowed for :data:`ROBOTS_RETRY_AFTER`,
  after which the next request to the origin fetches robots.txt again.

Redirects are followed (the rules are the final answer's). A redirect of a *page* to a
disallowed URL is not checked again (the target is fetched by the same request).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from .errors import RequestError, RobotsDisallowed
from .masking import mask_url

if TYPE_CHECKING:
    from .http import HttpClient

__all__ = ["MAX_CRAWL_DELAY", "ROBOTS_MAX_BYTES", "ROBOTS_RETRY_AFTER", "ROBOTS_TRIES", "ROBOTS_TTL", "Robots"]

log = logging.getLogger("achihuo_mini.http")

ROBOTS_TTL = 24 * 3600.0
"""Seconds the rules of an origin are kept before robots.txt is fetched again (4xx: also)."""
ROBOTS_RETRY_AFTER = 600.0
"""Seconds an origin whose robots.txt could not be fetched (5xx, network) stays allowed before the next try."""
ROBOTS_TRIES = 3
"""Tries of one robots.txt fetch (with the usual backoff between them)."""
ROBOTS_MAX_BYTES = 512 * 1024
"""Largest robots.txt read (RFC 9309 asks crawlers to read at least 500 KiB); a larger one counts as unavailable."""
MAX_CRAWL_DELAY = 60.0
"""Largest ``Crawl-delay`` honoured, seconds: a larger one is cut to it (with a warning)."""
MAX_ORIGINS = 10_000
"""Origins whose rules are kept at once; the oldest are forgotten first."""


@dataclass(slots=True)
class _Rules:
    parser: Any  # a Protego parser, or None: everything allowed
    expires: float  # monotonic
    delay: float  # Crawl-delay, seconds (0: none)


class Robots:
    """The robots.txt rules one worker knows (see the module docstring)."""

    def __init__(self, client: HttpClient) -> None:
        self.client = client
        agent = next((v for k, v in client.headers.items() if k.lower() == "user-agent"), client.user_agent)
        self.user_agent = str(agent)
        self.fetches = 0  # robots.txt fetches started (for tests)
        self._rules: dict[str, _Rules] = {}
        self._fetching: dict[str, asyncio.Task[_Rules]] = {}
        self._delays: dict[str, dict[str, float]] = {}  # host key -> origin -> Crawl-delay

    def delay(self, host: str) -> float:
        """The largest ``Crawl-delay`` known for ``host`` (0 when none)."""
        found = self._delays.get(host)
        return max(found.values()) if found else 0.0

    async def check(self, url: str, host: str) -> None:
        """Raise :class:`RobotsDisallowed` if the rules of ``url``'s origin disallow it (fetching them first)."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            return  # not a URL: the request itself fails with a clear error
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or not parts.hostname:
            return
        hostname = parts.hostname
        origin = f"{scheme}://" + (f"[{hostname}]" if ":" in hostname else hostname)
        if port is not None:
            origin += f":{port}"
        rules = self._rules.get(origin)
        if rules is None or rules.expires <= time.monotonic():
            task = self._fetching.get(origin)
            if task is None:
                task = asyncio.ensure_future(self._fetch(origin, host))
                self._fetching[origin] = task
                task.add_done_callback(lambda _: self._fetching.pop(origin, None))
            rules = await asyncio.shield(task)
        if rules.parser is not None and not rules.parser.can_fetch(url, self.user_agent):
            raise RobotsDisallowed(mask_url(url), mask_url(f"{origin}/robots.txt"))

    async def _fetch(self, origin: str, host: str) -> _Rules:
        """The rules of ``origin``; never raises (an unexpected failure allows, with a warning)."""
        self.fetches += 1
        robots_url = f"{origin}/robots.txt"
        try:
            rules = await self._load(robots_url)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a parser or client bug: allow rather than stop the crawl
            log.warning("%s: robots.txt of %s could not be read (%s: %s); allowing everything for now",
                        self.client.name, mask_url(origin), type(exc).__name__, exc)  # fmt: skip
            rules = _Rules(None, time.monotonic() + ROBOTS_RETRY_AFTER, 0.0)
        if len(self._rules) >= MAX_ORIGINS:
            for old in list(self._rules)[: MAX_ORIGINS // 10]:
                del self._rules[old]
            for delays in self._delays.values():
                for old in [o for o in delays if o not in self._rules]:
                    del delays[old]
        self._rules.pop(origin, None)
        self._rules[origin] = rules
        delays = self._delays.setdefault(host, {})
        if rules.delay > 0:
            delays[origin] = rules.delay
        else:
            delays.pop(origin, None)
        if not delays:
            del self._delays[host]
        return rules

    async def _load(self, robots_url: str) -> _Rules:
        from .http import Response, request

        name = self.client.name
        try:
            resp: Response = await request(
                self.client, {"url": robots_url, "max_retry": ROBOTS_TRIES}, check_html=_accept, _robots=True
            )
        except RequestError as exc:
            log.warning("%s: %s could not be fetched (%s); allowing everything for %g s, then trying again",
                        name, mask_url(robots_url), exc.last_error, ROBOTS_RETRY_AFTER)  # fmt: skip
            return _Rules(None, time.monotonic() + ROBOTS_RETRY_AFTER, 0.0)
        expires = time.monotonic() + ROBOTS_TTL
        if not 200 <= resp.status < 300:  # 4xx (and a redirect left unfollowed): no rules
            log.info("%s: %s answered HTTP %d: allowing everything", name, mask_url(robots_url), resp.status)
            return _Rules(None, expires, 0.0)
        from protego import Protego

        parser = Protego.parse(resp.text)
        return _Rules(parser, expires, self._crawl_delay(parser, robots_url))

    def _crawl_delay(self, parser: Any, robots_url: str) -> float:
        delay = 0.0
        crawl_delay = parser.crawl_delay(self.user_agent)
        if crawl_delay is not None:
            delay = float(crawl_delay)
        rate = parser.request_rate(self.user_agent)
        if rate is not None and rate.requests:
            delay = max(delay, float(rate.seconds) / float(rate.requests))
        if not math.isfinite(delay) or delay <= 0:
            return 0.0
        if delay > MAX_CRAWL_DELAY:
            log.warning("%s: %s asks for a delay of %g s between requests; honouring %g s, the most achihuo_mini does",
                        self.client.name, mask_url(robots_url), delay, MAX_CRAWL_DELAY)  # fmt: skip
            return MAX_CRAWL_DELAY
        return delay

    async def close(self) -> None:
        """Cancel fetches under way (their waiters are cancelled too)."""
        tasks = list(self._fetching.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)


def _accept(text: str) -> bool:
    return True

