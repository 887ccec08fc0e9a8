"""A newcomer's first hour: the command line's traps, silent re-runs, failures worth reading.

Process tests run tests/procs/plain_spider.py (a spider as the README writes it, ``debug``
left at its default) and the ``achihuo`` script as real processes; the rest drive a loop in
this process against real backends and a real local HTTP site.
"""

from __future__ import annotations

import asyncio
import configparser
import logging
import os
import shutil
import subprocess
import sys
import typing
import uuid
from pathlib import Path
from typing import Any

import pytest

import achihuo_mini
from achihuo_mini import AsyncLoop, ConfigError, HandlerError, InvalidRequest, Item, Reject, Response
from achihuo_mini.backend import NewTask
from achihuo_mini.codec import encode_task
from achihuo_mini_backends.memory import drop_namespace

from .conftest import SpiderFactory, store_of, write_backend_config
from .http_site import Site

ROOT = Path(__file__).resolve().parent.parent
PLAIN = Path(__file__).parent / "procs" / "plain_spider.py"


def achihuo_exe() -> str:
    exe = shutil.which("achihuo", path=os.path.dirname(sys.executable))
    assert exe, "the achihuo console script is installed with the package"
    return exe


def spider(name: str, *args: str, **env: Any) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "SPIDER_NAME": name, **{k: str(v) for k, v in env.items()}}
    return subprocess.run([sys.executable, str(PLAIN), *args], env=full, capture_output=True, text=True, timeout=120)


def achihuo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([achihuo_exe(), *args], capture_output=True, text=True, timeout=120)


def data_files() -> list[Path]:
    return sorted(Path(os.environ["XDG_DATA_HOME"]).rglob("*.sqlite3"))


@pytest.fixture
def name() -> str:
    return f"newcomer-{uuid.uuid4().hex[:8]}"


# -- the spider's command line ------------------------------------------------------------


@pytest.mark.processes
def test_every_subcommand_takes_backend_and_config_as_start_does(name: str, tmp_path: Path, redis_url: str) -> None:
    """A crawl started with --backend (or --config) is seen by status, dead, stop and clear given the same."""
    run = spider(name, "start", "--backend", "sqlite", "--idle-exit", "0", CACHE_BACKEND="memory", TASKS=3)
    assert run.returncode == 0, run.stderr
    shown = spider(name, "status", "--backend", "sqlite", "--json", CACHE_BACKEND="memory")
    assert shown.returncode == 0, shown.stderr
    assert '"count": 3' in shown.stdout
    unseen = spider(name, "status", CACHE_BACKEND="memory")  # the spider's own default: nothing there
    assert unseen.returncode == 1 and "no data for loop" in unseen.stderr
    for args in (("dead",), ("stop", "m1"), ("clear", "all", "--yes")):
        done = spider(name, *args, "--backend", "sqlite", CACHE_BACKEND="memory")
        assert "unrecognized arguments" not in done.stderr, args
    assert spider(name, "status", "--backend", "sqlite", CACHE_BACKEND="memory").returncode == 1, "cleared"

    config = write_backend_config(tmp_path / "redis.toml", "redis", {"url": redis_url})
    try:
        run = spider(name, "start", "--config", str(config), "--idle-exit", "0", TASKS=2, FAIL="all")
        assert run.returncode == 0, run.stderr
        for args in (("status",), ("dead",)):
            done = spider(name, *args, "--config", str(config))
            assert done.returncode == 0 and "no data" not in done.stderr, (args, done.stderr)
        assert "page(" in spider(name, "dead", "--config", str(config)).stdout
    finally:
        spider(name, "clear", "--config", str(config), "--yes")


@pytest.mark.processes
def test_commands_that_read_never_create_data(name: str, tmp_path: Path, redis_url: str) -> None:
    before = data_files()
    for done in (achihuo("status", name), spider(name, "status"), spider(name, "dead"), spider(name, "stop", "m1")):
        assert done.returncode == 1, done.stdout + done.stderr
        assert f"no data for loop '{name}' at " in done.stderr and "achihuo loops" in done.stderr
        assert "Traceback" not in done.stderr
    assert data_files() == before, "no SQLite file was created"
    cleared = spider(name, "clear", "--yes")
    assert cleared.returncode == 0 and "nothing to clear" in cleared.stdout
    assert data_files() == before

    config = write_backend_config(tmp_path / "redis.toml", "redis", {"url": redis_url})
    missing = achihuo("status", name, "--config", str(config))
    assert missing.returncode == 1 and "no data for loop" in missing.stderr
    assert f"achihuo loops --config {config}" in missing.stderr


