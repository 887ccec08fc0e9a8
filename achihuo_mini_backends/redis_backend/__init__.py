"""The ``redis`` backend: queue, done set, worker registry and notifier in Redis.

Scope ``network``: any process on any host that reaches the server shares a
loop's data. Requires **Redis 6.2 or newer** (``LPOP`` with a count,
fractional ``BLPOP`` timeouts) and the ``redis`` package
(``pip install redis``), imported only when a backend is created.

Keys
----
Every key of a loop is built by :func:`redis_key` as ``<prefix>:{<NAME>}:<part>``,
where ``<NAME>`` is the loop's NAME with ``%``, ``{`` and ``}`` percent-escaped
(``%25``, ``%7B``, ``%7D``; the empty NAME is ``%``). The whole escaped NAME is
therefore the Redis Cluster hash tag: one loop lives in one slot, and every
script passes all its keys in ``KEYS``. Nothing uses ``SCAN``/``KEYS`` patterns.

==========  ======  =========================================================
part        type    content
==========  ======  =========================================================
seq         STRING  last task id; a fresh namespace starts at TIME in µs
tasks       HASH    id → payload
meta        HASH    id → attempt, failures (8 bytes) + key digest
ready       LIST    ready ids, head first
delayed     ZSET    zero-padded id, score = due time (ms, server clock)
leased      HASH    id → ``<attempt>:<worker>``: the fencing token
pending     HASH    key digest → copies ready, delayed or leased
dcount      STRING  number of names in the done set
d:<b0><b1>  HASH    a done-set bucket: digest bytes 3-16 → ``''`` (see below)
dead        LIST    dead letters (msgpack records), oldest first
wake        LIST    wake-up tokens for idle workers (≤ 16, expire after 60 s)
workers     HASH    worker → alias, role, ttl, last heartbeat (server clock)
winfo       HASH    worker → published info (JSON)
aliases     HASH    alias → worker
mailbox     HASH    worker → pending commands (msgpack list)
==========  ======  =========================================================

The done set
------------
A done name is its 16-byte digest, stored in one of 65 536 HASH buckets: the key
ends in ``d:`` + the digest's first 2 bytes (raw), the field is the other 14 bytes,
the value is empty. Small hashes are kept as a listpack (ziplist before Redis 7),
about 18 bytes per name plus the bucket's key: 28 bytes per name at 1 000 000
names (``INFO used_memory`` delta; the one SET of earlier versions took 72, and
2^17 buckets 34). ``dcount`` is kept exact from the ``HSETNX``/``HDEL`` replies in
the same scripts, so :meth:`RedisDoneSet.count` reads one key.

A bucket stays a listpack while it holds at most ``hash-max-listpack-entries``
names (``hash-max-ziplist-entries`` before 7.0; the server default is 512 —
this backend never changes server settings). Names spread evenly over the
buckets, so with the default every bucket stays compact up to about **26
million** names (the chance that any bucket exceeds 512 is then 1 %; at 27.8
million one bucket is expected to have). Beyond that, full buckets turn into real
hash tables one by one: still correct, just about 80 bytes per name in those
buckets (a server configured with 128 reaches that point at about 5 million).
A converted bucket becomes a listpack again only when the server reloads its data.

Scripts receive the fixed keys above in ``KEYS``, then the bucket key of every
done-set name the call reads or writes (computed here, once per bucket), and find
a name's bucket among them by its 2 bytes: every key a script touches is in
``KEYS`` (Redis Cluster), and push/commit stay one call. Clearing the done set
unlinks all 65 536 possible bucket keys in one script. A loop written by an
earlier version still has the old ``done`` SET: :meth:`RedisDoneSet.open` moves
it into the buckets.

Every protocol call is one round trip: a Lua script from ``lua/*.lua`` (shared
helpers in ``lua/lib.lua``), registered once per client with ``register_script``
(``EVALSHA``, with redis-py's ``NOSCRIPT`` fallback), or one atomic command.
Task batches (push, commit, the reserve reply) travel as one msgpack string;
lease batches (release, retry, bury) as flat ``ARGV`` pairs/triples, done-set
batches as flat ``ARGV`` digests. Scripts
issue multi-argument commands in chunks of 512, so batch size is limited only
by memory, never by Lua's ``unpack``. Times that cross processes
(delays, heartbeats) are the server's ``TIME``.

Durability is read at :meth:`open` from ``CONFIG GET``: ``always``
(``appendonly yes`` + ``appendfsync always``), ``everysec`` (``appendfsync
everysec``), ``volatile`` (no AOF, ``appendfsync no``, or an eviction policy
other than ``noeviction`` with a ``maxmemory``), or ``unknown`` when ``CONFIG`` is
disabled (managed services).

Idle workers block in ``BLPOP`` on the ``wake`` key on a connection of their own;
every write that makes tasks ready or delayed pushes up to 16 tokens, so up to 16
idle workers wake per write (the others wake at their timeout or the next write).

Failures: redis-py's errors become ``BackendUnavailable`` (connection, timeout,
loading, failover, out of memory: waiting helps) or ``BackendError`` (refused
credentials, anything else), with the original chained. Every call has a deadline
of ``socket_timeout`` seconds (``connect_timeout`` for :meth:`open`). The driver
never re-sends a command on its own: a script whose reply was lost must not run
twice; the loop retries, and fencing makes a late commit harmless. After a Redis
restart no worker is declared dead before the server has been up for that
worker's ttl.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.resources
import json
import logging
import math
import re
from collections.abc import Awaitable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeVar, cast
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import msgpack

from achihuo_mini.backend import (
    Commit,
    DeadLetter,
    DoneSetBackend,
    Lease,
    NewTask,
    QueueStats,
    WorkerInfo,
)
from achihuo_mini.errors import BackendError, BackendUnavailable, ConfigError, PluginError
from achihuo_mini.plugins import BackendSpec, Option, hookimpl

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.commands.core import AsyncScript

__all__ = [
    "KEY_PARTS",
    "MIN_REDIS_VERSION",
    "RedisDoneSet",
    "RedisQueue",
    "achihuo_register_backends",
    "escape_namespace",
    "mask_url",
    "redis_key",
]

log = logging.getLogger("achihuo_mini.backends.redis")

MIN_REDIS_VERSION = (6, 2, 0)
"""Oldest server this backend runs on."""

DEFAULT_URL = "redis://127.0.0.1:6379/0"
DEFAULT_PREFIX = "achihuo"

KEY_PARTS = (
    "seq", "tasks", "meta", "ready", "delayed", "leased", "pending",
    "dcount", "dead", "wake", "workers", "winfo", "aliases", "mailbox",
)  # fmt: skip
"""The fixed keys of a loop, in the order scripts receive them in ``KEYS``.

