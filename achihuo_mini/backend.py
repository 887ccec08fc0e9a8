"""The storage contract: ``QueueBackend`` and ``DoneSetBackend``.

The loop talks to storage only through these protocols. A backend is correct when
it passes the contract suite in :mod:`achihuo_mini.testing`.

Vocabulary
----------
key
    The 16-byte digest of a task name (:func:`name_key`).
    Backends never see task names, only keys; ``None`` means an unnamed task.
payload
    The encoded task (opaque bytes to a backend).
pending
    Per key, the COUNT of copies that are ready, delayed or leased. Dead letters
    are not pending. A ``unique`` push of a key whose count is above zero is skipped.
lease
    A reserved task. It stays in the backend until it is committed (acked),
    released, retried or buried. Each reservation bumps the task's ``attempt``;
    every later call carries ``(worker, attempt)`` and the backend ignores the
    call for that task ("fenced") when they no longer match.
failures
    How many times the task's handler failed. Only :meth:`QueueBackend.retry` and
    :meth:`QueueBackend.bury` count; a release (graceful stop, recovery) does not.

Ordering
--------
Ready tasks form a deque. Plain pushes go to the tail in batch order; ``head``
pushes go to the head so that the batch runs in its own order before what was
there (the newest head batch runs first); released and recovered tasks go to the
head; retried and delayed tasks go to the tail when their delay expires.

Every method takes and returns batches: the loop's hot path is about two backend
round trips per batch of tasks, never one per task. Every method is atomic with
respect to other processes using the same backend (``scope`` says which
processes can share it). Empty batches are allowed and do nothing. A call that
is cancelled or fails with a connection error may or may not have been applied;
fencing makes repeating it safe, and leases taken by a lost ``reserve`` come back
through ``unregister``/``recover``.

Optional abilities are separate protocols: :class:`WorkerRegistry` (heartbeats,
aliases, remote commands, recovery of dead workers' leases), :class:`Notifier`
(wake idle workers instead of polling), :class:`CounterStore` (statistics summed
over all workers) and :class:`HostSlots` (per-host politeness held for the whole
loop) on a queue, and :class:`ExpiringDoneSet` (done names that age out, for
re-crawls) on a done set. A queue whose durability
depends on a server's settings may expose a ``durability`` attribute after
``open()``: ``"volatile"``, ``"everysec"``, ``"always"`` or ``"unknown"``; it is
logged at start, shown by ``status`` and checked by ``require_durable``.

A queue checks unique pushes against the done set of its own backend and
namespace. When the loop keeps its done set elsewhere, that one stays empty (the
loop filters unique pushes against the real done set itself) -- unless names were
left there by an earlier configuration: clear them when moving a done set.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from hashlib import blake2b
from typing import Any, Literal, Protocol, runtime_checkable

__all__ = [
    "COUNTS_LIMIT",
    "Commit",
    "CounterStore",
    "DeadLetter",
    "DoneSetBackend",
    "ExpiringDoneSet",
    "HostAsk",
    "HostGrant",
    "HostSlots",
    "Lease",
    "NewTask",
    "Notifier",
    "QueueBackend",
    "QueueStats",
    "Scope",
    "WorkerInfo",
    "WorkerRegistry",
    "name_key",
]

Scope = Literal["process", "host", "network"]
"""Who can share a backend: one process (memory), one host (SQLite), any host (Redis)."""

SCOPE_ORDER: dict[str, int] = {"process": 0, "host": 1, "network": 2}

KEY_FORMAT = "blake2b-128"
"""How a key is made from a name (the on-disk format: changing it orphans every stored key)."""


def name_key(name: str) -> bytes:
    """The key of a task name: the 16-byte blake2b digest of its UTF-8 bytes.

    Fixed size per name, whatever the name; lone surrogates are encoded as they are
    (``surrogatepass``), so every ``str`` has a key.
    """
    return blake2b(name.encode("utf-8", "surrogatepass"), digest_size=16).digest()


@dataclass(slots=True, eq=False)
class NewTask:
    """A task to push.

    ``unique`` (``repeat=False``): skip it when ``key`` is pending, or done in a done
    set this queue shares (see :meth:`QueueBackend.shares_done_set`). The decision is
    atomic with the write. ``head`` puts it at the head of the ready deque; ``delay``
    (seconds, > 0) makes it ready at the tail after that long; ``head`` is ignored
    for delayed tasks.

    Treat it as read-only. (It is not a frozen dataclass only because one is built
    for every ``add_task`` and a frozen one costs three times as much to build.)
    """

    payload: bytes
    key: bytes | None = None
    unique: bool = False
    head: bool = False
    delay: float = 0.0


@dataclass(slots=True, unsafe_hash=True)
class Lease:
    """A reserved task, as returned by :meth:`QueueBackend.reserve`.

    ``task_id`` identifies the queued copy (unique within the namespace, never
    reused while the copy exists). ``worker`` and ``attempt`` are the fencing token.

    Treat it as read-only (it hashes by value). It is not a frozen dataclass only
    because one is built for every task run, and a frozen one costs four times as
    much to build.
    """

    task_id: int
    payload: bytes
    key: bytes | None
    worker: str
    attempt: int
    failures: int


@dataclass(slots=True)
class Commit:
    """One finished attempt: ack ``lease``, then apply ``done``/``undone``/``expiring`` keys, then push ``children``.

    ``done``/``undone``/``expiring`` are only given to a queue that shares the done
    set; the loop writes them to a separate done set itself, before the commit.
    ``expiring`` holds ``(key, ttl)`` pairs: keys done for ``ttl`` seconds (as
    :meth:`ExpiringDoneSet.add_expiring` puts them); it is only given to a queue whose
    shared done set declares :class:`ExpiringDoneSet`, and such a queue must apply it.
    A key is in at most one of the three.

    Treat it as read-only (not frozen for the reason :class:`Lease` is not).
    """

    lease: Lease
    done: Sequence[bytes] = ()
    undone: Sequence[bytes] = ()
    children: Sequence[NewTask] = ()
    expiring: Sequence[tuple[bytes, float]] = ()


@dataclass(frozen=True, slots=True)
class QueueStats:
    """One atomic snapshot of a queue."""

    ready: int
    delayed: int
    leased: int
    dead: int

    @property
    def active(self) -> int:
        """Tasks that still have to run: ready + delayed + leased."""
        return self.ready + self.delayed + self.leased


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A buried task: its payload, why it was buried, and how often it failed."""

    task_id: int
    payload: bytes
    key: bytes | None
    error: str
    failures: int


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """A registered worker incarnation.

    ``info`` is JSON-compatible data the worker published (host, pid, role counters,
    handler names, ``seeding``). ``age`` is seconds since its last heartbeat, in the
    backend's clock.
    """

    worker: str
    alias: str
    role: str
    info: Mapping[str, Any] = field(default_factory=dict)
    age: float = 0.0


