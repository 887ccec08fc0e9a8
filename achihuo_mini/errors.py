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
    │   └── InvalidRequest (Reject, ValueError)   a request that can never succeed (not http(s), no url)
    ├── Reject                            raise from a handler: the task can never succeed, bury it now
    ├── RobotsDisallowed                  obey_robots: the site's robots.txt disallows the URL
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
    "InvalidRequest",
    "PluginError",
    "Reject",
    "RequestError",
    "Retry",
    "RobotsDisallowed",
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


class Reject(AchihuoError):
    """Raise from a handler when its task can never succeed: it becomes a dead letter at once.

    No retry is spent on it (``reason`` is the dead letter's error text). The loop treats
    a few failures the same way by itself, because running them again cannot help: arguments
    that do not fit the handler's signature, an :class:`InvalidRequest`, and adds that
    cannot be stored (``HandlerError``, ``EncodeError``, ``TaskTooLarge``) raised inside
    the handler. ``dead --requeue`` runs such tasks again once the cause is mended.
    """

    def __init__(self, reason: str = "") -> None:
        super().__init__(reason or "rejected by the handler")
        self.reason = reason


class InvalidRequest(RequestError, Reject, ValueError):
    """``async_web_request`` was given a request no try can send: no URL, a URL that does not
    parse or is not http(s), conflicting fields; also a redirect loop, a certificate error and
    a body over ``max_body_size``. It fails at once, and its task is a dead letter at once."""

    def __init__(self, url: str, reason: str, tries: int = 1) -> None:
        Exception.__init__(self, f"{url}: {reason}")
        self.url = url
        self.tries = tries
        self.last_error = reason
        self.reason = reason


class RobotsDisallowed(AchihuoError):
    """``async_web_request`` refused a URL that the site's robots.txt disallows (``obey_robots``).

    No request was sent. Raised out of a handler, the task is acknowledged and counted as
    ``disallowed``: never retried, never a dead letter, not marked done (its outbox is
    discarded, as for any handler that raises).
    """

    def __init__(self, url: str, robots_url: str) -> None:
        super().__init__(f"{url}: disallowed by {robots_url}")
        self.url = url
        self.robots_url = robots_url


class Retry(AchihuoError):
    """Raise from a handler to retry the task, after ``delay`` seconds if given.

    It spends one of the task's retries like any other failure; ``delay`` replaces
    the exponential backoff for this one retry.
    """

    def __init__(self, reason: str = "", *, delay: float | None = None) -> None:
        super().__init__(reason or "retry requested")
        self.delay = delay
