"""A spider for the politeness process tests (real OS processes against a local site).

Configured by environment variables:
  SPIDER_NAME    the loop's NAME            ACHIHUO_CONFIG  backend config file ([loop] options too)
  SITE_URL       the site (tests/http_site: /site/... pages record their arrival and X-Worker)
  PAGES          seeds {SITE_URL}site/p/0 .. PAGES-1
  PRIVATE        seeds {SITE_URL}site/private/0 .. PRIVATE-1 (robots.txt disallows them in the test)
  HOLD           seeds {SITE_URL}site/hold/0 .. HOLD-1 (answered only when the test releases them)
Every task is named by its URL (repeat=False) and marked done when fetched. Each request
carries ``X-Worker: <pid>``, so the site knows which process sent it.
Then: python polite_spider.py start ... (the normal command line).
"""

from __future__ import annotations

import os

from achihuo_mini import AsyncLoop, Item

SITE_URL = os.environ.get("SITE_URL", "")
SEEDS = [
    f"{SITE_URL}site/{kind}/{i}"
    for kind, var in (("hold", "HOLD"), ("p", "PAGES"), ("private", "PRIVATE"))
    for i in range(int(os.environ.get(var, "0")))
]


class PoliteSpider(AsyncLoop):
    NAME = os.environ["SPIDER_NAME"]
    HTTP_HEADERS = {"X-Worker": str(os.getpid())}

    def __init__(self) -> None:
        super().__init__(debug=False)

    async def run(self) -> None:
        for url in SEEDS:
            self.add_task("fetch", url, task_name=url, repeat=False)

    async def fetch(self, url: str) -> None:
        resp = await self.async_web_request(Item(url=url, timeout=120))
        assert resp.status == 200, resp.status
        self.task_done(url)


if __name__ == "__main__":
    PoliteSpider().start()