@runtime_checkable
class QueueBackend(Protocol):
    """A durable task queue with leases. All methods are coroutines unless noted."""

    @property
    def scope(self) -> Scope:
        """Who can share this queue: ``process``, ``host`` or ``network`` (a plain attribute is fine)."""

    @property
    def location(self) -> str:
        """Where the data lives, for logs: a file path or a URL WITHOUT password."""

    async def open(self) -> None:
        """Connect and create what is missing. Raises ``BackendUnavailable`` after a connect timeout."""

    async def close(self) -> None:
        """Release connections. Idempotent. Data stays."""

    def shares_done_set(self, done: DoneSetBackend) -> bool:
        """(sync) True when this queue can read and write ``done`` inside its own atomic operations.

        Then ``push`` checks unique keys against the done set too, and ``commit``
        applies ``Commit.done``/``undone`` atomically with the ack.
        """

    async def push(self, tasks: Sequence[NewTask]) -> int:
        """Push a batch; return how many were enqueued (unique duplicates are skipped).

        A unique task is checked against pending keys (and the shared done set),
        including the tasks earlier in the same batch.
        """

    async def reserve(self, worker: str, limit: int) -> list[Lease]:
        """Lease up to ``limit`` ready tasks (head first) for ``worker``; never blocks.

        Due delayed tasks are moved to the tail first. Each lease bumps the task's
        attempt number. ``limit <= 0`` returns ``[]``.
        """

    async def commit(self, commits: Sequence[Commit]) -> int:
        """Ack a batch of finished attempts; return how many were applied.

        For each commit whose lease is still held: remove the task (its key's
        pending count drops), apply done/undone keys, push the children. A
        fenced commit writes nothing at all.

        The commits of one call come from attempts that ran concurrently, so a
        backend may apply them one after the other or in three phases: every ack,
        then every done-set change in commit order (the last change of a key wins),
        then every child in commit order (unique ones checked against pending and
        done as they stand after the first two phases). Both orders lose nothing:
        acking first only ever lets more unique children through.
        """

    async def release(self, leases: Sequence[Lease], delay: float = 0.0) -> int:
        """Give leased tasks back without spending a failure; return how many were still held.

        ``delay <= 0`` (graceful stop, recovery, strays): to the HEAD, in order.
        ``delay > 0``: ready at the TAIL after ``delay`` seconds, like a retry but with
        the failure count unchanged (the loop holds back a task for a handler that
        only a live peer has, so that the peer takes it).
        """

    async def retry(self, items: Sequence[tuple[Lease, float]]) -> int:
        """Count one failure for each task and make it ready at the tail after ``delay`` seconds."""

    async def bury(self, items: Sequence[tuple[Lease, str]]) -> int:
        """Move leased tasks to the dead letters with an error text (counts one failure)."""

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """Up to ``limit`` dead letters, oldest first."""

    async def requeue_dead(self, limit: int | None = None) -> int:
        """Push up to ``limit`` (all when None) dead letters back to the ready tail, failures reset."""

    async def stats(self) -> QueueStats:
        """Counts of ready, delayed, leased and dead tasks in one atomic snapshot."""

    async def clear(self, what: Literal["queue", "dead"] = "queue") -> None:
        """``queue``: drop ready, delayed and leased tasks and pending counts. ``dead``: drop dead letters."""


