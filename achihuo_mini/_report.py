"""What a loop tells people: the start line, progress lines, the summary, and the data ``status`` shows.

Everything read back from a backend for display (worker info written by other
processes, perhaps by someone hostile) is checked field by field and printed with
control characters escaped: one bad registry entry costs its own fields, never the
command.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import os
import socket
import time
import traceback
from dataclasses import dataclass
from typing import Any

from ._stats import Stats, structured, table
from ._store import Store, wait_event
from .backend import QueueStats, WorkerInfo
from .errors import BackendError
from .masking import mask_secrets

__all__ = ["ERROR_MAX", "Report", "RunSummary", "error_text", "printable", "status_data"]

log = logging.getLogger("achihuo_mini")


@dataclass
class RunSummary:
    """What one :meth:`AsyncLoop.serve` did. ``exit_code`` follows the command line's rules."""

    alias: str | None = None
    succeeded: int = 0
    failed: int = 0
    retried: int = 0
    buried: int = 0
    released: int = 0
    fenced: int = 0
    added: int = 0  # tasks written to the queue, from handlers and elsewhere
    skipped: int = 0  # repeat=False tasks the backend skipped: their name was done or already queued
    deduplicated: int = 0  # repeat=False adds dropped in this process, without a round trip, as the backend would
    disallowed: int = 0  # tasks whose URL robots.txt disallows (obey_robots): acked, never retried, never dead
    elapsed: float = 0.0
    exit_code: int = 0
    reason: str = ""

    @property
    def offered(self) -> int:
        """Tasks given to ``add_task``/``add_tasks`` that reached the queue or were skipped as duplicates."""
        return self.added + self.skipped + self.deduplicated


