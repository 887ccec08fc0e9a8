"""Crawl a generated static site per backend, against a bare aiohttp crawler in the same run.

    python benchmarks/crawl.py                         # 20 000 pages, every builtin backend
    python benchmarks/crawl.py -n 300 --backends memory sqlite

The site: N pages ``/p/<n>.html`` (about 4 KB each, 10 links each) generated with a
seeded RNG into a temp dir. Page i links to 2i+1 and 2i+2 (so every page is reachable
from ``/p/0.html``) and to 8 random pages at or below i (mostly already seen: about 90 %
of the links a crawler extracts are repeats, so dedup matters). It is served by nginx
(the system package: ``apt-get install nginx``) from a generated config: one worker,
``access_log off``, ``daemon off``, 127.0.0.1 on a free port; it is stopped at the end.
Without nginx (or with ``ACHIHUO_BENCH_SERVER=python``) a Python static server serves it
and a note under the table says it may then be the bottleneck.

Rows, each in a fresh subprocess (so CPU seconds, ``getrusage(RUSAGE_SELF)``, and peak
RSS, ``VmHWM`` from ``/proc/self/status``, are its own), at the same concurrency (64):

* ``server alone``: aiohttp GETs of the N known URLs, bodies read, no parsing: what the
  server (plus a Python client) can deliver. With the nginx worker's CPU share during
  each row, it shows the server is not the bottleneck of the crawlers.
* ``bare aiohttp`` (the baseline): one ClientSession (connector limit 64), an
  ``asyncio.Queue``, a ``seen`` set and 64 worker coroutines: fetch, extract links with
  the same regex, enqueue unseen ones, stop when the queue is drained.
* one row per backend: an ``AsyncLoop`` subclass (unique NAME) whose handler does
  ``resp = await self.async_web_request(item)``, extracts links with the same regex,
  ``add_task(..., task_name=url, repeat=False)`` for each and ``task_done(url)``;
  seeded with ``/p/0.html``; ``serve(idle_exit=0)``. Redis uses ``--redis-url``
  (default ``$REDIS_URL`` or redis://127.0.0.1:6379/0); its data is cleared after.
  Politeness is off in these rows (no per-host limit or delay: the loop's defaults).
* ``achihuo_mini redis, per_host_limit 64`` (unless ``--no-polite``): the Redis row with
  ``per_host_limit = 64`` held for the whole loop (the concurrency, so it never waits: the
  row shows what the loop-wide gate costs). Redis rows also report backend round trips per
  page (the backend counts every call it sends) and, like the scrapy-redis row, the Redis
  server's CPU per page (``INFO cpu`` before and after the row), with the pages/s one Redis
  core could serve at that cost: how many such workers one Redis carries.
* ``achihuo_mini <backend>, session.get`` (with ``--raw-http BACKEND ...``): that row with
  the handler fetching through the loop's aiohttp session directly (``session.get`` +
  ``read`` + ``bytes.decode``, as the bare crawler does) instead of ``async_web_request``:
  the difference to its plain row is what the HTTP wrapper (retries, statistics, the
  ``Response``, charset detection) costs per page.
* ``achihuo_mini sqlite, synchronous "full"`` (with ``--sqlite-full``): the SQLite row with
  every commit synced at once (the default, ``"auto"``, syncs handler acks lazily).
* peers, one row each when its package is importable (``pip install -e ".[bench]"``;
  the script names the ones it skipped): crawlers from other projects doing the same
  crawl at the same concurrency with their own defaults otherwise, their own dedup and
  the same regex on the body text:

  - ``scrapy``: a ``scrapy.Spider`` run by ``CrawlerProcess`` on the asyncio reactor,
    ``CONCURRENT_REQUESTS`` and ``CONCURRENT_REQUESTS_PER_DOMAIN`` 64, telnet console and
    remote control off, ``LOG_LEVEL`` WARNING (robots.txt, AutoThrottle and retries as by
    default: off, off, 2); its default in-memory scheduler and ``RFPDupeFilter`` dedup;
    ``parse`` yields ``response.follow(link)`` for each link.
  - ``scrapy-redis``: the same spider with scrapy-redis's ``Scheduler`` and
    ``RFPDupeFilter`` on ``--redis-url``, keys under a unique prefix, deleted after.
    Seeded by the spider's ``start`` (not ``RedisSpider``'s blocking pop): with
    ``SCHEDULER_IDLE_BEFORE_CLOSE`` 0 the scheduler pops without blocking, so Scrapy
    closes the spider once the Redis queue is empty and nothing is in flight.
  - ``crawlee``: crawlee's ``HttpCrawler`` (no browser, no HTML parser; its default
    HTTP client, impit), ``ConcurrencySettings`` min = desired = max = 64, its request
    queue deduplicating on ``unique_key`` (the normalised URL); the handler does
    ``await context.add_requests(urls)``. Two rows: ``MemoryStorageClient`` and
    ``crawlee-fs``, its default ``FileSystemStorageClient``, in the run's temp dir.

  A peer that misses a page, fetches one twice or fails a request does not stop the
  run: its row gets a numbered note under the table saying so.

Every crawler of ours (and the baseline) must fetch each of the N pages exactly once, or
the script fails. Wall time and CPU seconds of a row are from the start of the crawl
(after imports) to its end, including opening and closing the backend and the HTTP
session; peak RSS is the whole process's. A peer's child process does not import
achihuo_mini (nor aiohttp, unless the peer does: Scrapy's remote-control extension does).
Children run in the temp dir, so nothing lands in the cwd.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import importlib.util
import json
import os
import random
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

# _common (and so achihuo_mini) is imported where it is used: a peer's child must not carry it.

HERE = Path(__file__).resolve()
LINK = re.compile(r'<a href="(/p/\d+\.html)">')
LINKS_PER_PAGE = 10
PAGE_BYTES = 4096
WORDS = (
    "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt ut labore et "
    "dolore magna aliqua enim ad minim veniam quis nostrud exercitation ullamco laboris nisi aliquip ex ea "
    "commodo consequat duis aute irure in reprehenderit voluptate velit esse cillum eu fugiat nulla pariatur"
).split()


# -- the site -----------------------------------------------------------------------


def page_links(i: int, n: int, rng: random.Random) -> list[int]:
    """Two tree links (2i+1, 2i+2: every page reachable from 0) and random links to pages <= i."""
    tree = [c for c in (2 * i + 1, 2 * i + 2) if c < n]
    return tree + [rng.randint(0, i) for _ in range(LINKS_PER_PAGE - len(tree))]


def generate_site(root: Path, n: int, seed: int = 20_000) -> int:
    """Write N pages under ``root/p``; return their total size in bytes. Same (n, seed), same bytes."""
    rng = random.Random(seed)
    (root / "p").mkdir(parents=True)
    # a pool of filler paragraphs, picked per page (generating 80 MB of words would dominate)
    pool = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60))) for _ in range(256)]
    total = 0
    for i in range(n):
        links = "\n".join(f'<li><a href="/p/{j}.html">page {j}</a></li>' for j in page_links(i, n, rng))
        head = (
            f"<!doctype html>\n<html><head><title>page {i}</title></head><body>\n"
            f"<h1>page {i}</h1>\n<ul>\n{links}\n</ul>\n"
        )
        parts = [head]
        size = len(head) + 15
        while size < PAGE_BYTES:
            para = f"<p>{rng.choice(pool)}</p>\n"
            parts.append(para)
            size += len(para)
        parts.append("</body></html>\n")
        data = "".join(parts).encode()
        (root / "p" / f"{i}.html").write_bytes(data)
        total += len(data)
    return total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


PYTHON_SERVER = """
import sys
from aiohttp import web
app = web.Application()
app.router.add_static("/", sys.argv[1])
web.run_app(app, host="127.0.0.1", port=int(sys.argv[2]), print=None, access_log=None)
"""
"""The static server when nginx is not installed: one Python process (it can be the bottleneck)."""


class Nginx:
    """nginx serving ``root`` from a generated config (one worker, no access log), as a subprocess."""

    def __init__(self, tmp: Path, root: Path) -> None:
        self.binary = shutil.which("nginx") or next(
            (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.path.exists(p)), None
        )
        if os.environ.get("ACHIHUO_BENCH_SERVER") == "python":
            self.binary = None
        self.name = "nginx" if self.binary else "python (aiohttp static)"
        self.tmp, self.root, self.port = tmp, root, free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def config(self) -> Path:
        t = self.tmp
        user = "user root;" if os.geteuid() == 0 else ""  # the temp dir is private to us
        conf = t / "nginx.conf"
        conf.write_text(
            f"""{user}
