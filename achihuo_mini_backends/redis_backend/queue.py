"""The Redis queue: :class:`RedisQueue`, with the worker registry and the notifier.

Each method runs one script from ``lua/`` (named like the method) or one atomic command.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

from achihuo_mini.backend import Commit, DeadLetter, DoneSetBackend, Lease, NewTask, QueueStats, WorkerInfo
from achihuo_mini.backend_kit import alias_order

from .connection import RedisBackend, delay_ms, info_json, ms, pack, text, unpack, wid
from .done_set import RedisDoneSet

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["RedisQueue"]

ERROR_MAX_CHARS = 2048
PROMOTE_MAX = 5000
"""Due delayed tasks moved to the ready tail by one ``reserve`` at most."""


def _task_list(tasks: Sequence[NewTask]) -> list[list[Any]]:
    """Tasks as the scripts' ``insert`` reads them: payload, key ('' = unnamed), flags, delay in ms."""
    return [[t.payload, t.key or b"", (1 if t.unique else 0) | (2 if t.head else 0), delay_ms(t.delay)] for t in tasks]


def _unique_keys(tasks: Sequence[NewTask]) -> list[bytes]:
    """Keys of the tasks a push checks against the done set."""
    return [t.key for t in tasks if t.unique and t.key]


def _leases(reply: Sequence[Any], worker: str) -> list[Lease]:
    """Leases from a script's flat reply: id, payload, key ('' = unnamed), attempt, failures."""
    return [
        Lease(int(reply[i]), bytes(reply[i + 1]), bytes(reply[i + 2]) or None, worker, int(reply[i + 3]),
              int(reply[i + 4]))
        for i in range(0, len(reply), 5)
    ]  # fmt: skip


def _token(lease: Lease) -> bytes:
    """The fencing token the backend keeps for a held lease."""
    return f"{lease.attempt}:".encode() + lease.worker.encode("utf-8", "surrogatepass")