@runtime_checkable
class DoneSetBackend(Protocol):
    """A durable set of finished task keys (16-byte digests)."""

    @property
    def scope(self) -> Scope:
        """Who can share this done set (a plain attribute is fine)."""

    @property
    def location(self) -> str:
        """Where the data lives, for logs, WITHOUT password."""

    async def open(self) -> None:
        """Connect and create what is missing."""

    async def close(self) -> None:
        """Release connections. Idempotent."""

    async def add(self, keys: Sequence[bytes]) -> int:
        """Add keys; return how many were new."""

    async def contains(self, keys: Sequence[bytes]) -> list[bool]:
        """Membership of each key, in order."""

    async def remove(self, keys: Sequence[bytes]) -> int:
        """Remove keys; return how many were present."""

    async def count(self) -> int:
        """Number of keys in the set."""

    async def clear(self) -> None:
        """Remove every key."""


@runtime_checkable
class WorkerRegistry(Protocol):
    """Optional queue ability: worker liveness, aliases, commands and lease recovery.

    Times are the backend's clock. A worker is dead when its last heartbeat is
    older than the ``ttl`` it gave; its leases are then recovered by anyone.
    """

    async def register(self, worker: str, role: str, info: Mapping[str, Any], ttl: float) -> str:
        """Register a new incarnation and claim the lowest free alias of its role
        (``m1``, ``m2``… for ``master``; ``s1``… for ``slave``), atomically. Its mailbox starts empty."""

    async def heartbeat(self, worker: str, info: Mapping[str, Any], ttl: float) -> list[str] | None:
        """Refresh liveness and info; return and clear commands sent to this worker.

        Returns ``None`` when the worker is not registered any more (it was
        declared dead): it must drop its leases and register again.
        """

    async def unregister(self, worker: str) -> None:
        """Remove the worker and free its alias. Its leases (if any remain) are released to the head."""

    async def workers(self) -> list[WorkerInfo]:
        """Registered workers (dead ones included until recovered), ordered by alias."""

    async def send(self, aliases: Sequence[str], command: str) -> list[str]:
        """Append ``command`` to the mailbox of each alias; return the aliases that exist."""

    async def leases(self, worker: str) -> list[Lease]:
        """Every lease ``worker`` holds, oldest task first.

        A worker whose ``reserve`` reply was lost (a connection dropped after the
        backend applied it) uses this to find and release leases it never saw.
        """

    async def recover(self) -> int:
        """Unregister workers whose heartbeat expired and release their leases to the head.

        Leases held by a worker that is not registered at all (declared dead, then
        still reserving under its old incarnation) are released too. Returns tasks released.
        """


@runtime_checkable
class CounterStore(Protocol):
    """Optional queue ability: the loop's statistics, summed over every worker that ever ran.

    Workers add what they counted since their last call (at each heartbeat and when they
    stop), so the totals include workers that have exited or crashed (up to their last
    heartbeat) until :meth:`clear_counts`. A call whose reply was lost may be repeated:
    the totals are statistics, not guarantees.
    """

    async def add_counts(self, counts: Mapping[str, int]) -> None:
        """Add each value to the loop's counter of that name, atomically for the call.

        Names starting with ``max/`` keep the largest value ever given instead, ``min/``
        the smallest. Values are 64-bit integers; names are short printable strings."""

    async def counts(self) -> dict[str, int]:
        """The loop's counters (at most :data:`COUNTS_LIMIT` of them; unreadable ones skipped)."""

    async def clear_counts(self) -> None:
        """Forget every counter of the loop."""


COUNTS_LIMIT = 10_000
"""The most counters :meth:`CounterStore.counts` returns (the loop itself keeps a few hundred)."""