daemon off;
worker_processes 1;
pid {t}/nginx.pid;
error_log {t}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    types {{ text/html html; }}
    default_type application/octet-stream;
    charset utf-8;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_requests 1000000;
    keepalive_timeout 60s;
    open_file_cache max=4096 inactive=60s;  # stays well under the fd limit
    client_body_temp_path {t}/client_body;
    proxy_temp_path {t}/proxy;
    fastcgi_temp_path {t}/fastcgi;
    uwsgi_temp_path {t}/uwsgi;
    scgi_temp_path {t}/scgi;
    server {{
        listen 127.0.0.1:{self.port};
        root {self.root};
    }}
}}
"""
        )
        return conf

    def start(self) -> str:
        if self.binary is None:  # no nginx (a fresh machine): Python serves, and may be the bottleneck
            cmd = [sys.executable, "-c", PYTHON_SERVER, str(self.root), str(self.port)]
        else:
            conf = self.config()
            cmd = [self.binary, "-p", str(self.tmp), "-c", str(conf), "-e", str(self.tmp / "nginx-error.log")]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise SystemExit(f"{self.name} exited with {self.proc.returncode}:\n{err}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return f"http://127.0.0.1:{self.port}"
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise SystemExit(f"{self.name} did not start listening within 10 s")

    def worker_pids(self) -> list[int]:
        assert self.proc is not None
        try:
            text = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        except OSError:
            return []
        return [int(p) for p in text.split()]

    def cpu(self) -> float:
        """CPU seconds used so far by the master and its workers."""
        assert self.proc is not None
        total = 0
        tick = os.sysconf("SC_CLK_TCK")
        for pid in [self.proc.pid, *self.worker_pids()]:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += int(fields[11]) + int(fields[12])  # utime, stime
        return total / tick

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: fast shutdown of master and workers
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# -- the crawlers (each runs in its own child process) ----------------------------------


async def server_alone(base: str, n: int, concurrency: int) -> int:
    """GET every known URL, read the body, no parsing."""
    import aiohttp

    urls = [f"{base}/p/{i}.html" for i in range(n)]
    got = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:

        async def worker(k: int) -> None:
            nonlocal got
            for url in urls[k::concurrency]:
                async with session.get(url) as resp:
                    resp.raise_for_status()
                    await resp.read()
                got += 1

        await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return got


async def bare_aiohttp(base: str, n: int, concurrency: int) -> int:
    """The baseline crawler: ClientSession + asyncio.Queue + a seen set + workers."""
    import aiohttp

    start = "/p/0.html"
    queue: asyncio.Queue[str] = asyncio.Queue()
    seen = {start}
    queue.put_nowait(start)
    fetched = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:

        async def worker() -> None:
            nonlocal fetched
            while True:
                path = await queue.get()
                try:
                    async with session.get(base + path) as resp:
                        resp.raise_for_status()
                        text = (await resp.read()).decode(resp.charset or "utf-8")
                    fetched += 1
                    for link in LINK.findall(text):
                        if link not in seen:
                            seen.add(link)
                            queue.put_nowait(link)
                finally:
                    queue.task_done()

        workers = [asyncio.create_task(worker()) for _ in range(concurrency)]
        await queue.join()
        for w in workers:
            w.cancel()
        results = await asyncio.gather(*workers, return_exceptions=True)
        errors = [r for r in results if not isinstance(r, asyncio.CancelledError)]
        if errors:
            raise errors[0]
    assert len(seen) == fetched, f"bare aiohttp: {len(seen)} seen, {fetched} fetched"
    return fetched


async def achihuo(
    base: str, n: int, concurrency: int, backend: str, redis_url: str, tmp: Path
) -> tuple[int, int | None]:
    """Our crawler on ``backend``: repeat=False dedup, task_done, serve(idle_exit=0).

    Returns the pages fetched and, for Redis, the backend round trips of the crawl.
    ``backend:nostats`` runs it with the ``stats`` option off (no HTTP statistics, nothing
    published), to measure what the statistics cost; ``backend:gc`` with ``tune_gc`` on (as
    ``start`` runs), to measure what tuning the garbage collector gains; ``sqlite:full`` with
    the SQLite option ``synchronous = "full"`` (every commit synced); ``backend:polite``
    with ``per_host_limit`` = the concurrency (the per-host gate held for the whole loop)."""
    from _common import unique_name, write_config

    from achihuo_mini import AsyncLoop, Item

    backend, _, flag = backend.partition(":")
    stats = flag != "nostats"
    tuned = flag == "gc"
    raw = flag == "raw"
    polite = {"per_host_limit": concurrency} if flag == "polite" else {}
    name = unique_name("crawl")
    extra = 'synchronous = "full"' if flag == "full" else ""
    config = write_config(tmp / f"{name}.toml", backend, redis_url, tmp / f"{name}.sqlite3", extra)

    class Spider(AsyncLoop):
        NAME = name

        def __init__(self) -> None:
            super().__init__(
                concurrency=concurrency,
                config_file=config,
                debug=False,
                progress_interval=0,
                stats=stats,
                tune_gc=tuned,
                **polite,
            )
            self.fetched: set[str] = set()
            self.count = 0

        async def run(self) -> None:
            url = base + "/p/0.html"
            self.add_task("get_page", Item(method="GET", url=url), task_name=url, repeat=False)

        async def get_page(self, item: Item) -> None:
            # the loop's session without the wrapper around it (looked up only in those rows)
            if raw and (http := self._AsyncLoop__core.http) is not None:  # type: ignore[attr-defined]
                async with http.session().get(item.url) as r:
                    r.raise_for_status()
                    text = (await r.read()).decode(r.charset or "utf-8")
            else:  # (the first request builds the loop's HTTP client)
                text = (await self.async_web_request(item)).text
            for link in LINK.findall(text):
                url = base + link
                self.add_task("get_page", Item(method="GET", url=url), task_name=url, repeat=False)
            self.task_done(item.url)
            self.count += 1
            self.fetched.add(item.url)

    spider = Spider()
    trips: int | None = None
    try:
        summary = await spider.serve(idle_exit=0)
        store = spider._AsyncLoop__core.store  # type: ignore[attr-defined]  # the backends it served with
        trips = getattr(store.raw_queue, "round_trips", None)
        if trips is not None:
            trips += store.raw_done.round_trips
    finally:
        await spider.clear_data("all")
    assert summary.failed == 0 and summary.buried == 0, f"{backend}: {summary}"
    assert spider.count == len(spider.fetched) == summary.succeeded, (
        f"{backend}: {spider.count} fetches of {len(spider.fetched)} pages ({summary.succeeded} tasks)"
    )
    return spider.count, trips


# -- peers: other projects' crawlers (each in its own child process, like ours) -----------

# kind -> (modules it needs, the pip distribution that brings them)
PEERS: dict[str, tuple[tuple[str, ...], str]] = {
    "scrapy": (("scrapy",), "scrapy"),
    "scrapy-redis": (("scrapy", "scrapy_redis"), "scrapy-redis"),
    "crawlee": (("crawlee",), "crawlee"),
    "crawlee-fs": (("crawlee",), "crawlee"),
}


def peer_installed(kind: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in PEERS[kind][0])


def peer_label(kind: str, detail: str) -> str:
    def v(dist: str) -> str:
        return importlib.metadata.version(dist)

    if kind == "scrapy":
        return f"Scrapy {v('scrapy')} ({detail}, memory scheduler)"
    if kind == "scrapy-redis":
        return f"scrapy-redis {v('scrapy-redis')} (Scrapy {v('scrapy')}, {detail}, Redis scheduler)"
    storage = "memory storage" if kind == "crawlee" else "file-system storage, its default"
    return f"crawlee {v('crawlee')} HttpCrawler ({storage})"


def scrapy_crawl(base: str, concurrency: int, redis_url: str | None) -> dict[str, Any]:
    """Scrapy with its own scheduler and dupefilter, or scrapy-redis's on ``redis_url``."""
    import scrapy
    from scrapy.crawler import CrawlerProcess
    from scrapy.exceptions import ScrapyDeprecationWarning

    # scrapy-redis 0.9 still passes spider= to the stats collector; the warnings are noise here
    warnings.filterwarnings("ignore", category=ScrapyDeprecationWarning, module="scrapy_redis")
    spider_name = f"crawl-{uuid.uuid4().hex[:8]}"
    counts: dict[str, int] = {}

    class Spider(scrapy.Spider):
        name = spider_name

        async def start(self) -> Any:
            yield scrapy.Request(base + "/p/0.html")

        def parse(self, response: Any) -> Any:
            counts[response.url] = counts.get(response.url, 0) + 1
            for link in LINK.findall(response.text):
                yield response.follow(link)

    settings: dict[str, Any] = {
        "TWISTED_REACTOR": "twisted.internet.asyncioreactor.AsyncioSelectorReactor",
        "CONCURRENT_REQUESTS": concurrency,
        "CONCURRENT_REQUESTS_PER_DOMAIN": concurrency,
        "ROBOTSTXT_OBEY": False,
        "AUTOTHROTTLE_ENABLED": False,
        "TELNETCONSOLE_ENABLED": False,
        # its HTTP code-execution console (recent Scrapy, on by default): an aiohttp server plus a
        # job file under ~/.local/state; off like the telnet console (Scrapy still imports aiohttp)
        "REMOTE_CONTROL_ENABLED": False,
        "LOG_LEVEL": "WARNING",
    }
    if redis_url is not None:
        settings |= {
            "SCHEDULER": "scrapy_redis.scheduler.Scheduler",
            "DUPEFILTER_CLASS": "scrapy_redis.dupefilter.RFPDupeFilter",
            "REDIS_URL": redis_url,
            "SCHEDULER_QUEUE_KEY": f"{spider_name}:requests",
            "SCHEDULER_DUPEFILTER_KEY": f"{spider_name}:dupefilter",
            "SCHEDULER_PERSIST": False,  # the scheduler deletes both keys when the spider closes
        }
    process = CrawlerProcess(settings)
    crawler = process.create_crawler(Spider)
    process.crawl(crawler)
    try:
        process.start()  # returns when the spider closes: nothing scheduled, nothing in flight
    finally:
        if redis_url is not None:
            import redis

            client = redis.Redis.from_url(redis_url)
            try:
                keys = list(client.scan_iter(match=f"{spider_name}:*"))
                if keys:
                    client.delete(*keys)
            finally:
                client.close()
    from twisted.internet import reactor

    stats = crawler.stats.get_stats()
    name = type(reactor).__name__
    detail = "asyncio reactor" if name == "AsyncioSelectorReactor" else f"{name} reactor"
    return {
        "pages": len(counts),
        "fetches": int(stats.get("downloader/request_count", 0)),  # retries included
        "handled": sum(counts.values()),
        "failed": int(stats.get("log_count/ERROR", 0)),
        "detail": detail,
    }


