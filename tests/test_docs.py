"""The plugin guide documents every hook with its real signature."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from achihuo_mini import plugins

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "plugins.md"


def test_every_hook_is_documented_with_its_signature() -> None:
    text = GUIDE.read_text()
    hooks = [name for name in dir(plugins._HookSpecs) if name.startswith("achihuo_")]
    assert hooks, "no hook specifications found"
    for name in hooks:
        sig = inspect.signature(getattr(plugins._HookSpecs, name))
        params = [p for p in sig.parameters.values() if p.name != "self"]
        rendered = ", ".join(f"{p.name}: {p.annotation}" for p in params)
        expected = f"{name}({rendered}) -> {sig.return_annotation}"
        assert expected in text, f"docs/plugins.md must document `{expected}`"


def test_entry_point_group_in_guide_matches() -> None:
    assert f"[project.entry-points.{plugins.ENTRY_POINT_GROUP}]" in GUIDE.read_text()


def test_every_protocol_method_is_in_the_guide() -> None:
    from achihuo_mini.backend import (
        DoneSetBackend,
        ExpiringDoneSet,
        HostSlots,
        Notifier,
        QueueBackend,
        WorkerRegistry,
    )

    text = GUIDE.read_text()
    for proto in (QueueBackend, DoneSetBackend, WorkerRegistry, Notifier, HostSlots, ExpiringDoneSet):
        for name, member in vars(proto).items():
            if callable(member) and not name.startswith("_"):
                assert re.search(rf"`{name}\(", text), f"{proto.__name__}.{name} is not in docs/plugins.md"
