"""One masking policy for the whole project: no secret reaches a log, ``status`` or a dead letter.

:func:`mask_secrets` is applied to every free text the project writes out that may quote
user data (task names, handler errors, tracebacks, URLs, config errors, ``repr`` of the
settings); :func:`mask_url` to a single URL value. What is masked, by ``***``:

- the password of a URL's user info (``redis://:pw@host``, ``http://user:pw@proxy``), and
  a lone user-info part (``https://token@host``), which is often a secret too. A password
  holding ``#``, ``/``, ``?`` or ``@`` is still masked whole: a URL whose user info runs
  past such a character is read up to its last ``@``.
- query and form values whose name says secret: ``password``, ``passwd``, ``pwd``,
  ``secret``, ``token`` (``access_token``, ``csrf_token`` …), ``key``, ``api_key``,
  ``apikey``, ``auth``, ``signature``, ``sig``, ``session``/``sessionid``, ``credential``.
- header-like fields ``Authorization``, ``Proxy-Authorization``, ``Cookie``,
  ``Set-Cookie``, ``X-Api-Key``, and ``password: …``/``'password': '…'`` pairs (as a
  ``repr`` of options shows them).
"""

from __future__ import annotations

import re

__all__ = ["MASK", "mask_secrets", "mask_url", "mask_url_value", "mask_values"]

MASK = "***"

# scheme://, then a run without white space or quotes that holds an '@'
_URL_WITH_AT = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)([^\s'\"<>]*@)")
_HOST_PORT_PATH = re.compile(r"^[A-Za-z0-9_.\-]+:\d+[/?#]")

_SECRET_WORDS = (
    r"pass(?:word|wd)?|pwd|secret|[a-z_\-]*token|(?:api|access|secret|private)?[_\-]?key|apikey|auth|"
    r"signature|sig|session(?:_?id)?|sid|credentials?"
)
_SECRET_QUERY = re.compile(rf"(?i)(?<![A-Za-z0-9_\-])((?:{_SECRET_WORDS})=)([^&\s#'\"<>;,]+)")
_SECRET_FIELD = re.compile(
    r"(?i)\b(proxy-authorization|authorization|set-cookie|cookie|x-api-key)(['\"]?\s*[:=]\s*['\"]?)([^'\"\r\n]+)"
    r"|\b(password|passwd|secret|token)(['\"]?\s*:\s*['\"]?)([^'\"\r\n,}]+)"
)


def _mask_userinfo(match: re.Match[str]) -> str:
    scheme, rest = match.group(1), match.group(2)  # ``rest`` runs up to the last '@' of the URL
    # the authority as a parser reads it: up to the first '/', '?' or '#'
    end = min((i for i in (rest.find(sep) for sep in "/?#") if i != -1), default=len(rest))
    at = rest.rfind("@", 0, end)
    if at != -1:
        userinfo, after = rest[:at], rest[at + 1 :]
    else:
        # an '@' only past a '/', '?' or '#': a password holding one of those, or an '@' in a path
        userinfo, after = rest[:-1], ""
        if ":" not in userinfo or _HOST_PORT_PATH.match(userinfo):
            return match.group(0)  # 'https://medium.com/@user', 'http://host:80/@x': a path, not user info
    user, colon, _ = userinfo.partition(":")
    return f"{scheme}{user}:{MASK}@{after}" if colon else f"{scheme}{MASK}@{after}"


def mask_url(url: str) -> str:
    """``url`` (or any text) with the passwords of URL user info replaced by ``***``."""
    return _URL_WITH_AT.sub(_mask_userinfo, url)


def mask_url_value(value: str) -> str:
    """One URL that is a whole value (a config option), not free text: its user info runs up to
    its last ``@``, whatever it holds (quotes, ``<``, spaces: characters that end a URL in free
    text), and its password is masked; then :func:`mask_secrets` (secret query values)."""
    scheme, sep, rest = value.partition("://")
    if sep and "@" in rest and re.fullmatch(r"[A-Za-z][A-Za-z0-9+.\-]*", scheme):
        userinfo, _, hosts = rest.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        value = f"{scheme}://{user}:{MASK}@{hosts}" if colon else f"{scheme}://{MASK}@{hosts}"
    return mask_secrets(value)


def mask_values(value: object) -> object:
    """``value`` with every string in it (in dicts, lists and tuples) that is a URL masked as
    :func:`mask_url_value` does: for a ``repr`` of options."""
    if isinstance(value, str):
        return mask_url_value(value) if "://" in value else value
    if isinstance(value, dict):
        return {k: mask_values(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(mask_values(v) for v in value)
    return value


def mask_secrets(text: str) -> str:
    """``text`` with URL passwords, secret query values and secret header-like fields as ``***``."""
    if not text:
        return text
    text = mask_url(text)
    text = _SECRET_QUERY.sub(rf"\1{MASK}", text)
    return _SECRET_FIELD.sub(_mask_field, text)


def _mask_field(match: re.Match[str]) -> str:
    name, sep = (match.group(1), match.group(2)) if match.group(1) else (match.group(4), match.group(5))
    return f"{name}{sep}{MASK}"
