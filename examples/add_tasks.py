"""Add tasks to a loop from a separate script: any class with the same NAME shares its data.

    START_URL=http://127.0.0.1:8080/ python examples/add_tasks.py t/1 t/2 t/3
    START_URL=http://127.0.0.1:8080/ python examples/seed_spider.py start --no-run

No event loop runs here, so each ``add_task`` is written before it returns (a running
crawl picks the tasks up at once). ``repeat=False`` skips pages already done or queued.
"""

import os
import sys
from urllib.parse import urljoin

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from seed_spider import START_URL, SomeSpider

from achihuo_mini.item import Item

if __name__ == "__main__":
    spider = SomeSpider()
    for path in sys.argv[1:]:
        url = urljoin(START_URL, path)
        spider.add_task("get_articles", Item(method="GET", url=url), task_name=url, repeat=False)
        print("added", url)
    spider.close()
