"""The sdist and the wheel hold what they must: the sdist can run its own tests, the wheel has its data files."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.processes

SKIP = shutil.ignore_patterns(".git", ".venv", ".tox", "__pycache__", "*.egg-info", "build", "dist", ".*_cache",
                              "*.sqlite3", "*.sqlite3-*")  # fmt: skip


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], list[str], str]:
    """(sdist member names, wheel member names, wheel METADATA), built from a copy of the source tree."""
    tmp = tmp_path_factory.mktemp("packaging")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=SKIP)
    out = tmp / "dist"
    done = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--sdist", "--wheel", "--outdir", str(out), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    (sdist,) = out.glob("*.tar.gz")
    (wheel,) = out.glob("*.whl")
    with tarfile.open(sdist) as tar:
        sdist_names = [name.split("/", 1)[1] for name in tar.getnames() if "/" in name]
    with zipfile.ZipFile(wheel) as z:
        wheel_names = z.namelist()
        metadata = z.read(next(n for n in wheel_names if n.endswith(".dist-info/METADATA"))).decode()
    return sdist_names, wheel_names, metadata


def test_the_sdist_carries_what_its_tests_need(built: tuple[list[str], list[str], str]) -> None:
    names = set(built[0])
    for needed in (
        "LICENSE",
        "README.md",
        "tox.ini",
        "pyproject.toml",
        "tests/conftest.py",
        "tests/procs/crash_spider.py",
        "tests/http_site/__init__.py",
        "tests/test_packaging.py",
        "examples/demo_site.py",
        "examples/demo_crawl.py",
        "examples/achihuo_filestore/pyproject.toml",
        "benchmarks/crawl.py",
        "docs/plugins.md",
        "achihuo_mini_backends/redis_backend/lua/commit.lua",
        "achihuo_mini_backends/sqlite/schema.sql",
    ):
        assert needed in names, f"{needed} is missing from the sdist"
    assert not [n for n in names if "__pycache__" in n or n.endswith((".pyc", ".sqlite3"))]


def test_the_wheel_has_its_data_files_license_and_metadata(built: tuple[list[str], list[str], str]) -> None:
    names = set(built[1])
    for needed in (
        "achihuo_mini/py.typed",
        "achihuo_mini_backends/py.typed",
        "achihuo_mini_backends/sqlite/schema.sql",
        "achihuo_mini_backends/redis_backend/lua/lib.lua",
    ):
        assert needed in names, f"{needed} is missing from the wheel"
    web = {Path(n).name for n in names if n.startswith("achihuo_mini/web/")}
    assert web == {p.name for p in (ROOT / "achihuo_mini/web").iterdir()}, "the status page needs all its files"
    lua = {Path(n).name for n in names if n.endswith(".lua")}
    assert lua == {p.name for p in (ROOT / "achihuo_mini_backends/redis_backend/lua").glob("*.lua")}
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert not [n for n in names if n.startswith(("tests/", "examples/", "benchmarks/"))], "code only"
    metadata = built[2]
    assert "License-Expression: MIT" in metadata
    assert "Classifier: Programming Language :: Python :: 3.13" in metadata
    assert "Project-URL: Homepage, " in metadata
    assert "Requires-Python: >=3.11" in metadata