The done-set buckets (:data:`BUCKET_PART` + :data:`BUCKET_BYTES` bytes) a call needs
follow them in ``KEYS``."""

BUCKET_PART = "d:"
"""Done-set bucket keys are ``redis_key(NAME, BUCKET_PART)`` + the first digest bytes."""
BUCKET_BYTES = 2
"""Digest bytes that pick a done-set bucket: 256 ** 2 = 65 536 buckets."""
LEGACY_DONE_PART = "done"
"""The done set of earlier versions: one SET of digests, moved into the buckets at open."""
MIGRATE_CHUNK = 1000
"""Names moved from the old done SET per step (``SSCAN`` count)."""

SCRIPTS = (
    "push", "reserve", "commit", "release", "retry", "bury", "dead_letters", "requeue",
    "stats", "clear", "peek", "register", "heartbeat", "unregister", "recover", "workers", "send", "leases",
    "done_add", "done_contains", "done_remove", "done_clear",
)  # fmt: skip

ERROR_MAX_CHARS = 2048
PROMOTE_MAX = 5000
"""Due delayed tasks moved to the ready tail by one ``reserve`` at most."""
MAX_DELAY_MS = 1e13
"""Delays are capped at about 300 years (a non-finite delay would not sort)."""

Durability = Literal["volatile", "everysec", "always", "unknown"]

T = TypeVar("T")


# -- names, keys and URLs --------------------------------------------------------


def escape_namespace(namespace: str) -> str:
    """``namespace`` with ``%``, ``{`` and ``}`` percent-escaped; never empty, never ambiguous."""
    if not namespace:
        return "%"  # '%' alone is never the escape of a non-empty name
    return namespace.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")


def redis_key(namespace: str, part: str, prefix: str = DEFAULT_PREFIX) -> bytes:
    """The key of ``part`` of loop ``namespace``: ``<prefix>:{<escaped NAME>}:<part>``.

    The only place keys are built. The escaped NAME contains no brace, so it is the
    key's whole Cluster hash tag.
    """
    return f"{prefix}:{{{escape_namespace(namespace)}}}:{part}".encode("utf-8", "surrogatepass")


_SECRET_QUERY_WORDS = ("pass", "secret", "token", "auth", "key")


def mask_url(url: str) -> str:
    """``url`` with its password (and any user-only credential or secret query value) as ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<invalid redis url>"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user, has_password, _ = userinfo.partition(":")
        # 'redis://secret@host': a lone user-info part is often a password; hide it too.
        userinfo = f"{user}:***" if has_password else "***"
        netloc = f"{userinfo}@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode(
            [(k, "***" if any(w in k.lower() for w in _SECRET_QUERY_WORDS) else v) for k, v in pairs],
            safe="*",
            quote_via=quote,
        )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _driver() -> Any:
    """Import redis-py (lazily: only the Redis backend needs it); returns the ``redis`` package."""
    try:
        import redis
        import redis.asyncio
        import redis.asyncio.retry
        import redis.backoff
        import redis.exceptions
    except ImportError as exc:
        raise PluginError("the 'redis' backend needs the redis package (redis-py >= 5): pip install redis") from exc
    try:
        import redis.maint_notifications
    except ImportError:  # redis-py < 7
        pass
    return redis


