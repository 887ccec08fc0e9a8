"""A spider for the statistics tests: pages of examples/demo_site.py (some of them 404),
items counted with ``self.stats.inc``, and a handler that always fails.

Environment: SPIDER_NAME, ACHIHUO_CONFIG, SITE_URL, PAGES (``page`` tasks for /t/0 ... /t/PAGES-1;
the site has 60 pages, so the rest answer 404), BROKEN (``broken`` tasks), SLEEP (seconds per page).
"""

from __future__ import annotations

import asyncio
import os

from achihuo_mini import AsyncLoop, Item

SITE_URL = os.environ.get("SITE_URL", "")
PAGES = int(os.environ.get("PAGES", "0"))
BROKEN = int(os.environ.get("BROKEN", "0"))
SLEEP = float(os.environ.get("SLEEP", "0"))


class StatsSpider(AsyncLoop):
    NAME = os.environ["SPIDER_NAME"]

    def __init__(self) -> None:
        super().__init__(debug=False)

    async def run(self) -> None:
        for i in range(PAGES):
            self.add_task("page", Item(url=f"{SITE_URL}t/{i}"), task_name=f"p{i}", repeat=False)
        for i in range(BROKEN):
            self.add_task("broken", i, task_name=f"b{i}", repeat=False)

    async def page(self, item: Item) -> None:
        if SLEEP:
            await asyncio.sleep(SLEEP)
        resp = await self.async_web_request(item)
        if resp.status == 200:
            self.stats.inc("items", 2)
        else:
            self.stats.inc("missing")
        self.task_done(item.url)

    async def broken(self, i: int) -> None:
        raise LookupError(f"broken task {i} fails on purpose")


if __name__ == "__main__":
    StatsSpider().start()
