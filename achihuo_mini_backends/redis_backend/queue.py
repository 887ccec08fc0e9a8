"""The Redis queue: :class:`RedisQueue`, with the worker registry and the notifier.

Each method runs the script of its name from ``lua/``. A batch that fits one bounded
step (:data:`~.connection.STEP_ITEMS` tasks, names or leases, and
:data:`~.connection.STEP_BYTES` payload bytes) is one script call, so the hot path
stays one round trip per protocol call; a bigger one is split into several calls,
none of which holds the server for long (see :meth:`RedisQueue.commit` for how a
commit keeps its guarantees across steps).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

from achihuo_mini.backend import (
    COUNTS_LIMIT,
    Commit,
    DeadLetter,
    DoneSetBackend,
    HostAsk,
    HostGrant,
    Lease,
    NewTask,
    QueueStats,
    WorkerInfo,
)
from achihuo_mini.backend_kit import alias_order, counter_ok, merge_counts, worker_info
from achihuo_mini.masking import mask_secrets

from .connection import (
    STEP_BYTES,
    STEP_ITEMS,
    RedisBackend,
    chunks,
    delay_ms,
    info_json,
    log,
    ms,
    pack,
    text,
    unpack,
    wid,
)
from .done_set import RedisDoneSet
from .keys import HOST_PART

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["RedisQueue"]

ERROR_MAX_CHARS = 2048
PROMOTE_MAX = 5000
"""Due delayed tasks moved to the ready tail by one ``reserve`` at most."""


# -- batches and steps -------------------------------------------------------------


def _task_list(tasks: Sequence[NewTask]) -> list[list[Any]]:
    """Tasks as the scripts' ``insert`` reads them: payload, key ('' = unnamed), flags, delay in ms."""
    return [[t.payload, t.key or b"", (1 if t.unique else 0) | (2 if t.head else 0), delay_ms(t.delay)] for t in tasks]


def _unique_keys(tasks: Sequence[NewTask]) -> list[bytes]:
    """Keys of the tasks a push checks against the done set."""
    return [t.key for t in tasks if t.unique and t.key]


def _weigh(tasks: Sequence[NewTask]) -> list[Sequence[NewTask]]:
    """``tasks`` in consecutive slices of at most STEP_ITEMS tasks and STEP_BYTES payload bytes (>= 1 task)."""
    out: list[Sequence[NewTask]] = []
    start = size = 0
    for i, t in enumerate(tasks):
        if i > start and (i - start >= STEP_ITEMS or size + len(t.payload) > STEP_BYTES):
            out.append(tasks[start:i])
            start, size = i, 0
        size += len(t.payload)
    if start < len(tasks):
        out.append(tasks[start:])
    return out


def _steps(tasks: Sequence[NewTask]) -> list[Sequence[NewTask]]:
    """A push of ``tasks`` as bounded steps, run in the order given, with the outcome of one call.

    One call adds a unique task only if no earlier task of the batch has its key (that
    one made the key pending, or found it pending or done); the steps skip those tasks
    up front, so the order of the steps cannot change which copy wins. Head tasks run
    in batch order before what was there: their steps go last-first.
    """
    if len(tasks) <= STEP_ITEMS and sum(len(t.payload) for t in tasks) <= STEP_BYTES:
        return [tasks]
    seen: set[bytes] = set()
    kept: list[NewTask] = []
    for t in tasks:
        if t.key:
            if t.unique and t.key in seen:
                continue
            seen.add(t.key)
        kept.append(t)
    head = [t for t in kept if t.head and not t.delay > 0]
    rest = [t for t in kept if not (t.head and not t.delay > 0)]
    return _weigh(rest) + _weigh(head)[::-1]


def _token(lease: Lease) -> bytes:
    """The fencing token the backend keeps for a held lease."""
    return f"{lease.attempt}:".encode() + lease.worker.encode("utf-8", "surrogatepass")


