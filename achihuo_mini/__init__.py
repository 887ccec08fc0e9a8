"""achihuo_mini: a durable, distributed asyncio task loop for web crawlers.

Subclass :class:`AsyncLoop`, write coroutine handlers, feed them tasks with
``add_task``; finished work goes in the done set with ``task_done``. Tasks live in
a pluggable durable queue (SQLite by default, Redis across machines) and are never
lost: a task leaves the queue only when its handler returns.
"""

from .async_loop import DEFAULT_CACHE_BACKEND, AsyncLoop, RunSummary, Task
from .errors import (
    AchihuoError,
    BackendError,
    BackendNotFound,
    BackendUnavailable,
    ConfigError,
    DecodeError,
    EncodeError,
    HandlerError,
    PluginError,
    RequestError,
    Retry,
    TaskTooLarge,
)
from .item import Item

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_CACHE_BACKEND",
    "AchihuoError",
    "AsyncLoop",
    "BackendError",
    "BackendNotFound",
    "BackendUnavailable",
    "ConfigError",
    "DecodeError",
    "EncodeError",
    "HandlerError",
    "Item",
    "PluginError",
    "RequestError",
    "Retry",
    "RunSummary",
    "Task",
    "TaskTooLarge",
    "__version__",
]
