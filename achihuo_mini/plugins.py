"""Backend plugins, found through pluggy and the ``achihuo_mini`` entry-point group.

A plugin is a module with a hook implementation::

    from achihuo_mini.plugins import BackendSpec, Option, hookimpl

    @hookimpl
    def achihuo_register_backends(register):
        register(BackendSpec(
            name="mystore",
            scope="host",
            description="what it is",
            create_queue=lambda namespace, options: MyQueue(namespace, **options),
            create_done_set=lambda namespace, options: MyDoneSet(namespace, **options),
            options={"path": Option(Path, None, "database file")},
        ))

registered in its package's ``pyproject.toml``::

    [project.entry-points.achihuo_mini]
    mystore = "mystore_package.plugin"

The builtin backends (memory, SQLite, Redis) are found exactly this way.
"""

from __future__ import annotations

import importlib.metadata
import logging
import math
import os
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pluggy

from . import backend_kit as _kit
from .backend import DoneSetBackend, QueueBackend, Scope
from .errors import BackendNotFound, ConfigError, PluginError
from .masking import mask_secrets, mask_values

__all__ = [
    "ENTRY_POINT_GROUP",
    "BackendSpec",
    "Option",
    "Registry",
    "build_backend_options",
    "coerce_option",
    "hookimpl",
    "hookspec",
    "registry",
]

PROJECT = "achihuo_mini"
ENTRY_POINT_GROUP = "achihuo_mini"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

log = logging.getLogger("achihuo_mini.plugins")


@dataclass(frozen=True, slots=True)
class Option:
    """One backend option, as written in a ``[queue]``/``[done]`` config section.

    ``type`` is ``str``, ``int``, ``float``, ``bool`` or ``Path``; a relative ``Path``
    is resolved against the config file's folder. ``default=None`` means unset.
    Numbers are checked by :func:`coerce_option`: a ``float`` must be finite, an
    ``int`` must fit in 64 bits, and both must lie within ``minimum``/``maximum``
    when those are given.
    """

    type: type
    default: Any = None
    help: str = ""
    minimum: float | None = None
    maximum: float | None = None


@dataclass(frozen=True)
class BackendSpec:
    """What a plugin contributes: a backend name and its two factories.

    Factories are called as ``factory(namespace, options)`` with the loop's raw
    ``NAME`` and a dict holding every declared option (defaults filled in). They must
    not do I/O (``open()`` does) and should import heavy drivers lazily, raising an
    error that says what to install. Either factory may be ``None`` when the backend
    provides only one side.
    """

    name: str
    scope: Scope
    description: str
    create_queue: Callable[[str, dict[str, Any]], QueueBackend] | None = None
    create_done_set: Callable[[str, dict[str, Any]], DoneSetBackend] | None = None
    options: Mapping[str, Option] = field(default_factory=dict)
    list_loops: Callable[[dict[str, Any]], Coroutine[Any, Any, list[str]]] | None = None
    """Optional: the NAMEs of the loops that have data where ``options`` point (for
    ``achihuo loops``), called with the same option dict as the factories."""
    has_data: Callable[[str, dict[str, Any]], Coroutine[Any, Any, bool]] | None = None
    """Optional: ``has_data(namespace, options)``: does the loop have anything (tasks, dead
    letters, done names, registered workers) where ``options`` point? It must create and
    change nothing. The commands that manage a loop (``status``, ``dead``, ``stop``,
    ``clear``) ask it first and answer "no data for loop X" instead of opening the backend,
    which could create a new, empty store for a misspelled NAME. When in doubt (a store it
    cannot read), answer True: opening it then reports the real problem."""
    plugin: str = ""
    """Filled in by the registry: the plugin that registered this spec."""


class _HookSpecs:
    @hookspec
    def achihuo_register_backends(self, register: Callable[[BackendSpec], None]) -> None:
        """Call ``register(BackendSpec(...))`` once for each backend the plugin provides."""


