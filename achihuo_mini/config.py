"""Settings: defaults < config file < keyword arguments < command-line options.

The config file is TOML::

    [loop]
    concurrency = 32

    [queue]
    backend = "redis"
    url = "redis://127.0.0.1:6379/0"

    [done]
    backend = "sqlite"
    path = "done.sqlite3"        # relative to this file's folder

One file is read: ``--config``, else ``config_file=``, else ``$ACHIHUO_CONFIG``.
``[queue]``/``[done]`` ``backend`` override ``cache_backend`` for their side; their
other keys go to that backend, which declares them (unknown keys are errors).
Every error names the file, the key and what was expected.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .masking import mask_secrets, mask_values
from .plugins import BackendSpec, Option, build_backend_options, coerce_option, registry

__all__ = ["DEFAULT_CACHE_BACKEND", "LOOP_OPTIONS", "Settings", "build_backend_options", "load_settings"]

DEFAULT_CACHE_BACKEND = "sqlite"
"""Embedded, durable, needs no server: a first run just works."""

_SECONDS = 1e9  # ~31 years: the largest time any option may give (backends store milliseconds)
_COUNT = 1_000_000

LOOP_OPTIONS: dict[str, Option] = {
    "concurrency": Option(int, 10, "task coroutines running at once in this process", 1, _COUNT),
    "debug": Option(bool, True, "verbose (DEBUG) logging"),
    "log_level": Option(str, None, "DEBUG, INFO, WARNING or ERROR; overrides debug"),
    "grace_period": Option(float, 8.0, "seconds running handlers may finish after a stop", 0, _SECONDS),
    "lease_timeout": Option(float, 30.0, "seconds without heartbeat after which a worker is dead", 0, _SECONDS),
    "heartbeat_interval": Option(float, 10.0, "seconds between heartbeats (less than lease_timeout)", 0, _SECONDS),
    "task_timeout": Option(float, 600.0, "seconds a handler may run before it is cancelled (a failure)", 0, _SECONDS),
    "max_retries": Option(int, 3, "retries of a failing task before it becomes a dead letter", 0, _COUNT),
    "retry_delay": Option(float, 1.0, "first retry delay in seconds; doubles each retry, with jitter", 0, _SECONDS),
    "retry_max_delay": Option(float, 300.0, "cap of the retry delay in seconds", 0, _SECONDS),
    "idle_exit": Option(float, None, "exit when the whole loop is idle this many seconds (None: never)", 0, _SECONDS),
    "flush_interval": Option(float, 0.1, "seconds between flushes of tasks added outside handlers", 0, 3600),
    "progress_interval": Option(float, 60.0, "seconds between progress log lines (1 or more; 0: none)", 0, _SECONDS),
    "allow_local": Option(bool, False, "allow a network queue with a host/process-scope done set"),
    "require_durable": Option(bool, False, "refuse a backend that reports volatile durability"),
    "max_task_size": Option(
        int, 1024 * 1024, "largest encoded task add_task accepts, bytes (handler, name and arguments)", 64, 2**28
    ),
    "user_agent": Option(str, None, "User-Agent header of async_web_request"),
    "request_timeout": Option(float, 30.0, "default total timeout of one HTTP try, seconds", 0, _SECONDS),
    "request_tries": Option(
        int, 3, "default tries of one async_web_request (item.max_retry overrides); 1: task retries alone", 1, 1000
    ),
    "max_body_size": Option(
        int, 64 * 1024 * 1024, "largest HTTP body async_web_request reads, bytes (0: no limit)", 0, 2**62
    ),
    "tune_gc": Option(
        bool,
        None,
        "raise the garbage collector's thresholds while serving (and freeze start-up objects); "
        "None: on in start(), which owns its process, off in an embedding serve()",
    ),
    "uvloop": Option(
        bool,
        None,
        "run start() and run_until_idle() on uvloop (pip install achihuo_mini[fast]); None: when installed",
    ),
    "stats": Option(
        bool, True, "count HTTP requests and publish the counters with heartbeats (False: task counts only)"
    ),
    "metrics": Option(str, None, "HOST:PORT where start serves this worker's Prometheus /metrics (None: nowhere)"),
    "per_host_limit": Option(int, 0, "concurrent requests per host (0: no limit)", 0, _COUNT),
    "per_host_delay": Option(float, 0.0, "seconds between the starts of requests to one host", 0, 86400),
    "dedup_cache": Option(
        int,
        100_000,
        "names this process itself marked done, remembered to skip repeat=False adds of them at once (0: off)",
        0,
        10**9,
    ),
    "dedup_cache_ttl": Option(
        float, 60.0, "seconds a name stays in the local dedup cache after this process marked it done", 0, _SECONDS
    ),
    "per_host_scope": Option(
        str,
        "loop",
        "loop: per_host_limit, per_host_delay and Crawl-delay hold across every worker sharing the backend; "
        "process: each process keeps them for itself",
    ),
    "obey_robots": Option(
        bool, False, "fetch each host's robots.txt; refuse the URLs it disallows and honour its Crawl-delay"
    ),
    "canonical_names": Option(
        bool, False, "apply canonical_url() to every task name that is an http(s) URL (adds, task_done, uncache_task)"
    ),
    "done_ttl": Option(
        float,
        None,
        "seconds a task_done name blocks repeat=False adds (None: for ever; task_done(ttl=) overrides)",
        0,
        _SECONDS,
    ),
}

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_HOST_SCOPES = ("loop", "process")
_POSITIVE = ("lease_timeout", "heartbeat_interval", "task_timeout", "flush_interval", "request_timeout",
             "dedup_cache_ttl")  # fmt: skip
"""Options where 0 would spin a background loop or fail every call: they must be more than 0."""


@dataclass
class Side:
    """One side (queue or done set): backend name and its checked options."""

    backend: str
    options: dict[str, Any]
    source: str

    def spec(self) -> BackendSpec:
        return registry.get(self.backend)

    def __repr__(self) -> str:
        options = mask_values(self.options)  # a URL value may hold quotes that end a URL in free text
        return mask_secrets(f"Side(backend={self.backend!r}, options={options!r}, source={self.source!r})")


@dataclass
class Settings:
    """Everything a loop needs to start, resolved and checked."""

    loop: dict[str, Any]
    queue: Side
    done: Side
    config_path: Path | None = None
    sources: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    """What the loop logs at start about these settings (a keyword argument hiding a config-file value)."""

    def __repr__(self) -> str:  # backend options hold URLs with passwords
        return mask_secrets(
            f"Settings(loop={self.loop!r}, queue={self.queue!r}, done={self.done!r}, config_path={self.config_path!r})"
        )


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path}: not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: invalid TOML: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {path}: not UTF-8 text (TOML files are UTF-8): {exc.reason} at byte {exc.start}"
        ) from None
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot read: {exc}") from exc


def _section(data: Mapping[str, Any], name: str, path: Path) -> dict[str, Any]:
    value = data.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"config file {path}: [{name}] must be a table, got {type(value).__name__}")
    return dict(value)


def load_settings(
    *,
    kwargs: Mapping[str, Any],
    cache_backend: str | None,
    queue_backend: str | None = None,
    config_file: str | os.PathLike[str] | None = None,
    cli: Mapping[str, Any] | None = None,
) -> Settings:
    """Resolve settings from defaults, the config file, keyword arguments and CLI options.

    ``kwargs`` and ``cli`` hold loop options (``None`` values are ignored); ``cli`` may
    also hold ``backend`` (both sides) and ``config`` (the file).
    """
    cli = dict(cli or {})
    chosen = cli.pop("config", None) or config_file or os.environ.get("ACHIHUO_CONFIG") or None
    path = Path(chosen).expanduser().resolve() if chosen else None
    data: dict[str, Any] = _read_toml(path) if path else {}
    base_dir = path.parent if path else None
    where = f"config file {path}" if path else "defaults"
    for top in data:
        if top not in ("loop", "queue", "done"):
            raise ConfigError(f"{where}: unknown section [{top}] (expected [loop], [queue] or [done])")

    loop: dict[str, Any] = {name: opt.default for name, opt in LOOP_OPTIONS.items()}
    sources = dict.fromkeys(loop, "default")
    layers: list[tuple[str, Mapping[str, Any]]] = [
        (f"{where}: [loop]", _section(data, "loop", path) if path else {}),
        ("keyword argument", kwargs),
        ("command-line option", cli),
    ]
    cli_backend = cli.pop("backend", None)
    warnings: list[str] = []
    for label, layer in layers:
        for name, value in layer.items():
            if name not in LOOP_OPTIONS:
                known = ", ".join(sorted(LOOP_OPTIONS))
                raise ConfigError(f"{label}: unknown option {name!r} (known: {known})")
            if value is None:
                continue
            coerced = coerce_option(LOOP_OPTIONS[name], value, f"{label} {name!r}", base_dir)
            if label == "keyword argument" and sources[name] != "default" and coerced != loop[name]:
                warnings.append(
                    f"the keyword argument {name}={coerced!r} hides {name} = {loop[name]!r} of {sources[name]} "
                    "(keyword arguments win over the config file; the command line wins over both)"
                )
            loop[name] = coerced
            sources[name] = label
    for name in _POSITIVE:
        if not loop[name] > 0:
            raise ConfigError(f"{sources[name]} {name!r}: must be more than 0, got {loop[name]}")
    if loop["metrics"] is not None:
        from ._metrics import parse_address  # no prometheus import: it only checks the text

        parse_address(loop["metrics"], f"{sources['metrics']} 'metrics'")
    if 0 < loop["progress_interval"] < 1:
        raise ConfigError(
            f"{sources['progress_interval']} 'progress_interval': {loop['progress_interval']:g} s is too often "
            "for a log line; give 1 s or more, or 0 for none"
        )
    if loop["heartbeat_interval"] >= loop["lease_timeout"]:
        raise ConfigError(
            f"heartbeat_interval ({loop['heartbeat_interval']:g} s, {sources['heartbeat_interval']}) must be less "
            f"than lease_timeout ({loop['lease_timeout']:g} s, {sources['lease_timeout']}): otherwise live workers "
            "are declared dead and their tasks run twice"
        )
    if loop["per_host_scope"] not in _HOST_SCOPES:
        raise ConfigError(
            f"{sources['per_host_scope']} 'per_host_scope': expected one of {', '.join(_HOST_SCOPES)}, "
            f"got {loop['per_host_scope']!r}"
        )
    if loop["done_ttl"] is not None and not loop["done_ttl"] > 0:
        raise ConfigError(f"{sources['done_ttl']} 'done_ttl': must be more than 0 seconds (or unset), got 0")
    if loop["log_level"] is not None and loop["log_level"].upper() not in _LOG_LEVELS:
        raise ConfigError(
            f"{sources['log_level']} 'log_level': expected one of {', '.join(_LOG_LEVELS)}, got {loop['log_level']!r}"
        )

    def side(section: str, side_keyword: str | None) -> Side:
        raw = _section(data, section, path) if path else {}
        configured = raw.pop("backend", None)
        label = f"{where}: [{section}]"
        if configured is not None and not isinstance(configured, str):
            raise ConfigError(f"{label}: key 'backend': expected a string, got {type(configured).__name__}")
        # the command line, then an explicit side keyword, then the section, then cache_backend
        name = cli_backend or side_keyword or configured or cache_backend or DEFAULT_CACHE_BACKEND
        spec = registry.get(name)
        if (section == "queue" and spec.create_queue is None) or (section == "done" and spec.create_done_set is None):
            raise ConfigError(f"{label}: backend {name!r} provides no {'queue' if section == 'queue' else 'done set'}")
        # the section's other keys belong to the backend it names (or to any, when it names none)
        applies = configured is None or configured == name
        options = build_backend_options(spec, raw if applies else {}, source=label, base_dir=base_dir)
        return Side(name, options, label)

    queue = side("queue", queue_backend)
    done = side("done", None)
    return Settings(loop=loop, queue=queue, done=done, config_path=path, sources=sources, warnings=warnings)
