"""How an SMS text is encoded and split into segments (GSM 03.38 / UCS-2), and how to make it cheaper.

``analyze`` tells what a text costs: its encoding, its length in units (GSM-7 septets or UTF-16
code units), the number of segments and the segments themselves. A text whose every character is
in the GSM 03.38 default alphabet or its extension table is sent as GSM-7 (160 septets in one
segment, 153 per segment when concatenated; the extension characters ``^ { } \\ [ ~ ] | €`` and
form feed take two septets each). Anything else makes the whole text UCS-2 (70 code units in one
segment, 67 per segment when concatenated; characters outside the BMP take two). A segment never
ends between the two septets of an extension character or the two halves of a surrogate pair, so
a concatenated segment may hold 152 septets or 66 code units.

``smart_replace`` swaps typographic look-alikes (curly quotes, dashes, special spaces …) for their
GSM-7 equivalents; ``transliterate`` also writes Cyrillic in Latin letters; ``savings`` compares
the three.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "GSM7",
    "GSM_BASIC",
    "GSM_EXTENSION",
    "GSM_MULTI",
    "GSM_SINGLE",
    "UCS2",
    "UCS2_MULTI",
    "UCS2_SINGLE",
    "Analysis",
    "EncodingError",
    "EncodingInputError",
    "Savings",
    "analyze",
    "savings",
    "smart_replace",
    "transliterate",
]

GSM7 = "GSM-7"
UCS2 = "UCS-2"

GSM_SINGLE, GSM_MULTI = 160, 153
"""Septets in a single GSM-7 message, and in each part of a concatenated one."""
UCS2_SINGLE, UCS2_MULTI = 70, 67
"""UTF-16 code units in a single UCS-2 message, and in each part of a concatenated one."""

# GSM 03.38 default alphabet in table order (0x1B, the escape to the extension table, left out).
GSM_BASIC = (
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ"
    " !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§"
    "¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
# The extension table: each character is sent as escape + code, two septets.
GSM_EXTENSION = "\f^{}\\[~]|€"

_GSM_ALL = GSM_BASIC + GSM_EXTENSION
_ASCII_GSM = bytes(sorted({ord(ch) for ch in _GSM_ALL if ch.isascii()}))
_ASCII_NOT_EXTENSION = bytes(b for b in range(128) if chr(b) not in GSM_EXTENSION)
_NON_GSM = re.compile("[^" + re.escape(_GSM_ALL) + "]")
_EXTENSION_CHAR = re.compile("[" + re.escape(GSM_EXTENSION) + "]")


class EncodingError(Exception):
    """Base class for errors raised by :mod:`smsops.encoding`."""


class EncodingInputError(EncodingError, TypeError):
    """Something other than text was given as a message."""


@dataclass(frozen=True, slots=True)
class Analysis:
    """What a message text costs to send: encoding, size in units, and its segments."""

    text: str
    encoding: str
    units: int
    segments: int
    parts: tuple[str, ...]

    @property
    def chars(self) -> int:
        """Length of the text in characters (code points)."""
        return len(self.text)

    @property
    def ucs2_chars(self) -> tuple[str, ...]:
        """The distinct characters that force UCS-2, in order of first appearance (computed on access)."""
        if self.encoding == GSM7:
            return ()
        return tuple(dict.fromkeys(_NON_GSM.findall(self.text)))

    @property
    def remaining(self) -> int:
        """Units that still fit in the last segment before another one is needed."""
        if self.encoding == GSM7:
            single, multi = GSM_SINGLE, GSM_MULTI
        else:
            single, multi = UCS2_SINGLE, UCS2_MULTI
        if self.segments <= 1:
            return single - self.units
        return multi - _units(self.parts[-1], self.encoding)


@dataclass(frozen=True, slots=True)
class Savings:
    """Segments a text takes as written, with look-alikes replaced, and transliterated."""

    original_segments: int
    smart_segments: int
    transliterated_segments: int


def _check_text(text: object) -> None:
    if not isinstance(text, str):
        raise EncodingInputError(
            f"a message text must be str, got {type(text).__name__}: {text!r:.40}"
            + (" (decode bytes first)" if isinstance(text, bytes | bytearray) else "")
        )


# ---------------------------------------------------------------------------------------
# Analysis


def analyze(text: str, *, smart: bool = False) -> Analysis:
    """Encoding, units and segments of ``text`` (after :func:`smart_replace` when ``smart``)."""
    if text.__class__ is not str:
        _check_text(text)
    if smart:
        text = smart_replace(text)[0]
    if text.isascii():
        raw = text.encode("ascii")
        if not raw.translate(None, _ASCII_GSM):
            escapes = len(raw.translate(None, _ASCII_NOT_EXTENSION))
            return _gsm(text, escapes)
    elif _NON_GSM.search(text) is None:
        return _gsm(text, len(_EXTENSION_CHAR.findall(text)))
    return _ucs2(text)


def _gsm(text: str, escapes: int) -> Analysis:
    units = len(text) + escapes
    if units <= GSM_SINGLE:
        return Analysis(text, GSM7, units, 1 if units else 0, (text,) if units else ())
    if escapes:
        parts = _split(text, GSM_MULTI, GSM7)
    else:
        parts = tuple(text[i : i + GSM_MULTI] for i in range(0, len(text), GSM_MULTI))
    return Analysis(text, GSM7, units, len(parts), parts)


def _ucs2(text: str) -> Analysis:
    try:
        units = len(text.encode("utf-16-le")) >> 1
        surrogates = False
    except UnicodeEncodeError:  # lone surrogates: one unit each
        units = _units(text, UCS2)
        surrogates = True
    if units <= UCS2_SINGLE:
        return Analysis(text, UCS2, units, 1, (text,))
    if units == len(text) and not surrogates:
        parts = tuple(text[i : i + UCS2_MULTI] for i in range(0, len(text), UCS2_MULTI))
    else:
        parts = _split(text, UCS2_MULTI, UCS2)
    return Analysis(text, UCS2, units, len(parts), parts)


def _units(text: str, encoding: str) -> int:
    if encoding == GSM7:
        return len(text) + len(_EXTENSION_CHAR.findall(text))
    return len(text.encode("utf-16-le", "surrogatepass")) >> 1


def _split(text: str, limit: int, encoding: str) -> tuple[str, ...]:
    """Greedy parts of at most ``limit`` units that split no character, escape or surrogate pair."""
    parts = []
    n = len(text)
    start = 0
    while start < n:
        end = min(n, start + limit)
        excess = _units(text[start:end], encoding) - limit
        while excess > 0:  # give back characters from the end, two units for a double one
            end -= 1
            excess -= _weight(text[end], encoding)
        # Two surrogate code points in a row (a pair Python keeps apart) stay in one part.
        if encoding == UCS2 and end < n and end - start > 1 and _splits_surrogate_pair(text, end):
            end -= 1
        parts.append(text[start:end])
        start = end
    return tuple(parts)


def _weight(ch: str, encoding: str) -> int:
    if encoding == GSM7:
        return 2 if ch in GSM_EXTENSION else 1
    return 2 if ch > "\uffff" else 1


def _splits_surrogate_pair(text: str, at: int) -> bool:
    return "\ud800" <= text[at - 1] <= "\udbff" and "\udc00" <= text[at] <= "\udfff"


# ---------------------------------------------------------------------------------------
# Making a text cheaper

_SMART = {
    **dict.fromkeys("‘’‚‛‹›′´`", "'"),
    **dict.fromkeys("“”„‟«»″", '"'),
    **dict.fromkeys("‐‑‒–—―−•", "-"),
    "…": "...",
    **dict.fromkeys("\u00a0\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a", " "),
    **dict.fromkeys("\u202f\u205f\u3000", " "),
    **dict.fromkeys("\u00ad\u200b\u200c\u200d\u2060\ufeff", ""),
}
_SMART_TABLE = str.maketrans(_SMART)


def smart_replace(text: str) -> tuple[str, dict[str, str]]:
    """``text`` with typographic look-alikes replaced by GSM-7 characters, and what was replaced.

    Curly quotes and guillemets become straight quotes, dashes, minus and bullets a hyphen, the
    ellipsis three dots, special spaces a space; zero-width characters and soft hyphens go.
    """
    _check_text(text)
    if text.isascii() and "`" not in text:
        return text, {}
    replaced = {ch: to for ch, to in _SMART.items() if ch in text}
    if not replaced:
        return text, {}
    return text.translate(_SMART_TABLE), replaced


_CYRILLIC = {
    "а": "a", "б": "b", "в": "v", "г": "g", "д": "d", "е": "e", "ё": "e", "ж": "zh", "з": "z",
    "и": "i", "й": "y", "к": "k", "л": "l", "м": "m", "н": "n", "о": "o", "п": "p", "р": "r",
    "с": "s", "т": "t", "у": "u", "ф": "f", "х": "kh", "ц": "ts", "ч": "ch", "ш": "sh",
    "щ": "shch", "ъ": "", "ы": "y", "ь": "", "э": "e", "ю": "yu", "я": "ya",
    # Ukrainian and Belarusian letters that Russian lacks
    "є": "ye", "і": "i", "ї": "yi", "ґ": "g", "ў": "u",
}  # fmt: skip
_SIGNS = {"₽": "rub.", "№": "No."}
_SINGLE_UPPER = {lower.upper(): latin.upper() for lower, latin in _CYRILLIC.items() if len(latin) < 2}
_TRANSLIT_TABLE = str.maketrans(_CYRILLIC | _SINGLE_UPPER | _SIGNS)
# Capitals written with two or more Latin letters: their case depends on the neighbours.
_MULTI_UPPER = re.compile("[" + "".join(ch.upper() for ch, lat in _CYRILLIC.items() if len(lat) > 1) + "]")


def _upper_multi(match: re.Match[str]) -> str:
    """Capital Ж, Щ, Я …: all capitals inside a capitalised word ("ЩУКА"), else title ("Щука")."""
    text, at = match.string, match.start()
    latin = _CYRILLIC[match.group().lower()]
    after = text[at + 1] if at + 1 < len(text) else ""
    before = text[at - 1] if at else ""
    if after.isupper() or (not after.isalpha() and before.isupper()):
        return latin.upper()
    return latin.capitalize()


def transliterate(text: str) -> str:
    """``text`` with Cyrillic written in Latin letters (GOST-like: ж→zh, щ→shch, я→ya …) and
    look-alikes replaced as by :func:`smart_replace`; "₽" becomes "rub." and "№" becomes "No."."""
    _check_text(text)
    if text.isascii():
        return smart_replace(text)[0]
    text = _MULTI_UPPER.sub(_upper_multi, text).translate(_TRANSLIT_TABLE)
    return smart_replace(text)[0]


def savings(text: str) -> Savings:
    """Segments of ``text`` as written, after :func:`smart_replace`, and after :func:`transliterate`."""
    return Savings(
        original_segments=analyze(text).segments,
        smart_segments=analyze(text, smart=True).segments,
        transliterated_segments=analyze(transliterate(text)).segments,
    )
