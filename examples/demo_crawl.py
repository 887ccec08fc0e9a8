"""The first thing to run: crawl a local demo site on the default (SQLite) backend.

    python examples/demo_crawl.py

It starts examples/demo_site.py in a thread, then runs a spider that follows every
link once (``repeat=False`` + ``task_done``), prints what it found and exits when
the queue is idle. Run it twice: the second run finds every page done already.
``python examples/demo_crawl.py status`` (or ``clear``, ``stop m1``) works too.
"""

from __future__ import annotations

import os
import re
import sys
from urllib.parse import urljoin

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from demo_site import serve_in_thread

from achihuo_mini import AsyncLoop, Item

LINK = re.compile(r'<a href="(/t/\d+)">')
TITLE = re.compile(r"<h1>(.+?)</h1>")


class DemoSpider(AsyncLoop):
    NAME = "demo_spider"

    def __init__(self, start_url: str) -> None:
        super().__init__(concurrency=8, debug=False)  # default backend: SQLite in the user data dir
        self.start_url = start_url

    async def run(self) -> None:
        self.add_task("get_page", Item(method="GET", url=self.start_url), "/", task_name="/", repeat=False)

    async def get_page(self, item: Item, path: str) -> None:
        resp = await self.async_web_request(item)
        title = TITLE.search(resp.text)
        print(f"{resp.url}  {title.group(1) if title else '?'}")
        for link in LINK.findall(resp.text):
            page = Item(method="GET", url=urljoin(self.start_url, link))
            self.add_task("get_page", page, link, task_name=link, repeat=False)
        self.task_done(path)


if __name__ == "__main__":
    url = serve_in_thread()
    argv = sys.argv[1:] or ["start", "--idle-exit", "0.5"]
    DemoSpider(url).start(argv)
