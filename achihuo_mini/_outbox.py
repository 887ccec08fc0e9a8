"""Buffered writes: the :class:`Outbox`, the :class:`Attempt` that owns one, and how a call finds it.

Everything a spider writes (``add_task``, ``task_done``, ``uncache_task``) lands in an
outbox first:

- inside a handler, in that attempt's outbox: committed together with the ack when the
  handler returns, discarded when it fails (a retry never duplicates children);
- elsewhere in the serving event loop, in the loop's outbox, flushed by the committer;
- with no event loop running, in a throw-away outbox written at once.

:data:`CURRENT` is the context variable that tells which attempt a call runs in: each
attempt's handler runs in a task of its own, which copies the context.
"""

from __future__ import annotations

import contextvars
import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from .backend import Lease, NewTask

__all__ = ["CURRENT", "Attempt", "Outbox", "settle"]


_SEQ = itertools.count(1)
"""One order for every done-set change of the process: when the loop's outbox and a handler's
commit change the same name in one round of writes, the later call wins, as it would have
had each call been written at once."""


class Outbox:
    """Tasks to push and done-set changes, in the order they were made.

    ``marks`` maps a key to its last change: ``(done, name, seq)`` (``done`` True adds it
    to the done set, False removes it; ``seq`` orders changes across outboxes).
    ``ttls`` holds the ttl (seconds) of the done changes made with one (``task_done(ttl=)``,
    ``done_ttl``): those names are done only until their ttl passes.
    ``removed`` lists every removal made (the dedup cache must not drop an add of such a
    name while the removal is unwritten). ``seen`` holds the keys of the named tasks
    buffered here: a later ``repeat=False`` task of such a key is dropped at once, as the
    backend would drop it (the earlier copy makes it pending) -- and so reordering the
    buffer for priority tasks can never change which copy of a name is queued.
    """

    __slots__ = ("marked_at", "marks", "removed", "seen", "tasks", "ttls")

    def __init__(self) -> None:
        self.tasks: list[NewTask] = []
        self.marks: dict[bytes, tuple[bool, str, int]] = {}
        self.removed: list[str] = []
        self.seen: set[bytes] = set()
        self.ttls: dict[bytes, float] = {}
        self.marked_at = math.inf  # monotonic time of the first change with a ttl (the dedup cache's bound)

    def __bool__(self) -> bool:
        return bool(self.tasks or self.marks)

    def __len__(self) -> int:
        return len(self.tasks) + len(self.marks)

    def add(self, tasks: Sequence[NewTask]) -> int:
        """Buffer one call's tasks so that the buffer behaves like one push per call: the head
        tasks of a newer call go before those of older calls (each call's in its own order).
        Returns how many were dropped as certain duplicates (see the class docstring)."""
        seen = self.seen
        if len(tasks) == 1:  # one add_task call: the common case, in short
            t = tasks[0]
            if t.key is not None:
                if t.unique and t.key in seen:
                    return 1
                seen.add(t.key)
            if t.head and not t.delay:
                self.tasks.insert(0, t)
            else:
                self.tasks.append(t)
            return 0
        kept: list[NewTask] = []
        for t in tasks:
            key = t.key
            if key is not None:
                if t.unique and key in seen:
                    continue
                seen.add(key)
            kept.append(t)
        head = [t for t in kept if t.head and not t.delay]
        if head:
            self.tasks[0:0] = head
            self.tasks.extend(t for t in kept if not (t.head and not t.delay))
        else:
            self.tasks.extend(kept)
        return len(tasks) - len(kept)

    def mark(self, key: bytes, name: str, done: bool, ttl: float | None = None) -> None:
        """Record a done-set change (the last change of a name wins); ``ttl``: done for that long only."""
        self.marks[key] = (done, name, next(_SEQ))
        if done and ttl is not None:
            self.ttls[key] = ttl
            if self.marked_at == math.inf:
                self.marked_at = time.monotonic()
        elif self.ttls:
            self.ttls.pop(key, None)
        if not done:
            self.removed.append(name)

    def take(self) -> Outbox:
        """Move everything into a new outbox and leave this one empty."""
        taken = Outbox()
        taken.tasks, self.tasks = self.tasks, []
        taken.marks, self.marks = self.marks, {}
        taken.removed, self.removed = self.removed, []
        taken.seen, self.seen = self.seen, set()
        taken.ttls, self.ttls = self.ttls, {}
        taken.marked_at, self.marked_at = self.marked_at, math.inf
        return taken

    def put_back(self, newer: Outbox) -> None:
        """After a failed write: keep this (older) outbox's writes and add the newer ones after them."""
        self.tasks.extend(newer.tasks)
        self.add_marks(newer)
        self.removed.extend(newer.removed)
        self.seen |= newer.seen

    def add_marks(self, newer: Outbox) -> None:
        """Take ``newer``'s done-set changes after this one's (a key's later change wins, with its ttl)."""
        if self.ttls or newer.ttls:
            self.marked_at = min(self.marked_at, newer.marked_at)
            for key in newer.marks:
                if key in newer.ttls:
                    self.ttls[key] = newer.ttls[key]
                else:
                    self.ttls.pop(key, None)
        self.marks.update(newer.marks)

    def split_done(self) -> tuple[list[bytes], list[bytes]]:
        """``(done, undone)`` keys, in one pass (most outboxes hold one done name and nothing else).

        Done keys with a ttl are not among them: see :meth:`expiring`."""
        done: list[bytes] = []
        undone: list[bytes] = []
        for k, (v, _, _) in self.marks.items():
            (done if v else undone).append(k)
        if self.ttls:
            ttls = self.ttls
            done = [k for k in done if k not in ttls]
        return done, undone

    def expiring(self) -> list[tuple[bytes, float]]:
        """``(key, ttl)`` of the done keys that have a ttl."""
        return list(self.ttls.items())

    def names(self) -> list[tuple[str, bool]]:
        """The done-set changes by name, oldest first."""
        return [(name, done) for done, name, _ in self.marks.values()]


def settle(older: Outbox, newer: Sequence[Outbox]) -> None:
    """Before ``newer`` outboxes and then ``older`` are written in one round: where both change
    one key, keep only the later call's change (by ``seq``), so write order cannot undo it."""
    if not older.marks:
        return
    for box in newer:
        for key in older.marks.keys() & box.marks.keys():
            if older.marks[key][2] > box.marks[key][2]:
                del box.marks[key]
                box.ttls.pop(key, None)
            else:
                del older.marks[key]
                older.ttls.pop(key, None)


@dataclass(eq=False)
class Attempt:
    """One run of a handler for one lease.

    ``owner`` is the object whose ``add_task`` calls join this attempt (the loop's
    producer); ``closed`` is set when the handler ended, after which adds from tasks it
    spawned go to the loop's outbox instead. ``deadline`` is the event-loop time after
    which the watchdog cancels it; ``cancel_reason`` says who cancelled it (``timeout``,
    ``stop``, ``lost`` when the lease was lost) — a handler that raises ``CancelledError``
    with no reason has failed like any other.
    """

    owner: object
    lease: Lease
    outbox: Outbox = field(default_factory=Outbox)
    handler: str = ""
    name: str | None = None
    closed: bool = False
    deadline: float = 0.0
    cancel_reason: str | None = None
    disallowed: bool = False  # robots.txt refused its URL: acked with an empty outbox, counted apart


CURRENT: contextvars.ContextVar[Attempt | None] = contextvars.ContextVar("achihuo_attempt", default=None)
"""The attempt the running code belongs to (set at the start of each handler's task)."""
