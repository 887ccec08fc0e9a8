"""Prometheus metrics: the loop's counters in the text exposition format, through ``prometheus-client``.

:func:`render` turns counters (one worker's, or the loop's totals from the backend) and a
few gauges into ``/metrics`` text; :class:`MetricsServer` serves one worker's on
``start --metrics HOST:PORT``. Every family is named ``achihuo_*`` and labelled ``loop``
and ``worker`` (the alias, or ``all`` for the loop's totals)::

    achihuo_tasks_total{outcome}                     ok, failed, retried, dead, released, fenced,
                                                     added, skipped, deduplicated
    achihuo_handler_tasks_total{handler,outcome}
    achihuo_http_requests_total, achihuo_http_received_bytes_total
    achihuo_http_responses_total{status}, achihuo_http_retries_total{reason},
    achihuo_http_errors_total{type}, achihuo_http_host_requests_total{host}
    achihuo_http_request_duration_seconds            histogram
    achihuo_custom_total{name}                       the spider's own (self.stats.inc)
    achihuo_queue_tasks{state}, achihuo_done_names, achihuo_running_handlers, achihuo_workers

Label values come from counters a backend returned: the library escapes them.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from ._stats import BUCKETS
from .backend_kit import counter_ok
from .errors import ConfigError

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

__all__ = ["CONTENT_TYPE", "MetricsServer", "parse_address", "render"]

log = logging.getLogger("achihuo_mini")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LABELLED = (  # counter prefix -> (family, help, label)
    ("tasks/", "achihuo_tasks", "tasks by outcome", "outcome"),
    ("http/status/", "achihuo_http_responses", "HTTP responses by status code", "status"),
    ("http/retries/", "achihuo_http_retries", "HTTP tries that failed and were tried again, by reason", "reason"),
    ("http/errors/", "achihuo_http_errors", "HTTP tries that got no response, by exception type", "type"),
    ("http/host/", "achihuo_http_host_requests", "HTTP requests of the busiest hosts", "host"),
    ("custom/", "achihuo_custom", "the spider's own counters (self.stats.inc)", "name"),
    ("runs/finished/", "achihuo_runs_finished", "serves that ended, by reason", "reason"),
)
_PLAIN = (
    ("http/requests", "achihuo_http_requests", "HTTP tries sent"),
    ("http/bytes", "achihuo_http_received_bytes", "HTTP body bytes received"),
    ("runs/started", "achihuo_runs_started", "serves started"),
)


def render(loop: str, worker: str, counts: Mapping[str, int], gauges: Mapping[str, Any]) -> bytes:
    """``/metrics`` text for ``counts`` (counter names as in :mod:`._stats`) and ``gauges``:
    ``queue`` (a ``QueueStats``), ``done`` (int), ``running`` (int), ``workers`` (int); absent
    ones are left out."""
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(loop, worker, counts, gauges))
    return generate_latest(registry)


class _Collector:
    def __init__(self, loop: str, worker: str, counts: Mapping[str, int], gauges: Mapping[str, Any]) -> None:
        self.labels = {"loop": loop, "worker": worker}
        self.counts = {k: v for k, v in counts.items() if counter_ok(k, v) and v >= 0}
        self.gauges = gauges

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        base, counts = self.labels, self.counts
        names = list(base)
        values = list(base.values())
        for prefix, family, text, label in _LABELLED:
            metric = CounterMetricFamily(family, text, labels=[*names, label])
            for key, value in sorted(counts.items()):
                if key.startswith(prefix):  # the prefixes do not nest: each counter is in one family
                    metric.add_metric([*values, key[len(prefix) :]], value)
            yield metric
        handlers = CounterMetricFamily("achihuo_handler_tasks", "tasks by handler and outcome",
                                       labels=[*names, "handler", "outcome"])  # fmt: skip
        for key, value in sorted(counts.items()):
            if key.startswith("handler/"):
                handler, _, outcome = key[8:].rpartition("/")
                if handler:
                    handlers.add_metric([*values, handler, outcome], value)
        yield handlers
        for key, family, text in _PLAIN:
            metric = CounterMetricFamily(family, text, labels=names)
            metric.add_metric(values, counts.get(key, 0))
            yield metric
        buckets, total = [], 0
        for bound in BUCKETS:
            total += counts.get(f"http/latency/{bound:g}", 0)
            buckets.append(("+Inf" if math.isinf(bound) else f"{bound:g}", total))
        latency = HistogramMetricFamily(
            "achihuo_http_request_duration_seconds", "time to an HTTP answer (or to the error), per try", labels=names
        )
        latency.add_metric(values, buckets, counts.get("http/latency/sum_us", 0) / 1e6)
        yield latency

        queue = self.gauges.get("queue")
        if queue is not None:
            tasks = GaugeMetricFamily("achihuo_queue_tasks", "tasks in the queue by state", labels=[*names, "state"])
            for state in ("ready", "delayed", "leased", "dead"):
                tasks.add_metric([*values, state], getattr(queue, state))
            yield tasks
        for key, family, text in (
            ("done", "achihuo_done_names", "names in the done set"),
            ("running", "achihuo_running_handlers", "handlers running now"),
            ("workers", "achihuo_workers", "registered workers"),
        ):
            gauged = self.gauges.get(key)
            if type(gauged) is int:
                gauge = GaugeMetricFamily(family, text, labels=names)
                gauge.add_metric(values, gauged)
                yield gauge


def parse_address(text: Any, what: str = "metrics", any_port: bool = False) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:9464`` for IPv6) as a pair; :class:`ConfigError` otherwise.

    ``any_port``: port 0 (any free port, which the caller then prints) is allowed too."""
    if not isinstance(text, str) or ":" not in text:
        raise ConfigError(f"{what}: expected HOST:PORT such as 127.0.0.1:9464, got {text!r}")
    host, _, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    lowest = 0 if any_port else 1
    if not host or not (port.isascii() and port.isdigit()) or not lowest <= int(port) < 65536:
        raise ConfigError(f"{what}: expected HOST:PORT with a port from {lowest} to 65535, got {text!r}")
    return host, int(port)


class MetricsServer:
    """``/metrics`` of one worker over HTTP (aiohttp), in the loop's event loop."""

    def __init__(self, address: str, page: Callable[[], Awaitable[bytes]]) -> None:
        self.host, self.port = parse_address(address)
        self._page = page
        self._runner: Any = None

    async def start(self) -> None:
        """Listen; :class:`ConfigError` when the address cannot be bound (taken, not ours)."""
        from aiohttp import web

        async def metrics(request: web.Request) -> web.Response:
            body = await self._page()
            return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self.port).start()
        except OSError as exc:
            await runner.cleanup()
            reason = exc.strerror or exc
            raise ConfigError(f"--metrics {self.host}:{self.port}: cannot listen there: {reason}") from None
        self._runner = runner
        log.info("metrics on http://%s:%d/metrics", self.host, self.port)

    async def close(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            try:
                async with asyncio.timeout(5):
                    await runner.cleanup()
            except TimeoutError:
                log.warning("the metrics server did not close within 5 s")
