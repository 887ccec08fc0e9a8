"""Crawl a generated static site per backend, against a bare aiohttp crawler in the same run.

    python benchmarks/crawl.py                         # 20 000 pages, every builtin backend
    python benchmarks/crawl.py -n 300 --backends memory sqlite

The site: N pages ``/p/<n>.html`` (about 4 KB each, 10 links each) generated with a
seeded RNG into a temp dir. Page i links to 2i+1 and 2i+2 (so every page is reachable
from ``/p/0.html``) and to 8 random pages at or below i (mostly already seen: about 90 %
of the links a crawler extracts are repeats, so dedup matters). It is served by nginx
(the system package: ``apt-get install nginx``) from a generated config: one worker,
``access_log off``, ``daemon off``, 127.0.0.1 on a free port; it is stopped at the end.

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

Every crawler must fetch each of the N pages exactly once, or the script fails.
Wall time and CPU seconds of a row are from the start of the crawl (after imports) to its
end, including opening and closing the backend and the HTTP session; peak RSS is the
whole process's.
"""

from __future__ import annotations

import argparse
import asyncio
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
from pathlib import Path
from typing import Any

from _common import DEFAULT_REDIS_URL, machine, table, unique_name, write_config

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


class Nginx:
    """nginx serving ``root`` from a generated config (one worker, no access log), as a subprocess."""

    def __init__(self, tmp: Path, root: Path) -> None:
        self.binary = shutil.which("nginx") or next(
            (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.path.exists(p)), None
        )
        if self.binary is None:
            raise SystemExit(
                "crawl.py needs nginx as the static server (it must not be the bottleneck): "
                "install it with `apt-get install -y nginx` (or your system's package)"
            )
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
        conf = self.config()
        cmd = [self.binary or "nginx", "-p", str(self.tmp), "-c", str(conf), "-e", str(self.tmp / "nginx-error.log")]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise SystemExit(f"nginx exited with {self.proc.returncode}:\n{err}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return f"http://127.0.0.1:{self.port}"
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise SystemExit("nginx did not start listening within 10 s")

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


async def achihuo(base: str, n: int, concurrency: int, backend: str, redis_url: str, tmp: Path) -> int:
    """Our crawler on ``backend``: repeat=False dedup, task_done, serve(idle_exit=0)."""
    from achihuo_mini import AsyncLoop, Item

    name = unique_name("crawl")
    config = write_config(tmp / f"{name}.toml", backend, redis_url, tmp / f"{name}.sqlite3")

    class Spider(AsyncLoop):
        NAME = name

        def __init__(self) -> None:
            super().__init__(concurrency=concurrency, config_file=config, debug=False, progress_interval=0)
            self.fetched: set[str] = set()
            self.count = 0

        async def run(self) -> None:
            url = base + "/p/0.html"
            self.add_task("get_page", Item(method="GET", url=url), task_name=url, repeat=False)

        async def get_page(self, item: Item) -> None:
            resp = await self.async_web_request(item)
            for link in LINK.findall(resp.text):
                url = base + link
                self.add_task("get_page", Item(method="GET", url=url), task_name=url, repeat=False)
            self.task_done(item.url)
            self.count += 1
            self.fetched.add(item.url)

    spider = Spider()
    try:
        summary = await spider.serve(idle_exit=0)
    finally:
        await spider._open()
        try:
            await spider._queue.clear("queue")
            await spider._queue.clear("dead")
            await spider._done.clear()
        finally:
            await spider._close_backends()
    assert summary.failed == 0 and summary.buried == 0, f"{backend}: {summary}"
    assert spider.count == len(spider.fetched) == summary.succeeded, (
        f"{backend}: {spider.count} fetches of {len(spider.fetched)} pages ({summary.succeeded} tasks)"
    )
    return spider.count


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(args: argparse.Namespace) -> None:
    import aiohttp  # noqa: F401  (imports are not part of the crawl's time)

    import achihuo_mini.http  # noqa: F401

    kind, base, n, c = args.child, args.url, args.pages, args.concurrency
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    if kind == "server":
        pages = asyncio.run(server_alone(base, n, c))
    elif kind == "bare":
        pages = asyncio.run(bare_aiohttp(base, n, c))
    else:
        pages = asyncio.run(achihuo(base, n, c, kind, args.redis_url, Path(args.tmp)))
    wall = time.perf_counter() - started
    r = resource.getrusage(resource.RUSAGE_SELF)
    cpu = r.ru_utime + r.ru_stime - r0.ru_utime - r0.ru_stime
    print(json.dumps({"pages": pages, "wall": wall, "cpu": cpu, "rss": peak_rss_mib()}))


# -- the parent ---------------------------------------------------------------------


def measure(kind: str, base: str, args: argparse.Namespace, tmp: Path, server: Nginx) -> dict[str, Any]:
    cmd = [sys.executable, str(HERE), "--child", kind, "--url", base, "-n", str(args.pages)]
    cmd += ["-c", str(args.concurrency), "--redis-url", args.redis_url, "--tmp", str(tmp)]
    cpu0 = server.cpu()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    server_cpu = server.cpu() - cpu0
    if proc.returncode != 0 or not proc.stdout.strip():
        log = tmp / "nginx-error.log"
        errors = log.read_text()[-2000:] if log.exists() else ""
        raise SystemExit(f"{kind}: exited with {proc.returncode}:\n{proc.stderr}\nnginx error log (tail):\n{errors}")
    r: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    if r["pages"] != args.pages:
        raise SystemExit(f"{kind}: fetched {r['pages']} pages of {args.pages}")
    r["server_cpu"] = server_cpu
    return r


def main() -> None:
    from achihuo_mini.plugins import registry

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--pages", type=int, default=20_000)
    parser.add_argument("-c", "--concurrency", type=int, default=64)
    parser.add_argument(
        "--backends", nargs="+", default=[b for b in ("memory", "sqlite", "redis") if b in registry.names()]
    )
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--tmp", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    n, c = args.pages, args.concurrency
    with tempfile.TemporaryDirectory(prefix="achihuo-crawl-") as tmpdir:
        tmp = Path(tmpdir)
        started = time.perf_counter()
        size = generate_site(tmp / "site", n)
        gen_s = time.perf_counter() - started
        server = Nginx(tmp, tmp / "site")
        base = server.start()
        try:
            runs = [("server alone (GET known URLs)", measure("server", base, args, tmp, server))]
            runs.append(("bare aiohttp + Queue + set", measure("bare", base, args, tmp, server)))
            for backend in args.backends:
                runs.append((f"achihuo_mini {backend}", measure(backend, base, args, tmp, server)))
        finally:
            server.stop()
    bare = n / runs[1][1]["wall"]
    rows = [["crawler", "pages", "pages/s", "CPU s", "peak RSS MiB", "nginx CPU %", "vs bare aiohttp"]]
    for label, r in runs:
        rate = n / r["wall"]
        rows.append(
            [
                label,
                f"{r['pages']:,}",
                f"{rate:,.0f}",
                f"{r['cpu']:.2f}",
                f"{r['rss']:.0f}",
                f"{100 * r['server_cpu'] / r['wall']:.0f}",
                f"{rate / bare:.2f}",
            ]
        )
    print(
        f"crawl of {n:,} pages ({size / n / 1024:.1f} KB avg, {LINKS_PER_PAGE} links each, "
        f"{size / 2**20:.0f} MiB, generated in {gen_s:.1f} s), nginx 1 worker, concurrency {c}; {machine()}"
    )
    print(table(rows))
    print(
        "nginx CPU %: the nginx worker's CPU time during the row / the row's wall time "
        "(well under 100 %: the server is not the bottleneck)"
    )


if __name__ == "__main__":
    main()
