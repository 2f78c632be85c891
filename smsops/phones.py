"""Phone numbers as CRMs hold them, turned into E.164 with a verdict on whether SMS can reach them.

``normalize`` takes one raw string ("8 (912) 345-67-89", "+7 912 345 67 89 доб. 12", "нет" …) and
returns a :class:`PhoneNumber`: the E.164 form, whether the number can receive SMS, a short
machine-readable reason when it cannot, its type, country and candidate time zones.
``normalize_many`` does the same for a whole column, once per distinct value. ``mask`` hides a
number for display.

A number is ``valid`` only when libphonenumber calls it valid *and* its type can receive SMS
(mobile, or fixed-line-or-mobile as in the US). A valid landline keeps its ``e164`` but is
``valid=False`` with reason ``"not_mobile"``. Reasons: ``"empty"``, ``"unparseable"``,
``"too_short"``, ``"too_long"``, ``"invalid"``, ``"not_mobile"``.

Input rules beyond libphonenumber's: an extension ("доб. 123", "ext. 12", "x12", "#12") is dropped;
any other letter makes the value unparseable (no vanity numbers such as "8 800 ЗВОНИ"); control and
zero-width characters are removed and every kind of space counts as a space; a value with no digits
and no letters ("-", "()") counts as empty; a value longer than 64 characters is ``"too_long"``
without being parsed.
"""

from __future__ import annotations

import functools
import hashlib
import multiprocessing
import re
import sys
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import phonenumbers
from phonenumbers import NumberParseException, PhoneNumberType, ValidationResult

__all__ = [
    "MAX_INPUT_LENGTH",
    "PhoneError",
    "PhoneInputError",
    "PhoneNumber",
    "UnknownRegionError",
    "clear_cache",
    "mask",
    "normalize",
    "normalize_many",
]

MAX_INPUT_LENGTH = 64
"""Longer values are rejected as ``"too_long"`` without reaching libphonenumber."""

PARALLEL_THRESHOLD = 50_000
"""``normalize_many`` uses worker processes only for at least this many distinct values."""

_CACHE_SIZE = 1 << 20
_SMS_TYPES = frozenset({PhoneNumberType.MOBILE, PhoneNumberType.FIXED_LINE_OR_MOBILE})
_TYPE_NAMES = {value: name.lower() for name, value in vars(PhoneNumberType).items() if name.isupper()}
_UNKNOWN_ZONE = "Etc/Unknown"


class PhoneError(Exception):
    """Base class for errors raised by :mod:`smsops.phones`."""


class PhoneInputError(PhoneError, TypeError):
    """A value that is not text (or None) was given where a phone number was expected."""


class UnknownRegionError(PhoneError, ValueError):
    """The default region is not an ISO 3166 region code known to libphonenumber."""


@dataclass(frozen=True, slots=True)
class PhoneNumber:
    """One raw value and what it turned out to be."""

    raw: str | None
    e164: str | None
    valid: bool
    reason: str | None
    number_type: str | None
    country: str | None
    time_zones: tuple[str, ...]


# ---------------------------------------------------------------------------------------
# Cleaning

_SPACES = "\t\n\v\f\r\u00a0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
_SPACES += "\u2028\u2029\u202f\u205f\u3000"
_INVISIBLE = [*range(0x00, 0x20), *range(0x7F, 0xA0), 0xAD, 0x061C, 0x180E, *range(0x200B, 0x2010)]
_INVISIBLE += [*range(0x202A, 0x202F), *range(0x2060, 0x2065), *range(0x2066, 0x2070), 0xFEFF]
_CLEAN = {code: None for code in _INVISIBLE} | {ord(ch): " " for ch in _SPACES}

_EXTENSION = re.compile(
    r"[\s,;]*\(?\s*(?:доб(?:авочный)?|вн(?:утр(?:енний)?)?|ext(?:ension)?|x|#)\s*[.:]?\s*(\d{1,7})\s*\)?\s*$",
    re.IGNORECASE,
)
_LETTER = re.compile(r"[^\W\d_]")
# Russian mobiles as CRMs hold most of them: [+7 | 8 | 7] then ten digits starting with 9, with
# spaces, dots, dashes or brackets between. libphonenumber parses each of these to country code 7
# and those ten digits, so they skip its parser (half the cost); it still judges validity and type.
_RU_MOBILE = re.compile(r"(?:\+7|8|7)?[ ().\-]*(9[\d ().\-]*)")
_NO_SEPARATORS = str.maketrans("", "", " ().-")
_DIGIT = re.compile(r"\d")
# A value made only of ASCII digits, spaces and "+().-" needs no cleaning: it has no invisible
# characters, no exotic spaces and no extension, so ``_clean`` would only strip it.
_PLAIN = re.compile(r"[0-9 +().\-]*")
# _RU_MOBILE on a plain value with its surrounding spaces: matches exactly when the value is
# plain and _RU_MOBILE matches it stripped, with the same digits in the group.
_PLAIN_RU_MOBILE = re.compile(r" *(?:\+7|8|7)?[ ().\-]*(9[0-9 ().\-]*)")