@functools.cache
def _script_sources() -> dict[str, str]:
    """Every script's text: generated ``K`` table + ``lib.lua`` + the script."""
    folder = importlib.resources.files(__package__).joinpath("lua")
    keys = ", ".join(f"{part} = KEYS[{i}]" for i, part in enumerate(KEY_PARTS, 1))
    lib = folder.joinpath("lib.lua").read_text(encoding="utf-8")
    prelude = f"local K = {{{keys}}}\nlocal FIXED_KEYS = {len(KEY_PARTS)}\n{lib}\n"
    return {name: prelude + folder.joinpath(f"{name}.lua").read_text(encoding="utf-8") for name in SCRIPTS}


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _version(text: str) -> tuple[int, ...]:
    out = []
    for piece in text.split(".")[:3]:
        digits = "".join(c for c in piece if c.isdigit())
        out.append(int(digits or 0))
    return tuple(out)


def _delay_ms(seconds: float) -> float:
    if not seconds > 0:  # also NaN
        return 0.0
    return min(seconds * 1000.0, MAX_DELAY_MS)


def _task_list(tasks: Sequence[NewTask]) -> list[list[Any]]:
    """Tasks as the scripts' ``insert`` reads them: payload, key ('' = unnamed), flags, delay in ms."""
    return [[t.payload, t.key or b"", (1 if t.unique else 0) | (2 if t.head else 0), _delay_ms(t.delay)] for t in tasks]


def _unique_keys(tasks: Sequence[NewTask]) -> list[bytes]:
    """Keys of the tasks a push checks against the done set."""
    return [t.key for t in tasks if t.unique and t.key]


def _pack(batch: Any) -> bytes:
    """msgpack for Redis's cmsgpack, which reads bytes as msgpack raw strings (not the bin type)."""
    return bytes(msgpack.packb(batch, use_bin_type=False))


def _unpack(reply: bytes) -> Any:
    return msgpack.unpackb(reply, raw=True)


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


def _alias_order(alias: str) -> tuple[str, int, str]:
    number = alias[1:]
    return (alias[:1], int(number) if number.isdigit() else 0, alias)


# -- shared connection handling ----------------------------------------------------


