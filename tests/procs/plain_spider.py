"""A spider written the way the README shows, for the command-line tests of a newcomer's first hour.

Environment: SPIDER_NAME (its NAME), CACHE_BACKEND (the ``cache_backend=`` keyword, else the
default), CONCURRENCY (the ``concurrency=`` keyword, else none), TASKS (seeds ``page0`` ...
with repeat=False), FAIL ("all": every handler raises). ``debug`` keeps its default (True).
"""

from __future__ import annotations

import os
from typing import Any

from achihuo_mini import AsyncLoop

TASKS = int(os.environ.get("TASKS", "1"))


class PlainSpider(AsyncLoop):
    NAME = os.environ["SPIDER_NAME"]

    def __init__(self) -> None:
        kwargs: dict[str, Any] = {"retry_delay": 0.01, "progress_interval": 0}
        if os.environ.get("CACHE_BACKEND"):
            kwargs["cache_backend"] = os.environ["CACHE_BACKEND"]
        if os.environ.get("CONCURRENCY"):
            kwargs["concurrency"] = int(os.environ["CONCURRENCY"])
        super().__init__(**kwargs)

    async def run(self) -> None:
        for i in range(TASKS):
            self.add_task("page", i, task_name=f"page{i}", repeat=False)

    async def page(self, i: int) -> None:
        if os.environ.get("FAIL") == "all":
            raise ValueError(f"page {i} is broken")
        self.task_done(f"page{i}")


if __name__ == "__main__":
    PlainSpider().start()
