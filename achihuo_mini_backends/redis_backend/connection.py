"""Connection, scripts and error translation shared by the Redis queue and done set.

redis-py is imported lazily (:func:`driver`); every driver call goes through
:meth:`RedisBackend._run`, which sets the deadline and turns driver errors into
:class:`~achihuo_mini.errors.BackendUnavailable` (waiting helps) or
:class:`~achihuo_mini.errors.BackendError`. The Lua scripts are read from ``lua/`` once
per process and registered once per client (``EVALSHA`` with redis-py's ``NOSCRIPT``
fallback). :meth:`RedisBackend.open` checks the server version and reads the
server's persistence settings (``durability``).
"""

from __future__ import annotations

import asyncio
import functools
import importlib.resources
import json
import logging
import math
from collections.abc import Awaitable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import msgpack

from achihuo_mini.errors import BackendError, BackendUnavailable, ConfigError, PluginError
from achihuo_mini.masking import mask_secrets

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
    "done_add", "done_contains", "done_remove", "done_clear",
)  # fmt: skip

MAX_DELAY_MS = 1e13
"""Delays are capped at about 300 years (a non-finite delay would not sort)."""

Durability = Literal["volatile", "everysec", "always", "unknown"]

T = TypeVar("T")


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
    """Every script's text: generated ``K`` table + ``lib.lua`` + the script."""
    folder = importlib.resources.files(__package__).joinpath("lua")
    keys = ", ".join(f"{part} = KEYS[{i}]" for i, part in enumerate(KEY_PARTS, 1))
    lib = folder.joinpath("lib.lua").read_text(encoding="utf-8")
    prelude = f"local K = {{{keys}}}\nlocal FIXED_KEYS = {len(KEY_PARTS)}\n{lib}\n"
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


def unpack(reply: bytes) -> Any:
    return msgpack.unpackb(reply, raw=True)


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
    ) -> None:
        self.namespace = namespace
        self.location = mask_secrets(url)
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

    def _same_data(self, other: RedisBackend) -> bool:
        return (self._target, self.prefix, self.namespace) == (other._target, other.prefix, other.namespace)

    def _bucket_keys(self, digests: Iterable[bytes]) -> list[bytes]:
        """The done-set bucket key of each digest, once each (appended to ``KEYS``)."""
        return bucket_keys(self._bucket_prefix, digests)

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
            info = await self._run(hello(client), self.connect_timeout)
            self.server_version = text(info.get("redis_version", "0"))
            if version(self.server_version) < MIN_REDIS_VERSION:
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
                    settings[text(k)] = text(v)
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


async def hello(client: Redis) -> dict[str, Any]:
    """PING, then the server section of INFO."""
    await client.ping()
    info: dict[str, Any] = await client.info("server")
    return info


def wid(worker: str) -> bytes:
    return worker.encode("utf-8", "surrogatepass")


def info_json(info: Mapping[str, Any]) -> bytes:
    return json.dumps(dict(info), ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass")


def ms(seconds: float) -> int:
    return max(math.ceil(seconds * 1000.0), 0) if math.isfinite(seconds) else 2**52


# -- the done set ------------------------------------------------------------------