class _RedisBackend:
    """Connection, options, error translation and server checks shared by both sides."""

    scope: Literal["network"] = "network"

    def __init__(
        self,
        namespace: str,
        url: str = DEFAULT_URL,
        connect_timeout: float = 5.0,
        socket_timeout: float = 10.0,
        prefix: str = DEFAULT_PREFIX,
    ) -> None:
        self.namespace = namespace
        self.location = mask_url(url)
        """The URL without password, for logs and ``status``."""
        self.connect_timeout = float(connect_timeout)
        self.socket_timeout = float(socket_timeout)
        if not (self.connect_timeout > 0 and self.socket_timeout > 0):
            raise ConfigError(f"redis backend {self.location}: connect_timeout and socket_timeout must be > 0")
        if not prefix or "{" in prefix or "}" in prefix:
            raise ConfigError(f"redis backend: prefix {prefix!r} must be non-empty and contain no braces")
        self.prefix = prefix
        self.durability: Durability = "unknown"
        """``volatile``, ``everysec`` or ``always`` (``unknown`` until opened, or when ``CONFIG`` is disabled)."""
        self.durability_detail = ""
        """The persistence settings the durability was derived from."""
        self.server_version = ""
        self._url = url
        self._driver = _driver()
        self._errors = self._driver.exceptions
        try:
            params = self._driver.asyncio.connection.parse_url(url)
        except ValueError as exc:
            raise ConfigError(f"redis url {self.location}: {exc}") from None
        self._target = tuple(sorted((k, repr(v)) for k, v in params.items()))
        self._client: Redis | None = None
        self.round_trips = 0
        """Calls sent to the server so far, each one round trip (a script, a command or a pipeline)."""
        self._keys = [self._key(part) for part in KEY_PARTS]
        self._bucket_prefix = self._key(BUCKET_PART)
        self._scripts: dict[str, AsyncScript] = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.namespace!r}, {self.location!r})"

    def _key(self, part: str) -> bytes:
        return redis_key(self.namespace, part, self.prefix)

    def _same_data(self, other: _RedisBackend) -> bool:
        return (self._target, self.prefix, self.namespace) == (other._target, other.prefix, other.namespace)

    def _bucket_keys(self, digests: Iterable[bytes]) -> list[bytes]:
        """The done-set bucket key of each digest, once each (appended to ``KEYS``)."""
        prefix = self._bucket_prefix
        return [prefix + b for b in {d[:BUCKET_BYTES] for d in digests}]

    async def _script(self, name: str, args: Sequence[Any] = (), digests: Iterable[bytes] = ()) -> Any:
        """Run script ``name``; ``digests``: the done-set names it reads or writes."""
        client = self._redis  # raises when not open
        keys = self._keys + self._bucket_keys(digests)
        return await self._run(self._scripts[name](keys=keys, args=list(args), client=client))

    # -- errors ------------------------------------------------------------

    def _translate(self, exc: BaseException) -> BackendError | None:
        """Our error for a driver/network error, or None when ``exc`` is not one."""
        e = self._errors
        where = f"Redis at {self.location}"
        detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if isinstance(exc, e.AuthenticationError | e.AuthorizationError | e.NoPermissionError):
            # Waiting does not fix credentials: not "unavailable", although redis-py
            # derives these from its ConnectionError.
            return BackendError(f"{where} refused our credentials or permissions ({detail})")
        transient = (
            e.ConnectionError,  # includes BusyLoadingError: the server is loading its data after a restart
            e.TimeoutError,
            e.ReadOnlyError,  # a replica during a failover
            e.TryAgainError,
            e.ClusterDownError,
            e.OutOfMemoryError,  # writes resume when memory is freed; pausing loses nothing
            OSError,  # includes TimeoutError
        )
        if isinstance(exc, transient):
            return BackendUnavailable(f"{where} is unavailable ({detail})")
        if isinstance(exc, e.RedisError):
            return BackendError(f"{where} failed ({detail})")
        return None

    async def _run(self, aw: Awaitable[T], timeout: float | None = None) -> T:
        """Await a driver call within ``timeout`` (default: the socket timeout), translating errors.

        The deadline is ours (``asyncio.timeout``), not redis-py's: its socket timeout
        sends through ``asyncio.wait_for``, which on Python 3.11 can swallow a
        cancellation and leave a cancelled task running. A call cut off by the
        deadline drops its connection (redis-py never reuses a half-read one).
        """
        deadline = self.socket_timeout if timeout is None else timeout
        self.round_trips += 1
        try:
            async with asyncio.timeout(deadline):
                return await aw
        except TimeoutError as exc:
            raise BackendUnavailable(f"Redis at {self.location} did not answer within {deadline:g} s") from exc
        except Exception as exc:
            error = self._translate(exc)
            if error is None:
                raise
            raise error from exc

    @property
    def _redis(self) -> Redis:
        if self._client is None:
            raise BackendError(f"{type(self).__name__} for {self.location} is not open")
        return self._client

    def _new_client(self) -> Redis:
        driver = self._driver
        extra: dict[str, Any] = {}
        maint = getattr(driver, "maint_notifications", None)  # redis-py >= 7
        if maint is not None:
            # With maintenance notifications possibly on, redis-py does not check a
            # pooled connection for EOF, so the first call after a server restart
            # fails. Redis OSS does not send them anyway (it saves a round trip too).
            extra["maint_notifications_config"] = maint.MaintNotificationsConfig(enabled=False)
        client: Redis = driver.asyncio.Redis.from_url(
            self._url,
            socket_connect_timeout=self.connect_timeout,
            socket_timeout=None,  # deadlines are set by _run (see there)
            # No silent re-sends: a script whose reply was lost must not run twice.
            # The loop retries after BackendUnavailable; fencing makes that safe.
            retry=driver.asyncio.retry.Retry(driver.backoff.NoBackoff(), 0),
            decode_responses=False,
            **extra,
        )
        return client

    # -- open / close -------------------------------------------------------

    async def open(self) -> None:
        """Connect, check the server version, read its durability. Idempotent.

        Raises ``BackendUnavailable`` after ``connect_timeout`` seconds when the
        server cannot be reached, ``BackendError`` when it is older than 6.2 or
        refuses our credentials.
        """
        if self._client is not None:
            return
        client = self._new_client()
        try:
            info = await self._run(_hello(client), self.connect_timeout)
            self.server_version = _text(info.get("redis_version", "0"))
            if _version(self.server_version) < MIN_REDIS_VERSION:
                minimum = ".".join(map(str, MIN_REDIS_VERSION))
                raise BackendError(
                    f"Redis at {self.location} is version {self.server_version}; achihuo_mini needs {minimum} or newer"
                )
            await self._read_durability(client)
        except BaseException:
            await client.aclose()
            raise
        self._client = client
        self._after_open(client)
        log.debug(
            "%s open: Redis %s, durability %s (%s)", self, self.server_version, self.durability, self.durability_detail
        )

    def _after_open(self, client: Redis) -> None:
        """Register the scripts (loaded on first use)."""
        self._scripts = {name: client.register_script(source) for name, source in _script_sources().items()}

    async def _read_durability(self, client: Redis) -> None:
        settings: dict[str, str] = {}
        try:
            for name in ("appendonly", "appendfsync", "save", "maxmemory", "maxmemory-policy"):
                reply = await self._run(client.config_get(name))
                for k, v in reply.items():
                    settings[_text(k)] = _text(v)
        except BackendUnavailable:
            raise
        except BackendError as exc:  # CONFIG renamed, disabled or not permitted (managed services)
            self.durability = "unknown"
            self.durability_detail = f"CONFIG GET not allowed: {exc.__cause__}"
            return
        aof = settings.get("appendonly") == "yes"
        fsync = settings.get("appendfsync", "")
        evicts = settings.get("maxmemory", "0") not in ("", "0") and settings.get("maxmemory-policy") != "noeviction"
        if evicts:
            self.durability = "volatile"
            log.warning(
                "Redis at %s may evict keys (maxmemory-policy %s): tasks can be lost; use noeviction",
                self.location,
                settings.get("maxmemory-policy"),
            )
        elif aof and fsync == "always":
            self.durability = "always"
        elif aof and fsync == "everysec":
            self.durability = "everysec"
        else:
            self.durability = "volatile"
        self.durability_detail = " ".join(f"{k}={settings[k]!r}" for k in sorted(settings))

    async def close(self) -> None:
        """Close the connections. Idempotent; data stays."""
        self._scripts = {}
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()