@pytest.mark.processes
def test_dead_honours_limit_and_shows_one_letter_whole(name: str) -> None:
    run = spider(name, "start", "--idle-exit", "0", TASKS=5, FAIL="all")
    assert run.returncode == 0, run.stderr
    listing = spider(name, "dead", "--limit", "2")
    lines = [line for line in listing.stdout.splitlines() if "page(" in line]
    assert len(lines) == 2 and "3 more" in listing.stdout
    first_id = lines[0].split()[0]

    requeued = spider(name, "dead", "--requeue", "--limit", "2")
    assert requeued.stdout.strip() == "requeued 2 dead letters"
    status = spider(name, "status")
    assert "ready 2" in status.stdout and "dead 3" in status.stdout, status.stdout

    remaining = spider(name, "dead").stdout.split()[0]
    shown = spider(name, "dead", "--show", remaining)
    assert shown.returncode == 0, shown.stderr
    assert f"dead letter {remaining}: page('page" in shown.stdout
    assert "args:     [" in shown.stdout and "failures: 4" in shown.stdout
    assert "ValueError: page" in shown.stdout and "Traceback (most recent call last)" in shown.stdout
    assert 'plain_spider.py", line' in shown.stdout, "the handler's own frame is kept"
    gone = spider(name, "dead", "--show", first_id)
    assert gone.returncode == 1 and f"no dead letter {first_id}" in gone.stderr


@pytest.mark.processes
def test_commands_other_than_start_log_at_warning(name: str, tmp_path: Path, redis_url: str) -> None:
    """The spider keeps debug=True (the default), and the Redis backend logs at DEBUG when it
    opens: start shows that line, status and dead do not -- unless --log-level asks."""
    config = write_backend_config(tmp_path / "redis.toml", "redis", {"url": redis_url})
    try:
        run = spider(name, "start", "--config", str(config), "--idle-exit", "0", TASKS=2)
        assert run.returncode == 0 and " DEBUG " in run.stderr and "open: Redis" in run.stderr
        for args in (("status",), ("dead",), ("status", "--json")):
            done = spider(name, *args, "--config", str(config))
            assert done.returncode == 0 and done.stderr == "", (args, done.stderr)
        loud = spider(name, "status", "--config", str(config), "--log-level", "DEBUG")
        assert loud.returncode == 0 and "open: Redis" in loud.stderr, "--log-level still turns it on"
    finally:
        spider(name, "clear", "--config", str(config), "--yes")


@pytest.mark.processes
def test_version_on_both_command_lines(name: str) -> None:
    for done in (achihuo("--version"), spider(name, "--version")):
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == f"achihuo_mini {achihuo_mini.__version__}"


@pytest.mark.processes
def test_a_rerun_says_why_nothing_happens(name: str) -> None:
    first = spider(name, "start", "--idle-exit", "0", TASKS=3)
    assert first.returncode == 0, first.stderr
    assert "tasks: 3 offered, 3 added, 0 skipped" in first.stderr
    again = spider(name, "start", "--idle-exit", "0", TASKS=3)
    assert again.returncode == 0, again.stderr
    assert "the loop holds 0 ready, 0 delayed, 0 leased tasks, 0 dead letters and 3 done names" in again.stderr
    assert "tasks: 3 offered, 0 added, 3 skipped as done or already queued" in again.stderr
    assert "nothing ran: run() and other adds outside handlers offered 3 tasks" in again.stderr
    assert "(the done set holds 3 names): `clear done` to crawl again" in again.stderr

    broken = f"{name}-b"
    spider(broken, "start", "--idle-exit", "0", TASKS=2, FAIL="all")
    rerun = spider(broken, "start", "--idle-exit", "0", TASKS=2, FAIL="all")
    assert "2 dead letters from earlier runs: `dead` lists them" in rerun.stderr
    assert "4 dead letters in the loop, 2 new in this run" in rerun.stderr


@pytest.mark.processes
def test_a_keyword_argument_hiding_a_config_value_is_a_warning(name: str, tmp_path: Path) -> None:
    config = tmp_path / "crawl.toml"
    config.write_text("[loop]\nconcurrency = 32\n")
    run = spider(name, "start", "--config", str(config), "--idle-exit", "0", CONCURRENCY=10)
    assert run.returncode == 0, run.stderr
    assert "starting as master, concurrency 10" in run.stderr, "the keyword argument still wins"
    (warning,) = [line for line in run.stderr.splitlines() if "hides" in line]
    assert " WARNING " in warning and "concurrency=10" in warning and "concurrency = 32" in warning
    assert str(config) in warning
    quiet = spider(name, "start", "--config", str(config), "--idle-exit", "0")
    assert "hides" not in quiet.stderr and "concurrency 32" in quiet.stderr
    cli_wins = spider(name, "start", "--config", str(config), "-c", "5", "--idle-exit", "0", CONCURRENCY=10)
    assert "concurrency 5" in cli_wins.stderr


