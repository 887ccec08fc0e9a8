"""A spider for the process tests (real OS processes, real signals).

Configured by environment variables:
  SPIDER_NAME   the loop's NAME            ACHIHUO_CONFIG  backend config file
  TASKS         seeds t0..t{TASKS-1}       CHILDREN        follow-ups each seed adds (t{TASKS+i*CHILDREN+k})
  SLEEP         max seconds per handler    EXEC_DIR        a file per process, a line per execution
  HANG_FIRST    seconds the first attempt of every HANG_MOD-th task sleeps (for a stop to cancel)
  FAIL          "always:<i>" / "twice:<i>" make task i fail
  KILL_AFTER    SIGKILL this process right after the handler of this task returns
  SITE_URL      fetch {SITE_URL}t/{i % 60} in each handler (examples/demo_site.py serves it)
  BLOCK         "<i>:<seconds>": the first attempt of task i blocks the whole event loop (time.sleep)
Then: python crash_spider.py start ... (the normal command line).
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time

from achihuo_mini import AsyncLoop, Item, Task

TASKS = int(os.environ.get("TASKS", "0"))
CHILDREN = int(os.environ.get("CHILDREN", "0"))
SLEEP = float(os.environ.get("SLEEP", "0"))
HANG_FIRST = float(os.environ.get("HANG_FIRST", "0"))
HANG_MOD = int(os.environ.get("HANG_MOD", "1"))
FAIL = os.environ.get("FAIL", "")
KILL_AFTER = os.environ.get("KILL_AFTER")
EXEC_DIR = os.environ.get("EXEC_DIR")
SITE_URL = os.environ.get("SITE_URL")
BLOCK = os.environ.get("BLOCK", "")


class CrashSpider(AsyncLoop):
    NAME = os.environ["SPIDER_NAME"]

    def __init__(self) -> None:
        super().__init__(debug=False)
        self._log_fd = None
        if EXEC_DIR:
            path = os.path.join(EXEC_DIR, f"exec-{os.getpid()}.log")
            self._log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._attempts: dict[int, int] = {}

    async def run(self) -> None:
        await self.add_tasks(Task("work", i, task_name=f"t{i}", repeat=False) for i in range(TASKS))

    async def work(self, i: int) -> None:
        if self._log_fd is not None:
            os.write(self._log_fd, f"{i}\n".encode())  # survives SIGKILL: the kernel has it
        self._attempts[i] = self._attempts.get(i, 0) + 1
        block_task, _, block_seconds = BLOCK.partition(":")
        if block_task and int(block_task) == i and self._attempts[i] == 1:
            time.sleep(float(block_seconds))  # a GC pause, a suspended VM, a handler calling time.sleep
        if HANG_FIRST and i % HANG_MOD == 0 and self._attempts[i] == 1:
            await asyncio.sleep(HANG_FIRST)
        if SLEEP:
            await asyncio.sleep(random.uniform(0, SLEEP))
        if SITE_URL:
            resp = await self.async_web_request(Item(url=f"{SITE_URL}t/{i % 60}"))
            assert f"<h1>话题 {i % 60}</h1>" in resp.text, resp.text[:200]
        kind, _, which = FAIL.partition(":")
        if which and int(which) == i:
            if kind == "always" or (kind == "twice" and self._attempts[i] <= 2):
                raise RuntimeError(f"task {i} failed on purpose")
        if i < TASKS:
            for k in range(CHILDREN):
                child = TASKS + i * CHILDREN + k
                self.add_task("work", child, task_name=f"t{child}", repeat=False)
        self.task_done(f"t{i}")
        if KILL_AFTER is not None and int(KILL_AFTER) == i:
            asyncio.get_running_loop().call_soon(os.kill, os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    CrashSpider().start()