@runtime_checkable
class Notifier(Protocol):
    """Optional queue ability: let an idle worker sleep until tasks may be ready."""

    async def wait_for_tasks(self, timeout: float) -> None:
        """Return when a push may have made tasks ready, or after ``timeout`` seconds."""


@runtime_checkable
class ExpiringDoneSet(Protocol):
    """Optional done-set ability: names that stop counting as done once they are older than a ttl.

    What the loop's ``task_done(name, ttl=...)`` and ``done_ttl`` need (re-crawls). A done
    set without it keeps every name for ever, and the loop refuses a ttl with a clear error.

    Guarantees, in the backend's clock (like lease times):

    - a key added with :meth:`add_expiring` counts as done (``contains``, and the unique
      check of a queue that shares this done set) until ``ttl`` seconds after the call
      was applied, and not from then on; a backend may round the deadline up by at most
      one second, never down;
    - the last write of a key wins: :meth:`DoneSetBackend.add` makes it permanent again,
      another ``add_expiring`` sets a new deadline, ``remove`` removes it;
    - ``count()`` may still include keys whose ttl has passed until the backend drops them
      (it may do so lazily, when they are next written, or in bounded sweeps);
    - a queue that shares this done set applies :attr:`Commit.expiring` in its commit,
      atomically with the ack, as it applies ``Commit.done``.
    """

    async def add_expiring(self, items: Sequence[tuple[bytes, float]]) -> int:
        """Add ``(key, ttl)`` pairs (``ttl`` seconds, > 0); return how many keys were not done before
        (absent, or their ttl had passed). A key repeated in the batch: the last pair wins."""


@dataclass(frozen=True, slots=True)
class HostAsk:
    """What a worker asks of one host in one :meth:`HostSlots.claim_hosts` call.

    ``host`` is the host name as the loop keys it (lower case, at most 255 characters).
    ``release``: slots this worker gives back first. ``slots``: slots wanted in addition
    to those it holds, granted while the host's total (over unexpired holders) stays at
    most ``limit`` (``per_host_limit``; 0 with ``slots == 0`` when there is none).
    ``turns``: request starts wanted, ``delay`` seconds apart (``per_host_delay``, or a
    larger ``Crawl-delay``).
    """

    host: str
    slots: int = 0
    limit: int = 0
    release: int = 0
    turns: int = 0
    delay: float = 0.0


@dataclass(frozen=True, slots=True)
class HostGrant:
    """The answer for one :class:`HostAsk`.

    ``slots``: granted now (0 .. ``ask.slots``); ``held``: slots this worker holds after the
    call; ``workers``: workers of the loop holding slots of this host, or refused some
    within the last ``wait`` seconds, this one included (the loop shares the limit among
    them); ``start``: seconds from now until the first of the ``turns`` granted starts
    (0 when none were asked), the others following every ``delay`` seconds.
    """

    slots: int = 0
    held: int = 0
    workers: int = 1
    start: float = 0.0
    turns: int = 0


@runtime_checkable
class HostSlots(Protocol):
    """Optional queue ability: ``per_host_limit`` and ``per_host_delay`` held for the whole loop.

    Without it, every process keeps the limits for itself (and the loop says so at start).
    The loop takes slots and turns in batches (a worker keeps the slots it uses and asks
    for many turns at once), so a call is rare compared with requests.

    Guarantees (times in the backend's clock):

    - :meth:`claim_hosts` is atomic for every process that shares the backend;
    - slots: a call never grants a slot that would bring a host's total held by unexpired
      holders above ``limit``; every call renews ``worker``'s holding of each host it
      names for ``ttl`` seconds; a holding that is not renewed within its ``ttl`` counts
      for nothing from then on (a crashed worker's slots come back by themselves);
    - turns: after each granted start of a host, the host's next granted start (to any
      worker) comes no sooner than the ``delay`` that start was granted with: a call's
      first start is at the host's next free start or now, whichever is later, its others
      follow every ``delay`` seconds, and the host's next free start moves ``delay`` past
      its last one;
    - per-host state that holds nothing (no unexpired holding or wait mark, no future
      start) may be dropped; a backend keeps no host state for ever.
    """

    async def claim_hosts(self, worker: str, asks: Sequence[HostAsk], ttl: float, wait: float) -> list[HostGrant]:
        """Apply each ask in order (release, then slots, then turns) and return one grant per ask.

        A worker refused part of the slots it asked for counts among the host's
        ``workers`` for ``wait`` seconds (it asks again sooner while it waits). A graceful
        stop gives back what it holds with ``release`` asks (what a lost reply granted
        expires after ``ttl``).
        """
