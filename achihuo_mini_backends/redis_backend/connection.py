"""Connection, scripts and error translation shared by the Redis queue and done set.

redis-py is imported lazily (:func:`driver`). Every driver call goes through
:meth:`RedisBackend._run`, which sets the deadline and turns every exception into
:class:`~achihuo_mini.errors.BackendUnavailable` (waiting helps: connection errors,
timeouts, ``BUSY``, ``LOADING``, failover and Cluster redirections) or
:class:`~achihuo_mini.errors.BackendError` (anything else), the original chained and
its text masked. Every script call goes through :meth:`RedisBackend._call`, which
logs the repairs the script reports and turns an unreadable reply into
``BackendError``. The Lua scripts are read from ``lua/`` once per process and
registered once per client (``EVALSHA`` with redis-py's ``NOSCRIPT`` fallback).
:meth:`RedisBackend.open` checks the server version and reads the server's
persistence settings (``durability``).
"""

from __future__ import annotations

import asyncio
import functools
import importlib.resources
import json
import logging
import math
import re
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeVar
from urllib.parse import unquote, urlsplit

import msgpack

from achihuo_mini.errors import AchihuoError, BackendError, BackendUnavailable, ConfigError, PluginError
from achihuo_mini.masking import mask_secrets, mask_url_value

from .keys import BUCKET_PART, DEFAULT_PREFIX, KEY_PARTS, bucket_keys, redis_key

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.commands.core import AsyncScript

log = logging.getLogger("achihuo_mini.backends.redis")

MIN_REDIS_VERSION = (6, 2, 0)
"""Oldest server this backend runs on."""

DEFAULT_URL = "redis://127.0.0.1:6379/0"

SCRIPTS = (
    "push", "reserve", "commit", "release", "retry", "bury", "dead_letters", "requeue",
    "stats", "clear", "peek", "register", "heartbeat", "unregister", "recover", "workers", "send", "leases",
    "done_add", "done_contains", "done_remove", "done_clear", "done_count", "counts",
    "done_expire", "hosts",
)  # fmt: skip

MAX_DELAY_MS = 1e13
"""Delays are capped at about 300 years (a non-finite delay would not sort)."""

MAX_PAYLOAD = 512 * 1024 * 1024
"""Largest task payload read back (Redis's default ``proto-max-bulk-len``: no client
can write a bigger one to a default server). A bigger stored one is quarantined."""
MAX_RECORD = MAX_PAYLOAD + 64 * 1024
"""Largest dead-letter record or mailbox a script decodes; a bigger one counts as unreadable."""
MAX_INFO = 1024 * 1024
"""Largest worker info (JSON) read back; a bigger one counts as unreadable."""

STEP_ITEMS = 1000
"""Tasks, done names or leases one script call handles at most (a commit's ack counts as
two): a median step of 7-14 ms, the longest 35 ms, measured on the 2-core development
machine under load (see the package docstring). Redis answers ``BUSY`` after 5 s."""
STEP_BYTES = 8 * 1024 * 1024
"""Payload bytes one script call writes or returns at most (a step holds at least one task)."""

Durability = Literal["volatile", "everysec", "always", "unknown"]

T = TypeVar("T")

TRANSIENT_CODES = frozenset(
    ("BUSY", "LOADING", "MASTERDOWN", "READONLY", "TRYAGAIN", "CLUSTERDOWN", "MOVED", "ASK", "NOREPLICAS",
     "UNBLOCKED", "OOM")
)  # fmt: skip
"""Error replies that end when the server is done with something else: waiting helps.

``BUSY`` (a script running past ``busy-reply-threshold``), ``LOADING`` (a restart),
``MASTERDOWN``/``READONLY``/``NOREPLICAS`` (failover), ``TRYAGAIN``/``CLUSTERDOWN``/
``MOVED``/``ASK`` (Cluster resharding), ``UNBLOCKED`` (``CLIENT UNBLOCK``), ``OOM`` (writes
resume when memory is freed; pausing loses nothing)."""

_READ_ERRORS = (ValueError, TypeError, IndexError, KeyError, OverflowError, msgpack.UnpackException)
"""What decoding a garbage reply raises (``UnicodeDecodeError`` and msgpack's errors are ValueErrors)."""