class Report:
    """One serve's view of the loop's :class:`~._stats.Stats`, and the lines written about it."""

    def __init__(self, name: str, stats: Stats) -> None:
        self.name = name
        self.stats = stats
        self.base = dict(stats.counts)  # what earlier serves of this loop object counted
        self.summary = RunSummary()
        self.started_wall = time.time()
        self.started = time.monotonic()
        self._samples: collections.deque[tuple[float, int]] = collections.deque()
        self._last: tuple[float, dict[str, int]] = (self.started, {})
        self.outside_offered = self.outside_added = 0  # tasks added outside handlers (run() and such)
        self.held: QueueStats | None = None  # what the loop held at start
        self.done_at_start: int | None = None

    def mine(self, key: str) -> int:
        """This serve's count of ``key``."""
        return self.stats.counts.get(key, 0) - self.base.get(key, 0)

    def task(self, outcome: str, handler: str = "", n: int = 1) -> None:
        """``n`` tasks had ``outcome`` (``ok``, ``failed``, ``dead`` …), of ``handler`` when known."""
        self.stats.add(f"tasks/{outcome}", n)
        if handler:
            self.stats.add_bounded("handler", f"{handler}/{outcome}", n)

    def written(self, offered: int, pushed: int, outside: bool) -> None:
        """``offered`` tasks were written, ``pushed`` of them enqueued (``outside``: not by a handler)."""
        self.stats.add("tasks/added", pushed)
        if offered > pushed:
            self.stats.add("tasks/skipped", offered - pushed)
        if outside:
            self.outside_offered += offered
            self.outside_added += pushed

    def fail(self, reason: str) -> None:
        """The serve ends with exit code 1 for ``reason`` (the first reason is kept)."""
        self.summary.exit_code = 1
        self.summary.reason = self.summary.reason or reason

    def rate(self) -> float:
        """Tasks acknowledged per second over the last minute (sampled at each call)."""
        now = time.monotonic()
        samples = self._samples
        samples.append((now, self.mine("tasks/ok")))
        while len(samples) > 2 and now - samples[1][0] > 60:
            samples.popleft()
        (t0, n0), (t1, n1) = samples[0], samples[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0

    def finish(self) -> RunSummary:
        """Fill the summary's counts from this serve's counters."""
        s, mine = self.summary, self.mine
        s.succeeded, s.failed, s.retried, s.buried = mine("tasks/ok"), mine("tasks/failed"), mine("tasks/retried"), \
            mine("tasks/dead")  # fmt: skip
        s.released, s.fenced, s.added = mine("tasks/released"), mine("tasks/fenced"), mine("tasks/added")
        s.skipped, s.deduplicated = mine("tasks/skipped"), mine("tasks/deduplicated")
        s.disallowed = mine("tasks/disallowed")
        s.elapsed = time.monotonic() - self.started
        return s

    def info(
        self, role: str, state: str, concurrency: int, running: int, seeding: bool, handlers: list[str]
    ) -> dict[str, Any]:
        """What this worker publishes in the registry (shown by ``status``)."""
        mine = self.mine
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "role": role,
            "state": state,
            "started": self.started_wall,
            "concurrency": concurrency,
            "running": running,
            "succeeded": mine("tasks/ok"),
            "failed": mine("tasks/failed"),
            "buried": mine("tasks/dead"),
            "pages": mine("http/requests"),
            "rate": round(self.rate(), 1),
            "seeding": seeding,
            "handlers": handlers,
        }

    def log_start(self, role: str, concurrency: int, store: Store) -> None:
        event_loop = type(asyncio.get_running_loop()).__module__.partition(".")[0]
        log.info("%s: starting as %s, concurrency %d, on %s; %s", self.name, role, concurrency, event_loop,
                 store.describe())  # fmt: skip
        for warning in store.settings.warnings:
            log.warning("%s: %s", self.name, mask_secrets(warning))

    async def progress(self, store: Store, interval: float, running: Any, closed: asyncio.Event) -> None:
        """Log a progress line every ``interval`` seconds until ``closed`` (``running()`` counts handlers)."""
        while not await wait_event(closed, interval):
            try:
                stats: QueueStats | None = await store.stats()
                done: int | None = await store.done_count()
            except BackendError:
                stats, done = None, None
            queue = (
                f"queue {stats.ready} ready, {stats.delayed} delayed, {stats.leased} leased, {stats.dead} dead; "
                f"{done} done names"
                if stats is not None
                else "queue unreachable"
            )
            log.info("%s: %s, %d running; %s", self.name, self.progress_text(), running(), queue)

    def progress_text(self) -> str:
        """Pages and items so far and per minute since the last call, tasks, and the main errors."""
        now, counts = time.monotonic(), self.stats.counts
        then, before = self._last
        self._last = (now, dict(counts))
        minutes = max(now - then, 1e-9) / 60

        def per_minute(key: str) -> float:
            return (counts.get(key, 0) - before.get(key, self.base.get(key, 0))) / minutes

        mine = self.mine
        errors = _main_errors(self.stats.since(self.base))
        return (
            f"crawled {mine('http/requests')} pages (at {per_minute('http/requests'):.0f} pages/min), "
            f"scraped {mine('custom/items')} items (at {per_minute('custom/items'):.0f} items/min); "
            f"tasks {mine('tasks/ok')} ok ({per_minute('tasks/ok') / 60:.1f} tasks/s), {mine('tasks/failed')} "
            f"failed, {mine('tasks/dead')} dead"
            + (f"; errors: {errors}" if errors else "")
        )

    async def look(self, store: Store) -> tuple[QueueStats, int] | None:
        """What the loop holds now (None when the backend does not answer within a few seconds)."""
        try:
            async with asyncio.timeout(LOOK_WAIT):
                return await store.stats(), await store.done_count()
        except (BackendError, TimeoutError):
            return None

    def log_holdings(self, held: tuple[QueueStats, int] | None) -> None:
        """At start: what the loop holds from earlier runs, and what to do about dead letters."""
        if held is None:
            return
        stats, done = held
        self.held, self.done_at_start = stats, done
        log.info(
            "%s: the loop holds %d ready, %d delayed, %d leased tasks, %d dead letters and %d done names",
            self.name, stats.ready, stats.delayed, stats.leased, stats.dead, done,
        )  # fmt: skip
        if stats.dead:
            log.info(
                "%s: %d dead letters from earlier runs: `dead` lists them, `dead --requeue` runs them again",
                self.name, stats.dead,
            )  # fmt: skip

    def log_summary(self, end: tuple[QueueStats, int] | None = None) -> None:
        """The summary line, the stats table, and what the loop holds at the end (``end``)
        when it explains something. At INFO, whatever ``debug`` says."""
        s = self.finish()
        log.info(
            "%s: finished in %.1f s (%s): %d ok (%.1f/s), %d failed (%d retried, %d dead), %d released, "
            "%d fenced; tasks: %d offered, %d added, %d skipped as done or already queued (%d of them in this "
            "process, without a round trip)%s",
            self.name,
            s.elapsed,
            s.reason or "stopped",
            s.succeeded,
            s.succeeded / s.elapsed if s.elapsed else 0.0,
            s.failed,
            s.retried,
            s.buried,
            s.released,
            s.fenced,
            s.offered,
            s.added,
            s.skipped + s.deduplicated,
            s.deduplicated,
            f", {s.disallowed} disallowed by robots.txt" if s.disallowed else "",
        )
        extra: list[tuple[str, Any]] = [
            ("elapsed_time_seconds", round(s.elapsed, 3)),
            ("finish_reason", s.reason or "stopped"),
            ("start_time", _utc(self.started_wall)),
            ("finish_time", _utc(time.time())),
        ]
        if self.held is not None:
            extra.append(("dead_letters_at_start", self.held.dead))
        if end is not None:
            extra.append(("dead_letters_at_end", end[0].dead))
        log.info("%s: stats of this worker:\n%s", self.name, table(self.stats.view(self.base), extra))
        if end is None:
            return
        stats, done = end
        if not (s.succeeded or s.failed or s.added or stats.active) and s.offered:
            who = "run() and other adds outside handlers" if self.outside_offered else "the adds of this run"
            log.info(
                "%s: nothing ran: %s offered %d task%s and every one was skipped, its name already done or "
                "queued (the done set holds %d names): `clear done` to crawl again, or add with repeat=True",
                self.name, who, s.offered, "" if s.offered == 1 else "s", done,
            )  # fmt: skip
        if stats.dead:
            earlier = self.held.dead if self.held is not None else None
            new = f", {max(0, stats.dead - earlier)} new in this run" if earlier is not None else ""
            log.info(
                "%s: %d dead letters in the loop%s: `dead` lists them, `dead --show ID` prints one, "
                "`dead --requeue` runs them again",
                self.name, stats.dead, new,
            )  # fmt: skip


