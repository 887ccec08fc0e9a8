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


def _ext_hook(code: int, data: bytes) -> Any:
    if code == _EXT_ITEM and not data:
        return _ITEM
    raise DecodeError(f"unknown extension type {code} ({len(data)} bytes)")


def _list_hook(values: list[Any]) -> Any:
    if values and values[0] is _ITEM:
        if len(values) != 2 or type(values[1]) is not dict:
            raise DecodeError("undecodable task: malformed Item")
        return Item(values[1])
    return values


def _unpack(data: bytes) -> Any:
    return msgpack.unpackb(
        data, ext_hook=_ext_hook, list_hook=_list_hook, raw=False, strict_map_key=True, use_list=True
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
    return _VERSION_BYTE + _pack([handler, name, list(args)])


@dataclass(frozen=True, slots=True)
class DecodedTask:
    handler: str
    name: str | None
    args: list[Any]


def decode_task(payload: bytes) -> DecodedTask:
    """Decode bytes written by :func:`encode_task`. Raises :class:`DecodeError` on anything else."""
    if not payload[:1] == _VERSION_BYTE:
        raise DecodeError(f"unknown task format {payload[:1]!r} (this version reads format {FORMAT_VERSION})")
    try:
        handler, name, args = _unpack(payload[1:])
    except DecodeError:
        raise
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise DecodeError(f"undecodable task: {type(exc).__name__}: {exc}") from exc
    if type(handler) is not str or not (name is None or type(name) is str) or type(args) is not list:
        raise DecodeError("undecodable task: wrong field types")
    return DecodedTask(handler, name, args)
