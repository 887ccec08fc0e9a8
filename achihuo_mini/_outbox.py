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
from collections.abc import Sequence
from dataclasses import dataclass, field

from .backend import Lease, NewTask

__all__ = ["CURRENT", "Attempt", "Outbox"]


class Outbox:
    """Tasks to push and done-set changes, in the order they were made.

    ``done`` maps a key to its last change (True: add to the done set, False: remove);
    ``names`` holds the same changes by name, for the local dedup cache, which learns
    them once the writes succeeded; ``removed`` lists every removal made (the cache
    must not drop an add of such a name while the removal is unwritten).
    """

    __slots__ = ("done", "names", "removed", "tasks")

    def __init__(self) -> None:
        self.tasks: list[NewTask] = []
        self.done: dict[bytes, bool] = {}
        self.names: dict[str, bool] = {}
        self.removed: list[str] = []

    def __bool__(self) -> bool:
        return bool(self.tasks or self.done)

    def __len__(self) -> int:
        return len(self.tasks) + len(self.done)

    def add(self, tasks: Sequence[NewTask]) -> None:
        """Buffer one call's tasks so that the buffer behaves like one push per call:
        the head tasks of a newer call go before those of older calls (each call's in its own order)."""
        head = [t for t in tasks if t.head and not t.delay]
        if head:
            self.tasks[0:0] = head
            self.tasks.extend(t for t in tasks if not (t.head and not t.delay))
        else:
            self.tasks.extend(tasks)

    def mark(self, key: bytes, name: str, done: bool) -> None:
        """Record a done-set change (the last change of a name wins)."""
        self.done[key] = done
        self.names[name] = done
        if not done:
            self.removed.append(name)

    def take(self) -> Outbox:
        """Move everything into a new outbox and leave this one empty."""
        taken = Outbox()
        taken.tasks, self.tasks = self.tasks, []
        taken.done, self.done = self.done, {}
        taken.names, self.names = self.names, {}
        taken.removed, self.removed = self.removed, []
        return taken

    def put_back(self, newer: Outbox) -> None:
        """After a failed write: keep this (older) outbox's writes and add the newer ones after them."""
        self.tasks.extend(newer.tasks)
        self.done.update(newer.done)
        self.names.update(newer.names)
        self.removed.extend(newer.removed)

    def split_done(self) -> tuple[list[bytes], list[bytes]]:
        """``(done, undone)`` keys, in one pass (most outboxes hold one done name and nothing else)."""
        done: list[bytes] = []
        undone: list[bytes] = []
        for k, v in self.done.items():
            (done if v else undone).append(k)
        return done, undone


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


CURRENT: contextvars.ContextVar[Attempt | None] = contextvars.ContextVar("achihuo_attempt", default=None)
"""The attempt the running code belongs to (set at the start of each handler's task)."""
