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
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pluggy

from .backend import DoneSetBackend, QueueBackend, Scope
from .errors import BackendNotFound, PluginError

__all__ = [
    "ENTRY_POINT_GROUP",
    "BackendSpec",
    "Option",
    "Registry",
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
    """

    type: type
    default: Any = None
    help: str = ""


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


def default_data_dir() -> Path:
    """``$XDG_DATA_HOME/achihuo_mini`` (default ``~/.local/share/achihuo_mini``)."""
    import os

    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "achihuo_mini"


def safe_filename(name: str) -> str:
    """A file name made from a loop NAME: readable where it can be, collision-free always."""
    import hashlib
    import re

    readable = re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:64].strip(".") or "loop"
    if readable == name:
        return name
    return f"{readable}-{hashlib.blake2b(name.encode('utf-8', 'surrogatepass'), digest_size=6).hexdigest()}"
