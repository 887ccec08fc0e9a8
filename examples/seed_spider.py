# filename: seed_spider.py -- the seed README's example, as it runs on achihuo_mini.
#
#   python examples/seed_spider.py start        # master: run() seeds, then crawls
#   python examples/seed_spider.py stop m1      # from anywhere: stop it gracefully
#
# It crawls START_URL (default: the seed's v2ex.com; point it at examples/demo_site.py
# when there is no internet). cache_backend='redis' as in the seed: a config file
# (ACHIHUO_CONFIG or --config) can put either side on another backend.

import os
import re

from achihuo_mini.async_loop import AsyncLoop
from achihuo_mini.item import Item

START_URL = os.environ.get("START_URL", "https://www.v2ex.com/")


class SomeSpider(AsyncLoop):
    NAME = "Some_spider"

    def __init__(self):
        super().__init__(concurrency=10, cache_backend="redis")

    async def run(self):
        item = Item(dict(
            method="GET",
            url=START_URL,
        ))
        self.add_task("get_articles", item, task_name=item.url)

    async def get_articles(self, item):
        resp = await self.async_web_request(item)
        html = resp.text
        titles = re.findall(r'<a href="/t/\d+">(.+?)</a>', html)
        for title in titles:
            print("title:", title)
        self.task_done(item.url)


if __name__ == "__main__":
    loop = SomeSpider()
    loop.start()