async def crawlee_crawl(base: str, concurrency: int, storage_dir: Path, memory: bool) -> dict[str, Any]:
    """crawlee's HttpCrawler (no browser), its request queue doing the dedup."""
    from crawlee import ConcurrencySettings, service_locator
    from crawlee.configuration import Configuration
    from crawlee.crawlers import HttpCrawler, HttpCrawlingContext
    from crawlee.storage_clients import FileSystemStorageClient, MemoryStorageClient

    # set before the crawler exists, so nothing falls back to ./storage or warns about implicit config
    service_locator.set_configuration(Configuration(storage_dir=str(storage_dir), purge_on_start=True))
    service_locator.set_storage_client(MemoryStorageClient() if memory else FileSystemStorageClient())
    crawler = HttpCrawler(
        concurrency_settings=ConcurrencySettings(
            min_concurrency=concurrency, desired_concurrency=concurrency, max_concurrency=concurrency
        ),
        configure_logging=False,  # its loggers propagate to the root: warnings and errors only
    )
    counts: dict[str, int] = {}

    @crawler.router.default_handler
    async def get_page(context: HttpCrawlingContext) -> None:
        url = context.request.url
        counts[url] = counts.get(url, 0) + 1
        text = (await context.http_response.read()).decode()
        await context.add_requests([base + link for link in LINK.findall(text)])

    stats = await crawler.run([base + "/p/0.html"])
    return {
        "pages": len(counts),
        "fetches": sum((retries + 1) * k for retries, k in enumerate(stats.retry_histogram)),
        "handled": sum(counts.values()),
        "failed": stats.requests_failed,
        "detail": "",
    }


