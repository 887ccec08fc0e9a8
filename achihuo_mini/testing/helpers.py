"""Small helpers of the contract suite (and of tests that use it)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest

__all__ = ["wait_until"]


async def wait_until(
    predicate: Callable[[], Awaitable[bool]],
    timeout: float = 10.0,
    interval: float = 0.01,
    describe: Callable[[], str] | None = None,
) -> None:
    """Poll an async predicate until it is true; fail the test after ``timeout`` seconds
    (with ``describe()`` in the message: logs that explain why)."""
    deadline = time.monotonic() + timeout
    while True:
        if await predicate():
            return
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout} s" + (f"\n{describe()}" if describe else ""))
        await asyncio.sleep(interval)
