"""achihuo-filestore: a file-based, host-scope backend plugin for achihuo_mini.

Each loop ``NAME`` gets one directory holding an append-only journal of
operations (msgpack records, fsynced on every write, compacted when it grows)
and a lock file that every operation holds with ``fcntl.flock``. Install the
package and use ``AsyncLoop(cache_backend="filestore")`` or ``backend =
"filestore"`` in a config file.
"""

from .backend import FileDoneSet, FileQueue

__all__ = ["FileDoneSet", "FileQueue"]
__version__ = "0.1.0"