def peer_note(r: dict[str, Any], n: int) -> str:
    """What a peer did differently from 'each of the N pages fetched and handled exactly once'."""
    problems = []
    if r["pages"] != n:
        problems.append(f"{r['pages']:,} distinct pages of {n:,}")
    if r["fetches"] != r["pages"]:
        problems.append(f"{r['fetches']:,} fetches")
    if r["handled"] != r["pages"]:
        problems.append(f"{r['handled']:,} handler calls")
    if r["failed"]:
        problems.append(f"{r['failed']:,} failed requests")
    return ", ".join(problems)


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(args: argparse.Namespace) -> None:
    kind, base, n, c = args.child, args.url, args.pages, args.concurrency
    # imports are not part of the crawl's time (a peer's are its own only: no achihuo_mini)
    if kind in ("scrapy", "scrapy-redis"):
        import scrapy.crawler  # noqa: F401
    elif kind in ("crawlee", "crawlee-fs"):
        import crawlee.crawlers  # noqa: F401
    else:
        import aiohttp  # noqa: F401

        import achihuo_mini.http  # noqa: F401
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    result: dict[str, Any]
    if kind in ("scrapy", "scrapy-redis"):
        result = scrapy_crawl(base, c, args.redis_url if kind == "scrapy-redis" else None)
    elif kind in ("crawlee", "crawlee-fs"):
        storage = Path(args.tmp) / f"crawlee-{uuid.uuid4().hex[:8]}"
        result = asyncio.run(crawlee_crawl(base, c, storage, memory=kind == "crawlee"))
    elif kind == "server":
        result = {"pages": asyncio.run(server_alone(base, n, c))}
    elif kind == "bare":
        with asyncio.Runner(loop_factory=_loop_factory(args.event_loop)) as runner:
            result = {"pages": runner.run(bare_aiohttp(base, n, c))}
    else:
        with asyncio.Runner(loop_factory=_loop_factory(args.event_loop)) as runner:
            pages, trips = runner.run(achihuo(base, n, c, kind, args.redis_url, Path(args.tmp)))
        result = {"pages": pages, "trips": trips}
    wall = time.perf_counter() - started
    r = resource.getrusage(resource.RUSAGE_SELF)
    cpu = r.ru_utime + r.ru_stime - r0.ru_utime - r0.ru_stime
    print(json.dumps(result | {"wall": wall, "cpu": cpu, "rss": peak_rss_mib()}))


