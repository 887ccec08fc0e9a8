# filename: polite_spider.py -- a polite, incremental crawl (the README's second example).
#
#   python examples/polite_spider.py start            # a master: seeds, then crawls
#   python examples/polite_spider.py start -s         # more workers: the limits hold for all of them
#
# robots.txt is obeyed, every site gets at most 10 requests/s and 4 at once from the whole
# loop (all workers together), each page has one task name however a link spells it, and a
# page is crawled again once its visit is a week old: run the master again next week and it
# revisits what has aged. START_URL defaults to v2ex.com; point it at examples/demo_site.py
# when there is no internet.

import os
import re
from urllib.parse import urljoin

from achihuo_mini import AsyncLoop, Item, canonical_url

START_URL = os.environ.get("START_URL", "https://www.v2ex.com/")
LINK = re.compile(r'<a href="(/t/\d+[^"]*)">')


class PoliteSpider(AsyncLoop):
    NAME = "Polite_spider"

    def __init__(self):
        super().__init__(
            concurrency=10,
            obey_robots=True,  # refuse what robots.txt disallows, honour its Crawl-delay
            per_host_delay=0.1,  # at most 10 requests/s to one site, from the whole loop
            per_host_limit=4,  # at most 4 requests in flight to one site, from the whole loop
            done_ttl=7 * 24 * 3600,  # a page is done for a week, then crawled again
        )

    async def run(self):
        url = canonical_url(START_URL)
        self.add_task("get_page", Item(url=url), task_name=url, repeat=False)

    async def get_page(self, item):
        resp = await self.async_web_request(item)
        for link in LINK.findall(resp.text):
            url = canonical_url(urljoin(item.url, link))  # '#reply', '/t/../t/1', 'HTTP://': one name
            self.add_task("get_page", Item(url=url), task_name=url, repeat=False)
        self.task_done(item.url)


if __name__ == "__main__":
    PoliteSpider().start()
