"""Bad input gets a clear error and loses nothing: encoding, handler names, config, plugins."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from achihuo_mini import (
    AsyncLoop,
    BackendNotFound,
    ConfigError,
    EncodeError,
    HandlerError,
    Item,
    PluginError,
)
from achihuo_mini._store import Store
from achihuo_mini.codec import decode_task, encode_task, name_key
from achihuo_mini.errors import DecodeError
from achihuo_mini.plugins import BackendSpec, Registry, hookimpl, registry


class Spider(AsyncLoop):
    NAME = "api-spider"

    async def get_page(self, *args: Any) -> None:  # any arguments: these tests check other things
        pass

    async def _private(self) -> None:
        pass

    def not_a_coroutine(self) -> None:
        pass


def make(**kwargs: Any) -> Spider:
    kwargs.setdefault("cache_backend", "memory")
    return Spider(**kwargs)


# -- encoding -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "path", "what"),
    [
        ((object(),), "args[0]", "object"),
        (({"data": (1, 2)},), "args[0]['data']", "tuple"),
        ((Item(url="u", deep=[1, {2: "x"}]),), "args[0]['deep'][1]", "dict key 2"),
        ((1, float("nan")), "args[1]", "not finite"),
        (([math.inf],), "args[0][0]", "not finite"),
        (({1, 2},), "args[0]", "set"),
    ],
)
def test_unstorable_args_raise_naming_the_path(args: tuple[Any, ...], path: str, what: str) -> None:
    loop = make()
    with pytest.raises(TypeError) as info:
        loop.add_task("get_page", *args)
    assert isinstance(info.value, EncodeError)
    assert path in str(info.value) and what in str(info.value)


def test_tuple_error_suggests_a_list() -> None:
    with pytest.raises(EncodeError, match="use a list"):
        encode_task("h", None, [(1,)])


def test_encoding_round_trip_is_exact() -> None:
    args = [
        None,
        True,
        False,
        0,
        -(2**63),
        2**64 - 1,
        1.5,
        "",
        "名字🕷",
        b"",
        b"\x00\xff",
        [],
        {},
        Item(),
        [Item(a=Item(b=[b"x"]))],
    ]
    task = decode_task(encode_task("h", "名", args))
    assert task.handler == "h" and task.name == "名"
    assert task.args == args
    assert [type(a) for a in task.args] == [type(a) for a in args]
    assert type(task.args[-1][0]["a"]) is Item


def test_malformed_items_are_undecodable() -> None:
    import msgpack

    mark = msgpack.ExtType(1, b"")
    for bad in ([mark, 5], [mark], [mark, {}, {}], [msgpack.ExtType(1, b"\x80")]):
        payload = b"\x01" + msgpack.packb(["h", None, [bad]], use_bin_type=True)
        with pytest.raises(DecodeError):
            decode_task(payload)


@pytest.mark.parametrize(
    "payload", [b"", b"\x01", b"\x01\x93\x01\x02\x03", b"\x01\xc1", b"\x02abc", b"\x01\x93\xa1h\xc0\xc7\x01\x09x"]
)
def test_undecodable_payloads(payload: bytes) -> None:
    with pytest.raises(DecodeError):
        decode_task(payload)


def test_name_key_is_fixed_size_and_distinct() -> None:
    assert len(name_key("")) == len(name_key("x" * 1_000_000)) == 16
    assert name_key("a") != name_key("A")
    assert name_key("\udcff") != name_key("\udcfe")  # lone surrogates are names too


# -- handler names --------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        "missing",
        "_private",
        "not_a_coroutine",
        "run",
        "start",
        "stop",
        "add_task",
        "flush",
        "async_web_request",
        "serve",
        "task_done",
        "clear_data",
        "check_html",
        42,
    ],
)
def test_add_task_refuses_non_handlers(bad: Any) -> None:
    loop = make()
    with pytest.raises(HandlerError) as info:
        loop.add_task(bad)
    assert repr(bad) in str(info.value) or type(bad).__name__ in str(info.value)
    if isinstance(bad, str):
        assert "get_page" in str(info.value), "the error lists the real handlers"


def test_add_task_argument_checks() -> None:
    loop = make()
    with pytest.raises(TypeError, match="task_name"):
        loop.add_task("get_page", task_name=123)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="repeat"):
        loop.add_task("get_page", repeat="no")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="delay"):
        loop.add_task("get_page", delay=-1)
    with pytest.raises(TypeError, match="task_done"):
        loop.task_done(None)  # type: ignore[arg-type]


def test_name_is_required() -> None:
    class Nameless(AsyncLoop):
        pass

    with pytest.raises(ConfigError, match="NAME"):
        Nameless(cache_backend="memory")


def test_bad_handler_alias() -> None:
    class Aliased(Spider):
        HANDLER_ALIASES = {"old": "nope"}

    with pytest.raises(ConfigError, match="'nope'"):
        Aliased(cache_backend="memory")


# -- backends and config -------------------------------------------------------------


def test_unknown_backend_lists_installed() -> None:
    with pytest.raises(BackendNotFound) as info:
        make(cache_backend="mongo")
    message = str(info.value)
    assert "'mongo'" in message
    for name in registry.names():
        assert name in message
    assert {"memory", "sqlite", "redis"} <= set(registry.names())


def test_default_backend_is_sqlite_in_the_data_dir(tmp_path: Path) -> None:
    loop = Spider()
    assert loop.settings.queue.backend == "sqlite" and loop.settings.done.backend == "sqlite"
    import os

    assert Store(loop.name, loop.settings).queue.location.startswith(os.environ["XDG_DATA_HOME"])


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "achihuo.toml"
    path.write_text(text)
    return path


def test_config_file_sets_sides_separately(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[loop]\nconcurrency = 32\nmax_retries = 5\n[queue]\nbackend = "memory"\n'
        '[done]\nbackend = "sqlite"\npath = "d/done.db"\n',
    )
    loop = Spider(config_file=path)
    assert loop.concurrency == 32 and loop.settings.loop["max_retries"] == 5
    assert loop.settings.queue.backend == "memory"
    assert loop.settings.done.backend == "sqlite"
    assert loop.settings.done.options["path"] == tmp_path / "d" / "done.db", "relative to the file's folder"
    assert Spider(config_file=path, concurrency=3).concurrency == 3, "keyword arguments beat the file"


def test_config_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "ACHIHUO_CONFIG",
        str(write(tmp_path, "[loop]\nconcurrency = 5\n[queue]\nbackend='memory'\n[done]\nbackend='memory'\n")),
    )
    assert Spider().concurrency == 5


def test_section_backend_overrides_cache_backend(tmp_path: Path) -> None:
    path = write(tmp_path, '[queue]\nbackend = "memory"\n[done]\nbackend = "memory"\n')
    loop = Spider(cache_backend="sqlite", config_file=path)
    assert (loop.settings.queue.backend, loop.settings.done.backend) == ("memory", "memory")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[loop\nconcurrency = 1", "invalid TOML"),
        ("[loop]\nconcurrency = 'many'", "'concurrency': expected an integer, got str 'many'"),
        ("[loop]\nconcurency = 3", "unknown option 'concurency'"),
        ("[loop]\nconcurrency = 0", "at least 1"),
        ("[loop]\ngrace_period = -1", "must be at least 0"),
        ("[loop]\ntask_timeout = 0", "'task_timeout': must be more than 0"),
        ("[loop]\nflush_interval = 0", "'flush_interval': must be more than 0"),
        ("[queu]\nbackend = 'memory'", "unknown section [queu]"),
        ("loop = 3", "[loop] must be a table"),
        ("[queue]\nbackend = 'nosuch'", "unknown backend 'nosuch'"),
        ("[queue]\nbackend = 3", "key 'backend': expected a string"),
        ("[queue]\nbackend = 'sqlite'\npth = 'x.db'", "unknown option 'pth' for backend 'sqlite'"),
        ("[done]\nbackend = 'sqlite'\npath = 7", "key 'path': expected a path"),
        (
            "[queue]\nbackend = 'memory'\nurl = 'redis://x'",
            "unknown option 'url' for backend 'memory' (it accepts: none)",
        ),
    ],
)
def test_config_errors_name_file_key_and_expectation(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises((ConfigError, BackendNotFound)) as info:
        Spider(config_file=path)
    assert expected in str(info.value)
    if "unknown backend" not in expected:
        assert str(path) in str(info.value), "the error names the file"


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        Spider(config_file=tmp_path / "nope.toml")


def test_unknown_keyword_option() -> None:
    with pytest.raises(ConfigError, match="unknown option 'concurrrency'"):
        make(concurrrency=3)


def test_network_queue_with_local_done_set_is_refused(tmp_path: Path) -> None:
    text = '[queue]\nbackend = "redis"\nurl = "redis://127.0.0.1:1/0"\n[done]\nbackend = "sqlite"\n'
    with pytest.raises(ConfigError, match="allow_local"):
        Spider(config_file=write(tmp_path, text))
    loop = Spider(config_file=write(tmp_path, "[loop]\nallow_local = true\n" + text))
    assert loop.settings.queue.backend == "redis"


# -- plugin registry ------------------------------------------------------------------


class _Plugin:
    def __init__(self, name: str) -> None:
        self.name = name

    @hookimpl
    def achihuo_register_backends(self, register: Any) -> None:
        from achihuo_mini_backends.memory import MemoryDoneSet, MemoryQueue

        register(
            BackendSpec(self.name, "process", "test", lambda ns, o: MemoryQueue(ns), lambda ns, o: MemoryDoneSet(ns))
        )


def test_two_plugins_claiming_one_name() -> None:
    reg = Registry()
    reg.register_plugin(_Plugin("memory"), "impostor")
    with pytest.raises(PluginError) as info:
        reg.names()
    assert "'memory'" in str(info.value) and "'impostor'" in str(info.value)


def test_extra_plugin_is_found() -> None:
    reg = Registry()
    reg.register_plugin(_Plugin("extra"), "extra-plugin")
    assert "extra" in reg.names()
    assert reg.get("extra").plugin == "extra-plugin"


def test_broken_plugin_is_a_warning_unless_requested(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A real installed distribution whose entry point cannot be imported."""
    group = "achihuo_mini_test_broken"
    dist = tmp_path / "broken_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[{group}]\nbroken = broken_pkg_that_is_not_installed.plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = Registry(group=group)
    reg.register_plugin(_Plugin("fine"), "fine")
    assert reg.names() == ["fine"]
    assert "failed to load" in caplog.text and "broken_pkg_that_is_not_installed" in caplog.text
    with pytest.raises(PluginError, match="installed but its plugin failed to load"):
        reg.get("broken")
    with pytest.raises(BackendNotFound, match="plugins that failed to load: broken"):
        reg.get("other")
