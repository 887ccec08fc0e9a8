"""Task encoding: what goes into a backend, without pickle.

A task is stored as ``b'\\x01' + msgpack([handler, name, args])``. The leading byte
is the format version. msgpack keeps ``bytes`` apart from ``str``; an ``Item`` is the
array ``[ExtType(1, b''), {its keys}]``. Decoding never runs code, so write access to
a backend is not code execution in a worker.

Task names are stored as a 16-byte blake2b digest of their UTF-8 bytes
(:func:`achihuo_mini.backend.name_key`, re-exported here): fixed memory per name, any unicode name is safe.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any

import msgpack

from .backend import name_key
from .errors import DecodeError, EncodeError
from .item import Item

__all__ = ["FORMAT_VERSION", "DecodedTask", "check_args", "decode_task", "encode_task", "name_key"]

FORMAT_VERSION = 1
_VERSION_BYTE = bytes([FORMAT_VERSION])
_EXT_ITEM = 1
_SCALARS = (str, bytes, int, bool, type(None))


def _check(value: Any) -> None:
    """Raise EncodeError if ``value`` cannot be stored; the error's path is built while unwinding.

    (No path string is formatted on the way down: this runs for every ``add_task``.)
    """
    kind = type(value)
    if kind in _SCALARS:
        return
    if kind is float:
        if not math.isfinite(value):
            raise _Bad(f"float {value!r} is not finite and cannot be stored")
        return
    if kind is list:
        for i, element in enumerate(value):
            if type(element) not in _SCALARS:
                try:
                    _check(element)
                except _Bad as bad:
                    bad.path.append(f"[{i}]")
                    raise
        return
    if kind is dict or kind is Item:
        for key, element in value.items():
            if type(key) is not str:
                raise _Bad(f"dict key {key!r} is {type(key).__name__}, only str keys can be stored")
            if type(element) not in _SCALARS:
                try:
                    _check(element)
                except _Bad as bad:
                    bad.path.append(f"[{key!r}]")
                    raise
        return
    hint = " (use a list)" if kind is tuple else ""
    raise _Bad(
        f"{kind.__name__} {_short(value)} cannot be stored{hint}; "
        "task arguments may be None, bool, int, finite float, str, bytes, list, dict with str keys or Item"
    )


class _Bad(Exception):
    """Internal: a value that cannot be stored; ``path`` collects the steps to it, innermost first."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        self.path: list[str] = []

    def error(self, path: str) -> EncodeError:
        """The error to raise, naming the full path (``path`` is where the checked value sits)."""
        return EncodeError(f"{path}{''.join(reversed(self.path))}: {self.message}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# An Item is the array [ExtType(1, b""), {its keys}], packed in one pass of one packer.
# (Packing the map separately inside the packer's ``default`` hook cost ~15 us per Item:
# a packer created while another is packing allocates a fresh buffer.)
_ITEM_MARK = msgpack.ExtType(_EXT_ITEM, b"")
_ITEM = object()  # what the marker decodes to, until its array becomes an Item


def _default(value: Any) -> Any:
    if type(value) is Item:
        return [_ITEM_MARK, dict(value)]
    raise EncodeError(f"cannot store {type(value).__name__}")  # unreachable after _check


_local = threading.local()


def _pack(value: Any) -> bytes:
    # one Packer per thread, reused: ``msgpack.packb`` builds a new one per call (about half its cost)
    try:
        packer = _local.packer
    except AttributeError:
        packer = _local.packer = msgpack.Packer(default=_default, strict_types=True, use_bin_type=True)
    try:
        return packer.pack(value)  # type: ignore[no-any-return]
    except BaseException:
        packer.reset()  # a failed pack may leave a partial buffer behind
        raise


MAX_CONTAINERS = 100_000
"""Lists and maps one decoded task may hold: a few bytes of msgpack can ask for millions of
empty containers (hundreds of MiB of Python objects); such a task is undecodable instead."""

_budget = threading.local()


def _spend() -> None:
    left = _budget.left - 1
    if left < 0:
        raise DecodeError(f"undecodable task: more than {MAX_CONTAINERS} lists and maps")
    _budget.left = left


def _ext_hook(code: int, data: bytes) -> Any:
    if code == _EXT_ITEM and not data:
        return _ITEM
    raise DecodeError(f"unknown extension type {code} ({len(data)} bytes)")


def _list_hook(values: list[Any]) -> Any:
    if values and values[0] is _ITEM:
        if len(values) != 2 or type(values[1]) is not dict:
            raise DecodeError("undecodable task: malformed Item")
        return Item(values[1])
    if _ITEM in values:
        raise DecodeError("undecodable task: an Item marker outside an Item")
    return values


def _object_hook(value: dict[Any, Any]) -> Any:
    for key, element in value.items():
        if type(key) is not str:
            raise DecodeError(f"undecodable task: a map key of type {type(key).__name__} (only str keys are stored)")
        if element is _ITEM:
            raise DecodeError("undecodable task: an Item marker outside an Item")
    return value


def _counted_list_hook(values: list[Any]) -> Any:
    _spend()
    return _list_hook(values)


def _counted_object_hook(value: dict[Any, Any]) -> Any:
    _spend()
    return _object_hook(value)


def _unpack(data: bytes) -> Any:
    # every container costs at least one byte: only a payload longer than the budget can exceed it
    counted = len(data) > MAX_CONTAINERS
    if counted:
        _budget.left = MAX_CONTAINERS
    return msgpack.unpackb(
        data,
        ext_hook=_ext_hook,
        list_hook=_counted_list_hook if counted else _list_hook,
        object_hook=_counted_object_hook if counted else _object_hook,
        raw=False,
        strict_map_key=False,  # keys are checked by _object_hook, with a better message
        use_list=True,
    )


def check_args(args: tuple[Any, ...] | list[Any]) -> None:
    """Raise :class:`EncodeError` (a ``TypeError``) naming the first argument that cannot be stored."""
    for i, arg in enumerate(args):
        if type(arg) not in _SCALARS:
            try:
                _check(arg)
            except _Bad as bad:
                raise bad.error(f"args[{i}]") from None


def encode_task(handler: str, name: str | None, args: tuple[Any, ...] | list[Any]) -> bytes:
    """Encode one task. Raises :class:`EncodeError` (a ``TypeError``) naming the bad value's path."""
    check_args(args)
    if name is not None and type(name) is not str:
        raise EncodeError(f"task_name must be a str or None, not {type(name).__name__}")
    try:
        return _VERSION_BYTE + _pack([handler, name, list(args)])
    except UnicodeEncodeError:
        # a str with a lone surrogate (text decoded with 'surrogateescape', say): msgpack
        # stores UTF-8, which has no such thing
        raise EncodeError(_unencodable(handler, name, args)) from None


def _unencodable(handler: str, name: str | None, args: tuple[Any, ...] | list[Any]) -> str:
    """Where the str that UTF-8 cannot encode sits."""

    def find(value: Any, path: str) -> str | None:
        if type(value) is str:
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                return f"{path}: str {_short(value)} cannot be stored ({exc.reason}: lone surrogates are not text)"
            return None
        if type(value) is list:
            items: Any = enumerate(value)
        elif isinstance(value, dict):
            for key in value:
                found = find(key, f"{path} key")
                if found:
                    return found
            items = value.items()
        else:
            return None
        for k, element in items:
            found = find(element, f"{path}[{k!r}]")
            if found:
                return found
        return None

    for value, path in ((handler, "generator_name"), (name, "task_name"), (list(args), "args")):
        found = find(value, path)
        if found:
            return found.replace("args[", "args[", 1)
    return "a str cannot be stored as UTF-8"


@dataclass(slots=True)  # one per task run: a frozen dataclass costs four times as much to build
class DecodedTask:
    handler: str
    name: str | None
    args: list[Any]


def decode_task(payload: bytes, max_size: int | None = None) -> DecodedTask:
    """Decode bytes written by :func:`encode_task`. Raises :class:`DecodeError` on anything else.

    ``max_size``: a payload longer than this is refused before it is parsed (the
    ``max_task_size`` a loop accepts at ``add_task``).
    """
    if type(payload) is not bytes:
        raise DecodeError(f"undecodable task: a {type(payload).__name__}, not bytes")
    if not payload[:1] == _VERSION_BYTE:
        raise DecodeError(f"unknown task format {payload[:1]!r} (this version reads format {FORMAT_VERSION})")
    if max_size is not None and len(payload) > max_size:
        raise DecodeError(f"undecodable task: {len(payload)} bytes, over max_task_size ({max_size})")
    try:
        handler, name, args = _unpack(payload[1:])
    except DecodeError:
        raise
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        reason = str(exc) or {"StackError": "nested too deeply"}.get(type(exc).__name__, "malformed")
        raise DecodeError(f"undecodable task: {type(exc).__name__}: {reason}") from exc
    if type(handler) is not str or not (name is None or type(name) is str) or type(args) is not list:
        raise DecodeError("undecodable task: wrong field types")
    return DecodedTask(handler, name, args)
