"""What every backend needs besides the protocols: files, folders, aliases, untrusted records.

Public, for plugin authors as much as for the builtin backends::

    from achihuo_mini.backend_kit import default_data_dir, private_dir, safe_filename
    from achihuo_mini.backend_kit import lowest_free_alias, alias_order, worker_info

Files and folders
    :func:`default_data_dir` is where embedded backends keep their files by default;
    :func:`private_dir` creates a folder and every missing parent with mode ``0700``
    whatever the umask (task data is nobody else's business); :func:`safe_filename`
    turns a loop ``NAME`` into a file name.

The alias policy
    A worker of role ``master`` is ``m1``, ``m2`` …, any other role ``s1``, ``s2`` …: the
    lowest number of its prefix that no registered worker holds (a number is freed when
    its worker unregisters or is recovered). :func:`lowest_free_alias` decides it (a
    backend calls it inside its atomic register step; the Redis backend's Lua script
    mirrors it), :func:`parse_alias` recognises one (ASCII digits only, no leading zero),
    :func:`alias_order` sorts them, an unparsable one last.

Untrusted records
    Anything read back from storage may have been written by someone else, a bug or a
    partial restore. :func:`worker_info` turns a stored info blob into a ``dict`` or
    ``None`` (skip that registry entry, with a warning), never an exception.

Counters (the :class:`~achihuo_mini.backend.CounterStore` ability)
    :func:`counter_ok` says whether a counter name and value may be stored or shown;
    :func:`merge_counts` applies one ``add_counts`` call to a dict (sums, and ``max/``,
    ``min/`` names), as the SQLite and Redis backends do in their own storage.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = [
    "COUNTER_NAME_MAX",
    "MAX_ALIAS_NUMBER",
    "alias_order",
    "counter_ok",
    "merge_counts",
    "alias_prefix",
    "default_data_dir",
    "lowest_free_alias",
    "parse_alias",
    "private_dir",
    "safe_filename",
    "worker_info",
]


# -- files and folders ---------------------------------------------------------------


def default_data_dir() -> Path:
    """``$XDG_DATA_HOME/achihuo_mini`` (default ``~/.local/share/achihuo_mini``)."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "achihuo_mini"


def private_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` and every missing parent with mode ``0700`` (whatever the umask); return it.

    Folders that exist already are left as they are.
    """
    folder = Path(path)
    missing: list[Path] = []
    probe = folder
    while not probe.exists():
        missing.append(probe)
        if probe.parent == probe:
            break
        probe = probe.parent
    for p in reversed(missing):
        try:
            os.mkdir(p, 0o700)
        except FileExistsError:
            continue  # another process made it at the same moment
        os.chmod(p, 0o700)  # mkdir's mode is filtered by the umask
    return folder


def safe_filename(name: str) -> str:
    """A file name made from a loop NAME: readable where it can be, collision-free always."""
    readable = re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:64].strip(".") or "loop"
    if readable == name:
        return name
    return f"{readable}-{hashlib.blake2b(name.encode('utf-8', 'surrogatepass'), digest_size=6).hexdigest()}"


# -- the alias policy ----------------------------------------------------------------

MAX_ALIAS_NUMBER = 10**9 - 1
"""Alias numbers have at most nine digits."""

_ALIAS = re.compile(r"([ms])([1-9][0-9]{0,8})", re.ASCII)


def alias_prefix(role: str) -> str:
    """``'m'`` for a master, ``'s'`` for any other role."""
    return "m" if role == "master" else "s"


def parse_alias(alias: Any) -> tuple[str, int] | None:
    """``('m', 1)`` for ``'m1'``; ``None`` for anything that is not an alias (``'s²'``, ``'m01'``, ``b'm1'``)."""
    if type(alias) is not str:
        return None
    match = _ALIAS.fullmatch(alias)
    return (match.group(1), int(match.group(2))) if match else None


def lowest_free_alias(role: str, taken: Iterable[Any]) -> str:
    """The alias a new worker of ``role`` claims when ``taken`` are held (unparsable ones are ignored)."""
    prefix = alias_prefix(role)
    used = set()
    for alias in taken:
        parsed = parse_alias(alias)
        if parsed is not None and parsed[0] == prefix:
            used.add(parsed[1])
    number = 1
    while number in used:
        number += 1
    return f"{prefix}{number}"


def alias_order(alias: Any) -> tuple[int, str, int, str]:
    """A sort key: masters, then slaves, by number; anything unparsable last, by its text."""
    parsed = parse_alias(alias)
    if parsed is None:
        return (1, "", 0, str(alias))
    return (0, parsed[0], parsed[1], "")


# -- untrusted records ---------------------------------------------------------------


def worker_info(raw: Any) -> dict[str, Any] | None:
    """A worker's published info read back from storage: a JSON object (text, bytes or a dict).

    Returns a ``dict`` with ``str`` keys, or ``None`` when ``raw`` is not one (the
    caller skips the entry with a warning). Values are not checked here: readers of
    info fields check the type of the field they read.
    """
    if isinstance(raw, (bytes, bytearray, memoryview)):
        try:
            raw = bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            return None
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except (ValueError, RecursionError):
            return None
    if type(raw) is not dict or not all(type(k) is str for k in raw):
        return None
    return raw


COUNTER_NAME_MAX = 200
"""Longest counter name a backend stores (characters)."""

_INT64 = 2**63


def counter_ok(name: Any, value: Any) -> bool:
    """A counter that may be stored and shown: a non-empty str name of at most
    :data:`COUNTER_NAME_MAX` characters and a 64-bit int value (never a bool)."""
    return (
        type(name) is str
        and 0 < len(name) <= COUNTER_NAME_MAX
        and type(value) is int
        and -_INT64 <= value < _INT64
    )


def merge_counts(target: dict[str, int], counts: Any) -> None:
    """Apply one ``add_counts(counts)`` to ``target``: add each value, except that ``max/``
    and ``min/`` names keep the largest or smallest value. A bad entry raises ``ValueError``
    before anything changes."""
    items = list(counts.items()) if hasattr(counts, "items") else None
    if items is None or not all(counter_ok(k, v) for k, v in items):
        raise ValueError("add_counts: counters are short str names with 64-bit int values")
    for name, value in items:
        old = target.get(name)
        if old is None:
            target[name] = value
        elif name.startswith("max/"):
            target[name] = max(old, value)
        elif name.startswith("min/"):
            target[name] = min(old, value)
        else:
            total = old + value
            if not -_INT64 <= total < _INT64:
                raise ValueError(f"add_counts: counter {name!r} would overflow 64 bits")
            target[name] = total
