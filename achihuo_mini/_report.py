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
    added: int = 0  # tasks handed to the backend, from handlers and elsewhere (it may still skip repeat=False ones)
    deduplicated: int = 0  # repeat=False adds the local dedup cache skipped without a round trip
    elapsed: float = 0.0
    exit_code: int = 0
    reason: str = ""


class Report:
    """The counters of one serve and the lines written about them."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.summary = RunSummary()
        self.started_wall = time.time()
        self.started = time.monotonic()
        self._samples: collections.deque[tuple[float, int]] = collections.deque()

    def fail(self, reason: str) -> None:
        """The serve ends with exit code 1 for ``reason`` (the first reason is kept)."""
        self.summary.exit_code = 1
        self.summary.reason = self.summary.reason or reason

    def rate(self) -> float:
        """Tasks acknowledged per second over the last minute (sampled at each call)."""
        now = time.monotonic()
        samples = self._samples
        samples.append((now, self.summary.succeeded))
        while len(samples) > 2 and now - samples[1][0] > 60:
            samples.popleft()
        (t0, n0), (t1, n1) = samples[0], samples[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0

    def info(
        self, role: str, state: str, concurrency: int, running: int, seeding: bool, handlers: list[str]
    ) -> dict[str, Any]:
        """What this worker publishes in the registry (shown by ``status``)."""
        s = self.summary
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "role": role,
            "state": state,
            "started": self.started_wall,
            "concurrency": concurrency,
            "running": running,
            "succeeded": s.succeeded,
            "failed": s.failed,
            "buried": s.buried,
            "rate": round(self.rate(), 1),
            "seeding": seeding,
            "handlers": handlers,
        }

    def log_start(self, role: str, concurrency: int, store: Store) -> None:
        log.info("%s: starting as %s, concurrency %d; %s", self.name, role, concurrency, store.describe())

    async def progress(self, store: Store, interval: float, running: Any, closed: asyncio.Event) -> None:
        """Log a progress line every ``interval`` seconds until ``closed`` (``running()`` counts handlers)."""
        while not await wait_event(closed, interval):
            s = self.summary
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
            log.info(
                "%s: %.1f tasks/s; %d ok, %d failed, %d dead letters, %d running; %s",
                self.name,
                self.rate(),
                s.succeeded,
                s.failed,
                s.buried,
                running(),
                queue,
            )

    def log_summary(self) -> None:
        s = self.summary
        s.elapsed = time.monotonic() - self.started
        log.info(
            "%s: finished in %.1f s (%s): %d ok (%.1f/s), %d failed (%d retried, %d dead), %d released, "
            "%d fenced, %d added, %d duplicates skipped locally",
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
            s.added,
            s.deduplicated,
        )


ERROR_MAX = 2048
"""Characters of error text a dead letter keeps."""


def error_text(exc: BaseException, with_traceback: bool) -> str:
    """The first line says what failed; then as much of the traceback's end as fits."""
    summary = "".join(traceback.format_exception_only(exc)).strip() or type(exc).__name__
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
        "rate": _number(info.get("rate")),
        "last_heartbeat_s": round(w.age, 1) if _number(w.age) is not None else None,
    }


async def status_data(name: str, store: Store) -> dict[str, Any]:
    """What ``status`` prints, as data."""
    stats = await store.stats()
    workers = await store.registry.workers() if store.registry is not None else []
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
    }
