"""The ``redis`` backend: queue, done set, worker registry and notifier in Redis.

Scope ``network``: any process on any host that reaches the server shares a
loop's data. Requires **Redis 6.2 or newer** (the minimum stated since the first
version; fractional ``BLPOP`` timeouts need 6.0) and the ``redis`` package
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
h:<host>    HASH    per-host slots and turns (``HostSlots``): ``next`` → the host's
                    next free start (ms), ``w:<worker>`` → ``<slots>:<held until
                    ms>:<waiting until ms>``; the key expires when all has passed
==========  ======  =========================================================

The done set
------------
A done name is its 16-byte digest, stored in one of 65 536 HASH buckets: the key
ends in ``d:`` + the digest's first 2 bytes (raw), the field is the other 14 bytes,
the value is empty -- or, for a name done with a ttl (``ExpiringDoneSet``), the second
of the server clock its ttl ends, in decimal (Redis stores it as an integer: about 4
bytes more, 31.7 bytes per name at 1 000 000 names with ttls). A name whose second has
come is not done; it stays stored (and counted) until it is written again or removed.
An entry that is neither counts as done for ever, with a warning, and the next write
makes it so. Small hashes are kept as a listpack (ziplist before Redis 7),
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
``KEYS`` (Redis Cluster). A loop written by an earlier version still has the old
``done`` SET: :meth:`RedisDoneSet.open` moves it into the buckets.

Modules
-------
:mod:`.keys` builds every key; :mod:`.connection` imports the driver, checks the URL,
connects, translates errors and registers the scripts; :mod:`.queue` holds
:class:`RedisQueue` (queue, registry, notifier) and :mod:`.done_set`
:class:`RedisDoneSet`. Each method runs the Lua script of its name from ``lua/``
(shared helpers in ``lua/lib.lua`` and ``lua/lib_state.lua``), registered once per client with
``register_script`` (``EVALSHA``, with redis-py's ``NOSCRIPT`` fallback). Task batches
(push, commit, the reserve reply) travel as one msgpack string, lease batches as flat
``ARGV``; scripts issue multi-argument commands in chunks of 512. Times that cross
processes (delays, heartbeats) are the server's ``TIME``.

Bounded steps
-------------
No script call may hold the server for long (other workers' calls wait behind it,
and past ``busy-reply-threshold`` they get ``BUSY``). A call handles at most
``STEP_ITEMS`` (1000) tasks, names or leases and ``STEP_BYTES`` (8 MiB) of payload;
a bigger batch is split into several calls. The hot path (batches of a few hundred)
stays one call per protocol call. A commit bigger than a step runs as: its
undone/done names, its children, then the ack alone -- children first, the ack
last, so a crash in between re-runs the handler (duplicates) rather than losing
children. Each step checks the lease token first: a step whose lease is gone
writes nothing and ends the commit. In its children steps the task's own copy does
not count against its unique children (as in a one-step commit, where the ack
comes first), and pending counts deduplicate unique children across steps. Pushes
split the same way (a unique task after an earlier task of its key is skipped up
front, head tasks' steps run last-first to keep batch order); releases to the head
run last part first. Measured with ``SLOWLOG`` on the 2-core development machine
under a load average of about 2 (``ACHIHUO_STEP_N=200000 python -m pytest -s
tests/test_redis_steps.py -k slowlog``): 1000-item steps take a median of 7-14 ms,
the longest 35 ms (one of the 221 steps of a commit of 200 000 children and 20 000
done names); 5000-item steps took 100-300 ms on the same machine.

Bad data
--------
Anything stored may have been written by someone else, a bug or a partial restore,
and Redis does not roll back a script that fails half-way. So every writing script
first checks the type of each key it writes, reads and validates everything it
needs, and only then writes, with commands that cannot fail (see ``lua/lib.lua``).
One bad entry costs that entry only, and every repair is logged as a warning
(logger ``achihuo_mini.backends.redis``):

- a ready, delayed or leased entry that is not a task id, a task whose meta is
  unreadable, whose payload is missing or over ``MAX_PAYLOAD`` (512 MiB, Redis's
  default bulk limit): quarantined as a dead letter with the reason, the id when it is
  one and whatever payload, key and failure count can be read. A task whose meta is
  unreadable has no known key: its name stays pending until ``clear queue``. A
  duplicate ready entry of a leased or already met task is dropped.
- retry, bury and commit of a held lease whose meta is unreadable use the lease's
  own copy (key, failures), so nothing is lost and pending counts stay right.
- a pending count that is not a count counts as 0 (it blocks nothing: at worst a
  unique task is queued twice, never lost) and is rewritten by the next write of
  that name; counts never go below 0. An unreadable id counter restarts from the
  server clock; an unreadable done counter is left alone by the scripts and
  recounted (and repaired) by :meth:`RedisDoneSet.count`.
- an unreadable dead letter is skipped by ``dead_letters`` and left in place by
  ``requeue_dead`` (moved to the end of the list, so a requeue of all meets it
  once); ``clear dead`` removes it.
- an unreadable worker record holds no alias, is not listed, is forgotten by the
  worker's own heartbeat (it then registers again) or by ``recover`` (which
  releases its leases); an unreadable lease token is released by ``recover``;
  an alias entry whose worker is not registered under it receives nothing and is
  taken over by the next register; unreadable mailbox entries are dropped; worker
  info that is not a JSON object (``achihuo_mini.backend_kit.worker_info``) is
  listed as ``{}``. An odd alias (``s²``) sorts last.
- a key of the wrong type (a string where a hash belongs) is repaired when its
  content can be rebuilt or given up safely: ``seq``, ``wake``, ``winfo``, ``mailbox``
  and done-set buckets are dropped, ``pending`` too (every count then counts as 0),
  ``dcount`` is recounted, ``workers`` dropped (the workers register again),
  ``aliases`` rebuilt from the worker records. For ``tasks``, ``meta``, ``ready``,
  ``delayed``, ``leased`` and ``dead`` that would lose tasks: the script fails before
  it writes anything (a ``BackendError`` naming the key).

Replies are decoded with msgpack limits (strings up to ``MAX_PAYLOAD``, no bin,
map or ext types, arrays no longer than the call asked for), so a forged length
header is an error, not an allocation.

Durability is read at :meth:`open` from ``CONFIG GET``: ``always``
(``appendonly yes`` + ``appendfsync always``), ``everysec`` (``appendfsync
everysec``), ``volatile`` (no AOF, ``appendfsync no``, or an eviction policy
other than ``noeviction`` with a ``maxmemory``), or ``unknown`` when ``CONFIG`` is
disabled (managed services).

Idle workers block in ``BLPOP`` on the ``wake`` key on a connection of their own;
every write that makes tasks ready or delayed pushes up to 16 tokens, so up to 16
idle workers wake per write (the others wake at their timeout or the next write).

Failures: no driver exception leaves a method. Connection errors, timeouts and the
replies ``BUSY``, ``LOADING``, ``MASTERDOWN``, ``READONLY``, ``NOREPLICAS``,
``TRYAGAIN``, ``CLUSTERDOWN``, ``MOVED``, ``ASK``, ``UNBLOCKED`` and ``OOM`` become
``BackendUnavailable`` (waiting helps: the loop pauses and resumes); refused
credentials and anything else ``BackendError``; the original is chained and every
message masked (:func:`achihuo_mini.masking.mask_secrets`). A URL redis-py would
misread (a password holding ``#``, ``/`` or ``?`` that is not percent-encoded) or
cannot read is a ``ConfigError`` naming it masked. Every call has a deadline of
``socket_timeout`` seconds (``connect_timeout`` for :meth:`open`). The driver never
re-sends a command on its own: a script whose reply was lost must not run twice;
the loop retries, and fencing makes a late commit harmless. After a Redis restart no
worker is declared dead before the server has been up for that worker's ttl.
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
    "url": Option(str, DEFAULT_URL, "redis://[[user]:password@]host[:port][/db], rediss://… (TLS), unix://…?db=N, "
                  "redis+sentinel://host:port,…/service[/db] or redis+cluster://host:port,…"),
    "connect_timeout": Option(float, 5.0, "seconds to connect (and for open()'s first PING) before giving up"),
    "socket_timeout": Option(float, 10.0, "seconds to wait for any reply before the server counts as unavailable"),
    "prefix": Option(str, DEFAULT_PREFIX, "first part of every key (e.g. to match an ACL key pattern); no braces"),
    "wait_replicas": Option(int, 0, "after each write of tasks or done names, WAIT until this many replicas have it "
                            "(0: do not wait; not on a Cluster)", 0, 100),
    "wait_timeout": Option(float, 2.0, "seconds WAIT waits for the replicas; fewer in time: the loop pauses and "
                           "writes again", 0.01),
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
            has_data=_has_data,
        )
    )


HAS_DATA_PARTS = ("tasks", "ready", "delayed", "leased", "dead", "dcount", LEGACY_DONE_PART, "workers", "stats")
"""A loop has data when any of these keys exists (one ``EXISTS``, all in the loop's slot)."""


async def _has_data(namespace: str, options: Mapping[str, Any]) -> bool:
    """Whether the loop has tasks, dead letters, done names or workers here (reads only)."""
    opts = _options(options)
    probe = RedisDoneSet(namespace, **opts)  # only its connection is used
    await probe.open()
    try:
        keys = [redis_key(namespace, part, opts["prefix"]) for part in HAS_DATA_PARTS]
        return bool(await probe._run(probe._redis.exists(*keys)))
    finally:
        await probe.close()


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
        prefix = opts["prefix"].encode("utf-8", "surrogatepass")
        glob = re.sub(rb"([*?\[\]\\])", rb"\\\1", prefix)
        names: set[str] = set()
        for part in (b"seq", b"dcount"):
            for key in await probe.scan(glob + b":{*}:" + part):  # every primary of a Cluster
                inner = key[len(prefix) + 2 : key.rindex(b"}:")]
                names.add(unescape_namespace(inner.decode("utf-8", "surrogatepass")))
        return sorted(names)
    finally:
        await probe.close()