def _utc(wall: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(wall))


def _main_errors(counts: dict[str, int], most: int = 3) -> str:
    """The commonest failures: HTTP statuses of 400 and over, and errors by type (``404 x12, TimeoutError x3``)."""
    found = [(v, k.removeprefix("http/status/")) for k, v in counts.items()
             if k.startswith("http/status/") and k[12:13] in ("4", "5")]  # fmt: skip
    found += [(v, k.removeprefix("http/errors/")) for k, v in counts.items() if k.startswith("http/errors/")]
    found.sort(key=lambda x: (-x[0], x[1]))
    return ", ".join(f"{name} x{n}" for n, name in found[:most])


LOOK_WAIT = 5.0
"""Seconds the start and the end of a serve wait for the counts of what the loop holds."""

ERROR_MAX = 2048
"""Characters of error text a dead letter keeps."""


def error_text(exc: BaseException, with_traceback: bool, why: str = "") -> str:
    """The first line says what failed (after ``why``, if given); then as much of the
    traceback's end as fits in :data:`ERROR_MAX` characters."""
    summary = "".join(traceback.format_exception_only(exc)).strip() or type(exc).__name__
    if why:
        summary = f"{why}: {summary}"
    if not with_traceback:
        return mask_secrets(summary)[:ERROR_MAX]
    tb = "".join(traceback.format_exception(exc)).strip()
    room = ERROR_MAX - len(summary) - 2
    tail = tb[-room:] if room > 0 else ""
    return mask_secrets(f"{summary}\n\n{tail}")[:ERROR_MAX]


# -- status -------------------------------------------------------------------------------

# C0 and C1 controls, DEL, and the invisible marks that reorder or hide text on a terminal
_CONTROL = {
    i: f"\\x{i:02x}" if i < 0x100 else f"\\u{i:04x}"
    for i in (
        *range(0x20),
        0x7F,
        *range(0x80, 0xA0),
        *range(0x200B, 0x2010),
        *range(0x202A, 0x202F),
        *range(0x2066, 0x206A),
    )
}


def printable(value: Any, limit: int = 200) -> str:
    """``value`` as one line of text for a terminal: control characters escaped, secrets masked, cut at ``limit``."""
    text = value if isinstance(value, str) else repr(value)
    text = mask_secrets(text).translate(_CONTROL)
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")  # lone surrogates cannot be printed
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _number(value: Any) -> float | None:
    if type(value) in (int, float) and math.isfinite(value):
        return value  # type: ignore[no-any-return]
    return None


def _text(value: Any) -> str | None:
    return printable(value, 100) if value is not None else None