# -- the queue ---------------------------------------------------------------------


class RedisQueue(_RedisBackend):
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
        return int(await self._script("push", [_pack(_task_list(tasks))], _unique_keys(tasks)))

    async def reserve(self, worker: str, limit: int) -> list[Lease]:
        """Promote due delayed tasks (server clock), then lease up to ``limit`` from the head."""
        if limit <= 0:
            return []
        return _leases(_unpack(await self._script("reserve", [_wid(worker), limit, PROMOTE_MAX])), worker)

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
        return int(await self._script("commit", [_pack(batch)], digests))

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
            args += [lease.task_id, _token(lease), _delay_ms(delay)]
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
        alias = await self._script("register", [_wid(worker), role, _json(info), _ms(ttl)])
        return _text(alias)

    async def heartbeat(self, worker: str, info: Mapping[str, Any], ttl: float) -> list[str] | None:
        """Refresh liveness (server clock) and info; return and clear the mailbox, None if unknown."""
        reply = await self._script("heartbeat", [_wid(worker), _json(info), _ms(ttl)])
        if not int(reply[0]):
            return None
        return [_text(c) for c in reply[1:]]

    async def unregister(self, worker: str) -> None:
        """Remove the worker, free its alias and release its leases to the head."""
        await self._script("unregister", [_wid(worker)])

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
                    _text(reply[i + 1]),
                    _text(reply[i + 2]),
                    info,
                    int(reply[i + 3]) / 1000.0,
                )
            )
        return sorted(found, key=lambda w: _alias_order(w.alias))

    async def send(self, aliases: Sequence[str], command: str) -> list[str]:
        """Append ``command`` to each alias's mailbox; return the aliases that exist."""
        if not aliases:
            return []
        reply = await self._script("send", [command, *aliases])
        return [_text(a) for a in reply]

    async def leases(self, worker: str) -> list[Lease]:
        """Every lease ``worker`` holds, oldest task first (one script call)."""
        return _leases(_unpack(await self._script("leases", [_wid(worker)])), worker)

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


