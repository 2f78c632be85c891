"""Who a message appears to come from: alphanumeric sender IDs, long codes, short codes."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import phonenumbers

SenderKind = Literal["alphanumeric", "long_code", "short_code"]

ALPHANUMERIC_MAX = 11
# What operators and aggregators accept in an alphanumeric sender ID (Twilio, SMS.ru and
# SMSC agree on Latin letters, digits and space; most also take these few signs).
ALPHANUMERIC_ALLOWED = re.compile(r"[A-Za-z0-9 .\-_&]+")
_DIGITS = re.compile(r"\d+")


class SenderError(ValueError):
    """A sender that a provider would refuse; the message names the rule it breaks."""


@dataclass(frozen=True, slots=True)
class Sender:
    """A validated sender: ``value`` is what goes in the provider's ``From``."""

    value: str
    kind: SenderKind
    country: str | None = None  # of a long code


def validate(sender: str) -> Sender:
    """Check ``sender`` against the rules for its kind, or raise SenderError naming the rule.

    ``+`` followed by digits is a long code (a full international number); digits alone are a
    short code (3-8 digits); anything else is an alphanumeric sender ID.
    """
    if not isinstance(sender, str):
        raise SenderError(f"a sender must be text, got {type(sender).__name__}")
    value = sender.strip()
    if not value:
        raise SenderError("the sender is empty: choose a sender ID (e.g. SHOPMARKET) or a number")
    if value.startswith("+"):
        return _long_code(value)
    if _DIGITS.fullmatch(value):
        return _short_code(value)
    return _alphanumeric(value)


def _alphanumeric(value: str) -> Sender:
    if len(value) > ALPHANUMERIC_MAX:
        raise SenderError(
            f"sender ID {value!r} has {len(value)} characters; at most {ALPHANUMERIC_MAX} are allowed"
        )
    if not ALPHANUMERIC_ALLOWED.fullmatch(value):
        bad = sorted({ch for ch in value if not ALPHANUMERIC_ALLOWED.fullmatch(ch)})
        raise SenderError(
            f"sender ID {value!r} contains {', '.join(repr(ch) for ch in bad)}; "
            "use Latin letters, digits, space, '.', '-', '_' or '&'"
        )
    if not any(ch.isalpha() for ch in value):
        raise SenderError(f"sender ID {value!r} needs at least one letter (digits only read as a number)")
    if "  " in value:
        raise SenderError(f"sender ID {value!r} has consecutive spaces")
    return Sender(value=value, kind="alphanumeric")


def _long_code(value: str) -> Sender:
    digits = value[1:].replace(" ", "").replace("-", "")
    if not _DIGITS.fullmatch(digits):
        raise SenderError(f"long code {value!r} must be '+' and digits, in international (E.164) form")
    try:
        number = phonenumbers.parse("+" + digits, None)
    except phonenumbers.NumberParseException as exc:
        raise SenderError(f"long code {value!r} is not a phone number: {exc}") from None
    if not phonenumbers.is_valid_number(number):
        raise SenderError(f"long code {value!r} is not a valid number in any numbering plan")
    e164 = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    return Sender(value=e164, kind="long_code", country=phonenumbers.region_code_for_number(number))


def _short_code(value: str) -> Sender:
    if not 3 <= len(value) <= 8:
        raise SenderError(
            f"short code {value!r} has {len(value)} digits; short codes have 3 to 8 "
            "(a full number needs its '+' and country code)"
        )
    return Sender(value=value, kind="short_code")