def _entry(
    lease: Lease,
    undone: Sequence[bytes],
    done: Sequence[bytes],
    children: Sequence[NewTask],
    ack: bool,
    expiring: Sequence[tuple[bytes, float]] = (),
) -> list[Any]:
    """One entry of the ``commit`` script's batch."""
    entry = [lease.task_id, _token(lease), list(undone), list(done), _task_list(children), lease.key or b"", int(ack)]
    if expiring:
        entry.append([x for key, ttl in expiring for x in (key, delay_ms(ttl))])
    return entry


def _leases(result: Any, worker: str, limit: int) -> list[Lease]:
    """Leases from a script's msgpack reply: 5 fields per lease (id, payload, key or '', attempt, failures)."""
    flat = unpack(result, 5 * limit)
    if len(flat) % 5:
        raise ValueError("a lease reply is 5 fields per lease")
    return [
        Lease(int(flat[i]), bytes(flat[i + 1]), bytes(flat[i + 2]) or None, worker, int(flat[i + 3]),
              int(flat[i + 4]))
        for i in range(0, len(flat), 5)
    ]  # fmt: skip


def _leases_of(worker: str, limit: int) -> Callable[[Any], list[Lease]]:
    return lambda result: _leases(result, worker, limit)


def _dead_letters(result: Any) -> tuple[int, list[DeadLetter], int]:
    examined, flat, length = result
    letters = [
        DeadLetter(int(flat[i]), bytes(flat[i + 1]), bytes(flat[i + 2]) or None,
                   bytes(flat[i + 3]).decode("utf-8", "replace"), int(flat[i + 4]))
        for i in range(0, len(flat), 5)
    ]  # fmt: skip
    return int(examined), letters, int(length)


def _ints(result: Any) -> list[int]:
    return [int(x) for x in result]


def _grants(result: Any) -> list[HostGrant]:
    """Five numbers per host: granted, held, workers, ms until the first turn, turns."""
    flat = [int(x) for x in result]
    if len(flat) % 5:
        raise ValueError("a hosts reply is five numbers per host")
    return [
        HostGrant(flat[i], flat[i + 1], flat[i + 2], flat[i + 3] / 1000.0, flat[i + 4]) for i in range(0, len(flat), 5)
    ]