def _clean(raw: str) -> str:
    """The raw value without invisible characters, an extension, or surrounding space."""
    text = raw.translate(_CLEAN).strip()
    match = _EXTENSION.search(text)
    if match is not None and match.start() > 0:
        text = text[: match.start()].rstrip()
    return text


# ---------------------------------------------------------------------------------------
# One number


def _check_region(region: str) -> str:
    if not isinstance(region, str):
        raise PhoneInputError(f"default_region must be a region code like 'RU', got {type(region).__name__}")
    code = region.upper()
    if code not in phonenumbers.SUPPORTED_REGIONS:
        raise UnknownRegionError(f"default_region {region!r} is not a known ISO 3166 region code (e.g. 'RU')")
    return code


def _check_raw(raw: object) -> None:
    if raw is not None and not isinstance(raw, str):
        raise PhoneInputError(
            f"a phone number must be str or None, got {type(raw).__name__}: {raw!r:.40}"
            + (" (decode bytes first)" if isinstance(raw, bytes | bytearray) else "")
        )


def _rejected(raw: str | None, reason: str, number_type: str | None = None) -> PhoneNumber:
    return PhoneNumber(raw, None, False, reason, number_type, None, ())


_EMPTY_NONE = _rejected(None, "empty")


def normalize(raw: str | None, default_region: str = "RU") -> PhoneNumber:
    """The phone number in ``raw`` (as a person or a CRM wrote it), read in ``default_region``."""
    if raw is None:
        return _EMPTY_NONE
    _check_raw(raw)
    if len(raw) > MAX_INPUT_LENGTH:
        return _rejected(raw, "too_long")
    return _normalize(raw, _check_region(default_region))


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _normalize(raw: str, region: str) -> PhoneNumber:
    if region == "RU":  # the usual case first: a plain Russian mobile, one regex and no cleaning
        match = _PLAIN_RU_MOBILE.fullmatch(raw)
        if match is not None:
            national = match.group(1).translate(_NO_SEPARATORS)
            if len(national) == 10:
                return _judge_ru_mobile(raw, national)
    text = raw.strip() if _PLAIN.fullmatch(raw) is not None else _clean(raw)
    if not text:
        return _rejected(raw, "empty")
    national = _ru_mobile_national(text) if region == "RU" else None
    if national is not None:
        return _judge_ru_mobile(raw, national)
    if _LETTER.search(text) is not None:
        return _rejected(raw, "unparseable")
    if _DIGIT.search(text) is None:
        return _rejected(raw, "empty")
    try:
        number = phonenumbers.parse(text, region)
    except NumberParseException as exc:
        return _rejected(raw, _parse_failure(exc, text))
    return _judge(raw, number)[0]


def _judge(raw: str, number: phonenumbers.PhoneNumber) -> tuple[PhoneNumber, bool]:
    """What libphonenumber makes of a parsed number, and whether the answer holds for every
    number with the same type in the same range (its time zones are not the number's own)."""
    kind = phonenumbers.number_type(number)
    if kind == PhoneNumberType.UNKNOWN:
        return _rejected(raw, _impossibility(number), "unknown"), True
    e164 = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    country = phonenumbers.region_code_for_number(number)
    sms = kind in _SMS_TYPES
    result = PhoneNumber(
        raw=raw,
        e164=e164,
        valid=sms,
        reason=None if sms else "not_mobile",
        number_type=_TYPE_NAMES.get(kind, "unknown"),
        country=country if country and country.isalpha() and country != "ZZ" else None,
        time_zones=_time_zones(number, kind, e164),
    )
    return result, not phonenumbers.is_number_type_geographical(kind, number.country_code)


