"""Bad input gets a clear error and loses nothing: options, config files, oversized and hostile
queue entries, registry strings with terminal escapes, secrets in errors, hostile charsets."""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import msgpack
import pytest

from achihuo_mini import AsyncLoop, ConfigError, EncodeError, TaskTooLarge
from achihuo_mini.backend import NewTask
from achihuo_mini.backend_kit import private_dir
from achihuo_mini.cli import run_spider_cli
from achihuo_mini.codec import MAX_CONTAINERS, decode_task
from achihuo_mini.config import LOOP_OPTIONS
from achihuo_mini.errors import DecodeError
from achihuo_mini.http import decode_body
from achihuo_mini.masking import mask_secrets, mask_url

from .conftest import SpiderFactory, store_of


class Spider(AsyncLoop):
    NAME = "hostile-input"

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("cache_backend", "memory")
        super().__init__(**kwargs)
        self.seen: list[Any] = []

    async def h(self, *args: Any) -> None:
        self.seen.append(args)

    async def leaky(self, url: str) -> None:
        raise RuntimeError(f"could not fetch {url}")


# -- options (item 10) -------------------------------------------------------------------

NUMERIC = sorted(name for name, opt in LOOP_OPTIONS.items() if opt.type in (int, float))


@pytest.mark.parametrize("name", NUMERIC)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, -1, 2**70])
def test_every_numeric_option_refuses_nan_infinity_negatives_and_huge_integers(name: str, value: float) -> None:
    if LOOP_OPTIONS[name].type is int and isinstance(value, float):
        value_ok_for_int = False
    else:
        value_ok_for_int = True
    with pytest.raises(ConfigError, match=name) as info:
        Spider(**{name: value})
    assert "Traceback" not in str(info.value)
    assert value_ok_for_int or "expected an integer" in str(info.value)


def test_heartbeat_interval_must_be_less_than_lease_timeout() -> None:
    with pytest.raises(ConfigError, match=r"heartbeat_interval .* lease_timeout"):
        Spider(heartbeat_interval=30, lease_timeout=30)
    Spider(heartbeat_interval=29, lease_timeout=30)