def worker_row(w: WorkerInfo) -> dict[str, Any]:
    """One worker of ``status``, every field checked (info is whatever the worker, or anyone, wrote)."""
    info = w.info if isinstance(w.info, dict) else {}
    return {
        "alias": printable(w.alias, 20),
        "role": printable(w.role, 20),
        "worker": printable(w.worker, 64),
        "host": _text(info.get("host")),
        "pid": info.get("pid") if type(info.get("pid")) is int else None,
        "state": _text(info.get("state")),
        "running": info.get("running") if type(info.get("running")) is int else None,
        "succeeded": info.get("succeeded") if type(info.get("succeeded")) is int else None,
        "failed": info.get("failed") if type(info.get("failed")) is int else None,
        "pages": info.get("pages") if type(info.get("pages")) is int else None,
        "rate": _number(info.get("rate")),
        "started": _number(info.get("started")),
        "last_heartbeat_s": round(w.age, 1) if _number(w.age) is not None else None,
    }


def stats_lines(stats: dict[str, Any] | None) -> list[str]:
    """The ``"stats"`` of :func:`status_data` as a few lines of text."""
    if stats is None:
        return ["stats: this queue keeps no statistics"]
    t, h = stats["tasks"], stats["http"]

    def pairs(counts: dict[str, int], sep: str = " x") -> str:
        return ", ".join(f"{k}{sep}{v}" for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:8])

    lines = [
        "stats (all workers, until `clear stats`):",
        f"  tasks: {t['ok']} ok, {t['failed']} failed ({t['retried']} retried), {t['dead']} dead, "
        f"{t['released']} released, {t['fenced']} fenced; {t['added']} added, "
        f"{t['skipped'] + t['deduplicated']} skipped as done or queued"
        + (f"; {t['disallowed']} disallowed by robots.txt" if t["disallowed"] else ""),
        f"  http: {h['requests']} requests, {h['bytes']} bytes"
        + (f"; status {pairs(h['status'])}" if h["status"] else "")
        + (f"; retries {pairs(h['retries'])}" if h["retries"] else "")
        + (f"; errors {pairs(h['errors'])}" if h["errors"] else ""),
    ]
    lat = h["latency"]
    if lat["count"]:
        lines.append(
            "  response time: " + ", ".join(f"{p} {_ms(lat[p])}" for p in ("p50", "p90", "p99"))
            + f" (mean {_ms(lat['mean'])})"
        )  # fmt: skip
    if h["hosts"]:
        lines.append(f"  busiest hosts: {pairs(h['hosts'], ' ')}")
    if stats["custom"]:
        lines.append(f"  counted by the spider: {pairs(stats['custom'], ' ')}")
    if stats["handlers"]:
        per = [f"{name} " + " ".join(f"{v} {k}" for k, v in sorted(c.items()))
               for name, c in sorted(stats["handlers"].items())]  # fmt: skip
        lines.append(f"  handlers: {'; '.join(per[:10])}")
    runs = stats["runs"]
    if runs["started"]:
        seen = stats["last_seen"]
        lines.append(
            f"  runs: {runs['started']} started"
            + (f", finished {pairs(runs['finished'], ' ')}" if runs["finished"] else "")
            + (f"; first start {_utc(stats['first_start'])}" if stats["first_start"] else "")
            + (f"; last seen {_utc(seen)}" if seen else "")
        )  # fmt: skip
    return lines


def _ms(seconds: Any) -> str:
    return f"{seconds * 1000:.0f} ms" if isinstance(seconds, (int, float)) else "?"


async def status_data(name: str, store: Store) -> dict[str, Any]:
    """What ``status`` prints, as data."""
    stats = await store.stats()
    workers = await store.registry.workers() if store.registry is not None else []
    totals = await store.counts()
    settings = store.settings
    return {
        "name": name,
        "queue": {
            "backend": settings.queue.backend,
            "location": printable(str(store.queue.location)),
            "ready": stats.ready,
            "delayed": stats.delayed,
            "leased": stats.leased,
            "dead": stats.dead,
            "durability": store.durability,
        },
        "done": {
            "backend": settings.done.backend,
            "location": printable(str(store.done.location)),
            "count": await store.done_count(),
        },
        "workers": [worker_row(w) for w in workers if isinstance(w, WorkerInfo)],
        "stats": _printable_tree(structured(totals)) if totals is not None else None,
    }


def _printable_tree(value: Any) -> Any:
    """Counter names come from the backend: every key escaped for a terminal."""
    if isinstance(value, dict):
        return {printable(k, 200): _printable_tree(v) for k, v in value.items()}
    return value