class RedisQueue(RedisBackend):
    """:class:`~achihuo_mini.backend.QueueBackend` with the registry and notifier abilities.

    A call that fits one step is one script call, atomic for every process that uses
    the server; a bigger one is several (see the module docstring).
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
        """Push a batch; unique keys are checked against pending and the done set (see :func:`_steps`)."""
        n = 0
        for step in _steps(tasks) if tasks else ():
            n += await self._call("push", [pack(_task_list(step))], _unique_keys(step), int, replicated=True)
        return n

    async def reserve(self, worker: str, limit: int) -> list[Lease]:
        """Promote due delayed tasks (server clock), then lease up to ``limit`` from the head.

        A step leases at most STEP_ITEMS tasks and STEP_BYTES of payload; more steps
        follow while each one filled up.
        """
        leases: list[Lease] = []
        while len(leases) < limit:
            want = min(limit - len(leases), STEP_ITEMS)
            args = [wid(worker), want, PROMOTE_MAX, STEP_BYTES]
            got = await self._call("reserve", args, parse=_leases_of(worker, want))
            leases += got
            if len(got) < want:
                break
        return leases

    async def commit(self, commits: Sequence[Commit]) -> int:
        """Ack a batch; per commit: fencing check, ack, undone, done, children.

        Commits are grouped into script calls of at most one step each (usually all
        in one). A commit bigger than a step is applied in steps of its own: its
        undone and done names, then its children, then the ack alone — children
        first, the ack last, so a crash in between re-runs the handler (duplicates)
        instead of losing children. Every step checks the lease token first; a step
        whose lease is gone writes nothing and no later step runs (children written
        by earlier steps stay). In the children steps the task counts as acked for
        its own key, as in a one-step commit, and pending counts deduplicate unique
        children across steps.
        """
        applied = 0
        group: list[list[Any]] = []
        digests: list[bytes] = []
        items = size = 0
        big: list[Commit] = []
        for c in commits:
            n = 2 + len(c.undone) + len(c.done) + len(c.expiring) + len(c.children)  # an ack costs about two names
            b = sum(len(t.payload) for t in c.children)
            if n > STEP_ITEMS or b > STEP_BYTES:
                big.append(c)
                continue
            if group and (items + n > STEP_ITEMS or size + b > STEP_BYTES):
                applied += await self._commit(group, digests)
                group, digests, items, size = [], [], 0, 0
            group.append(_entry(c.lease, c.undone, c.done, c.children, ack=True, expiring=c.expiring))
            digests += [*c.undone, *c.done, *(key for key, _ in c.expiring), *_unique_keys(c.children)]
            items, size = items + n, size + b
        if group:
            applied += await self._commit(group, digests)
        for c in big:
            applied += await self._commit_in_steps(c)
        return applied

    async def _commit_in_steps(self, c: Commit) -> int:
        lease = c.lease
        steps: list[tuple[list[Any], Sequence[bytes]]] = []
        steps += [(_entry(lease, part, (), (), ack=False), part) for part in chunks(c.undone)]
        steps += [(_entry(lease, (), part, (), ack=False), part) for part in chunks(c.done)]
        steps += [
            (_entry(lease, (), (), (), ack=False, expiring=part), [key for key, _ in part])
            for part in chunks(c.expiring)
        ]
        steps += [(_entry(lease, (), (), part, ack=False), _unique_keys(part)) for part in _steps(c.children)]
        for entry, digests in steps:
            if not await self._commit([entry], digests):
                return 0  # the lease is gone: fenced from here on
        return await self._commit([_entry(lease, (), (), (), ack=True)], ())

    children_pushed = 0
    """Children this object's commits enqueued (unique ones skipped as done or pending are not counted)."""

    async def _commit(self, entries: list[list[Any]], digests: Sequence[bytes]) -> int:
        """One ``commit`` script call; returns how many entries applied."""
        applied, pushed = await self._call("commit", [pack(entries)], digests, _ints, replicated=True)
        self.children_pushed += pushed
        return applied

    async def release(self, leases: Sequence[Lease], delay: float = 0.0) -> int:
        """Give held leases back, no failure counted: to the head in order, or after ``delay`` at the tail."""
        due = delay_ms(delay)
        parts = list(chunks(leases))
        if not due > 0:
            parts.reverse()  # to the head: the first part goes last, so that it ends up in front
        n = 0
        for part in parts:
            args: list[Any] = [due]
            for lease in part:
                args += [lease.task_id, _token(lease)]
            n += await self._call("release", args, parse=int)
        return n

    async def retry(self, items: Sequence[tuple[Lease, float]]) -> int:
        """Count a failure and delay each held lease (due time on the server clock)."""
        n = 0
        for part in chunks(items):
            args: list[Any] = []
            for lease, delay in part:
                args += [lease.task_id, _token(lease), delay_ms(delay), lease.failures, lease.key or b""]
            n += await self._call("retry", args, parse=int)
        return n

    async def bury(self, items: Sequence[tuple[Lease, str]]) -> int:
        """Move held leases to the dead letters; the error is cut to 2048 characters."""
        n = 0
        for part in chunks(items):
            args: list[Any] = []
            for lease, error in part:
                message = error[:ERROR_MAX_CHARS].encode("utf-8", "replace")
                args += [lease.task_id, _token(lease), message, lease.failures, lease.key or b""]
            n += await self._call("bury", args, parse=int)
        return n

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """Up to ``limit`` dead letters, oldest first; unreadable records are skipped (with a warning)."""
        letters: list[DeadLetter] = []
        start = 0
        while len(letters) < limit:
            want = min(limit - len(letters), STEP_ITEMS)
            examined, got, length = await self._call("dead_letters", [start, want, STEP_BYTES], parse=_dead_letters)
            letters += got
            start += examined
            if not examined or start >= length:
                break
        return letters

    async def requeue_dead(self, limit: int | None = None) -> int:
        """Move the oldest ``limit`` (all when None) dead letters to the ready tail, failures reset.

        Unreadable records are left (at the end of the dead letters) with a warning.
        """
        if limit is not None and limit <= 0:
            return 0
        total = 0
        remaining = limit
        while True:
            want = STEP_ITEMS if remaining is None else min(STEP_ITEMS, remaining)
            pushed, examined, length = await self._call("requeue", [want, STEP_BYTES], parse=_ints)
            total += pushed
            remaining = (length if remaining is None else remaining) - examined
            if not examined or remaining <= 0:
                return total

    async def stats(self) -> QueueStats:
        """Ready, delayed (due or not), leased and dead counts in one snapshot."""
        ready, delayed, leased, dead = await self._call("stats", parse=_ints)
        return QueueStats(ready=ready, delayed=delayed, leased=leased, dead=dead)

    async def clear(self, what: Literal["queue", "dead"] = "queue") -> None:
        """``queue``: drop tasks, leases, delays and pending counts; ``dead``: drop dead letters.

        Keys are unlinked (freed in the background). A namespace with neither tasks
        nor dead letters left loses its id counter too: a cleared loop leaves no key.
        """
        await self._call("clear", ["dead" if what == "dead" else "queue"])

    # -- registry ------------------------------------------------------------

    async def register(self, worker: str, role: str, info: Mapping[str, Any], ttl: float) -> str:
        """Register an incarnation; claim the lowest free alias of its role atomically."""
        return await self._call("register", [wid(worker), role, info_json(info), ms(ttl)], parse=text)

    async def heartbeat(self, worker: str, info: Mapping[str, Any], ttl: float) -> list[str] | None:
        """Refresh liveness (server clock) and info; return and clear the mailbox, None if unknown."""

        def parse(reply: Any) -> list[str] | None:
            return [text(c) for c in reply[1:]] if int(reply[0]) else None

        return await self._call("heartbeat", [wid(worker), info_json(info), ms(ttl)], parse=parse)

    async def unregister(self, worker: str) -> None:
        """Remove the worker, free its alias and release its leases to the head."""
        await self._call("unregister", [wid(worker)])

    # -- CounterStore ------------------------------------------------------------------

    async def add_counts(self, counts: Mapping[str, int]) -> None:
        """Add to the loop's counters, one script call per 500 (``max/``, ``min/`` names keep the extreme)."""
        items = list(counts.items())
        merge_counts({}, dict(items))  # refuses bad names and values before anything is sent
        for first in range(0, len(items), 500):
            args: list[Any] = ["add"]
            for name, value in items[first : first + 500]:
                args += [name.encode("utf-8", "surrogatepass"), str(value)]
            await self._call("counts", args, parse=int)

    async def counts(self) -> dict[str, int]:
        """The loop's counters, read in HSCAN steps; a field that is not a short name with an integer is skipped."""
        found: dict[str, int] = {}
        skipped = 0
        cursor = b"0"
        while len(found) < COUNTS_LIMIT:
            cursor, flat = await self._call("counts", ["read", cursor, 1000], parse=lambda r: (r[0], list(r[1])))
            for raw_name, raw_value in zip(flat[0::2], flat[1::2], strict=True):
                try:
                    name = bytes(raw_name).decode("utf-8")
                    value = int(bytes(raw_value))
                except (TypeError, ValueError):
                    skipped += 1
                    continue
                if counter_ok(name, value):
                    found[name] = value
                else:
                    skipped += 1
            if bytes(cursor) in (b"0", b""):
                break
        if skipped:
            log.warning("%s: skipped %d unreadable counters of loop %r", self, skipped, self.namespace)
        return dict(itertools.islice(found.items(), COUNTS_LIMIT))

    async def clear_counts(self) -> None:
        await self._call("counts", ["clear"], parse=int)

    async def workers(self) -> list[WorkerInfo]:
        """Registered workers ordered by alias (``m2`` before ``m10``), ages in the server clock.

        A worker whose record is unreadable is left out, one whose info is not a JSON
        object is listed with empty info; each with a warning.
        """
        return await self._call("workers", parse=self._workers)

    def _workers(self, reply: Any) -> list[WorkerInfo]:
        found = []
        for i in range(0, len(reply), 5):
            raw = bytes(reply[i])
            try:
                worker = raw.decode("utf-8", "surrogatepass")
            except UnicodeDecodeError:
                log.warning("%s: worker id %r is not UTF-8: not listed", self, raw[:40])
                continue
            info = worker_info(reply[i + 4])
            if info is None:
                log.warning("%s: info of worker %s is not a JSON object: listed without it", self, mask_secrets(worker))
                info = {}
            found.append(WorkerInfo(worker, text(reply[i + 1]), text(reply[i + 2]), info, int(reply[i + 3]) / 1000.0))
        return sorted(found, key=lambda w: alias_order(w.alias))

    async def send(self, aliases: Sequence[str], command: str) -> list[str]:
        """Append ``command`` to each alias's mailbox; return the aliases that exist."""
        if not aliases:
            return []
        return await self._call("send", [command, *aliases], parse=lambda r: [text(a) for a in r])

    async def leases(self, worker: str) -> list[Lease]:
        """Every lease ``worker`` holds, oldest task first (one script call)."""
        return await self._call("leases", [wid(worker)], parse=lambda r: _leases(r, worker, len(r)))

    async def recover(self) -> int:
        """Unregister expired workers and release their (and orphaned) leases to the head.

        No worker is declared dead before the server has been up for that worker's
        ttl, so after a Redis restart every worker gets a full ttl to reconnect. A
        worker whose record is unreadable counts as dead.
        """
        return await self._call("recover", parse=int)

    # -- per-host slots -------------------------------------------------------

    async def claim_hosts(self, worker: str, asks: Sequence[HostAsk], ttl: float, wait: float) -> list[HostGrant]:
        """Release, take slots and reserve turns per host (one script call per STEP_ITEMS hosts).

        Each host is one HASH key with an expiry (see ``lua/hosts.lua``), all under the
        loop's hash tag; times are the server's."""
        grants: list[HostGrant] = []
        for part in chunks(asks):
            args: list[Any] = [wid(worker), ms(ttl), ms(wait)]
            for a in part:
                args += [max(a.slots, 0), max(a.limit, 0), max(a.release, 0), max(a.turns, 0), delay_ms(a.delay)]
            keys = [self._key(HOST_PART + a.host) for a in part]
            grants += await self._call("hosts", args, parse=_grants, keys=keys)
        return grants

    # -- notifier -------------------------------------------------------------

    async def wait_for_tasks(self, timeout: float) -> None:
        """Return at once when tasks are ready; else block in ``BLPOP`` on the wake key.

        The wait is capped by ``timeout`` and by the due time of the next delayed
        task. It runs on a connection of its own, so other calls are not held up.
        """
        ready, due, now = await self._call("peek", parse=_ints)
        if ready > 0:
            return
        if due >= 0:
            timeout = min(timeout, max(due - now, 0) / 1000.0)
        if not timeout > 0:
            return
        if self._waiter is None:
            self._waiter = self._new_client()
        wait = self._waiter.blpop([self._key("wake")], timeout=max(timeout, 0.01))  # 0 would block forever
        # BLPOP's own timeout ends the wait; a dead connection is given up a socket timeout later.
        await self._run(wait, timeout + self.socket_timeout)
