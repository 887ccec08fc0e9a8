"""This process in the worker registry: registration, heartbeats, commands, recovery, peers.

:class:`Presence` is one incarnation at a time (a uuid that owns its leases and
receives commands). Its heartbeat loop refreshes liveness, delivers commands, recovers
the leases of dead workers, and asks the worker to look for stray leases. When the
incarnation was declared dead, or could not heartbeat for a lease timeout (a blocked
event loop, a suspended VM, an outage), it drops its leases, unregisters the old
incarnation (after reading its mailbox: a stop sent to it still reaches the process) and
registers a new one.

:class:`NullPresence` stands in for a queue without a registry: no aliases, no
commands, no peers; idleness is this process's own.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any, Protocol

from ._store import Backoff, wait_event
from .backend import Lease, WorkerInfo, WorkerRegistry
from .backend_kit import parse_alias
from .errors import BackendError
from .masking import mask_secrets

__all__ = ["NullPresence", "Presence", "PresenceHooks"]

log = logging.getLogger("achihuo_mini")


class PresenceHooks(Protocol):
    """What the heartbeat loop asks of the worker."""

    def info(self) -> dict[str, Any]: ...

    def command(self, command: str) -> None: ...

    def leases_lost(self) -> None: ...

    def check_leases(self) -> None: ...


class Presence:
    """One registered incarnation of this process (see the module docstring)."""

    def __init__(self, name: str, registry: WorkerRegistry, lease_timeout: float, heartbeat_interval: float) -> None:
        self.name = name
        self.registry = registry
        self.lease_timeout = lease_timeout
        self.heartbeat_interval = heartbeat_interval
        self.worker = uuid.uuid4().hex
        self.alias: str | None = None
        self.role = "master"
        self._peers: set[str] = set()
        self._peers_at = float("-inf")

    async def start(self, role: str, info: dict[str, Any]) -> str | None:
        """Recover dead workers' leases, then register; returns the alias."""
        self.role = role
        recovered = await self.registry.recover()
        if type(recovered) is int and recovered:
            log.warning("%s: recovered %d tasks of dead workers", self.name, recovered)
        await self._register(info)
        log.info("%s: registered as %s (worker %s)", self.name, self.alias, self.worker[:8])
        return self.alias

    async def _register(self, info: dict[str, Any]) -> None:
        alias = await self.registry.register(self.worker, self.role, info, self.lease_timeout)
        if parse_alias(alias) is None:
            raise BackendError(f"register() answered {mask_secrets(repr(alias))[:60]}, not an alias like m1 or s1")
        self.alias = alias

    async def stop(self) -> None:
        """Unregister (the backend releases any lease left)."""
        if self.alias is not None:
            await self.registry.unregister(self.worker)
            self.alias = None

    async def run(
        self, hooks: PresenceHooks, beat_now: asyncio.Event, closing: Callable[[], bool], backoff: Backoff
    ) -> None:
        """Heartbeat every ``heartbeat_interval`` (or when ``beat_now`` is set) until ``closing()``."""
        last_ok = time.monotonic()
        retry = False
        while not closing():
            if not retry:
                before = time.monotonic()
                if not await wait_event(beat_now, self.heartbeat_interval):
                    lag = time.monotonic() - before - self.heartbeat_interval
                    if lag > 1.0:
                        log.warning("%s: event loop lagged %.1f s (a handler is blocking it?)", self.name, lag)
                if closing():
                    return
                beat_now.clear()
            sent = time.monotonic()  # the backend's clock restarts the lease when it applies the call, not after
            try:
                await self._beat(hooks, sent - last_ok > self.lease_timeout)
            except BackendError as exc:
                await backoff.failed(exc, "heartbeat")
                retry = True
                continue
            backoff.ok("heartbeat")
            retry = False
            last_ok = sent

    async def _beat(self, hooks: PresenceHooks, lagged: bool) -> None:
        reply = await self.registry.heartbeat(self.worker, hooks.info(), self.lease_timeout)
        if reply is not None and not isinstance(reply, list):
            raise BackendError(f"heartbeat() answered {mask_secrets(repr(reply))[:80]}, not a list of commands or None")
        commands = None if reply is None else [c for c in reply if type(c) is str]
        for command in commands or ():
            hooks.command(command)
        if commands is None or lagged:
            old = self.worker
            if commands is not None:
                # still registered, but others may already have taken its tasks: let them go
                await self.registry.unregister(old)
            hooks.leases_lost()
            self.worker = uuid.uuid4().hex
            self.alias = None
            await self._register(hooks.info())
            log.warning(
                "%s: worker %s %s; its tasks went back to the queue; re-registered as %s (%s)",
                self.name,
                old[:8],
                "could not heartbeat for the lease timeout" if commands is not None else "was declared dead",
                self.alias,
                self.worker[:8],
            )
        recovered = await self.registry.recover()
        if type(recovered) is int and recovered:
            log.warning("%s: recovered %d tasks of dead workers", self.name, recovered)
        hooks.check_leases()

    async def leases(self) -> list[Lease]:
        """The leases the backend says this incarnation holds."""
        held = await self.registry.leases(self.worker)
        return [lease for lease in held if type(lease) is Lease] if isinstance(held, list) else []

    async def _workers(self) -> list[WorkerInfo]:
        found = await self.registry.workers()
        return [w for w in found if isinstance(w, WorkerInfo)] if isinstance(found, list) else []

    async def peer_handles(self, handler: str) -> bool | None:
        """Does another live worker advertise ``handler`` (its heartbeat lists its handlers)?
        ``None``: the registry could not be read (then nobody should bury the task)."""
        now = time.monotonic()
        if now - self._peers_at > self.heartbeat_interval:
            try:
                workers = await self._workers()
            except BackendError:
                return None
            peers: set[str] = set()
            for w in workers:
                handlers = w.info.get("handlers") if isinstance(w.info, dict) else None
                if w.worker != self.worker and _alive(w, self.lease_timeout) and isinstance(handlers, list):
                    peers.update(h for h in handlers if type(h) is str)
            self._peers, self._peers_at = peers, now
        return handler in self._peers

    async def others_seeding(self) -> bool:
        """Is another live master still running ``run()``?"""
        for w in await self._workers():
            if w.worker != self.worker and _alive(w, self.lease_timeout) and isinstance(w.info, dict):
                if w.info.get("seeding") is True:
                    return True
        return False


def _alive(w: WorkerInfo, lease_timeout: float) -> bool:
    return type(w.age) in (int, float) and w.age <= lease_timeout


class NullPresence:
    """For a queue without a worker registry: this process alone (see the module docstring)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.worker = uuid.uuid4().hex
        self.alias: str | None = None

    async def start(self, role: str, info: dict[str, Any]) -> str | None:
        return None

    async def stop(self) -> None:
        pass

    async def run(
        self, hooks: PresenceHooks, beat_now: asyncio.Event, closing: Callable[[], bool], backoff: Backoff
    ) -> None:
        while not closing():  # nothing to refresh: wait until the worker closes (it sets beat_now)
            await beat_now.wait()
            beat_now.clear()

    async def leases(self) -> list[Lease]:
        return []

    async def peer_handles(self, handler: str) -> bool | None:
        return False

    async def others_seeding(self) -> bool:
        return False
