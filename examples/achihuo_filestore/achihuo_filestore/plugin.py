"""The pluggy hook that registers the ``filestore`` backend.

Found through the ``achihuo_mini`` entry-point group (see ``pyproject.toml``),
exactly like the builtin backends.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from achihuo_mini.plugins import BackendSpec, Option, hookimpl

from .backend import FileDoneSet, FileQueue

__all__ = ["OPTIONS", "achihuo_register_backends"]

OPTIONS: dict[str, Option] = {
    "root": Option(
        Path,
        None,
        "folder holding one directory per loop NAME (local disk only); default $XDG_DATA_HOME/achihuo_mini/filestore",
    ),
    "lock_timeout": Option(float, 30.0, "seconds to wait for another process's lock before giving up"),
    "compact_bytes": Option(int, 8 << 20, "compact the journal once it is larger than this many bytes"),
    "poll_interval": Option(float, 0.05, "seconds between an idle worker's checks for new tasks"),
}


@hookimpl
def achihuo_register_backends(register: Callable[[BackendSpec], None]) -> None:
    """Register the ``filestore`` backend (scope ``host``)."""
    register(
        BackendSpec(
            name="filestore",
            scope="host",
            description="one directory per loop: an fsynced, flock-guarded journal file",
            create_queue=lambda namespace, options: FileQueue(namespace, **options),
            create_done_set=lambda namespace, options: FileDoneSet(namespace, **options),
            options=OPTIONS,
        )
    )