class Registry:
    """The installed backends. Use the module-level :data:`registry`."""

    def __init__(self, group: str = ENTRY_POINT_GROUP) -> None:
        self.group = group
        self._specs: dict[str, BackendSpec] | None = None
        self._failed: dict[str, str] = {}
        self._extra: list[tuple[str, object]] = []

    def register_plugin(self, plugin: object, name: str) -> None:
        """Add a plugin object directly (tests, embedding); takes effect at the next lookup."""
        self._extra.append((name, plugin))
        self._specs = None

    def unregister_plugin(self, name: str) -> None:
        self._extra = [(n, p) for n, p in self._extra if n != name]
        self._specs = None

    def _load(self) -> dict[str, BackendSpec]:
        if self._specs is not None:
            return self._specs
        pm = pluggy.PluginManager(PROJECT)
        pm.add_hookspecs(_HookSpecs)
        failed: dict[str, str] = {}
        for ep in sorted(importlib.metadata.entry_points(group=self.group), key=lambda e: e.name):
            if pm.has_plugin(ep.name):
                continue
            try:
                plugin = ep.load()
                pm.register(plugin, name=ep.name)
            except Exception as exc:  # a broken third-party plugin must not break the others
                failed[ep.name] = f"{ep.value}: {type(exc).__name__}: {exc}"
                log.warning("backend plugin %r failed to load: %s", ep.name, failed[ep.name])
        for name, plugin in self._extra:
            pm.register(plugin, name=name)
        pm.check_pending()
        specs: dict[str, BackendSpec] = {}
        for impl in pm.hook.achihuo_register_backends.get_hookimpls():
            plugin_name = impl.plugin_name

            def register(spec: BackendSpec, _plugin: str = plugin_name) -> None:
                if not isinstance(spec, BackendSpec):
                    raise PluginError(f"plugin {_plugin!r} registered {spec!r}, not a BackendSpec")
                if spec.name in specs:
                    raise PluginError(
                        f"backend name {spec.name!r} is claimed by two plugins: "
                        f"{specs[spec.name].plugin!r} and {_plugin!r}"
                    )
                specs[spec.name] = replace(spec, plugin=_plugin)

            impl.function(register)
        self._specs = specs
        self._failed = failed
        return specs

    def names(self) -> list[str]:
        """Installed backend names, sorted."""
        return sorted(self._load())

    def specs(self) -> list[BackendSpec]:
        return [self._load()[n] for n in self.names()]

    def failed(self) -> dict[str, str]:
        """Plugins that failed to load: entry-point name → error."""
        self._load()
        return dict(self._failed)

    def get(self, name: str) -> BackendSpec:
        """The spec for ``name``; raises :class:`BackendNotFound` listing the installed names."""
        specs = self._load()
        if name in specs:
            return specs[name]
        if name in self._failed:
            raise PluginError(f"backend {name!r} is installed but its plugin failed to load: {self._failed[name]}")
        installed = ", ".join(sorted(specs)) or "none"
        hint = ""
        if self._failed:
            hint = "; plugins that failed to load: " + ", ".join(sorted(self._failed))
        raise BackendNotFound(f"unknown backend {name!r}; installed backends: {installed}{hint}")

    def reload(self) -> None:
        self._specs = None


registry = Registry()
"""The process-wide registry of installed backends."""


# Kept here for plugins written against 0.1: the helpers live in ``backend_kit`` now.
default_data_dir = _kit.default_data_dir
safe_filename = _kit.safe_filename


def _type_name(t: type) -> str:
    return {Path: "a path (str)", float: "a number", int: "an integer", bool: "true or false", str: "a string"}.get(
        t, t.__name__
    )


_INT_LIMIT = 2**63


def _short_repr(value: Any) -> str:
    text = mask_secrets(repr(mask_values(value)))
    return text if len(text) <= 80 else text[:77] + "..."


def coerce_option(option: Option, value: Any, where: str, base_dir: Path | None) -> Any:
    """``value`` as ``option.type``, or :class:`ConfigError` naming ``where`` and what was expected.

    Refused: a value of another type (``True`` is not an integer), a non-finite
    float (NaN, infinity), an integer outside 64 bits, a number outside
    ``option.minimum``/``option.maximum``. The value is quoted with secrets masked.
    """
    if value is None:
        return None
    t = option.type
    out: Any = _NOT_COERCED
    if t is bool:
        if type(value) is bool:
            out = value
    elif t is int:
        if type(value) is int:
            if not -_INT_LIMIT <= value < _INT_LIMIT:
                raise ConfigError(f"{where}: {value} is too large (an integer of at most 64 bits)")
            out = value
    elif t is float:
        if type(value) in (int, float):
            if not math.isfinite(value):
                raise ConfigError(f"{where}: expected a finite number, got {value!r}")
            out = float(value)
    elif t is str:
        if type(value) is str:
            out = value
    elif t is Path:
        if isinstance(value, (str, os.PathLike)):
            path = Path(os.path.expanduser(os.fspath(value)))
            if not path.is_absolute() and base_dir is not None:
                path = base_dir / path
            out = path
    else:  # pragma: no cover - plugin declared an unsupported option type
        raise ConfigError(f"{where}: option type {t!r} is not supported")
    if out is _NOT_COERCED:
        raise ConfigError(f"{where}: expected {_type_name(t)}, got {type(value).__name__} {_short_repr(value)}")
    if t in (int, float):
        if option.minimum is not None and out < option.minimum:
            raise ConfigError(f"{where}: must be at least {option.minimum:g}, got {out!r}")
        if option.maximum is not None and out > option.maximum:
            raise ConfigError(f"{where}: must be at most {option.maximum:g}, got {out!r}")
    return out


_NOT_COERCED = object()


def build_backend_options(
    spec: BackendSpec, raw: Mapping[str, Any], *, source: str, base_dir: Path | None = None
) -> dict[str, Any]:
    """Check ``raw`` against the options ``spec`` declares and fill in defaults."""
    unknown = sorted(set(raw) - set(spec.options))
    if unknown:
        known = ", ".join(sorted(spec.options)) or "none"
        raise ConfigError(f"{source}: unknown option {unknown[0]!r} for backend {spec.name!r} (it accepts: {known})")
    out: dict[str, Any] = {}
    for name, option in spec.options.items():
        value = raw.get(name, option.default)
        out[name] = coerce_option(option, value, f"{source}: key {name!r}", base_dir)
    return out