def test_the_shipped_two_machine_config_is_not_silently_beaten() -> None:
    text = (ROOT / "examples" / "two_machines" / "crawl.toml").read_text()
    active = [line.split("#")[0].strip() for line in text.splitlines()]
    assert "concurrency = 32" not in active, "the seed spider's concurrency=10 would hide it"


@pytest.mark.processes
def test_require_durable_accepts_the_sqlite_default(name: str, tmp_path: Path) -> None:
    config = tmp_path / "durable.toml"
    config.write_text("[loop]\nrequire_durable = true\n")
    run = spider(name, "start", "--config", str(config), "--idle-exit", "0")
    assert run.returncode == 0, run.stderr
    assert "(durability: always)" in run.stderr
    assert "(durability: always)" in spider(name, "status").stdout


# -- failures worth reading ---------------------------------------------------------------


class Failing(AsyncLoop):
    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("retry_delay", 0.01)
        kwargs.setdefault("progress_interval", 0)
        super().__init__(**kwargs)
        self.calls: dict[str, int] = {}

    def _count(self, what: str) -> None:
        self.calls[what] = self.calls.get(what, 0) + 1

    async def flaky(self) -> None:
        self._count("flaky")
        raise KeyError("always missing")

    async def rejects(self) -> None:
        self._count("rejects")
        raise Reject("the page is gone for good")

    async def fetch(self, item: Item) -> None:
        self._count("fetch")
        await self.async_web_request(item)

    async def two(self, a: int, b: int) -> None:
        self._count("two")

    async def bad_child(self) -> None:
        self._count("bad_child")
        self.add_task("two", 1)  # one argument short: the handler itself is wrong


async def dead(loop: AsyncLoop) -> list[Any]:
    async with store_of(loop) as store:
        return await store.dead_letters(100)


async def test_the_traceback_is_logged_once_when_a_task_becomes_a_dead_letter(
    spiders: SpiderFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="achihuo_mini")
    loop = spiders(Failing, max_retries=2)
    loop.add_task("flaky", task_name="f")
    summary = await asyncio.wait_for(loop.serve(idle_exit=0), 30)
    assert loop.calls == {"flaky": 3} and summary.buried == 1
    tracebacks = [r for r in caplog.records if "Traceback (most recent call last)" in r.getMessage()]
    assert len(tracebacks) == 1, "once, at the dead letter; never per retry"
    (record,) = tracebacks
    assert record.levelno >= logging.WARNING and "now a dead letter (failed 3 times)" in record.getMessage()
    assert "in flaky" in record.getMessage()
    (letter,) = await dead(loop)
    assert letter.error.startswith("KeyError: 'always missing'")
    assert "Traceback (most recent call last)" in letter.error and "in flaky" in letter.error


async def test_failures_no_retry_can_mend_are_buried_at_once(spiders: SpiderFactory, site: Site) -> None:
    loop = spiders(Failing, max_retries=3)
    loop.add_task("rejects", task_name="r")
    loop.add_task("fetch", Item(url="ftp://example.invalid/file"), task_name="ftp")
    loop.add_task("fetch", Item(url="http://[::1/broken"), task_name="unparsable")
    loop.add_task("fetch", Item(method="GET"), task_name="no-url")
    loop.add_task("bad_child", task_name="child")
    async with store_of(loop) as store:  # a task whose arguments do not fit (written by an older version)
        await store.queue.push([NewTask(encode_task("two", "unfit", [1, 2, 3]))])
    summary = await asyncio.wait_for(loop.serve(idle_exit=0), 30)
    assert loop.calls == {"rejects": 1, "fetch": 3, "bad_child": 1}, "no retry was spent on any of them"
    assert summary.buried == 6 and summary.retried == 0
    errors = sorted(letter.error.split("\n")[0] for letter in await dead(loop))
    assert any(e.startswith("achihuo_mini.errors.Reject: the page is gone for good") for e in errors), errors
    assert any("not an http(s) URL (scheme 'ftp')" in e for e in errors), errors
    assert any("does not parse" in e for e in errors), errors
    assert any("the item has no url" in e for e in errors), errors
    assert any(e.startswith("the arguments do not fit handler 'two': TypeError") for e in errors), errors
    assert any("HandlerError" in e and "takes 2 arguments after self, got 1" in e for e in errors), errors
    assert site.hits == {}, "nothing reached a server"