# -- the parent ---------------------------------------------------------------------


def _loop_factory(name: str) -> Any:
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return None


def measure(
    kind: str, base: str, args: argparse.Namespace, tmp: Path, server: Nginx, event_loop: str = "asyncio"
) -> dict[str, Any]:
    cmd = [sys.executable, str(HERE), "--child", kind, "--url", base, "-n", str(args.pages)]
    cmd += ["--event-loop", event_loop]
    cmd += ["-c", str(args.concurrency), "--redis-url", args.redis_url, "--tmp", str(tmp)]
    uses_redis = kind.startswith("redis") or kind == "scrapy-redis"
    redis0 = redis_cpu(args.redis_url) if uses_redis else 0.0
    cpu0 = server.cpu()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp)
    server_cpu = server.cpu() - cpu0
    redis_used = redis_cpu(args.redis_url) - redis0 if uses_redis else None
    if proc.returncode != 0 or not proc.stdout.strip():
        log = tmp / "nginx-error.log"
        errors = log.read_text()[-2000:] if log.exists() else ""
        raise SystemExit(f"{kind}: exited with {proc.returncode}:\n{proc.stderr}\nnginx error log (tail):\n{errors}")
    r: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    if kind in PEERS:
        r["note"] = peer_note(r, args.pages)  # reported under the table, not fatal: it is not our crawler
    elif r["pages"] != args.pages:
        raise SystemExit(f"{kind}: fetched {r['pages']} pages of {args.pages}")
    r["server_cpu"] = server_cpu
    r["redis_cpu"] = redis_used
    return r


