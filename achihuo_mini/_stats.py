"""Statistics: the counters every worker keeps, and how they read for people and machines.

:class:`Stats` is one loop's counters in this process: a dict of ``name -> int`` whose
hot-path cost is one dict increment per event (no backend call). The worker publishes
what changed since the last time with each heartbeat (and when it stops) to a queue that
offers the :class:`~achihuo_mini.backend.CounterStore` ability, so that the loop's totals
add up over every worker that ever ran, until ``clear stats`` (or ``clear all``).

Names (the same in the backend, ``status --json`` and the metrics)::

    tasks/ok, tasks/failed, tasks/retried, tasks/dead, tasks/released, tasks/fenced,
    tasks/added, tasks/skipped, tasks/deduplicated,
    tasks/disallowed                                  a task's outcomes, and what adds did
    handler/<name>/ok, handler/<name>/failed, handler/<name>/dead
    http/requests, http/bytes                         every try of async_web_request
    http/status/<code>                                responses by status code
    http/retries/<reason>                             tries that failed and were tried again
    http/errors/<ExceptionType>                       tries that got no response
    http/latency/<bucket>, http/latency/sum_us        response time histogram (see BUCKETS)
    http/host/<host>, http/host/(other)               requests of the busiest hosts (top N)
    custom/<name>                                     the spider's own: self.stats.inc('items')
    runs/started, runs/finished/<reason>              serves started, and why they ended
    min/first_start, max/last_seen                    unix milliseconds

Everything read back from a backend is checked (:func:`~achihuo_mini.backend_kit.counter_ok`)
and bounded: a spider can count at most :data:`CUSTOM_MAX` names of its own, at most
:data:`HOSTS_TOP` hosts are named, and a few hundred names of each other kind.
"""

from __future__ import annotations

import bisect
import heapq
import logging
import math
import time
from collections.abc import Iterable, Mapping
from typing import Any

from .backend_kit import COUNTER_NAME_MAX, counter_ok

__all__ = ["BUCKETS", "CUSTOM_MAX", "HOSTS_TOP", "NoStats", "Stats", "latency_summary", "structured", "table"]

log = logging.getLogger("achihuo_mini")

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, math.inf)
"""Upper bounds (seconds) of the response-time histogram, as Prometheus's default buckets
and a few more for slow sites; each counter ``http/latency/<bound>`` holds the tries that
took at most that long and more than the bound before (``inf`` for the rest)."""

_BUCKET_KEYS = tuple(f"http/latency/{b:g}" for b in BUCKETS)
CUSTOM_MAX = 200
"""Names a spider may count with ``self.stats.inc``; more are refused with a warning (once)."""
HOSTS_TOP = 10
"""Hosts named in the published counters; the requests of the others are summed as ``(other)``."""
_KIND_MAX = 300  # status codes, retry reasons, error types, handlers: names of each kind kept
OTHER_HOST = "(other)"


