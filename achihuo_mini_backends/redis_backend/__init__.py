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

import re
from collections.abc import Mapping
from typing import Any

from achihuo_mini.masking import mask_url
from achihuo_mini.plugins import BackendSpec, Option, hookimpl

from .connection import DEFAULT_URL, MIN_REDIS_VERSION
from .connection import version as _version  # noqa: F401  (tests)
from .done_set import RedisDoneSet
from .keys import (
    BUCKET_BYTES,
    BUCKET_PART,
    DEFAULT_PREFIX,
    KEY_PARTS,
    LEGACY_DONE_PART,
    escape_namespace,
    redis_key,
    unescape_namespace,
)
from .queue import RedisQueue

__all__ = [
    "BUCKET_BYTES",
    "BUCKET_PART",
    "DEFAULT_PREFIX",
    "DEFAULT_URL",
    "KEY_PARTS",
    "LEGACY_DONE_PART",
    "MIN_REDIS_VERSION",
    "OPTIONS",
    "RedisDoneSet",
    "RedisQueue",
    "achihuo_register_backends",
    "escape_namespace",
    "mask_url",
    "redis_key",
    "unescape_namespace",
]


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