async def _hello(client: Redis) -> dict[str, Any]:
    """PING, then the server section of INFO."""
    await client.ping()
    info: dict[str, Any] = await client.info("server")
    return info


def _wid(worker: str) -> bytes:
    return worker.encode("utf-8", "surrogatepass")


def _json(info: Mapping[str, Any]) -> bytes:
    return json.dumps(dict(info), ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass")


def _ms(seconds: float) -> int:
    return max(math.ceil(seconds * 1000.0), 0) if math.isfinite(seconds) else 2**52


# -- the done set ------------------------------------------------------------------


class RedisDoneSet(_RedisBackend):
    """:class:`~achihuo_mini.backend.DoneSetBackend`: 16-byte digests in 65 536 hash buckets per loop.

    Every method is one script call (``count`` one ``GET``); see the module docstring
    for the layout and :meth:`open` for the move from the old one-SET layout.
    """

    @property
    def _done(self) -> bytes:
        """The old layout's done SET (moved into the buckets by :meth:`open`; gone afterwards)."""
        return self._key(LEGACY_DONE_PART)

    async def open(self) -> None:
        """Connect (see :meth:`_RedisBackend.open`), then move an old-layout done SET into the buckets."""
        if self._client is not None:
            return
        await super().open()
        try:
            await self._migrate()
        except BaseException:
            await self.close()
            raise

    async def _migrate(self) -> None:
        """Move the names of the old done SET into the buckets, chunk by chunk.

        Each chunk is added through ``done_add`` (the counter stays exact), then
        removed from the SET: a crash loses nothing, and the next open finishes the
        job. Redis deletes the SET with its last member; the loop ends then (it also
        picks up names an old-version process adds meanwhile).
        """
        client, old = self._redis, self._done
        if not await self._run(client.exists(old)):
            return
        moved = new = 0
        while await self._run(client.exists(old)):
            cursor = 0
            while True:
                cursor, members = await self._run(client.sscan(old, cursor, count=MIGRATE_CHUNK))
                chunk = cast("list[bytes]", members)  # decode_responses=False
                if chunk:
                    new += await self.add(chunk)
                    await self._run(client.srem(old, *chunk))
                    moved += len(chunk)
                if not cursor:
                    break
        log.info("%s: moved %d done names (%d new) from the old SET %r into hash buckets", self, moved, new, old)

    async def add(self, keys: Sequence[bytes]) -> int:
        """How many keys were new."""
        if not keys:
            return 0
        return int(await self._script("done_add", keys, keys))

    async def contains(self, keys: Sequence[bytes]) -> list[bool]:
        """Membership of each key, in order."""
        if not keys:
            return []
        return [bool(x) for x in await self._script("done_contains", keys, keys)]

    async def remove(self, keys: Sequence[bytes]) -> int:
        """How many keys were present."""
        if not keys:
            return 0
        return int(await self._script("done_remove", keys, keys))

    async def count(self) -> int:
        """``GET`` of the counter the scripts keep."""
        return int(await self._run(self._redis.get(self._key("dcount"))) or 0)

    async def clear(self) -> None:
        """``UNLINK`` every bucket and the counter in one script (freed in the background)."""
        client = self._redis
        buckets = [self._bucket_prefix + i.to_bytes(BUCKET_BYTES, "big") for i in range(256**BUCKET_BYTES)]
        keys = self._keys + buckets + [self._done]
        await self._run(self._scripts["done_clear"](keys=keys, args=[], client=client))


# -- plugin ------------------------------------------------------------------------

OPTIONS = {
    "url": Option(str, DEFAULT_URL, "redis://[[user]:password@]host[:port][/db], rediss://… (TLS) or unix://…?db=N"),
    "connect_timeout": Option(float, 5.0, "seconds to connect (and for open()'s first PING) before giving up"),
    "socket_timeout": Option(float, 10.0, "seconds to wait for any reply before the server counts as unavailable"),
    "prefix": Option(str, DEFAULT_PREFIX, "first part of every key (e.g. to match an ACL key pattern); no braces"),
}


def _options(options: Mapping[str, Any]) -> dict[str, Any]:
    return {name: options[name] if options.get(name) is not None else OPTIONS[name].default for name in OPTIONS}


@hookimpl
def achihuo_register_backends(register: Any) -> None:
    """Register the ``redis`` backend (queue with registry and notifier, done set)."""
    register(
        BackendSpec(
            name="redis",
            scope="network",
            description="Redis >= 6.2 server: shared by processes on any host; durability as the server's",
            create_queue=lambda namespace, options: RedisQueue(namespace, **_options(options)),
            create_done_set=lambda namespace, options: RedisDoneSet(namespace, **_options(options)),
            options=OPTIONS,
            list_loops=_list_loops,
        )
    )


def unescape_namespace(escaped: str) -> str:
    """The inverse of :func:`escape_namespace`."""
    if escaped == "%":
        return ""
    return re.sub(r"%(25|7B|7D)", lambda m: {"25": "%", "7B": "{", "7D": "}"}[m.group(1)], escaped)


async def _list_loops(options: Mapping[str, Any]) -> list[str]:
    """Loops with a task counter or a done set in this database, found with ``SCAN``.

    The one place that scans: the loop itself never does (its keys are all known), but
    a listing of loops has nothing else to go by. ``SCAN`` walks the keyspace in small
    steps, so it does not block the server the way ``KEYS`` would.
    """
    opts = _options(options)
    probe = RedisDoneSet("%", **opts)  # only its connection is used
    await probe.open()
    try:
        client = probe._redis
        prefix = opts["prefix"].encode("utf-8", "surrogatepass")
        glob = re.sub(rb"([*?\[\]\\])", rb"\\\1", prefix)
        names: set[str] = set()
        for part in (b"seq", b"dcount"):
            cursor = 0
            while True:
                cursor, keys = await probe._run(client.scan(cursor, match=glob + b":{*}:" + part, count=1000))
                for raw in keys:
                    key = raw if isinstance(raw, bytes) else str(raw).encode("utf-8", "surrogatepass")
                    inner = key[len(prefix) + 2 : key.rindex(b"}:")]
                    names.add(unescape_namespace(inner.decode("utf-8", "surrogatepass")))
                if not cursor:
                    break
        return sorted(names)
    finally:
        await probe.close()