def driver() -> Any:
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
    """Every script's text: generated ``K`` table and limits + ``lib.lua`` + ``lib_state.lua`` + the script."""
    folder = importlib.resources.files(__package__).joinpath("lua")
    keys = ", ".join(f"{part} = KEYS[{i}]" for i, part in enumerate(KEY_PARTS, 1))
    lib = "\n".join(folder.joinpath(name).read_text(encoding="utf-8") for name in ("lib.lua", "lib_state.lua"))
    prelude = (
        f"local K = {{{keys}}}\nlocal FIXED_KEYS = {len(KEY_PARTS)}\n"
        f"local MAX_PAYLOAD = {MAX_PAYLOAD}\nlocal MAX_RECORD = {MAX_RECORD}\nlocal MAX_INFO = {MAX_INFO}\n{lib}\n"
    )
    return {name: prelude + folder.joinpath(f"{name}.lua").read_text(encoding="utf-8") for name in SCRIPTS}


def text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def version(text: str) -> tuple[int, ...]:
    out = []
    for piece in text.split(".")[:3]:
        digits = "".join(c for c in piece if c.isdigit())
        out.append(int(digits or 0))
    return tuple(out)


def delay_ms(seconds: float) -> float:
    if not seconds > 0:  # also NaN
        return 0.0
    return min(seconds * 1000.0, MAX_DELAY_MS)


def pack(batch: Any) -> bytes:
    """msgpack for Redis's cmsgpack, which reads bytes as msgpack raw strings (not the bin type)."""
    return bytes(msgpack.packb(batch, use_bin_type=False))


def unpack(reply: Any, max_items: int) -> Any:
    """A script's msgpack reply (a flat list of at most ``max_items``); garbage raises a ValueError.

    Strings are limited to :data:`MAX_PAYLOAD`; the bin, map and ext types never come
    from a script and are refused, so a forged header cannot make msgpack allocate.
    """
    if not isinstance(reply, bytes):
        raise TypeError(f"expected a msgpack string, got {type(reply).__name__}")
    return msgpack.unpackb(
        reply, raw=True, max_str_len=MAX_PAYLOAD, max_bin_len=0, max_array_len=max_items, max_map_len=0,
        max_ext_len=0,
    )  # fmt: skip


def chunks(items: Sequence[T], size: int = STEP_ITEMS) -> Iterator[Sequence[T]]:
    """``items`` in slices of at most ``size``."""
    for i in range(0, len(items), size):
        yield items[i : i + size]


_PASSWORD_HINT = "a password holding '#', '/', '?' or '@' must be percent-encoded (%23, %2F, %3F, %40)"


