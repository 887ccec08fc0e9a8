"""achihuo_mini: a durable, distributed asyncio task loop for web crawlers.

Subclass :class:`AsyncLoop`, write coroutine handlers, feed them tasks with
``add_task``; finished work goes in the done set with ``task_done``. Tasks live in
a pluggable durable queue (SQLite by default, Redis across machines) and are never
lost: a task leaves the queue only when its handler returns.
"""

from typing import TYPE_CHECKING, Any

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
    InvalidRequest,
    PluginError,
    Reject,
    RequestError,
    Retry,
    RobotsDisallowed,
    TaskTooLarge,
)
from .item import Item
from .urls import canonical_url

if TYPE_CHECKING:
    from .http import Response as Response

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # ``Response`` comes from the HTTP module, which imports aiohttp: only when asked for
    if name == "Response":
        from .http import Response

        return Response
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

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
    "InvalidRequest",
    "Item",
    "PluginError",
    "Reject",
    "RequestError",
    "Retry",
    "RobotsDisallowed",
    "RunSummary",
    "Task",
    "TaskTooLarge",
    "__version__",
    "canonical_url",
]
