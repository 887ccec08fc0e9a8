"""Canonical task names for URLs: :func:`canonical_url`.

Five spellings of one page (``#top``, ``HTTP://``, ``/p/../p/1.html``, a trailing ``?``,
the plain one) are one task name once canonical, so ``repeat=False`` fetches the page
once. The work is w3lib's ``canonicalize_url`` (the function Scrapy's request
fingerprints use), imported on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["canonical_url", "is_http_url"]

_canonicalize: Any = None


def canonical_url(url: str) -> str:
    """``url`` in one canonical spelling (w3lib's ``canonicalize_url``).

    Lower-case scheme and host (IDNA for unicode hosts), dot segments resolved, the
    fragment dropped, an empty query dropped, query arguments sorted (blank ones kept),
    percent-encoding normalised (unreserved characters decoded, others upper-case
    UTF-8 escapes). A default port stays as written. Raises ``ValueError`` for a string
    that is not a URL it can read (``http://[::1``).
    """
    global _canonicalize
    if _canonicalize is None:
        from w3lib.url import canonicalize_url

        _canonicalize = canonicalize_url
    if not isinstance(url, str):
        raise TypeError(f"canonical_url: url must be a str, not {type(url).__name__}")
    try:
        return str(_canonicalize(url))
    except (ValueError, UnicodeError) as exc:
        raise ValueError(f"canonical_url: cannot read {url[:200]!r} as a URL: {exc}") from None


def is_http_url(name: str) -> bool:
    """Whether ``name`` starts with ``http://`` or ``https://`` (any case)."""
    head = name[:8].lower()
    return head.startswith("http://") or head == "https://"
