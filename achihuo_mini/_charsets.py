"""Decoding fetched bodies as a browser would: declared charsets, then detection.

Only the encodings of the web are ever used (an allow-list: a hostile page cannot pick
``unicode_escape`` and write lone surrogates into ``Response.text``); undecodable bytes
become U+FFFD, so the text is always valid Unicode that ``add_task`` can store.
"""

from __future__ import annotations

import codecs
import functools
import itertools
import re
from collections import Counter

__all__ = ["decode", "decode_body", "detect_encoding"]


# Labels Python does not know, and the browser (WHATWG) mapping of those it does.
_LABELS = {
    "x-gbk": "gb18030",
    "x-x-big5": "big5hkscs",
    "x-sjis": "cp932",
    "windows-31j": "cp932",
    "x-euc-jp": "euc_jp",
    "unicode-1-1-utf-8": "utf-8",
    "x-user-defined": "cp1252",
}
_CANONICAL = {
    "gb2312": "gb18030",
    "gbk": "gb18030",
    "big5": "big5hkscs",
    "cp950": "big5hkscs",
    "iso8859-1": "cp1252",
    "ascii": "cp1252",
    "shift_jis": "cp932",
    "euc_kr": "cp949",
}
# an encoding, then the codecs tried strictly for it, in order
_FAMILY: dict[str, tuple[str, ...]] = {
    "big5hkscs": ("big5hkscs", "cp950"),
    "cp1252": ("cp1252", "latin-1"),
}
# Python codec names of the encodings of the web (WHATWG's list, and the labels of the
# pages this tool's users crawl): a page may pick among these and nothing else
_TEXT_ENCODINGS = frozenset(
    {"utf-8", "utf-16", "utf-16-le", "utf-16-be", "ascii", "latin-1", "iso8859-1", "cp1252", "cp866", "koi8-r",
     "koi8-u", "mac-roman", "mac-cyrillic", "cp874", "tis-620", "gb2312", "gbk", "gb18030", "big5", "big5hkscs",
     "cp950", "euc_jp", "iso2022_jp", "shift_jis", "cp932", "euc_kr", "cp949"}
    | {f"iso8859-{n}" for n in range(2, 17) if n != 12}
    | {f"cp{n}" for n in range(1250, 1259)}
)  # fmt: skip
_BOMS = ((codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"))
_META = re.compile(rb"""<meta\s[^>]*?charset\s*=\s*["']?\s*([A-Za-z0-9_.:\-]+)""", re.I)
_XML_DECL = re.compile(rb"""^\s*<\?xml\s[^>]*?encoding\s*=\s*["']([A-Za-z0-9_.:\-]+)""", re.I)
_PRESCAN = 16384  # bytes searched for a declaration
_SAMPLE = 65536  # bytes scored by detection
_CJK_CANDIDATES = ("gb18030", "big5hkscs")


def _normalise_encoding(label: str | None, *, from_meta: bool = False) -> str | None:
    """The codec to decode a page labelled ``label`` with, or None for an unknown or unsafe label."""
    if not label or not isinstance(label, str):  # an item's "encoding" may be anything
        return None
    return _normalise_label(label if type(label) is str else str(label), from_meta)


@functools.lru_cache(maxsize=256)  # bounded: labels come from pages, and nearly every page repeats a few
def _normalise_label(label: str, from_meta: bool) -> str | None:
    label = label.strip().strip("\"'").lower()
    label = _LABELS.get(label, label)
    try:
        info = codecs.lookup(label)
    except LookupError:
        return None
    name = info.name
    if name not in _TEXT_ENCODINGS:
        return None  # unicode_escape, rot13, utf-7 … would let a page write any text, lone surrogates too
    if from_meta and name.startswith("utf-16"):
        return "utf-8"  # a declaration readable as ASCII is not UTF-16 (as browsers decide)
    return _CANONICAL.get(name, name)


def _declared_in_body(content: bytes) -> str | None:
    head = content[:_PRESCAN]
    match = _XML_DECL.search(head) or _META.search(head)
    return match.group(1).decode("ascii", "replace") if match else None


def _decode_strict(content: bytes, encoding: str) -> str | None:
    for codec in _FAMILY.get(encoding, (encoding,)):
        try:
            return content.decode(codec)
        except UnicodeDecodeError:
            continue
    return None


def _decode_loose(content: bytes, encoding: str) -> str:
    text = _decode_strict(content, encoding)
    return text if text is not None else content.decode(_FAMILY.get(encoding, (encoding,))[0], errors="replace")


@functools.cache
def _common_chinese() -> frozenset[str]:
    """Frequent hanzi, simplified and traditional, read off the codecs themselves.

    GB2312 level 1 (rows B0-D7) holds the 3755 most used simplified characters; Big5's
    "frequent" block (A440-C67E) the 5401 most used traditional ones. Plus CJK punctuation.
    """
    chars: set[str] = set()
    for lead in range(0xB0, 0xD8):
        for trail in range(0xA1, 0xFF):
            chars.add(bytes((lead, trail)).decode("gb2312", errors="replace"))
    for lead in range(0xA4, 0xC7):
        for trail in itertools.chain(range(0x40, 0x7F), range(0xA1, 0xFF)):
            if (lead, trail) > (0xC6, 0x7E):
                break
            chars.add(bytes((lead, trail)).decode("big5", errors="replace"))
    # CJK punctuation: ideographic space to the black lenticular brackets, fullwidth punctuation,
    # fullwidth tilde, curly quotes, em dash, ellipsis, middle dot
    chars.update(map(chr, (*range(0x3000, 0x3012), *range(0xFF01, 0xFF20), 0xFF5E)))
    chars.update(map(chr, (0x2014, 0x2018, 0x2019, 0x201C, 0x201D, 0x2026, 0x00B7)))
    chars.discard("\ufffd")
    return frozenset(chars)


def _is_bad(char: str) -> bool:
    """Characters a right decoding rarely yields: replacement, private use, C1 controls."""
    o = ord(char)
    return o == 0xFFFD or 0xE000 <= o <= 0xF8FF or 0x80 <= o <= 0x9F or o >= 0xF0000


def _score_cjk(text: str) -> float:
    """Share of the non-ASCII characters that are frequent hanzi, minus 4 per bad one."""
    common = _common_chinese()
    good = bad = total = 0
    for char, n in Counter(text).items():
        if char < "\x80":
            continue
        total += n
        if char in common:
            good += n
        elif _is_bad(char):
            bad += n
    return (good - 4 * bad) / total if total else 0.0


# typographic marks of Latin text: no-break space, guillemets, copyright, degree, pound, and
# windows-1252's curly quotes, dashes, ellipsis, bullet, euro and trade mark
_LATIN_MARKS = frozenset(
    "\xa0\xab\xbb\xa9\xae\xb0\xa3\u2018\u2019\u201a\u201c\u201d\u201e\u2013\u2014\u2026\u2022\u20ac\u2122"
)
_NON_ASCII_RUN = re.compile(r"[^\x00-\x7f]{2,}")


def _score_latin(text: str) -> float:
    """For windows-1252: non-ASCII characters are letters standing alone between ASCII.

    CJK bytes read as windows-1252 form runs of symbols (the lead bytes of frequent
    Big5 and GB2312 characters are A4-D7: mostly symbols and capitals).
    """
    good = bad = total = 0
    for char, n in Counter(text).items():
        if char < "\x80":
            continue
        total += n
        if _is_bad(char):
            bad += n
        elif char.isalpha() or char in _LATIN_MARKS:
            good += n
    runs = sum(len(run) - 1 for run in _NON_ASCII_RUN.findall(text))
    return (good - 4 * bad - runs) / total if total else 0.0


def _plausible_utf8(text: str) -> bool:
    """Valid UTF-8 that is not GBK in disguise: a character beyond U+07FF, or one script only.

    Two GBK characters form valid 2-byte UTF-8 now and then (``未知`` reads as Greek
    and Hebrew); real text with only 2-byte sequences sticks to one script besides Latin.
    """
    scripts = set()
    for char in set(text):
        o = ord(char)
        if o >= 0x800:
            return True
        if o >= 0x370:
            scripts.add(o >> 7 if o >= 0x530 else o >> 8)  # Greek+Cyrillic blocks, then by 128
    return len(scripts) <= 1


def _detect(content: bytes, declared: list[str]) -> str:
    sample = content[:_SAMPLE]
    text: str | None
    try:
        text = sample.decode("utf-8")
    except UnicodeDecodeError as exc:
        text = None
        if len(content) > len(sample) and exc.start >= len(sample) - 3 and exc.reason == "unexpected end of data":
            text = sample[: exc.start].decode("utf-8")  # the sample ends inside a character
    if text is not None:
        if text.isascii() or _plausible_utf8(text):
            return "utf-8"
        gb = _decode_strict(sample, "gb18030")
        return "gb18030" if gb is not None and _score_cjk(gb) >= 0.999 else "utf-8"
    best, best_score = "", float("-inf")
    # declarations first (a declared page with a few bad bytes keeps its declaration), then
    # GB18030 before Big5 (the more common on ties), windows-1252 last: its label is many
    # servers' default, so it earns no preference
    candidates = [c for c in declared if c != "cp1252"]
    candidates += [c for c in (*_CJK_CANDIDATES, "cp1252") if c not in candidates]
    for encoding in candidates:
        decoded = _decode_loose(sample, encoding)
        score = _score_latin(decoded) if encoding == "cp1252" else _score_cjk(decoded)
        if encoding in declared and encoding != "cp1252":
            score += 0.05
        if score > best_score:
            best, best_score = encoding, score
    return best


def decode(content: bytes, header_charset: str | None = None, forced: str | None = None) -> tuple[str, str]:
    forced_encoding = _normalise_encoding(forced)
    if forced_encoding:
        return _decode_loose(content, forced_encoding), forced_encoding
    for bom, bom_encoding in _BOMS:
        if content.startswith(bom):
            return content[len(bom) :].decode(bom_encoding, errors="replace"), bom_encoding
    declared: list[str] = []
    for step in (0, 1):  # the header's charset; only if it fails, the body's declaration (a regex scan)
        label = (
            _normalise_encoding(header_charset)
            if step == 0
            else _normalise_encoding(_declared_in_body(content), from_meta=True)
        )
        if label and label not in declared:
            declared.append(label)
            text = _decode_strict(content, label)
            # ISO-8859-1 is many servers' default label and decodes anything: with non-ASCII
            # bytes it is only one candidate of the detection (a GBK or UTF-8 page behind it)
            if text is not None and (label != "cp1252" or text.isascii()):
                return text, label
    detected = _detect(content, declared)
    return _decode_loose(content, detected), detected


def detect_encoding(content: bytes, header_charset: str | None = None, forced: str | None = None) -> str:
    """The codec :func:`decode_body` decodes ``content`` with (for instance ``'gb18030'``)."""
    return decode(content, header_charset, forced)[1]


def decode_body(content: bytes, header_charset: str | None = None, forced: str | None = None) -> str:
    """Decode a body as a browser would, with detection where nothing is declared.

    Order: ``forced``; a byte-order mark; ``header_charset`` (the ``Content-Type``
    charset); a ``<meta charset>``, ``http-equiv`` or XML declaration in the first 16 KB.
    A declaration is used when the body decodes under it without error. Otherwise the
    body is detected: valid UTF-8 is UTF-8 (unless it reads as a few stray Greek/Hebrew
    letters that GBK bytes happen to form); else GB18030, Big5(-HKSCS), windows-1252 and
    the failed declarations are each decoded, and the one whose non-ASCII characters are
    most often frequent Chinese characters (derived from the GB2312 level-1 and Big5
    frequent blocks) and least often replacement/private-use characters wins. Big5 bytes
    read as GBK give kana, Greek, box drawing and rare characters; GBK read as Big5 gives
    undefined and rare characters; both lose to the right reading. Undecodable bytes
    become U+FFFD.
    """
    return decode(content, header_charset, forced)[0]
