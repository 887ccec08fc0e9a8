"""A spider for the Sentinel failover test: PAGES pages of the local test site, one request each.

Environment: SPIDER_NAME, ACHIHUO_CONFIG (the redis+sentinel:// config), SITE_URL (the test site),
PAGES, SLEEP (seconds per page, so that the crawl is still running when the primary is killed).
"""

from __future__ import annotations

import asyncio
import os

from achihuo_mini import AsyncLoop, Item

SITE_URL = os.environ.get("SITE_URL", "")
PAGES = int(os.environ.get("PAGES", "0"))
SLEEP = float(os.environ.get("SLEEP", "0"))


class FailoverSpider(AsyncLoop):
    NAME = os.environ["SPIDER_NAME"]

    def __init__(self) -> None:
        super().__init__(debug=False)

    async def run(self) -> None:
        for i in range(PAGES):
            self.add_task("page", i, task_name=f"p{i}", repeat=False)

    async def page(self, i: int) -> None:
        await asyncio.sleep(SLEEP)
        resp = await self.async_web_request(Item(url=f"{SITE_URL}/status/p{i}?fail=0"))
        assert resp.status == 200, resp.status
        self.task_done(f"p{i}")


if __name__ == "__main__":
    FailoverSpider().start()