def redis_cpu(url: str) -> float:
    """CPU seconds the Redis server has used (``INFO cpu``: user + system, all its threads)."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        info = client.info("cpu")
    finally:
        client.close()
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--pages", type=int, default=20_000)
    parser.add_argument("-c", "--concurrency", type=int, default=64)
    parser.add_argument("--backends", nargs="+", help="default: memory sqlite redis (those registered)")
    parser.add_argument(
        "--peers",
        nargs="*",
        choices=list(PEERS),
        default=list(PEERS),
        help="peer crawlers to run when installed (default: all; none with a bare --peers)",
    )
    parser.add_argument(
        "--stats-off",
        nargs="*",
        metavar="BACKEND",
        help="also run these backends with the stats option off (bare: memory), to see what statistics cost",
    )
    parser.add_argument(
        "--tune-gc",
        nargs="*",
        metavar="BACKEND",
        help="also run these backends with tune_gc on, as `start` does (bare: memory)",
    )
    parser.add_argument(
        "--raw-http",
        nargs="*",
        metavar="BACKEND",
        help="also run these backends with the handler on session.get instead of async_web_request "
        "(bare: memory), to see what the HTTP wrapper costs",
    )
    parser.add_argument("--redis-url", help="default: $REDIS_URL or redis://127.0.0.1:6379/0")
    parser.add_argument(
        "--sqlite-full",
        action="store_true",
        help='also run the SQLite row with synchronous = "full" (every commit synced at once)',
    )
    parser.add_argument(
        "--event-loops",
        nargs="+",
        choices=["asyncio", "uvloop"],
        help="event loops of the bare and achihuo_mini rows (default: asyncio, and uvloop when installed); "
        "each row's ratio is against the bare crawler on the same event loop",
    )
    parser.add_argument("--event-loop", default="asyncio", help=argparse.SUPPRESS)
    parser.add_argument(
        "--no-polite", action="store_true", help="skip the Redis row with per_host_limit (run with redis)"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--tmp", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    from _common import DEFAULT_REDIS_URL, machine, table

    from achihuo_mini.plugins import registry

    if args.backends is None:
        args.backends = [b for b in ("memory", "sqlite", "redis") if b in registry.names()]
    args.redis_url = args.redis_url or DEFAULT_REDIS_URL
    peers = [p for p in args.peers if peer_installed(p)]
    missing = sorted({PEERS[p][1] for p in args.peers if p not in peers})
    n, c = args.pages, args.concurrency
    uvloop_installed = importlib.util.find_spec("uvloop") is not None
    event_loops = args.event_loops or (["asyncio", "uvloop"] if uvloop_installed else ["asyncio"])
    if "uvloop" in event_loops and not uvloop_installed:
        raise SystemExit('--event-loops uvloop: uvloop is not installed (pip install -e ".[fast]")')
    with tempfile.TemporaryDirectory(prefix="achihuo-crawl-") as tmpdir:
        tmp = Path(tmpdir)
        started = time.perf_counter()
        size = generate_site(tmp / "site", n)
        gen_s = time.perf_counter() - started
        server = Nginx(tmp, tmp / "site")
        base = server.start()
        try:
            runs = [("server alone (GET known URLs)", measure("server", base, args, tmp, server))]
            bares: dict[str, float] = {}
            baseline = {id(runs[0][1]): "asyncio"}
            stats_off = [] if args.stats_off is None else args.stats_off or ["memory"]
            tune_gc = [] if args.tune_gc is None else args.tune_gc or ["memory"]
            raw_http = [] if args.raw_http is None else args.raw_http or ["memory"]
            for ev in event_loops:
                tag = "" if ev == "asyncio" else f" ({ev})"
                r = measure("bare", base, args, tmp, server, ev)
                bares[ev] = n / r["wall"]
                baseline[id(r)] = ev
                runs.append((f"bare aiohttp + Queue + set{tag}", r))
                variants = [(b, f"achihuo_mini {b}") for b in args.backends]
                variants += [(f"{b}:nostats", f"achihuo_mini {b}, stats off") for b in args.backends if b in stats_off]
                variants += [(f"{b}:gc", f"achihuo_mini {b}, tune_gc") for b in args.backends if b in tune_gc]
                variants += [(f"{b}:raw", f"achihuo_mini {b}, session.get") for b in args.backends if b in raw_http]
                if args.sqlite_full and "sqlite" in args.backends:
                    variants.append(("sqlite:full", 'achihuo_mini sqlite, synchronous "full"'))
                for kind, label in variants:
                    r = measure(kind, base, args, tmp, server, ev)
                    baseline[id(r)] = ev
                    runs.append((label + tag, r))
            if "redis" in args.backends and not args.no_polite:
                r = measure("redis:polite", base, args, tmp, server)
                baseline[id(r)] = "asyncio"
                runs.append((f"achihuo_mini redis, per_host_limit {c}", r))
            for peer in peers:
                r = measure(peer, base, args, tmp, server)
                runs.append((peer_label(peer, r.get("detail", "")), r))
        finally:
            server.stop()
        server_name = "nginx 1 worker" if server.binary else server.name
    bare = bares["asyncio"] if "asyncio" in bares else next(iter(bares.values()))
    rows = [["crawler", "pages", "pages/s", "CPU s", "peak RSS MiB", "server CPU %", "vs bare aiohttp",
             "round trips/page", "Redis CPU µs/page"]]  # fmt: skip
    ceilings: list[str] = []
    notes: list[str] = []
    for label, r in runs:
        rate = r["pages"] / r["wall"]
        if r.get("note"):
            notes.append(f"[{len(notes) + 1}] {label}: {r['note']}")
            label += f" [{len(notes)}]"
        rows.append(
            [
                label,
                f"{r['pages']:,}",
                f"{rate:,.0f}",
                f"{r['cpu']:.2f}",
                f"{r['rss']:.0f}",
                f"{100 * r['server_cpu'] / r['wall']:.0f}",
                f"{rate / bares.get(baseline.get(id(r), 'asyncio'), bare):.2f}",
                f"{r['trips'] / r['pages']:.3f}" if r.get("trips") is not None else "-",
                f"{1e6 * r['redis_cpu'] / r['pages']:.0f}" if r.get("redis_cpu") and r["pages"] else "-",
            ]
        )
        if r.get("redis_cpu") and r["pages"]:
            ceiling = r["pages"] / r["redis_cpu"]
            ceilings.append(f"{label}: {ceiling:,.0f} pages/s, {ceiling / rate:.1f} workers at this row's rate")
    print(
        f"crawl of {n:,} pages ({size / n / 1024:.1f} KB avg, {LINKS_PER_PAGE} links each, "
        f"{size / 2**20:.0f} MiB, generated in {gen_s:.1f} s), {server_name}, concurrency {c}; {machine()}"
    )
    print(table(rows))
    print(
        "vs bare aiohttp: each row against the bare crawler on the same event loop"
        + ("" if uvloop_installed else '; uvloop is not installed (pip install -e ".[fast]"), so asyncio only')
    )
    if server_name != "nginx 1 worker":
        print(
            "NOTE: nginx is not installed, so a Python static server served the site: it may be the "
            "bottleneck of every row (see its CPU %); install nginx for figures worth comparing"
        )
    print(
        "server CPU %: the static server's CPU time during the row / the row's wall time "
        "(well under 100 %: the server is not the bottleneck)"
    )
    print(
        "round trips/page: backend calls (scripts, commands, pipelines) of the whole crawl / pages; "
        "Redis rows only (the backend counts them)"
    )
    if ceilings:
        print(
            "Redis CPU µs/page: the Redis server's CPU time during the row (INFO cpu, user + system) / pages; "
            "one Redis core at that cost could serve (Redis runs commands on one thread):"
        )
        for line in ceilings:
            print(f"  {line}")
    if peers:
        print(
            "peers: other crawlers, same site, concurrency and regex, with their own dedup; "
            "every row fetched each page exactly once unless a note below says otherwise"
        )
    for note in notes:
        print(note)
    if missing:
        print(f'peers not installed, so not run: {", ".join(missing)} (install them with `pip install -e ".[bench]"`)')


if __name__ == "__main__":
    main()
