"""``achihuo web NAME``: a live status page of one loop, served with aiohttp from its backend.

Everything comes from the backend (workers, queue, done set, dead letters, the loop's
statistics), so the page works from any machine that reaches the backend, and while no
worker runs. Routes::

    GET  /              the page (HTML; its script and style are served from the package)
    GET  /api/status    the same JSON as ``status --json``
    GET  /api/page      what the page draws: status, the first dead letters, the rate history
    GET  /metrics       the loop's totals in the Prometheus text format (worker="all")
    POST /api/stop      {"targets": ["m1", "all", ...]}      only with --token, see below
    POST /api/requeue   {"limit": N or null}                  only with --token

Read-only unless started with a token; an action then needs ``Authorization: Bearer TOKEN``
(a header a browser never adds by itself, so another site cannot make a visitor's browser
act). Requests must name the server by an IP address, ``localhost`` or the ``--bind`` host
name (``Host`` header): a page of another site that resolves its own name to this server's
address (DNS rebinding) reads nothing.
Every text shown comes from the backend and is treated as hostile: the script writes it with
``textContent`` only, and the Content-Security-Policy allows no inline script and no other
origin. Passwords in URLs are masked before anything leaves the server.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import ipaddress
import json
import logging
import re
import signal
import time
from collections.abc import Sequence
from importlib import resources
from typing import Any

from ._metrics import CONTENT_TYPE, parse_address, render
from ._report import printable, status_data
from ._store import Store
from .backend import DeadLetter, WorkerInfo
from .backend_kit import counter_ok
from .codec import decode_task
from .errors import AchihuoError, ConfigError, DecodeError
from .masking import mask_secrets

__all__ = ["StatusPage", "resolve_targets", "serve_web"]

log = logging.getLogger("achihuo_mini")

HISTORY = 300
"""Rate samples kept for the chart (10 minutes at the default 2 s interval)."""
DEAD_SHOWN = 10
"""Dead letters the page lists (the oldest: the order every queue backend keeps)."""
MAX_BODY = 4096
"""Largest action request body accepted."""

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}
_STATIC = {  # route -> (file in achihuo_mini/web, content type)
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/app.css": ("app.css", "text/css; charset=utf-8"),
}
_LOOPBACK_NAMES = {"localhost", "localhost."}


def resolve_targets(workers: Sequence[WorkerInfo], targets: Sequence[str]) -> tuple[list[str], list[str]]:
    """The aliases ``targets`` (aliases, ``all``, ``masters``, ``slaves``) name, and the unknown ones."""
    chosen: list[str] = []
    unknown: list[str] = []
    aliases = [w.alias for w in workers]
    for target in targets:
        if target == "all":
            chosen += aliases
        elif target in ("masters", "slaves"):
            chosen += [w.alias for w in workers if w.role == target[:-1]]
        elif target in aliases:
            chosen.append(target)
        else:
            unknown.append(target)
    return list(dict.fromkeys(chosen)), unknown


def _is_loopback(host: str) -> bool:
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _host_of(header: str) -> str:
    """The host part of a ``Host`` header (``[::1]:8080`` -> ``::1``)."""
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rpartition(":")[0] if header.count(":") == 1 else header


def _dead_row(letter: DeadLetter) -> dict[str, Any]:
    """One dead letter as the page shows it: every field checked, secrets masked."""
    try:
        task = decode_task(letter.payload)
        handler: str | None = printable(task.handler, 60)
        name = printable(mask_secrets(task.name), 300) if isinstance(task.name, str) else None
    except DecodeError:
        handler, name = None, None
    error = letter.error if isinstance(letter.error, str) else ""
    return {
        "id": letter.task_id if type(letter.task_id) is int else None,
        "handler": handler,
        "name": name,
        "failures": letter.failures if type(letter.failures) is int else None,
        "reason": printable(mask_secrets(error.splitlines()[0] if error else ""), 300),
    }


class StatusPage:
    """The aiohttp application of one loop's status page over an open :class:`Store`."""

    def __init__(
        self, name: str, store: Store, *, token: str | None = None, interval: float = 2.0, bound_host: str = ""
    ) -> None:
        if token is not None and not re.fullmatch(r"[\x21-\x7e]{8,}", token):
            raise ConfigError("web --token: use at least 8 characters, printable ASCII without spaces "
                              "(it goes in an HTTP header; it guards stop and requeue)")  # fmt: skip
        if not 0.5 <= interval <= 3600:
            raise ConfigError(f"web --interval: from 0.5 to 3600 s, got {interval!r}")
        self.name = name
        self.store = store
        self.token = token
        self.interval = interval
        self.bound_host = bound_host.lower().rstrip(".")
        self.history: collections.deque[tuple[float, int, int]] = collections.deque(maxlen=HISTORY)
        self._warned = False
        self._sampler: asyncio.Task[None] | None = None

    # -- the application -------------------------------------------------------------

    def app(self) -> Any:
        from aiohttp import web

        @web.middleware
        async def guard(request: web.Request, handler: Any) -> web.StreamResponse:
            if not self._host_allowed(request.host):
                response: web.StreamResponse = web.json_response(
                    {"error": "this page answers to IP addresses, localhost and the --bind host name only"},
                    status=421,
                )
            else:
                try:
                    response = await handler(request)
                except web.HTTPException as exc:
                    response = web.json_response({"error": exc.reason}, status=exc.status)
            response.headers.update(_SECURITY_HEADERS)
            return response

        app = web.Application(middlewares=[guard], client_max_size=MAX_BODY)
        for route in _STATIC:
            app.router.add_get(route, self._static)
        app.router.add_get("/api/status", self._status)
        app.router.add_get("/api/page", self._page)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_post("/api/stop", self._stop)
        app.router.add_post("/api/requeue", self._requeue)
        app.on_startup.append(self._start_sampler)
        app.on_cleanup.append(self._stop_sampler)
        return app

    def _host_allowed(self, header: str) -> bool:
        """DNS rebinding: a page of another site whose own name resolves to this server's address
        reaches it under that name. An IP address, localhost or the name given to --bind is
        no such name."""
        host = _host_of(header).lower().rstrip(".")
        if _is_loopback(host) or (self.bound_host and host == self.bound_host):
            return True
        try:
            ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            return False
        return True

    async def _static(self, request: Any) -> Any:
        from aiohttp import web

        file, content_type = _STATIC[request.path]
        body = resources.files("achihuo_mini").joinpath("web", file).read_bytes()
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def _answer(self, make: Any) -> Any:
        """``make()``'s JSON, or 503 with the reason when the backend cannot answer."""
        from aiohttp import web

        try:
            data = await make()
        except AchihuoError as exc:
            return web.json_response({"error": mask_secrets(str(exc))}, status=503)
        return web.json_response(data, dumps=json.dumps)

    async def _status(self, request: Any) -> Any:
        return await self._answer(lambda: status_data(self.name, self.store))

    async def _page(self, request: Any) -> Any:
        async def page() -> dict[str, Any]:
            status = await status_data(self.name, self.store)
            letters = await self.store.dead_letters(DEAD_SHOWN) if status["queue"]["dead"] else []
            return {
                "status": status,
                "dead": [_dead_row(x) for x in letters if isinstance(x, DeadLetter)],
                "history": list(self.history),
                "interval": self.interval,
                "actions": self.token is not None,
                "now": time.time(),
            }

        return await self._answer(page)

    async def _metrics(self, request: Any) -> Any:
        from aiohttp import web

        try:
            stats = await self.store.stats()
            counts = await self.store.counts() or {}
            gauges: dict[str, Any] = {"queue": stats, "done": await self.store.done_count()}
            if self.store.registry is not None:
                workers = [w for w in await self.store.registry.workers() if isinstance(w, WorkerInfo)]
                gauges["workers"] = len(workers)
                running = [w.info.get("running") for w in workers if isinstance(w.info, dict)]
                gauges["running"] = sum(r for r in running if type(r) is int and r >= 0)
        except AchihuoError as exc:
            return web.json_response({"error": mask_secrets(str(exc))}, status=503)
        body = render(self.name, "all", counts, gauges)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    # -- actions ---------------------------------------------------------------------

    async def _authorised_body(self, request: Any) -> dict[str, Any]:
        from aiohttp import web

        if self.token is None:
            raise web.HTTPForbidden(reason="read-only: start `achihuo web` with --token to allow actions")
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        given_bytes = given.strip().encode("utf-8", "surrogateescape")  # whatever bytes the client sent
        if scheme.lower() != "bearer" or not hmac.compare_digest(given_bytes, self.token.encode("ascii")):
            raise web.HTTPUnauthorized(reason="this action needs the header Authorization: Bearer TOKEN")
        try:
            body = json.loads(await request.read())
        except web.HTTPException:
            raise
        except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested beyond reason
            raise web.HTTPBadRequest(reason="the body must be a JSON object") from None
        if not isinstance(body, dict):
            raise web.HTTPBadRequest(reason="the body must be a JSON object")
        return body

    async def _stop(self, request: Any) -> Any:
        from aiohttp import web

        body = await self._authorised_body(request)
        targets = body.get("targets")
        if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
            raise web.HTTPBadRequest(reason='expected {"targets": ["m1", ...]} (aliases, all, masters, slaves)')
        reg = self.store.registry
        if reg is None:
            raise web.HTTPConflict(reason="this queue backend has no worker registry; stop workers with SIGTERM")

        async def stop() -> dict[str, Any]:
            workers = [w for w in await reg.workers() if isinstance(w, WorkerInfo)]
            chosen, unknown = resolve_targets(workers, targets)
            sent = await reg.send(chosen, "stop") if chosen else []
            log.warning("web: stop sent to %s", ", ".join(printable(a, 20) for a in sent) or "nobody")
            return {"sent": [printable(a, 20) for a in sent], "unknown": [printable(a, 20) for a in unknown]}

        return await self._answer(stop)

    async def _requeue(self, request: Any) -> Any:
        from aiohttp import web

        body = await self._authorised_body(request)
        limit = body.get("limit")
        if limit is not None and (type(limit) is not int or limit < 0):
            raise web.HTTPBadRequest(reason='expected {"limit": N} with N >= 0, or {"limit": null} for all')

        async def requeue() -> dict[str, Any]:
            n = await self.store.requeue_dead(limit)
            log.warning("web: requeued %d dead letters", n)
            return {"requeued": n}

        return await self._answer(requeue)

    # -- the rate history ------------------------------------------------------------

    async def sample(self) -> None:
        """Add one (time, tasks finished, HTTP responses) point to the history."""
        try:
            counts = await self.store.counts()
        except AchihuoError as exc:
            if not self._warned:
                log.warning("web: cannot read the loop's counters: %s", mask_secrets(str(exc)))
                self._warned = True
            return
        self._warned = False
        clean = {k: v for k, v in (counts or {}).items() if counter_ok(k, v)}
        tasks = clean.get("tasks/ok", 0) + clean.get("tasks/failed", 0)
        pages = sum(v for k, v in clean.items() if k.startswith("http/status/"))
        self.history.append((round(time.time(), 3), tasks, pages))

    async def _sample_forever(self) -> None:
        while True:
            await self.sample()
            await asyncio.sleep(self.interval)

    async def _start_sampler(self, app: Any) -> None:
        self._sampler = asyncio.create_task(self._sample_forever())

    async def _stop_sampler(self, app: Any) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            try:
                await self._sampler
            except asyncio.CancelledError:
                pass


async def serve_web(name: str, store: Store, bind: str, token: str | None, interval: float) -> int:
    """Serve the page of loop ``name`` on ``bind`` (HOST:PORT) until SIGINT or SIGTERM."""
    from aiohttp import web

    host, port = parse_address(bind, "web --bind", any_port=True)
    page = StatusPage(name, store, token=token, interval=interval, bound_host=host)
    runner = web.AppRunner(page.app(), access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(f"web --bind {bind}: cannot listen there: {exc.strerror or exc}") from None
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopped.set)
    try:
        shown = f"[{host}]" if ":" in host else host
        real_port = runner.addresses[0][1] if runner.addresses else port  # the port taken for port 0
        mode = "actions allowed with the token" if token else "read-only"
        print(f"status page of loop {printable(name)!r} on http://{shown}:{real_port}/ ({mode}); Ctrl-C stops it",
              flush=True)  # fmt: skip
        await stopped.wait()
    finally:
        await runner.cleanup()  # requests in flight get 2 s; a second Ctrl-C meanwhile changes nothing
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    return 0
