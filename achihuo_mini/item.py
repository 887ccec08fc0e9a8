"""``Item``: a dict whose keys are also attributes.

>>> item = Item(dict(method='GET', url='http://example.test/'))
>>> item.url
'http://example.test/'
>>> item.proxy is None          # missing keys read as None
True
>>> item.depth = 2; item['depth']
2

Items are stored in task arguments without pickle: an ``Item`` comes back as an
``Item`` (nested ones too), with the same keys and values.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Item"]


class Item(dict[str, Any]):
    """A ``dict`` with attribute access; a missing key reads as ``None``."""

    __slots__ = ()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)  # keep copy/pickle/inspect protocols honest
        return self.get(name)

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __delattr__(self, name: str) -> None:
        try:
            del self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __repr__(self) -> str:
        return f"Item({dict.__repr__(self)})"

    def copy(self) -> Item:
        return Item(self)
