"""A small local site to crawl: ``python examples/demo_site.py [PORT]``.

Pages ``/`` and ``/t/<n>`` (n < PAGES); every page links to a few others, so a
crawler has to deduplicate. The index looks like the seed README's v2ex example:
``<a href="/t/12">Title 12</a>``. Some pages are GBK-encoded, as many sites still are.
"""

from __future__ import annotations

import asyncio
import sys
import threading

from aiohttp import web

PAGES = 60


def page_html(n: int | None) -> str:
    links = range(0, 10) if n is None else [(n * 7 + k) % PAGES for k in (1, 2, 3, 5, 8)]
    title = "Index" if n is None else f"话题 {n}"
    items = "\n".join(f'<li><a href="/t/{m}">Title {m}</a></li>' for m in links)
    return f"<html><head><title>{title}</title></head><body><h1>{title}</h1><ul>\n{items}\n</ul></body></html>"


async def index(request: web.Request) -> web.Response:
    return web.Response(text=page_html(None), content_type="text/html")


async def topic(request: web.Request) -> web.Response:
    n = int(request.match_info["n"])
    if not 0 <= n < PAGES:
        raise web.HTTPNotFound()
    if n % 3 == 0:  # GBK page, charset declared only in the header
        return web.Response(body=page_html(n).encode("gbk"), content_type="text/html", charset="gbk")
    return web.Response(text=page_html(n), content_type="text/html")


def make_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/", index)
    app.router.add_get("/t/{n}", topic)
    return app


def serve_in_thread(port: int = 0) -> str:
    """Start the site on 127.0.0.1 in a daemon thread (it ends with the process); return its base URL."""
    ready = threading.Event()
    box: dict[str, str] = {}

    async def main() -> None:
        runner = web.AppRunner(make_app(), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", port)
        await site.start()
        sockets = site._server.sockets  # type: ignore[union-attr]
        box["url"] = f"http://127.0.0.1:{sockets[0].getsockname()[1]}/"
        ready.set()
        await asyncio.Event().wait()  # serve until the process exits

    threading.Thread(target=asyncio.run, args=(main(),), daemon=True).start()
    if not ready.wait(10):
        raise RuntimeError("the demo site did not start")
    return box["url"]


if __name__ == "__main__":
    web.run_app(make_app(), host="127.0.0.1", port=int(sys.argv[1]) if len(sys.argv) > 1 else 8080)
