"""Key names of the Redis backend: every key of a loop is built here, from its NAME.

A key is ``<prefix>:{<escaped NAME>}:<part>``; the escaped NAME holds no brace, so it
is the key's whole Redis Cluster hash tag and one loop lives in one slot. The fixed
parts are :data:`KEY_PARTS` (in the order scripts receive them in ``KEYS``); the
done-set buckets follow them (see the package docstring).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = [
    "BUCKET_BYTES",
    "BUCKET_PART",
    "DEFAULT_PREFIX",
    "HOST_PART",
    "KEY_PARTS",
    "LEGACY_DONE_PART",
    "bucket_keys",
    "escape_namespace",
    "redis_key",
    "unescape_namespace",
]

DEFAULT_PREFIX = "achihuo"

KEY_PARTS = (
    "seq", "tasks", "meta", "ready", "delayed", "leased", "pending",
    "dcount", "dead", "wake", "workers", "winfo", "aliases", "mailbox", "stats",
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
HOST_PART = "h:"
"""Per-host slot and turn keys are ``redis_key(NAME, HOST_PART + host)`` (a HASH each, with an expiry)."""


def escape_namespace(namespace: str) -> str:
    """``namespace`` with ``%``, ``{`` and ``}`` percent-escaped; never empty, never ambiguous."""
    if not namespace:
        return "%"  # '%' alone is never the escape of a non-empty name
    return namespace.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")


def unescape_namespace(escaped: str) -> str:
    """The inverse of :func:`escape_namespace`."""
    if escaped == "%":
        return ""
    return re.sub(r"%(25|7B|7D)", lambda m: {"25": "%", "7B": "{", "7D": "}"}[m.group(1)], escaped)


def redis_key(namespace: str, part: str, prefix: str = DEFAULT_PREFIX) -> bytes:
    """The key of ``part`` of loop ``namespace``: ``<prefix>:{<escaped NAME>}:<part>``.

    The only place keys are built. The escaped NAME contains no brace, so it is the
    key's whole Cluster hash tag.
    """
    return f"{prefix}:{{{escape_namespace(namespace)}}}:{part}".encode("utf-8", "surrogatepass")


def bucket_keys(bucket_prefix: bytes, digests: Iterable[bytes]) -> list[bytes]:
    """The done-set bucket key of each digest, once each (appended to a script's ``KEYS``)."""
    return [bucket_prefix + b for b in {d[:BUCKET_BYTES] for d in digests}]


def all_bucket_keys(bucket_prefix: bytes) -> list[bytes]:
    """Every possible bucket key (65 536 of them), for clearing the done set."""
    return [bucket_prefix + i.to_bytes(BUCKET_BYTES, "big") for i in range(256**BUCKET_BYTES)]