@pytest.mark.parametrize(("tries", "retries", "requests"), [(3, 1, 6), (1, 1, 2), (1, 3, 4), (2, 0, 2)])
async def test_request_tries_and_task_retries_multiply_and_request_tries_1_leaves_one_bound(
    memory_spiders: SpiderFactory, site: Site, tries: int, retries: int, requests: int, monkeypatch: Any
) -> None:
    from achihuo_mini import http

    monkeypatch.setattr(http, "BACKOFF_BASE", 0.001)
    loop = memory_spiders(Failing, request_tries=tries, max_retries=retries)
    loop.add_task("fetch", Item(url=f"{site.url}status/perm?code=500"), task_name="p")
    summary = await asyncio.wait_for(loop.serve(idle_exit=0), 30)
    assert site.hits["perm"] == requests, "max_retry x (max_retries + 1) requests in all"
    assert summary.buried == 1


# -- the earliest, clearest message -------------------------------------------------------


def test_a_missing_super_init_says_what_to_add() -> None:
    class Forgot(AsyncLoop):
        NAME = "forgot"

        def __init__(self) -> None:
            self.start_url = "http://example.invalid/"

        async def page(self) -> None:
            pass

    loop = Forgot()
    with pytest.raises(ConfigError, match=r"Forgot.__init__ did not call super\(\).__init__\(\)"):
        loop.add_task("page")
    with pytest.raises(ConfigError, match="super"):
        loop.start(["status"])
    with pytest.raises(AttributeError):
        loop.no_such_thing  # noqa: B018 -- other missing attributes stay AttributeErrors
    assert not hasattr(loop, "no_such_thing")


def test_a_plain_run_method_is_refused_at_construction() -> None:
    class PlainRun(AsyncLoop):
        NAME = "plain-run"

        def run(self) -> None:  # type: ignore[override]
            pass

    with pytest.raises(ConfigError, match=r"PlainRun.run must be a coroutine function: write `async def run"):
        PlainRun(cache_backend="memory")


def test_add_task_checks_the_number_of_arguments_against_the_handler() -> None:
    class Arity(AsyncLoop):
        NAME = "arity"
        HANDLER_ALIASES = {"old": "page"}

        async def page(self, item: Item, depth: int = 0) -> None:
            pass

        async def anything(self, *args: Any) -> None:
            pass

        async def keyword(self, item: Item, *, strict: bool) -> None:
            pass

        def plain(self, item: Item) -> None:
            pass

    loop = Arity(cache_backend="memory")
    try:
        loop.add_task("page", Item(url="u"))
        loop.add_task("page", Item(url="u"), 1)
        loop.add_task("old", Item(url="u"))
        loop.add_task("anything", 1, 2, 3, 4)
        with pytest.raises(HandlerError, match=r"page\(item: 'Item', depth: 'int' = 0\) takes 1 to 2 arguments"):
            loop.add_task("page")
        with pytest.raises(HandlerError, match="got 3"):
            loop.add_task("old", 1, 2, 3)
        with pytest.raises(HandlerError, match="keyword-only parameter without a default"):
            loop.add_task("keyword", Item(url="u"))
        with pytest.raises(HandlerError, match=r"'plain' is a plain method of Arity.*write `async def plain"):
            loop.add_task("plain", 1)
    finally:
        loop.close()  # the writer that add_task opened outside an event loop
        drop_namespace(loop.name)


# -- packaging and types --------------------------------------------------------------------


def test_tox_declares_a_test_env_for_each_supported_python() -> None:
    tox = configparser.ConfigParser()
    tox.read(ROOT / "tox.ini")
    envs = [e.strip() for e in tox["tox"]["env_list"].split(",")]
    assert {"py311", "py312", "py313"} <= set(envs)
    assert tox["tox"]["skip_missing_interpreters"] == "false", "a missing interpreter is named, never skipped"
    assert "pytest" in tox["testenv"]["commands"] and tox["testenv"]["extras"] == "test"
    pyproject = (ROOT / "pyproject.toml").read_text()
    for version in ("3.11", "3.12", "3.13"):
        assert f"Programming Language :: Python :: {version}" in pyproject


def test_async_web_request_is_typed() -> None:
    from achihuo_mini import async_loop

    # the annotation names the HTTP module's Response (imported for type checkers only, as
    # aiohttp is imported on the first request); .ci/run also runs mypy --strict on a spider
    hints = typing.get_type_hints(AsyncLoop.async_web_request, {**vars(async_loop), "Response": Response})
    assert hints["return"] is Response
    assert Response is achihuo_mini.http.Response
    assert issubclass(InvalidRequest, Reject) and issubclass(InvalidRequest, ValueError)


def test_the_readme_says_what_repeat_does_to_the_seed() -> None:
    readme = (ROOT / "README.md").read_text()
    spider_section = readme[readme.index("## A spider") : readme.index("### The API")]
    assert "`run()` runs at every master start" in spider_section
    assert "repeat=False" in spider_section and "task_done" in spider_section
    assert "never crawled twice" not in readme, "only repeat=False adds of a done name are skipped"