def check_url(url: str, parse: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
    """redis-py's connection parameters for ``url``, or a ``ConfigError`` that shows it masked.

    redis-py's parser reads ``#`` as the start of a fragment and ``/`` or ``?`` as the end
    of the host: a password holding one of them would silently connect elsewhere
    (``localhost`` by default) with part of the password, and show the rest in errors.
    Such URLs are refused here, as is anything redis-py cannot read. The messages
    never quote redis-py's own (which may hold part of a password).
    """
    where = f"redis url {mask_url_value(url)}"
    try:
        parts = urlsplit(url) if "://" in url else None
    except ValueError:  # 'Invalid IPv6 URL'
        raise ConfigError(f"{where}: not a URL") from None
    if parts is None or parts.scheme.lower() not in ("redis", "rediss", "unix"):
        raise ConfigError(f"{where}: must start with redis://, rediss://, unix://, redis+sentinel:// or redis+cluster://")
    problem = ""
    if "#" in url:
        problem = "holds a '#'"
    elif parts.scheme.lower() == "unix":
        if parts.netloc and not parts.netloc.endswith("@"):
            problem = "has something before the socket path that does not end in '@'"
    elif not re.fullmatch(r"/?\d*", parts.path):
        problem = "has a path that is not /<database number>"
    if not problem and any("=" not in piece for piece in parts.query.split("&") if piece):
        problem = "has a query that is not name=value pairs"
    if problem:
        hint = f": {_PASSWORD_HINT}" if "@" in url else ""
        raise ConfigError(f"{where} {problem}{hint}")
    try:
        return parse(url)
    except Exception as exc:  # redis-py raises ValueError, TypeError, IndexError ... on odd URLs
        has_secret = "@" in url or "password" in url.lower()
        detail = type(exc).__name__ if has_secret else f"{type(exc).__name__}: {mask_secrets(str(exc))}"
        raise ConfigError(f"{where}: redis-py cannot read it ({detail})") from None


TOPOLOGY_SCHEMES = {"redis+sentinel": 26379, "redis+cluster": 6379}
"""URL schemes that name several servers, with each one's default port."""


@dataclass(frozen=True)
class Topology:
    """A ``redis+sentinel://`` or ``redis+cluster://`` URL, read.

    ``redis+sentinel://[[user]:password@]host:port[,host:port...]/service[/db]``: the
    sentinels, the name of the primary they watch, the database.
    ``redis+cluster://[[user]:password@]host:port[,host:port...]``: any nodes of the Cluster
    (the rest are discovered). The credentials are the data servers'; sentinels are asked
    without a password.
    """

    kind: Literal["sentinel", "cluster"]
    nodes: tuple[tuple[str, int], ...]
    username: str | None = None
    password: str | None = None
    service: str = ""
    db: int = 0

    def params(self) -> dict[str, Any]:
        """What identifies the data (for :meth:`RedisBackend._same_data`): never the password."""
        return {"kind": self.kind, "nodes": self.nodes, "service": self.service, "db": self.db}


def parse_topology(url: str) -> Topology:
    """Read a ``redis+sentinel://`` or ``redis+cluster://`` URL; ``ConfigError`` (masked) otherwise."""
    where = f"redis url {mask_url_value(url)}"
    scheme, _, rest = url.partition("://")
    kind = scheme.lower()
    if kind not in TOPOLOGY_SCHEMES:
        raise ConfigError(f"{where}: not a redis+sentinel:// or redis+cluster:// URL")
    if "#" in rest or "?" in rest:
        hint = f" ({_PASSWORD_HINT})" if "@" in rest else ""
        raise ConfigError(f"{where}: holds a '#' or a query, which {kind}:// URLs do not take{hint}")
    # the user info runs up to the last '@' (a password may hold '/'); the rest holds no secret
    userinfo, at, after = rest.rpartition("@")
    hosts, _, path = after.partition("/")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    nodes: list[tuple[str, int]] = []
    for piece in hosts.split(","):
        host, port = piece, str(TOPOLOGY_SCHEMES[kind])
        if piece.startswith("["):
            host, _, tail = piece[1:].partition("]")
            if tail:
                if not tail.startswith(":"):
                    raise ConfigError(f"{where}: {piece!r} is not HOST:PORT")
                port = tail[1:]
        elif ":" in piece:
            host, _, port = piece.rpartition(":")
        host = host.strip()
        if not host or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
            raise ConfigError(f"{where}: {piece.strip()!r} is not HOST:PORT (a port from 1 to 65535)")
        nodes.append((host, int(port)))
    parts = [unquote(p) for p in path.split("/")] if path else []
    service, db = "", "0"
    if kind == "redis+sentinel":
        if not parts or not parts[0] or len(parts) > 2:
            raise ConfigError(f"{where}: expected /<service name>[/<database>] after the sentinels")
        service = parts[0]
        db = parts[1] if len(parts) == 2 and parts[1] else "0"
    elif len(parts) > 1 or (parts and parts[0] not in ("", "0")):
        raise ConfigError(f"{where}: a Redis Cluster has database 0 only (no path, or /0)")
    if not (db.isascii() and db.isdigit()) or int(db) > 2**31:
        raise ConfigError(f"{where}: the database must be a number, got {db!r}")
    return Topology(kind[6:], tuple(nodes), username, password, service, int(db))  # type: ignore[arg-type]


def error_code(exc: BaseException) -> str:
    """The code of a Redis error reply (``BUSY``, ``MOVED`` …), also when a script passed it on."""
    message = str(exc)
    code = getattr(exc, "status_code", None) or message.split(" ", 1)[0]
    if code == "ERR" or code.startswith("Error"):  # an error of a command run inside a script (Redis < 7)
        found = re.search(r"-([A-Z]{3,}) ", message)
        return found.group(1) if found else str(code)
    return str(code)


class RedisBackend:
    """Connection, options, error translation and server checks shared by both sides."""

    scope: Literal["network"] = "network"

    def __init__(
        self,
        namespace: str,
        url: str = DEFAULT_URL,
        connect_timeout: float = 5.0,
        socket_timeout: float = 10.0,
        prefix: str = DEFAULT_PREFIX,
        wait_replicas: int = 0,
        wait_timeout: float = 2.0,
    ) -> None:
        self.namespace = namespace
        self.location = mask_url_value(url)
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
        self._driver = driver()
        self._errors = self._driver.exceptions
        self.topology: Topology | None = None
        """The sentinels or Cluster nodes of a ``redis+sentinel://`` or ``redis+cluster://`` URL."""
        if url.partition("://")[0].lower() in TOPOLOGY_SCHEMES:
            self.topology = parse_topology(url)
            params = self.topology.params()
        else:
            params = check_url(url, self._driver.asyncio.connection.parse_url)
        self._sentinel: Any = None
        self.wait_replicas = int(wait_replicas)
        """Replicas every write of tasks or done names must reach (``WAIT``) before it counts as done."""
        self.wait_timeout = float(wait_timeout)
        self.replica_shortfalls = 0
        """Writes that fewer than ``wait_replicas`` replicas acknowledged in time."""
        if self.wait_replicas < 0 or not self.wait_timeout > 0:
            raise ConfigError(f"redis backend {self.location}: wait_replicas must be >= 0 and wait_timeout > 0")
        if self.wait_replicas and self.topology is not None and self.topology.kind == "cluster":
            raise ConfigError(f"redis backend {self.location}: wait_replicas is not available on a Redis Cluster")
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

    def _same_data(self, other: RedisBackend) -> bool:
        return (self._target, self.prefix, self.namespace) == (other._target, other.prefix, other.namespace)

    def _bucket_keys(self, digests: Iterable[bytes]) -> list[bytes]:
        """The done-set bucket key of each digest, once each (appended to ``KEYS``)."""
        return bucket_keys(self._bucket_prefix, digests)

    async def _call(
        self,
        name: str,
        args: Sequence[Any] = (),
        digests: Iterable[bytes] = (),
        parse: Callable[[Any], T] = lambda result: result,
        keys: Sequence[bytes] | None = None,
        replicated: bool = False,
    ) -> T:
        """Run script ``name``, log the repairs it reports, return ``parse(result)``.

        ``digests``: the done-set names it reads or writes (their buckets join ``KEYS``);
        ``keys``: extra ``KEYS`` instead. A reply that ``parse`` cannot read is a
        ``BackendError`` naming the script. ``replicated``: with ``wait_replicas``, the
        script is followed by ``WAIT`` on its connection (see :meth:`_replicated`).
        """
        client = self._redis  # raises when not open
        extra = self._bucket_keys(digests) if keys is None else list(keys)
        script = self._scripts[name]
        if replicated and self.wait_replicas:
            reply = await self._run(self._replicated(script, self._keys + extra, list(args)),
                                    self.socket_timeout + 2 * self.wait_timeout)  # fmt: skip
        else:
            reply = await self._run(script(keys=self._keys + extra, args=list(args), client=client))
        try:
            result, notes = reply
            for note in notes:
                log.warning("%s: %s: %s", self, name, mask_secrets(text(note)))
            return parse(result)
        except _READ_ERRORS as exc:
            raise BackendError(f"Redis at {self.location}: unreadable reply to {name} ({type(exc).__name__})") from exc

    async def _replicated(self, script: Any, keys: list[bytes], args: list[Any]) -> Any:
        """Run ``script``, then ``WAIT`` for ``wait_replicas`` on the same connection (``WAIT``
        counts the writes of its own connection), once more when they are behind. The write is
        never repeated: it is on the primary, and a second push would queue its tasks twice. A
        shortfall after that is a warning (with a count), and the write counts as done."""
        async with self._redis.client() as conn:  # one connection for the script and its WAIT
            reply = await script(keys=keys, args=args, client=conn)
            ms_ = max(1, round(self.wait_timeout * 1000))
            acknowledged = await conn.wait(self.wait_replicas, ms_)
            if type(acknowledged) is int and acknowledged < self.wait_replicas:
                acknowledged = await conn.wait(self.wait_replicas, ms_)
        if type(acknowledged) is not int or acknowledged < self.wait_replicas:
            self.replica_shortfalls += 1
            if self.replica_shortfalls in (1, 10, 100) or self.replica_shortfalls % 1000 == 0:
                log.warning(
                    "Redis at %s: a write reached %s of %d replicas within %g s (wait_replicas; %d such writes so "
                    "far): it is on the primary; a failover now could lose it",
                    self.location, acknowledged, self.wait_replicas, 2 * self.wait_timeout, self.replica_shortfalls,
                )  # fmt: skip
        return reply

    # -- errors ------------------------------------------------------------

    def _translate(self, exc: BaseException) -> BackendError:
        """Our error for any exception a driver call raised (its text masked)."""
        e = self._errors
        where = f"Redis at {self.location}"
        message = str(exc)
        code = getattr(exc, "status_code", None)
        if code and not message.startswith(str(code)):  # redis-py cut the code off: READONLY, LOADING ...
            message = f"{code} {message}"
        if type(exc).__name__ == "MasterNotFoundError" and self.topology is not None:  # redis-py's text: 2 KB of reprs
            sentinels = ", ".join(f"{host}:{port}" for host, port in self.topology.nodes)
            why = ("none of them answered" if re.search(r"Connection|Timeout|Error \d+", message)
                   else "they do not monitor it, or see it down")  # fmt: skip
            message = f"the sentinels ({sentinels}) name no primary for {self.topology.service!r}: {why}"
        detail = mask_secrets(f"{type(exc).__name__}: {message}" if message else type(exc).__name__)
        if isinstance(exc, e.AuthenticationError | e.AuthorizationError | e.NoPermissionError):
            # Waiting does not fix credentials: not "unavailable", although redis-py
            # derives these from its ConnectionError.
            return BackendError(f"{where} refused our credentials or permissions ({detail})")
        transient = (
            e.ConnectionError,  # includes BusyLoadingError: the server is loading its data after a restart
            e.TimeoutError,
            e.InvalidResponse,  # a broken stream: redis-py drops the connection
            e.ReadOnlyError,  # a replica during a failover
            e.TryAgainError,
            e.ClusterDownError,  # includes MasterDownError
            e.AskError,  # includes MovedError: a slot moved during resharding
            e.ClusterError,  # redis-py followed redirections (or TRYAGAIN) until its TTL ran out: resharding
            e.RedisClusterUnreachableError,  # no node of the Cluster answers (all restarting)
            e.OutOfMemoryError,  # writes resume when memory is freed; pausing loses nothing
            OSError,  # includes TimeoutError
        )
        if isinstance(exc, transient) or (isinstance(exc, e.ResponseError) and error_code(exc) in TRANSIENT_CODES):
            return BackendUnavailable(f"{where} is unavailable ({detail})")
        if isinstance(exc, e.RedisError):
            return BackendError(f"{where} failed ({detail})")
        return BackendError(f"{where}: unexpected error from the driver ({detail})")

    async def _run(self, aw: Awaitable[T], timeout: float | None = None) -> T:
        """Await a driver call within ``timeout`` (default: the socket timeout), translating errors.

        The deadline is ours (``asyncio.timeout``), not redis-py's: its socket timeout
        sends through ``asyncio.wait_for``, which on Python 3.11 can swallow a
        cancellation and leave a cancelled task running. A call cut off by the
        deadline drops its connection (redis-py never reuses a half-read one).
        No exception but ours leaves here (cancellation aside).
        """
        deadline = self.socket_timeout if timeout is None else timeout
        self.round_trips += 1
        try:
            async with asyncio.timeout(deadline):
                return await aw
        except TimeoutError as exc:
            raise BackendUnavailable(f"Redis at {self.location} did not answer within {deadline:g} s") from exc
        except AchihuoError:
            raise
        except Exception as exc:
            raise self._translate(exc) from exc

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
        common: dict[str, Any] = {
            "socket_connect_timeout": self.connect_timeout,
            "socket_timeout": None,  # deadlines are set by _run (see there)
            # No silent re-sends: a script whose reply was lost must not run twice.
            # The loop retries after BackendUnavailable; fencing makes that safe.
            "retry": driver.asyncio.retry.Retry(driver.backoff.NoBackoff(), 0),
            "decode_responses": False,
            **extra,
        }
        topo = self.topology
        if topo is None:
            client: Redis = driver.asyncio.Redis.from_url(self._url, **common)
        elif topo.kind == "sentinel":
            from redis.asyncio.sentinel import Sentinel

            # The sentinels are asked for the primary at each new connection; a connection
            # to a demoted primary answers READONLY, which redis-py turns into a dropped
            # connection: the next call finds the new primary (and the loop waits meanwhile).
            wait = self.connect_timeout
            if self._sentinel is None:  # one manager for every client of this backend (the queue's waiter too)
                self._sentinel = self._new_sentinel(Sentinel, topo, wait, common)
            client = self._sentinel.master_for(topo.service, redis_class=driver.asyncio.Redis)
        else:
            from redis.asyncio.cluster import ClusterNode, RedisCluster

            # MOVED and ASK are followed inside redis-py (a redirected command had not
            # run); nothing else is re-sent (retry above).
            client = RedisCluster(  # type: ignore[assignment]
                startup_nodes=[ClusterNode(host, port) for host, port in topo.nodes],
                username=topo.username,
                password=topo.password,
                **common,
            )
        return client

    @staticmethod
    def _new_sentinel(cls: Any, topo: Topology, wait: float, common: dict[str, Any]) -> Any:
        return cls(
            list(topo.nodes),
            sentinel_kwargs={"socket_connect_timeout": wait, "socket_timeout": wait},
            username=topo.username,
            password=topo.password,
            db=topo.db,
            **common,
        )

    async def scan(self, match: bytes) -> list[bytes]:
        """The keys matching ``match``, with ``SCAN`` (on every primary of a Cluster)."""
        client: Any = self._redis
        cluster = self.topology is not None and self.topology.kind == "cluster"
        found: list[bytes] = []
        for node in client.get_primaries() if cluster else [None]:
            where = {"target_nodes": node} if cluster else {}
            cursor = 0
            while True:
                cursor, keys = await self._run(client.scan(cursor, match=match, count=1000, **where))
                if isinstance(cursor, dict):  # a Cluster names the node: {"host:port": cursor}
                    cursor = next(iter(cursor.values()), 0)
                found += [k if isinstance(k, bytes) else str(k).encode("utf-8", "surrogatepass") for k in keys]
                if not cursor:
                    break
        return found

    async def _close_sentinels(self) -> None:
        sentinel, self._sentinel = self._sentinel, None
        if sentinel is not None:
            for node in sentinel.sentinels:
                await node.aclose()

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
            info = await self._run(hello(client), self.connect_timeout)
            self.server_version = text(info.get("redis_version", "0"))
            if version(self.server_version) < MIN_REDIS_VERSION:
                minimum = ".".join(map(str, MIN_REDIS_VERSION))
                raise BackendError(
                    f"Redis at {self.location} is version {self.server_version}; achihuo_mini needs {minimum} or newer"
                )
            await self._read_durability(client)
            await self._read_topology(client)
        except BaseException:
            await client.aclose()
            await self._close_sentinels()
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
                    settings[text(k)] = text(v)
        except BackendUnavailable:
            raise
        except BackendError as exc:  # CONFIG renamed, disabled or not permitted (managed services)
            self.durability = "unknown"
            self.durability_detail = mask_secrets(f"CONFIG GET not allowed: {exc.__cause__}")
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
        await self._close_sentinels()

    async def _read_topology(self, client: Redis) -> None:
        """Name the primary, its replicas and ``min-replicas-to-write`` in ``location`` (``status`` shows it)."""
        topo = self.topology
        if topo is None:
            return
        base = mask_url_value(self._url)
        if topo.kind == "cluster":
            primaries = client.get_primaries()  # type: ignore[attr-defined]
            self.location = f"{base} ({len(primaries)} primaries)"
            return
        info = await self._run(client.info("replication"))
        replicas = [text(v.get("ip")) + ":" + text(v.get("port")) for k, v in sorted(info.items())
                    if re.fullmatch(r"slave\d+", text(k)) and isinstance(v, dict)]  # fmt: skip
        primary = await self._run(self._sentinel.discover_master(topo.service))
        detail = f"primary {primary[0]}:{primary[1]}, {len(replicas)} replicas"
        if replicas:
            detail += " (" + ", ".join(replicas) + ")"
        try:
            reply: dict[Any, Any] = await self._run(client.config_get("min-replicas-to-write"))
            minimum = reply.get(b"min-replicas-to-write")
        except BackendError as exc:
            if isinstance(exc, BackendUnavailable):
                raise
            minimum = None
        if minimum not in (None, b"0"):
            detail += f", min-replicas-to-write {text(minimum)}"
        self.location = f"{base} ({detail})"


async def hello(client: Redis) -> dict[str, Any]:
    """PING, then the server section of INFO (of one node, on a Cluster)."""
    await client.ping()
    info: dict[str, Any] = await client.info("server")
    if info and all(isinstance(v, dict) for v in info.values()) and "redis_version" not in info:
        info = min((v for v in info.values()), key=lambda node: version(text(node.get("redis_version", "0"))))
    return info


def wid(worker: str) -> bytes:
    return worker.encode("utf-8", "surrogatepass")


def info_json(info: Mapping[str, Any]) -> bytes:
    return json.dumps(dict(info), ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass")


def ms(seconds: float) -> int:
    return max(math.ceil(seconds * 1000.0), 0) if math.isfinite(seconds) else 2**52