# Ten-digit Russian numbers starting with 9 (nearly every mobile a CRM holds) are judged once
# per range: in libphonenumber's metadata for country code 7 (RU and KZ) their validity, type,
# region and possible length are decided by the first six national digits, and their time zones
# (not geographical) by the country code. The answer for the first number seen in a range serves
# every later one, about twenty times faster than asking libphonenumber. The rule is checked
# against a fingerprint of that metadata: after an update that changes it, every number goes to
# libphonenumber again until the rule is re-checked and the fingerprint renewed.
_RU_RANGE_DIGITS = 6
_RU_METADATA_FINGERPRINT = "95336acb663a74f6"
_RU_RANGES: dict[str, PhoneNumber] = {}
_DESCRIPTIONS = (
    "general_desc", "fixed_line", "mobile", "toll_free", "premium_rate", "shared_cost", "personal_number",
    "voip", "pager", "uan", "voicemail", "no_international_dialling",
)  # fmt: skip


def _ru_metadata_fingerprint() -> str:
    parts: list[object] = [phonenumbers.COUNTRY_CODE_TO_REGION_CODE.get(7)]
    for region in ("RU", "KZ"):
        metadata = phonenumbers.PhoneMetadata.metadata_for_region(region)
        parts.append(None if metadata is None else metadata.leading_digits)
        for name in _DESCRIPTIONS:
            desc = None if metadata is None else getattr(metadata, name)
            parts.append(
                None
                if desc is None
                else (desc.national_number_pattern, desc.possible_length, desc.possible_length_local_only)
            )
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


@functools.cache
def _ru_ranges_hold() -> bool:
    return _ru_metadata_fingerprint() == _RU_METADATA_FINGERPRINT


def _judge_ru_mobile(raw: str, national: str) -> PhoneNumber:
    """``_judge`` for a ten-digit Russian number starting with 9, from its range's answer."""
    seen = _RU_RANGES.get(national[:_RU_RANGE_DIGITS])
    if seen is None:
        result, shared = _judge(raw, phonenumbers.PhoneNumber(country_code=7, national_number=int(national)))
        if shared and _ru_ranges_hold():
            _RU_RANGES[national[:_RU_RANGE_DIGITS]] = result
        return result
    if seen.e164 is None:
        return PhoneNumber(raw, None, False, seen.reason, seen.number_type, None, ())
    return PhoneNumber(
        raw, "+7" + national, seen.valid, seen.reason, seen.number_type, seen.country, seen.time_zones
    )


def _ru_mobile_national(text: str) -> str | None:
    """The ten national digits when ``text`` is in a common Russian mobile form, else None
    (``phonenumbers.parse(text, "RU")`` reads these forms as country code 7 and those digits)."""
    match = _RU_MOBILE.fullmatch(text)
    if match is None:
        return None
    national = match.group(1).translate(_NO_SEPARATORS)  # the group holds digits and separators
    if len(national) != 10:
        return None
    return national if national.isascii() else str(int(national))  # other scripts' digits too


def _parse_failure(exc: NumberParseException, text: str) -> str:
    match exc.error_type:
        case NumberParseException.TOO_SHORT_NSN | NumberParseException.TOO_SHORT_AFTER_IDD:
            return "too_short"
        case NumberParseException.TOO_LONG:
            return "too_long"
        case NumberParseException.INVALID_COUNTRY_CODE:
            return "invalid"
        case NumberParseException.NOT_A_NUMBER if len(_DIGIT.findall(text)) < 3:
            return "too_short"
        case _:
            return "unparseable"


def _impossibility(number: phonenumbers.PhoneNumber) -> str:
    match phonenumbers.is_possible_number_with_reason(number):
        case ValidationResult.TOO_SHORT | ValidationResult.IS_POSSIBLE_LOCAL_ONLY:
            return "too_short"
        case ValidationResult.TOO_LONG:
            return "too_long"
        case _:
            return "invalid"


_ZONES_BY_E164: dict[str, tuple[str, ...]] = {}
_ZONES_BY_COUNTRY_CODE: dict[int, tuple[str, ...]] = {}
_ZONE_TUPLES: dict[tuple[str, ...], tuple[str, ...]] = {}


def _time_zones(number: phonenumbers.PhoneNumber, kind: int, e164: str) -> tuple[str, ...]:
    """Candidate IANA zones of a valid number; one shared tuple per distinct answer."""
    from phonenumbers import timezone  # ~10 ms on first use; geocoder is never imported

    if not phonenumbers.is_number_type_geographical(kind, number.country_code):
        zones = _ZONES_BY_COUNTRY_CODE.get(number.country_code)
        if zones is None:
            zones = _ZONES_BY_COUNTRY_CODE[number.country_code] = _intern_zones(
                timezone.time_zones_for_number(number)
            )
        return zones
    zones = _ZONES_BY_E164.get(e164)
    if zones is None:
        if len(_ZONES_BY_E164) >= _CACHE_SIZE:
            _ZONES_BY_E164.clear()
        zones = _ZONES_BY_E164[e164] = _intern_zones(timezone.time_zones_for_geographical_number(number))
    return zones