class RedisQueue(RedisBackend):
    """:class:`~achihuo_mini.backend.QueueBackend` with the registry and notifier abilities.

    Every method is one script call (or one atomic command), atomic for every
    process that uses the server.
    """

    def __init__(self, namespace: str, **options: Any) -> None:
        super().__init__(namespace, **options)
        self._waiter: Redis | None = None

    async def close(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            await waiter.aclose()
        await super().close()

    def shares_done_set(self, done: DoneSetBackend) -> bool:
        """True for a :class:`RedisDoneSet` of the same URL, key prefix and namespace."""
        return isinstance(done, RedisDoneSet) and self._same_data(done)

    # -- queue ---------------------------------------------------------------

    async def push(self, tasks: Sequence[NewTask]) -> int:
        """Push a batch in one script; unique keys are checked against pending and the done set."""
        if not tasks:
            return 0
        return int(await self._script("push", [pack(_task_list(tasks))], _unique_keys(tasks)))

    async def reserve(self, worker: str, limit: int) -> list[Lease]:
        """Promote due delayed tasks (server clock), then lease up to ``limit`` from the head."""
        if limit <= 0:
            return []
        return _leases(unpack(await self._script("reserve", [wid(worker), limit, PROMOTE_MAX])), worker)

    async def commit(self, commits: Sequence[Commit]) -> int:
        """Ack a batch in one script: per commit, fencing check, ack, undone, done, children."""
        if not commits:
            return 0
        batch = [
            [c.lease.task_id, _token(c.lease), list(c.undone), list(c.done), _task_list(c.children)] for c in commits
        ]
        digests: list[bytes] = []
        for c in commits:
            digests += c.undone
            digests += c.done
            digests += _unique_keys(c.children)
        return int(await self._script("commit", [pack(batch)], digests))

    async def release(self, leases: Sequence[Lease]) -> int:
        """Return held leases to the head in the given order; no failure counted."""
        if not leases:
            return 0
        args: list[Any] = []
        for lease in leases:
            args += [lease.task_id, _token(lease)]
        return int(await self._script("release", args))

    async def retry(self, items: Sequence[tuple[Lease, float]]) -> int:
        """Count a failure and delay each held lease (due time on the server clock)."""
        if not items:
            return 0
        args: list[Any] = []
        for lease, delay in items:
            args += [lease.task_id, _token(lease), delay_ms(delay)]
        return int(await self._script("retry", args))

    async def bury(self, items: Sequence[tuple[Lease, str]]) -> int:
        """Move held leases to the dead letters; the error is cut to 2048 characters."""
        if not items:
            return 0
        args: list[Any] = []
        for lease, error in items:
            args += [lease.task_id, _token(lease), error[:ERROR_MAX_CHARS].encode("utf-8", "replace")]
        return int(await self._script("bury", args))

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """Up to ``limit`` dead letters, oldest first."""
        if limit <= 0:
            return []
        reply = await self._script("dead_letters", [limit])
        return [
            DeadLetter(int(reply[i]), bytes(reply[i + 1]), bytes(reply[i + 2]) or None,
                       bytes(reply[i + 3]).decode("utf-8", "replace"), int(reply[i + 4]))
            for i in range(0, len(reply), 5)
        ]  # fmt: skip

    async def requeue_dead(self, limit: int | None = None) -> int:
        """Move the oldest ``limit`` (all when None) dead letters to the ready tail, failures reset."""
        if limit is not None and limit <= 0:
            return 0
        return int(await self._script("requeue", [-1 if limit is None else limit]))

    async def stats(self) -> QueueStats:
        """Ready, delayed (due or not), leased and dead counts in one snapshot."""
        ready, delayed, leased, dead = await self._script("stats")
        return QueueStats(ready=int(ready), delayed=int(delayed), leased=int(leased), dead=int(dead))

    async def clear(self, what: Literal["queue", "dead"] = "queue") -> None:
        """``queue``: drop tasks, leases, delays and pending counts; ``dead``: drop dead letters.

        Keys are unlinked (freed in the background). A namespace with neither tasks
        nor dead letters left loses its id counter too: a cleared loop leaves no key.
        """
        await self._script("clear", ["dead" if what == "dead" else "queue"])

    # -- registry ------------------------------------------------------------

    async def register(self, worker: str, role: str, info: Mapping[str, Any], ttl: float) -> str:
        """Register an incarnation; claim the lowest free alias of its role atomically."""
        alias = await self._script("register", [wid(worker), role, info_json(info), ms(ttl)])
        return text(alias)

    async def heartbeat(self, worker: str, info: Mapping[str, Any], ttl: float) -> list[str] | None:
        """Refresh liveness (server clock) and info; return and clear the mailbox, None if unknown."""
        reply = await self._script("heartbeat", [wid(worker), info_json(info), ms(ttl)])
        if not int(reply[0]):
            return None
        return [text(c) for c in reply[1:]]

    async def unregister(self, worker: str) -> None:
        """Remove the worker, free its alias and release its leases to the head."""
        await self._script("unregister", [wid(worker)])

    async def workers(self) -> list[WorkerInfo]:
        """Registered workers ordered by alias (``m2`` before ``m10``), ages in the server clock."""
        reply = await self._script("workers")
        found = []
        for i in range(0, len(reply), 5):
            try:
                info = json.loads(bytes(reply[i + 4]))
            except ValueError:
                info = {}
            if not isinstance(info, dict):
                info = {}
            found.append(
                WorkerInfo(
                    bytes(reply[i]).decode("utf-8", "surrogatepass"),
                    text(reply[i + 1]),
                    text(reply[i + 2]),
                    info,
                    int(reply[i + 3]) / 1000.0,
                )
            )
        return sorted(found, key=lambda w: alias_order(w.alias))

    async def send(self, aliases: Sequence[str], command: str) -> list[str]:
        """Append ``command`` to each alias's mailbox; return the aliases that exist."""
        if not aliases:
            return []
        reply = await self._script("send", [command, *aliases])
        return [text(a) for a in reply]

    async def leases(self, worker: str) -> list[Lease]:
        """Every lease ``worker`` holds, oldest task first (one script call)."""
        return _leases(unpack(await self._script("leases", [wid(worker)])), worker)

    async def recover(self) -> int:
        """Unregister expired workers and release their (and orphaned) leases to the head.

        No worker is declared dead before the server has been up for that worker's
        ttl, so after a Redis restart every worker gets a full ttl to reconnect.
        """
        return int(await self._script("recover"))

    # -- notifier -------------------------------------------------------------

    async def wait_for_tasks(self, timeout: float) -> None:
        """Return at once when tasks are ready; else block in ``BLPOP`` on the wake key.

        The wait is capped by ``timeout`` and by the due time of the next delayed
        task. It runs on a connection of its own, so other calls are not held up.
        """
        ready, due, now = await self._script("peek")
        if int(ready) > 0:
            return
        if int(due) >= 0:
            timeout = min(timeout, max(int(due) - int(now), 0) / 1000.0)
        if not timeout > 0:
            return
        if self._waiter is None:
            self._waiter = self._new_client()
        wait = self._waiter.blpop([self._key("wake")], timeout=max(timeout, 0.01))  # 0 would block forever
        # BLPOP's own timeout ends the wait; a dead connection is given up a socket timeout later.
        await self._run(wait, timeout + self.socket_timeout)
