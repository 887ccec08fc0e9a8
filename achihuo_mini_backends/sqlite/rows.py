"""Reading rows back: anything in the file may have been written by someone else.

SQLite columns are dynamically typed: a ``payload BLOB`` column holds whatever an
``INSERT`` gave it (an INTEGER, TEXT, NULL), a TEXT column may hold a BLOB or bytes that
are not UTF-8, a REAL column text. Every operation checks the rows it reads with the
functions here BEFORE its first write, so that one bad record costs that record only:

- a ready task that cannot be leased (:func:`task_problem`) is moved to the dead letters,
  with the reason as its error text, by the ``reserve`` that meets it;
- a registry entry that cannot be read (:func:`worker_entry`) is left out of
  ``workers()`` with a warning; ``recover`` treats an entry whose liveness cannot be read
  as expired (its worker re-registers at its next heartbeat if it is alive);
- a damaged dead letter is listed with what could be read (:func:`dead_letter`), and
  stays in place on ``requeue_dead``; a damaged lease is left out of ``leases()``.

Connections read TEXT with :func:`decode_text`: bytes that are not UTF-8 come back as a
``str`` with lone surrogates, which :func:`valid_text` refuses, instead of an error that
would fail the whole statement.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from achihuo_mini import backend_kit
from achihuo_mini.backend import DeadLetter, WorkerInfo
from achihuo_mini.masking import mask_secrets

log = logging.getLogger("achihuo_mini.backends.sqlite")

KEY_SIZE = 16
"""Bytes in a key (``achihuo_mini.backend.name_key``)."""

COUNT_LIMIT = 2**62
"""Attempt and failure numbers are integers in ``[0, COUNT_LIMIT)``."""


def decode_text(raw: bytes) -> str:
    """The connection's ``text_factory``: UTF-8, with undecodable bytes as lone surrogates."""
    return raw.decode("utf-8", "surrogateescape")


def valid_text(value: Any) -> bool:
    """A ``str`` that was valid UTF-8 in the file."""
    if type(value) is not str:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def kind(value: Any) -> str:
    """What SQLite stored: ``NULL``, ``INTEGER``, ``REAL``, ``TEXT`` or ``BLOB`` (with its size)."""
    if value is None:
        return "NULL"
    if type(value) is int:
        return "INTEGER"
    if type(value) is float:
        return "REAL"
    if type(value) is str:
        return "TEXT" if valid_text(value) else "TEXT that is not UTF-8"
    if type(value) is bytes:
        return f"a BLOB of {len(value)} bytes"
    return type(value).__name__


def show(value: Any) -> str:
    """A short, masked ``repr`` of a stored value, for a warning."""
    text = mask_secrets(repr(value))
    return text if len(text) <= 60 else text[:57] + "..."


def is_number(value: Any) -> bool:
    """A finite INTEGER or REAL."""
    return type(value) in (int, float) and math.isfinite(value)


def is_count(value: Any) -> bool:
    """An INTEGER in ``[0, COUNT_LIMIT)``."""
    return type(value) is int and 0 <= value < COUNT_LIMIT


def valid_key(value: Any) -> bool:
    """NULL (an unnamed task) or a 16-byte BLOB."""
    return value is None or (type(value) is bytes and len(value) == KEY_SIZE)


def as_blob(value: Any) -> bytes:
    """A stored value as bytes, to keep it in a dead letter: TEXT as its bytes, a number as its digits."""
    if type(value) is bytes:
        return value
    if value is None:
        return b""
    if type(value) is str:
        return value.encode("utf-8", "surrogateescape")
    return str(value).encode("ascii", "backslashreplace")


# -- tasks -----------------------------------------------------------------------------


def task_problem(payload: Any, key: Any, attempt: Any, failures: Any) -> str | None:
    """Why a stored task cannot be leased, or None when it can."""
    if type(payload) is not bytes:
        return f"its payload is {kind(payload)}, not a BLOB"
    if not valid_key(key):
        return f"its key is {kind(key)}, not a {KEY_SIZE}-byte BLOB or NULL"
    if not is_count(attempt):
        return f"its attempt number is {kind(attempt)} {show(attempt)}, not an integer >= 0"
    if not is_count(failures):
        return f"its failure count is {kind(failures)} {show(failures)}, not an integer >= 0"
    return None


def dead_letter(task_id: Any, payload: Any, key: Any, error: Any, failures: Any) -> tuple[DeadLetter, list[str]]:
    """A dead letter as it can be read, and what was wrong with the stored one.

    Damaged fields are replaced (payload: its bytes; key: None; failures: 0; error: its
    text), and the problems are appended to the error text, whose last line ``status``
    shows.
    """
    problems: list[str] = []
    if type(task_id) is not int:
        problems.append(f"task id is {kind(task_id)}")
        task_id = 0
    if type(payload) is not bytes:
        problems.append(f"payload is {kind(payload)}")
        payload = as_blob(payload)
    if not valid_key(key):
        problems.append(f"key is {kind(key)}")
        key = None
    if not valid_text(error):
        problems.append(f"error text is {kind(error)}")
        error = as_blob(error).decode("utf-8", "replace")
    if not is_count(failures):
        problems.append(f"failure count is {kind(failures)}")
        failures = 0
    if problems:
        error = f"{error}\n(damaged dead letter: {'; '.join(problems)})"
    return DeadLetter(task_id, payload, key, error, failures), problems


def requeue_problem(payload: Any, key: Any) -> str | None:
    """Why a dead letter cannot go back to the queue (its error and failures do not matter)."""
    if type(payload) is not bytes:
        return f"its payload is {kind(payload)}, not a BLOB"
    if not valid_key(key):
        return f"its key is {kind(key)}, not a {KEY_SIZE}-byte BLOB or NULL"
    return None


# -- the worker registry ---------------------------------------------------------------


def worker_entry(worker: Any, alias: Any, role: Any, info: Any, last_seen: Any, now: float) -> WorkerInfo | str:
    """A registry entry as :class:`WorkerInfo`, or why it cannot be one.

    An alias that is text but not an alias (``s²``) is kept: ``workers()`` sorts it last
    (:func:`achihuo_mini.backend_kit.alias_order`), and ``stop`` can still reach it.
    """
    if not valid_text(worker):
        return f"its worker id is {kind(worker)}"
    if not valid_text(alias):
        return f"its alias is {kind(alias)}"
    if not valid_text(role):
        return f"its role is {kind(role)}"
    if not is_number(last_seen):
        return f"its last heartbeat time is {kind(last_seen)} {show(last_seen)}"
    parsed = backend_kit.worker_info(info) if valid_text(info) else None
    if parsed is None:
        return f"its info is {kind(info)} that is not a JSON object"
    return WorkerInfo(worker, alias, role, parsed, max(now - last_seen, 0.0))


def liveness_problem(worker: Any, last_seen: Any, ttl: Any) -> str | None:
    """Why ``recover`` cannot tell whether an entry is alive (it then counts as expired), or None."""
    if not valid_text(worker):
        return f"its worker id is {kind(worker)}"
    if not is_number(last_seen):
        return f"its last heartbeat time is {kind(last_seen)} {show(last_seen)}"
    if not is_number(ttl) or ttl < 0:
        return f"its ttl is {kind(ttl)} {show(ttl)}"
    return None
