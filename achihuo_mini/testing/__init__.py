"""Test helpers for achihuo_mini users and backend plugin authors.

:class:`BackendContract` is the backend contract suite: inherit it in a test module,
provide ``backend_name`` (and ``backend_options``) fixtures, and pytest runs every
contract test against your backend. See ``docs/plugins.md``.
"""

from .contract import BackendContract, Backends, wait_until

__all__ = ["BackendContract", "Backends", "wait_until"]