def _intern_zones(zones: Iterable[str]) -> tuple[str, ...]:
    key = tuple(zone for zone in zones if zone != _UNKNOWN_ZONE)
    return _ZONE_TUPLES.setdefault(key, key)


def clear_cache() -> None:
    """Forget every cached result (about 350 bytes per distinct value normalised so far)."""
    _normalize.cache_clear()
    _ZONES_BY_E164.clear()


# ---------------------------------------------------------------------------------------
# A column


def normalize_many(
    raws: Iterable[str | None], default_region: str = "RU", processes: int | None = None
) -> list[PhoneNumber]:
    """``normalize`` for each value, in input order; equal values share one result object.

    With ``processes`` > 1 and at least ``PARALLEL_THRESHOLD`` distinct values, the work is split
    across that many forked worker processes (serially where fork is unavailable). The result is
    the same either way.
    """
    values = list(raws)
    region = _check_region(default_region)
    try:
        distinct = list(dict.fromkeys(values))
    except TypeError:
        distinct = []
    for raw in distinct or values:
        _check_raw(raw)
    if processes is not None and processes > 1 and len(distinct) >= PARALLEL_THRESHOLD:
        results = _normalize_parallel(distinct, region, processes)
    else:
        results = None
    if results is None:  # what ``normalize`` does for each, with the checks made once
        results = [
            _EMPTY_NONE if raw is None else _rejected(raw, "too_long") if len(raw) > MAX_INPUT_LENGTH
            else _normalize(raw, region)
            for raw in distinct
        ]  # fmt: skip
    by_raw = dict(zip(distinct, results, strict=True))
    return [by_raw[raw] for raw in values]


_Row = tuple[str | None, bool, str | None, str | None, str | None, tuple[str, ...]]


def _normalize_chunk(chunk: list[str | None], region: str) -> list[_Row]:
    """Worker side: compact rows, cheaper to send back than dataclass instances."""
    rows = []
    for raw in chunk:
        p = normalize(raw, region)
        rows.append((p.e164, p.valid, p.reason, p.number_type, p.country, p.time_zones))
    return rows


def _normalize_parallel(distinct: list[str | None], region: str, processes: int) -> list[PhoneNumber] | None:
    """``normalize`` over ``distinct`` in worker processes, or None when they cannot be used."""
    if sys.platform != "linux" or "fork" not in multiprocessing.get_all_start_methods():
        return None
    chunk_count = processes * 4
    size = -(-len(distinct) // chunk_count)
    chunks = [distinct[i : i + size] for i in range(0, len(distinct), size)]
    try:
        context = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(max_workers=processes, mp_context=context) as pool:
            row_lists = list(pool.map(_normalize_chunk, chunks, [region] * len(chunks)))
    except (OSError, RuntimeError):  # no processes or a broken pool: do it here instead
        return None
    results = []
    for chunk, rows in zip(chunks, row_lists, strict=True):
        for raw, (e164, valid, reason, number_type, country, zones) in zip(chunk, rows, strict=True):
            zones = _ZONE_TUPLES.setdefault(zones, zones)
            results.append(PhoneNumber(raw, e164, valid, reason, number_type, country, zones))
    return results


# ---------------------------------------------------------------------------------------
# Display

_E164 = re.compile(r"\+(\d{7,15})")


def mask(e164: str | None) -> str:
    """A number for display with its middle hidden: ``"+79123456789"`` → ``"+7 912 ***-**-89"``."""
    if e164 is None:
        return "—"
    _check_raw(e164)
    match = _E164.fullmatch(e164)
    if match is None:  # not E.164: hide every digit but the last two
        digits = len(_DIGIT.findall(e164))
        seen = 0
        out = []
        for ch in e164:
            if ch.isdigit():
                seen += 1
                out.append(ch if seen > digits - 2 else "*")
            else:
                out.append(ch)
        return "".join(out)
    digits = match.group(1)
    cc_len = next((n for n in (1, 2, 3) if int(digits[:n]) in phonenumbers.COUNTRY_CODE_TO_REGION_CODE), 1)
    country, national = digits[:cc_len], digits[cc_len:]
    hidden = len(national) - 5
    if hidden <= 0:
        return f"+{country} {'*' * max(len(national) - 2, 0)}{national[-2:]}"
    stars = "***-**" if hidden == 5 else "*" * hidden  # Russian and NANP numbers read as 3-3-2-2
    return f"+{country} {national[:3]} {stars}-{national[-2:]}"
