"""A spider as a user writes it, checked with ``mypy --strict`` (``.ci/run`` does):
``async_web_request`` returns a typed ``Response``, so mistakes in handlers are caught."""

from __future__ import annotations

from typing import assert_type

from achihuo_mini import AsyncLoop, Item, Response, RunSummary, Task


class TypedSpider(AsyncLoop):
    NAME = "typed_spider"

    def __init__(self) -> None:
        super().__init__(concurrency=4, cache_backend="memory")

    async def run(self) -> None:
        self.add_task("get_page", Item(url="http://127.0.0.1/"), task_name="/", repeat=False)
        await self.add_tasks([Task("get_page", Item(url="http://127.0.0.1/a"))])

    async def get_page(self, item: Item) -> None:
        resp = await self.async_web_request(item)
        assert_type(resp, Response)
        status: int = resp.status
        text: str = resp.text
        body: bytes = resp.content
        print(status, len(text), len(body), resp.headers.get("Content-Type"), resp.url)
        self.task_done("/")


def main() -> None:
    summary = TypedSpider().run_until_idle()
    assert_type(summary, RunSummary)
    print(summary.succeeded, summary.added)