class Stats:
    """The counters of one loop in this process (see the module docstring).

    A spider counts its own things with :meth:`inc` (``self.stats.inc('items')``) and reads
    any counter of this process with :meth:`get` (its own names without the ``custom/``
    prefix). Counts from all workers of the loop are in ``status`` and on the metrics page.
    """

    __slots__ = ("_hosts", "_hosts_at_delta", "_kinds", "_refused", "_sent", "_sent_hosts", "counts")

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self._sent: dict[str, int] = {}
        self._hosts: dict[str, int] = {}
        self._sent_hosts: dict[str, int] = {}
        self._hosts_at_delta: dict[str, int] = {}
        self._kinds: dict[str, int] = {}  # names of a bounded kind seen so far, per kind
        self._refused = False

    # -- for spiders -------------------------------------------------------------------

    def inc(self, name: str, n: int = 1) -> None:
        """Add ``n`` (default 1, never negative) to the spider's own counter ``name``.

        Raises ``TypeError``/``ValueError`` for a name that is not a short string or a count
        that is not a non-negative int. At most :data:`CUSTOM_MAX` names are kept; further
        names are dropped with one warning.
        """
        if type(name) is not str or not name or len(name) > COUNTER_NAME_MAX - 7:
            raise TypeError(f"stats.inc: the name must be a non-empty str of at most {COUNTER_NAME_MAX - 7} characters")
        if type(n) is not int or n < 0:
            raise ValueError(f"stats.inc: the count must be an int of 0 or more, not {n!r}")
        key = "custom/" + name
        counts = self.counts
        if key not in counts and self._kinds.get("custom", 0) >= CUSTOM_MAX:
            if not self._refused:
                self._refused = True
                log.warning("stats.inc: more than %d names of the spider's own; %r and later ones are not counted",
                            CUSTOM_MAX, name)  # fmt: skip
            return
        if key not in counts:
            self._kinds["custom"] = self._kinds.get("custom", 0) + 1
        counts[key] = counts.get(key, 0) + n

    def get(self, name: str, default: int = 0) -> int:
        """This process's count of ``name``: a spider's own (``'items'``) or any other (``'tasks/ok'``)."""
        counts = self.counts
        return counts.get(name, counts.get("custom/" + name, default))

    def __getitem__(self, name: str) -> int:
        return self.get(name)

    def __repr__(self) -> str:
        return f"Stats({len(self.counts)} counters)"

    # -- for the loop (hot path: one dict increment) -----------------------------------

    def add(self, key: str, n: int = 1) -> None:
        counts = self.counts
        counts[key] = counts.get(key, 0) + n

    def add_bounded(self, kind: str, name: str, n: int = 1) -> None:
        """``<kind>/<name>`` for names that come from outside (status codes, error types,
        handler names): at most a few hundred names per kind, the rest as ``(other)``."""
        key = self.bounded_key(kind, name)
        counts = self.counts
        counts[key] = counts.get(key, 0) + n

    def bounded_key(self, kind: str, name: str) -> str:
        """The counter :meth:`add_bounded` adds to (a caller may keep it for the next time)."""
        key = f"{kind}/{name}"
        if key not in self.counts:
            seen = self._kinds.get(kind, 0)
            if seen >= _KIND_MAX or len(key) > COUNTER_NAME_MAX:
                return f"{kind}/(other)"
            self._kinds[kind] = seen + 1
            self.counts[key] = 0
        return key

    def response(self, seconds: float, status: int | None, size: int, host: str) -> None:
        """One try of ``async_web_request`` that got an answer (``status``) or none (``None``)."""
        counts = self.counts
        counts["http/requests"] = counts.get("http/requests", 0) + 1
        if status is not None:
            key = _STATUS_KEYS.get(status)
            if key is None:
                self.add_bounded("http/status", str(status))
            else:
                counts[key] = counts.get(key, 0) + 1
            if size:
                counts["http/bytes"] = counts.get("http/bytes", 0) + size
        bucket = _BUCKET_KEYS[bisect.bisect_left(BUCKETS, seconds)]
        counts[bucket] = counts.get(bucket, 0) + 1
        counts["http/latency/sum_us"] = counts.get("http/latency/sum_us", 0) + int(seconds * 1e6)
        hosts = self._hosts
        hosts[host] = hosts.get(host, 0) + 1

    # -- publishing --------------------------------------------------------------------

    def delta(self) -> dict[str, int]:
        """What changed since the last :meth:`sent` (the busiest hosts named, the rest summed)."""
        sent = self._sent
        changed = {
            k: v if k.startswith(("max/", "min/")) else v - sent.get(k, 0)
            for k, v in self.counts.items()
            if v != sent.get(k, 0)
        }
        hosts, sent_hosts = self._hosts, self._sent_hosts
        if len(hosts) > 4 * HOSTS_TOP:  # forget the quiet ones (their requests were published already)
            keep = set(heapq.nlargest(2 * HOSTS_TOP, hosts, key=hosts.__getitem__))
            for host in [h for h in hosts if h not in keep and hosts[h] == sent_hosts.get(h, 0)]:
                del hosts[host]
                sent_hosts.pop(host, None)
        top = set(heapq.nlargest(HOSTS_TOP, hosts, key=hosts.__getitem__))
        other = 0
        for host, n in hosts.items():
            d = n - sent_hosts.get(host, 0)
            if d:
                if host in top and counter_ok(f"http/host/{host}", d):
                    changed[f"http/host/{host}"] = d
                else:
                    other += d
        if other:
            changed["http/host/" + OTHER_HOST] = other
        self._hosts_at_delta = dict(hosts)
        return changed

    def sent(self, delta: Mapping[str, int]) -> None:
        """``delta`` (the last :meth:`delta`) reached the backend; what was counted meanwhile was not."""
        sent = self._sent
        for key, n in delta.items():
            if not key.startswith("http/host/"):
                sent[key] = sent.get(key, 0) + n if not key.startswith(("max/", "min/")) else n
        self._sent_hosts.update(self._hosts_at_delta)

    def since(self, baseline: Mapping[str, int]) -> dict[str, int]:
        """The counts added after ``baseline`` (a copy of :attr:`counts` taken earlier)."""
        return {k: v - baseline.get(k, 0) for k, v in self.counts.items() if v != baseline.get(k, 0)}

    def view(self, baseline: Mapping[str, int] | None = None) -> dict[str, int]:
        """This process's counters (since ``baseline``), the busiest hosts named as in the totals."""
        counts = dict(self.counts) if baseline is None else self.since(baseline)
        hosts = self._hosts
        top = heapq.nlargest(HOSTS_TOP, hosts, key=hosts.__getitem__)
        for host in top:
            counts[f"http/host/{host}"] = hosts[host]
        rest = sum(hosts.values()) - sum(hosts[h] for h in top)
        if rest:
            counts["http/host/" + OTHER_HOST] = rest
        return counts

    def stamp(self) -> None:
        """Record this moment as the loop's latest (and maybe first) sign of life."""
        now = int(time.time() * 1000)
        counts = self.counts
        counts["max/last_seen"] = now
        counts.setdefault("min/first_start", now)


