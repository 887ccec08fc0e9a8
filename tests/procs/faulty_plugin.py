"""A backend plugin whose queue raises ``KeyError`` in one chosen method (a third-party plugin's bug),
and a spider to run on it. Used by tests/test_supervision.py, in process and as a script's import."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from achihuo_mini import AsyncLoop
from achihuo_mini.backend import Commit, Lease
from achihuo_mini.plugins import BackendSpec, Option, hookimpl
from achihuo_mini_backends.memory import MemoryDoneSet, MemoryQueue


class FaultyQueue(MemoryQueue):
    """The memory queue, except that one method raises ``KeyError`` (a third-party plugin's bug)."""

    def __init__(self, namespace: str, fail: str) -> None:
        super().__init__(namespace)
        self.fail = fail

    def _maybe_fail(self, method: str) -> None:
        if self.fail == method:
            raise KeyError(f"{method} broke")

    async def commit(self, commits: Sequence[Commit]) -> int:
        self._maybe_fail("commit")
        return await super().commit(commits)

    async def reserve(self, worker: str, limit: int) -> list[Lease]:
        self._maybe_fail("reserve")
        return await super().reserve(worker, limit)

    async def heartbeat(self, worker: str, info: Any, ttl: float) -> list[str] | None:
        self._maybe_fail("heartbeat")
        return await super().heartbeat(worker, info, ttl)


class FaultyPlugin:
    @hookimpl
    def achihuo_register_backends(self, register: Any) -> None:
        register(
            BackendSpec(
                name="faulty",
                scope="process",
                description="the memory backend with one broken method",
                create_queue=lambda ns, opts: FaultyQueue(ns, opts["fail"]),
                create_done_set=lambda ns, opts: MemoryDoneSet(ns),
                options={"fail": Option(str, "", "the method that raises KeyError")},
            )
        )


class Waiter(AsyncLoop):
    """Handlers that finish at once, or wait for a gate that only the test opens."""

    gate: asyncio.Event

    async def quick(self, i: int) -> None:
        pass

    async def slow(self, i: int) -> None:
        await self.gate.wait()


class PlainQueue:
    """A queue with the required protocol only: no registry, no notifier (a minimal third-party backend)."""

    scope = "process"

    def __init__(self, namespace: str) -> None:
        self._q = MemoryQueue(namespace)
        self.location = f"plain:{namespace}"

    def __getattr__(self, name: str) -> Any:
        if name in ("open", "close", "push", "reserve", "commit", "release", "retry", "bury", "dead_letters",
                    "requeue_dead", "stats", "clear"):  # fmt: skip
            return getattr(self._q, name)
        raise AttributeError(name)

    def shares_done_set(self, done: Any) -> bool:
        return self._q.shares_done_set(done)


class PlainPlugin:
    @hookimpl
    def achihuo_register_backends(self, register: Any) -> None:
        register(
            BackendSpec(
                name="plain",
                scope="process",
                description="the memory backend without its optional abilities",
                create_queue=lambda ns, opts: PlainQueue(ns),  # type: ignore[arg-type,return-value]
                create_done_set=lambda ns, opts: MemoryDoneSet(ns),
            )
        )
