"""Every error achihuo_mini raises on purpose.

::

    AchihuoError                          root: ``except AchihuoError`` catches all of ours
    ├── ConfigError (ValueError)          bad config file, option or keyword; names file and key
    ├── BackendNotFound (LookupError)     unknown backend name; lists the installed ones
    ├── PluginError                       two plugins claim one name / a plugin failed to load
    ├── HandlerError (ValueError)         add_task named something that is not a handler
    ├── EncodeError (TypeError)           add_task args that cannot be stored; names the path
    ├── TaskTooLarge (ValueError)         an encoded task over the max_task_size option
    ├── DecodeError (ValueError)          bytes read from a backend that are not a task
    ├── BackendError                      a backend failed; the driver's error is chained
    │   └── BackendUnavailable (ConnectionError)   it cannot be reached (yet)
    ├── RequestError                      async_web_request gave up after its last try
    └── Retry                             raise from a handler to retry it (optionally after ``delay``)

Driver exceptions (redis, sqlite3, aiohttp) are translated at the backend boundary
into ``BackendError``/``BackendUnavailable`` with the original as ``__cause__``.
"""

from __future__ import annotations

__all__ = [
    "AchihuoError",
    "BackendError",
    "BackendNotFound",
    "BackendUnavailable",
    "ConfigError",
    "DecodeError",
    "EncodeError",
    "HandlerError",
    "PluginError",
    "RequestError",
    "Retry",
    "TaskTooLarge",
]


class AchihuoError(Exception):
    """Root of every exception achihuo_mini raises on purpose."""


class ConfigError(AchihuoError, ValueError):
    """A config file, keyword argument or command-line option is invalid."""


class BackendNotFound(AchihuoError, LookupError):
    """No installed plugin provides the requested backend name."""


class PluginError(AchihuoError):
    """A plugin is broken: it failed to import, or two plugins claim one backend name."""


class HandlerError(AchihuoError, ValueError):
    """A task names something that is not a handler of the loop."""


class EncodeError(AchihuoError, TypeError):
    """Task arguments contain a value that cannot be stored without pickle."""


class TaskTooLarge(AchihuoError, ValueError):
    """An encoded task is larger than the ``max_task_size`` option allows."""


class DecodeError(AchihuoError, ValueError):
    """Bytes read from a backend are not a task this version can decode."""


class BackendError(AchihuoError):
    """A backend operation failed. The driver's exception is chained as ``__cause__``."""


class BackendUnavailable(BackendError, ConnectionError):
    """The backend cannot be reached; the loop pauses and retries."""


class RequestError(AchihuoError):
    """``async_web_request`` failed on every try; names the URL and the last error."""

    def __init__(self, url: str, tries: int, last_error: str) -> None:
        super().__init__(f"{url}: gave up after {tries} tr{'y' if tries == 1 else 'ies'}: {last_error}")
        self.url = url
        self.tries = tries
        self.last_error = last_error


class Retry(AchihuoError):
    """Raise from a handler to retry the task, after ``delay`` seconds if given.

    It spends one of the task's retries like any other failure; ``delay`` replaces
    the exponential backoff for this one retry.
    """

    def __init__(self, reason: str = "", *, delay: float | None = None) -> None:
        super().__init__(reason or "retry requested")
        self.delay = delay