class NoStats(Stats):
    """What HTTP requests count when the ``stats`` loop option is off: nothing."""

    __slots__ = ()

    def add(self, key: str, n: int = 1) -> None:
        pass

    def add_bounded(self, kind: str, name: str, n: int = 1) -> None:
        pass

    def bounded_key(self, kind: str, name: str) -> str:
        return f"{kind}/(other)"

    def response(self, seconds: float, status: int | None, size: int, host: str) -> None:
        pass


_STATUS_KEYS = {code: f"http/status/{code}" for code in range(100, 600)}


# -- reading counters ------------------------------------------------------------------


def latency_summary(counts: Mapping[str, int]) -> dict[str, float | int | None]:
    """Tries, mean and approximate percentiles (seconds) of the response-time histogram."""
    buckets = [max(0, counts.get(key, 0)) for key in _BUCKET_KEYS]
    total = sum(buckets)
    out: dict[str, float | int | None] = {"count": total, "mean": None, "p50": None, "p90": None, "p99": None}
    if not total:
        return out
    out["mean"] = round(max(0, counts.get("http/latency/sum_us", 0)) / 1e6 / total, 6)
    for label, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
        rank, seen = q * total, 0
        for i, n in enumerate(buckets):
            if n and seen + n >= rank:
                low = BUCKETS[i - 1] if i else 0.0
                high = BUCKETS[i] if math.isfinite(BUCKETS[i]) else low * 2 or 1.0
                out[label] = round(low + (high - low) * (rank - seen) / n, 6)
                break
            seen += n
    return out


def _group(counts: Mapping[str, int], prefix: str) -> dict[str, int]:
    return {k[len(prefix) :]: v for k, v in counts.items() if k.startswith(prefix)}


def structured(counts: Mapping[str, int], hosts: int = HOSTS_TOP) -> dict[str, Any]:
    """Counters as the nested data ``status --json`` shows under ``"stats"``.

    ``counts`` may come from a backend: only :func:`counter_ok` entries are used.
    """
    clean = {k: v for k, v in counts.items() if counter_ok(k, v)}
    tasks = _group(clean, "tasks/")
    handlers: dict[str, dict[str, int]] = {}
    for key, value in _group(clean, "handler/").items():
        name, _, outcome = key.rpartition("/")
        if name:
            handlers.setdefault(name, {})[outcome] = value
    host_counts = _group(clean, "http/host/")
    busiest = dict(sorted(host_counts.items(), key=lambda kv: (-kv[1], kv[0]))[:hosts])
    rest = sum(host_counts.values()) - sum(busiest.values())
    if rest:
        busiest[OTHER_HOST] = busiest.get(OTHER_HOST, 0) + rest
    first, last = clean.get("min/first_start"), clean.get("max/last_seen")
    return {
        "tasks": {name: tasks.get(name, 0) for name in _TASK_OUTCOMES} | tasks,
        "handlers": handlers,
        "http": {
            "requests": clean.get("http/requests", 0),
            "bytes": clean.get("http/bytes", 0),
            "status": dict(sorted(_group(clean, "http/status/").items())),
            "retries": _group(clean, "http/retries/"),
            "errors": _group(clean, "http/errors/"),
            "latency": latency_summary(clean),
            "hosts": busiest,
        },
        "custom": _group(clean, "custom/"),
        "runs": {"started": clean.get("runs/started", 0), "finished": _group(clean, "runs/finished/")},
        "first_start": first / 1000 if first is not None else None,
        "last_seen": last / 1000 if last is not None else None,
    }


_TASK_OUTCOMES = ("ok", "failed", "retried", "dead", "released", "fenced", "added", "skipped", "deduplicated",
                  "disallowed")  # fmt: skip


def table(counts: Mapping[str, int], extra: Iterable[tuple[str, Any]] = ()) -> str:
    """A readable block of counters, one per line, sorted (like Scrapy's stats dump)."""
    rows = [(k, v) for k, v in extra] + sorted((k, v) for k, v in counts.items() if not k.startswith(("min/", "max/")))
    latency = latency_summary(counts)
    if latency["count"]:
        rows.append(("http/latency (p50 / p90 / p99)", " / ".join(_ms(latency[p]) for p in ("p50", "p90", "p99"))))
    rows = [(k, v) for k, v in rows if not k.startswith("http/latency/")]
    width = max((len(k) for k, _ in rows), default=0)
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)


def _ms(seconds: Any) -> str:
    return f"{seconds * 1000:.0f} ms" if isinstance(seconds, (int, float)) else "?"