def test_a_config_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes('[loop]\n# caf\xe9\nconcurrency = 3\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match=f"{path}.*not UTF-8"):
        Spider(config_file=path)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["start", "--idle-exit", "nan"], "idle_exit"),
        (["start", "--idle-exit", "-1"], "idle_exit"),
        (["start", "-c", str(2**70)], "concurrency"),
        (["start", "-c", "0"], "concurrency"),
    ],
)
def test_bad_command_line_numbers_are_clear_errors(
    args: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_spider_cli(Spider(), args) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err and "Traceback" not in err


def test_serve_refuses_a_nan_idle_exit() -> None:
    with pytest.raises(ConfigError, match="idle_exit"):
        asyncio.run(Spider().serve(idle_exit=math.nan))


# -- task size and decoding (items 14, 15) ------------------------------------------------


def test_a_task_over_max_task_size_is_refused_at_add_task() -> None:
    loop = Spider(max_task_size=1024)
    with pytest.raises(TaskTooLarge, match="max_task_size"):
        loop.add_task("h", "x" * 2000)
    assert isinstance(TaskTooLarge("x"), ValueError)
    loop.add_task("h", "x" * 900)
    loop.close()


async def test_hostile_queue_entries_become_dead_letters_and_the_loop_goes_on(memory_spiders: SpiderFactory) -> None:
    loop = memory_spiders(Spider, max_task_size=64 * 1024, max_retries=0)
    item_marker = msgpack.ExtType(1, b"")
    bombs = {
        "too large": b"\x01" + msgpack.packb(["h", None, [[[]] * 100_000]]),  # 100 KB of tiny arrays
        "many containers": b"\x01" + msgpack.packb(["h", None, [[[]] * (MAX_CONTAINERS + 5)]])[:60_000],
        "marker in a map": b"\x01" + msgpack.packb(["h", None, [{"a": item_marker}]]),
        "marker in a list": b"\x01" + msgpack.packb(["h", None, [[1, item_marker]]]),
        "bytes key": b"\x01" + msgpack.packb(["h", None, [{b"k": 1}]], use_bin_type=True),
        "deep": b"\x01\x93\xa1h\xc0" + b"\x91" * 5000 + b"\x90",
    }
    async with store_of(loop) as store:
        await store.queue.push([NewTask(p) for p in bombs.values()])
        loop.add_task("h", "good")
        await loop.flush()
        summary = await asyncio.wait_for(loop.serve(idle_exit=0), 30)
        assert loop.seen == [("good",)], "the good task ran, nothing hostile reached a handler"
        letters = await store.dead_letters(20)
    assert summary.buried == len(bombs) - 1 or summary.buried == len(bombs)
    reasons = " | ".join(letter.error for letter in letters)
    assert "over max_task_size" in reasons
    assert "Item marker outside an Item" in reasons
    assert "map key of type bytes" in reasons
    assert "nested too deeply" in reasons, reasons


def test_decode_errors_always_have_a_reason() -> None:
    for payload in (b"\x01\x93\xa1h\xc0" + b"\x91" * 5000 + b"\x90", b"\x01\xc1", b"\x01", b"\x02abc"):
        with pytest.raises(DecodeError) as info:
            decode_task(payload)
        assert str(info.value).split(":")[-1].strip(), f"empty reason for {payload[:10]!r}"


# -- strings (item 19) ----------------------------------------------------------------------


def test_a_hostile_charset_cannot_put_lone_surrogates_in_text() -> None:
    for label in ("unicode-escape", "unicode_escape", "raw-unicode-escape", "utf-7", "rot13", "hex", "punycode"):
        body = f"<meta charset={label}>\\udcff +2D3- caf\xe9".encode("latin-1")
        text = decode_body(body)
        text.encode("utf-8")  # no lone surrogate: it encodes
    assert decode_body(b"caf\xc3\xa9", "utf-8") == "caf\xe9"


def test_unencodable_strings_raise_encode_error_naming_where() -> None:
    loop = Spider()
    with pytest.raises(EncodeError, match=r"args\[0\]\['k'\]"):
        loop.add_task("h", {"k": "bad \udcff"})
    with pytest.raises(EncodeError, match="task_name"):
        loop.add_task("h", "ok", task_name="bad \udcff")
    with pytest.raises(EncodeError, match="task_done"):
        loop.task_done("bad \udcff")
    with pytest.raises(EncodeError, match="uncache_task"):
        loop.uncache_task("bad \udcff")
    loop.close()


# -- secrets (item 18) ----------------------------------------------------------------------


@pytest.mark.parametrize("password", ["pa#ss", "pa/ss", "pa?ss", "p@ss", "s3cr3t"])
def test_passwords_with_url_delimiters_are_masked(password: str) -> None:
    url = f"redis://:{password}@10.0.0.5:6379/0"
    for text in (mask_url(url), mask_secrets(f"cannot connect to {url}: refused")):
        assert password not in text and "***" in text


def test_a_wrongly_typed_url_is_not_echoed_with_its_password(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[queue]\nbackend = "redis"\nurl = ["redis://:hunter2@h:6379/0"]\n')
    with pytest.raises(ConfigError) as info:
        Spider(config_file=path)
    assert "hunter2" not in str(info.value) and "'url'" in str(info.value)


def test_settings_repr_masks_the_url(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[queue]\nbackend = "redis"\nurl = "redis://:hunter2@h:6379/0"\n[done]\nbackend = "memory"\n'
                    "[loop]\nallow_local = true\n")  # fmt: skip
    loop = Spider(config_file=path)
    assert "hunter2" not in repr(loop.settings) and "hunter2" not in str(loop.settings)


async def test_query_string_secrets_never_reach_logs_or_dead_letters(
    memory_spiders: SpiderFactory, caplog: pytest.LogCaptureFixture
) -> None:
    loop = memory_spiders(Spider, max_retries=0)
    url = "https://api.example.test/v1?password=hunter2&token=t0ken&api_key=k3y&key=s3cret&page=2"
    loop.add_task("leaky", url, task_name=url)
    await loop.serve(idle_exit=0)
    async with store_of(loop) as store:
        (letter,) = await store.dead_letters(5)
    for secret in ("hunter2", "t0ken", "k3y", "s3cret"):
        assert secret not in letter.error and secret not in caplog.text
    assert "page=2" in letter.error


# -- status (item 16) -----------------------------------------------------------------------


@pytest.mark.processes
def test_status_escapes_control_characters_from_the_registry(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'[queue]\nbackend = "sqlite"\npath = "{tmp_path / "s.sqlite3"}"\n'
                      f'[done]\nbackend = "sqlite"\npath = "{tmp_path / "s.sqlite3"}"\n')  # fmt: skip
    name = f"escapes-{uuid.uuid4().hex[:8]}"
    cls = type("Spider", (Spider,), {"NAME": name})

    async def register() -> None:
        async with store_of(cls(config_file=config)) as store:
            assert store.registry is not None
            info = {"host": "evil\x1b[2J\x1b]0;pwned\x07", "pid": "1\r\n", "rate": "fast", "state": "\u202eevil"}
            await store.registry.register("w-evil", "slave", info, 3600)

    asyncio.run(register())
    for args in (["status"], ["status", "--json"]):
        command = [sys.executable, "-m", "achihuo_mini", *args, name, "--config", str(config)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert "\x1b" not in done.stdout and "\x07" not in done.stdout and "\u202e" not in done.stdout
        assert "s1" in done.stdout
    data = json.loads(done.stdout)
    (row,) = data["workers"]
    assert row["pid"] is None and row["rate"] is None, "fields of the wrong type are not shown"


# -- folders (item 20) ----------------------------------------------------------------------


def test_private_dir_makes_every_level_0700_under_umask_0(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        leaf = private_dir(tmp_path / "a" / "b" / "c")
    finally:
        os.umask(old)
    for folder in (tmp_path / "a", tmp_path / "a" / "b", leaf):
        assert oct(folder.stat().st_mode & 0o777) == oct(0o700), folder
