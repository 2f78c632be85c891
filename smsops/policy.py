"""Sending policy: who may get a campaign message, and when. Pure functions, no I/O.

The campaign engine (``smsops.campaigns``) applies these rules set-based, in SQL, to a whole
audience; this module states them one recipient at a time, so each rule can be read, tested
and explained on its own, and the engine is tested against it.

The checks run in :data:`POLICY_ORDER`; the first that fails names the recipient's
``skip_reason`` (the outbox column), and every reason has a user-facing explanation in
:data:`SKIP_REASONS`:

1. ``erased`` — the person asked to be erased (checked first: erasure also scrubs the
   contact's number, which would otherwise read as invalid);
2. ``invalid_number`` — no valid mobile number;
3. ``opted_out`` — an opt-out covers this kind of message;
4. ``no_consent`` — a promotion without a current marketing opt-in;
5. ``duplicate`` — the same number earlier in the audience (the lowest ``contact_id`` keeps it);
6. ``capped_daily`` / ``capped_weekly`` — the frequency caps (promotions only, counted
   across campaigns);
7. ``holdout`` — the control group: recorded, never sent.

Quiet hours are not an exclusion: a message that would arrive in the recipient's quiet
hours is *deferred* (state ``planned``, ``not_before`` set) with the held reason
``quiet_hours``, or ``quiet_hours_candidate_zones`` when only the number's candidate zones
were known (a Russian mobile has 16): then it goes only in a window allowed in every one of
them, and when they share none, at the soonest minute allowed in most of them (see
:func:`deferral`). Held reasons (:data:`HELD_REASONS`) sit on ``planned`` rows and say why
the row is waiting; exclusion reasons sit on rows that will never be sent.

Time zones come from the system's IANA database through :mod:`zoneinfo` (no ``tzdata``
package is needed where ``/usr/share/zoneinfo`` exists), so DST is handled by the rules of
each zone.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from functools import lru_cache
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from smsops import i18n
from smsops.i18n import N_

__all__ = [
    "EXCLUSION_REASONS",
    "HELD_REASONS",
    "HOLDOUT",
    "NO_QUIET_HOURS",
    "POLICY_ORDER",
    "REMAINDER",
    "SKIP_REASONS",
    "Deferral",
    "FrequencyCaps",
    "PolicyError",
    "QuietHours",
    "assign",
    "consent_verdict",
    "deferral",
    "exclusion",
    "explain",
    "next_allowed",
    "parse_cap",
    "parse_quiet_hours",
    "split_unit",
]

Kind = Literal["promo", "service"]

SKIP_REASONS: dict[str, str] = {
    # exclusions at planning, in the order they are checked
    "erased": N_("the person asked to be erased"),
    "invalid_number": N_("no valid mobile number"),
    "opted_out": N_("opted out"),
    "no_consent": N_("no current marketing opt-in"),
    "duplicate": N_("the same number is earlier in the audience"),
    "capped_daily": N_("daily frequency cap reached"),
    "capped_weekly": N_("weekly frequency cap reached"),
    "holdout": N_("control group: recorded, never sent"),
    "render_failed": N_("the message could not be personalised"),
    # held: the row is planned and waits
    "quiet_hours": N_("recipient's quiet hours: deferred"),
    "quiet_hours_candidate_zones": N_(
        "quiet hours: zone unknown, deferred to a window allowed in every candidate zone of the number"
    ),
    "awaiting_winner": N_("waiting for the A/B test's winner"),
    # later, at dispatch or by the user
    "cancelled": N_("campaign cancelled"),
    "capped": N_("frequency cap reached"),
    "provider_rejected": N_("the provider rejected the message"),
    "provider_opted_out": N_("the recipient opted out at the provider"),
    "gave_up_after_retries": N_("the provider kept refusing: gave up after the last retry"),
    "fate_unknown": N_("unknown whether it was sent: the provider did not answer; not re-sent"),
    "no_sender": N_("no sender for this message"),
    "awaiting_lookup": N_(
        "outcome unknown: the provider may still accept the request; looked up again later"
    ),
    "record_failed": N_("the provider answered but the answer could not be recorded; not re-sent"),
    "unknown_given_up": N_("outcome unknown, closed by a person without a resend"),
}
"""Every ``skip_reason`` the outbox may hold, with what a user reads: English marked with ``N_()``,
shown with :func:`explain` (or ``i18n.label(SKIP_REASONS, code)``) in the current language.
``capped`` is the demo history's undivided cap reason; ``provider_*`` are written by the dispatcher."""

POLICY_ORDER: tuple[str, ...] = (
    "erased",
    "invalid_number",
    "opted_out",
    "no_consent",
    "duplicate",
    "capped_daily",
    "capped_weekly",
    "holdout",
)
"""The planning checks, in the order they run: a recipient gets the first that applies."""

EXCLUSION_REASONS = frozenset(POLICY_ORDER[:-1])
"""Reasons that suppress a recipient at planning (state ``suppressed``)."""

HELD_REASONS = frozenset({"quiet_hours", "quiet_hours_candidate_zones", "awaiting_winner"})
"""Reasons a ``planned`` row carries while it waits; a dispatcher clears them when it sends."""

HOLDOUT = "holdout"
"""The variant name of the control group."""
REMAINDER = "remainder"
"""The variant name of recipients outside the test share, until a winner is chosen."""


class PolicyError(ValueError):
    """A policy setting or input that cannot be used; the message names it.

    ``str()`` reads in English (logs, the CLI), :meth:`localized` in the current language (a
    page): raise it with the English marked ``N_()`` and the values apart."""

    def __init__(self, message: str = "", /, **values: Any) -> None:
        super().__init__(message.format(**values) if values else message)
        self.template = message
        self.values = values

    def localized(self) -> str:
        text = i18n._(self.template)
        return text.format(**self.values) if self.values else text


def explain(reason: str | None) -> str:
    """What a user reads for ``reason``, in the current language (the reason itself when it is
    not in the vocabulary, "—" for none)."""
    return i18n.label(SKIP_REASONS, reason)


# ---------------------------------------------------------------------------------------
# Quiet hours


@dataclass(frozen=True, slots=True)
class QuietHours:
    """Local hours in which nothing is sent: from ``start`` (included) to ``end`` (excluded),
    wrapping midnight when ``start`` is later than ``end``. ``start == end`` means none."""

    start: time = time(21, 0)
    end: time = time(9, 0)

    def __post_init__(self) -> None:
        for name in ("start", "end"):
            value = getattr(self, name)
            if not isinstance(value, time) or value.tzinfo is not None:
                raise PolicyError(
                    f"quiet hours {name}: expected a local time such as time(21, 0), got {value!r}"
                )
            if value.second or value.microsecond:
                raise PolicyError(f"quiet hours {name}: whole minutes only, got {value.isoformat()}")

    def is_quiet(self, local: time) -> bool:
        """Whether the local wall-clock time ``local`` falls in the quiet hours."""
        start, end = self.start, self.end
        if start == end:
            return False
        if start < end:
            return start <= local < end
        return local >= start or local < end

    def __str__(self) -> str:
        """``21:00-09:00``, as :func:`parse_quiet_hours` reads it."""
        return f"{self.start:%H:%M}-{self.end:%H:%M}"


NO_QUIET_HOURS = QuietHours(time(0, 0), time(0, 0))
"""Quiet hours that never apply (e.g. a test send to the team's own numbers)."""


def parse_quiet_hours(text: str) -> QuietHours:
    """``"21:00-09:00"`` (local start-end, 24-hour clock) as :class:`QuietHours`; ``"off"``
    or ``"none"`` for none."""
    if not isinstance(text, str):
        raise PolicyError(f"quiet hours: expected text such as '21:00-09:00', got {text!r}")
    cleaned = text.strip().replace("–", "-").replace("—", "-")
    if cleaned.lower() in ("off", "none", ""):
        return NO_QUIET_HOURS
    parts = [p.strip() for p in cleaned.split("-")]
    if len(parts) != 2:
        raise PolicyError(N_("quiet hours {text!r}: expected start-end such as '21:00-09:00'"), text=text)
    bounds = []
    for part in parts:
        try:
            hours, minutes = (int(x) for x in part.split(":"))
            bounds.append(time(hours, minutes))
        except ValueError:
            raise PolicyError(
                N_("quiet hours {text!r}: {part!r} is not a time of day such as 21:00"), text=text, part=part
            ) from None
    return QuietHours(bounds[0], bounds[1])


def parse_cap(text: str | int | None, name: str = "cap") -> int | None:
    """A frequency cap from settings: a whole number ≥ 1, or None for ``""``/``"off"``/``"none"``."""
    if text is None or (isinstance(text, str) and text.strip().lower() in ("", "off", "none")):
        return None
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise PolicyError(f"{name}: expected a whole number ≥ 1 or 'off', got {text!r}") from None
    if value < 1:
        raise PolicyError(f"{name}: expected a whole number ≥ 1 or 'off', got {text!r}")
    return value


@dataclass(frozen=True, slots=True)
class Deferral:
    """When a message that falls in quiet hours may go instead."""

    not_before: datetime
    """The earliest allowed UTC minute (timezone-aware)."""
    reason: str
    """``quiet_hours`` or ``quiet_hours_candidate_zones``."""
    in_every_zone: bool
    """False when the zones share no allowed window and the fallback was used."""


_HORIZON = timedelta(days=3)
_FALLBACK_SPAN = timedelta(days=1)


def next_allowed(now_utc: datetime, zones: Sequence[str], quiet: QuietHours) -> datetime | None:
    """None when sending at ``now_utc`` is allowed in every zone of ``zones``; else the
    earliest UTC minute after it that is (see :func:`deferral` for the fallback when the
    zones share no allowed window). ``now_utc`` naive means UTC; the result is aware."""
    found = deferral(now_utc, zones, quiet)
    return None if found is None else found.not_before


def deferral(
    now_utc: datetime, zones: Sequence[str], quiet: QuietHours, *, candidates: bool | None = None
) -> Deferral | None:
    """None when a message may go at ``now_utc`` in every zone of ``zones``, else when it may.

    ``zones`` are IANA names: the recipient's own zone, or the candidate zones of the number
    (``candidates`` defaults to "more than one zone"; it decides the reason's name). The
    answer is the earliest minute at or after ``now_utc`` allowed in every zone, found among
    the moments at which a zone's quiet hours end or its UTC offset changes (so DST gaps and
    folds are exact). Fallback, when the zones share no allowed window at all (e.g. zones
    12 h apart under a 12-hour quiet window): the earliest minute within a day that is
    allowed in as many of the zones as possible, with ``in_every_zone=False``; it is never a
    minute that is quiet in all of them."""
    now = _utc(now_utc)
    loaded = _zones(zones)
    if candidates is None:
        candidates = len(loaded) > 1
    reason = "quiet_hours_candidate_zones" if candidates else "quiet_hours"
    if all(_allowed(now, zone, quiet) for zone in loaded):
        return None
    moments = sorted({m for zone in loaded for m in _openings(now, zone, quiet, now + _HORIZON)})
    for moment in moments:
        if all(_allowed(moment, zone, quiet) for zone in loaded):
            return Deferral(_ceil_minute(moment), reason, True)
    # No common window: the soonest minute that is allowed in the most zones.
    best: tuple[int, datetime] | None = None
    for moment in [now, *moments]:
        if moment > now + _FALLBACK_SPAN:
            break
        covered = sum(_allowed(moment, zone, quiet) for zone in loaded)
        if covered and (best is None or covered > best[0]):
            best = (covered, moment)
    if best is None:  # quiet around the clock: the settings leave no window anywhere
        raise PolicyError(f"quiet hours {quiet.start}–{quiet.end} leave no minute to send in")
    return Deferral(_ceil_minute(best[1]), reason, False)


def _utc(value: datetime) -> datetime:
    if not isinstance(value, datetime):
        raise PolicyError(f"now_utc: expected a datetime, got {type(value).__name__}")
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


@lru_cache(maxsize=1024)
def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise PolicyError(f"time zone {name!r} is not an IANA zone name such as 'Europe/Moscow'") from None


def _zones(names: Sequence[str]) -> tuple[ZoneInfo, ...]:
    if isinstance(names, str):
        raise PolicyError("zones: expected a list of zone names, not one text")
    loaded = tuple(dict.fromkeys(_zone(name) for name in names))
    if not loaded:
        raise PolicyError("zones: at least one time zone is needed (use the install's default zone)")
    return loaded


def _allowed(moment: datetime, zone: ZoneInfo, quiet: QuietHours) -> bool:
    return not quiet.is_quiet(moment.astimezone(zone).time())


def _ceil_minute(moment: datetime) -> datetime:
    floor = moment.replace(second=0, microsecond=0)
    return floor if floor == moment else floor + timedelta(minutes=1)


def _openings(now: datetime, zone: ZoneInfo, quiet: QuietHours, until: datetime) -> Iterator[datetime]:
    """Moments in [now, until] at which sending may become allowed in ``zone``: its quiet
    hours end (both readings of an ambiguous local time), or its UTC offset changes."""
    first_day = now.astimezone(zone).date() - timedelta(days=1)
    for offset in range((until - now).days + 3):
        day = first_day + timedelta(days=offset)
        for fold in (0, 1):
            moment = datetime.combine(day, quiet.end, tzinfo=zone).replace(fold=fold).astimezone(UTC)
            if now <= moment <= until:
                yield moment
    yield from _transitions(now, zone, until)


def _transitions(now: datetime, zone: ZoneInfo, until: datetime) -> Iterator[datetime]:
    """The minutes at which ``zone``'s UTC offset changes between ``now`` and ``until``."""
    step = timedelta(hours=1)
    before = now
    offset = before.astimezone(zone).utcoffset()
    while before < until:
        after = min(before + step, until)
        if after.astimezone(zone).utcoffset() != offset:
            lo, hi = before, after  # offset(lo) == old, offset(hi) != old
            while hi - lo > timedelta(minutes=1):
                mid = _ceil_minute(lo + (hi - lo) / 2)
                if mid >= hi:
                    break
                if mid.astimezone(zone).utcoffset() == offset:
                    lo = mid
                else:
                    hi = mid
            yield hi
            offset = after.astimezone(zone).utcoffset()
        before = after


# ---------------------------------------------------------------------------------------
# Frequency caps


DAY = timedelta(days=1)
WEEK = timedelta(days=7)


@dataclass(frozen=True, slots=True)
class FrequencyCaps:
    """At most ``per_day`` promotions in 24 hours and ``per_week`` in 7 days per number,
    across all campaigns (None: no such cap). The windows end when the new message would
    go; promotions already planned for later count too. Service messages are not capped
    and do not count."""

    per_day: int | None = 1
    per_week: int | None = 3

    def __post_init__(self) -> None:
        for name in ("per_day", "per_week"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise PolicyError(f"frequency cap {name}: expected a whole number ≥ 1 or None, got {value!r}")

    def check(self, last_day: int, last_week: int) -> str | None:
        """``capped_daily`` / ``capped_weekly`` when one more promotion would break a cap,
        given the promotions the number already has (sent or planned) in the 24 hours and
        the 7 days before this one would go; None when it may get one more."""
        if self.per_day is not None and last_day >= self.per_day:
            return "capped_daily"
        if self.per_week is not None and last_week >= self.per_week:
            return "capped_weekly"
        return None


# ---------------------------------------------------------------------------------------
# One recipient's verdict


def consent_verdict(
    kind: Kind, marketing_last_action: str | None, service_last_action: str | None
) -> str | None:
    """None when the ledger allows a ``kind`` message, else ``opted_out`` or ``no_consent``.

    The arguments are the deciding ledger event's action for each purpose (the latest, an
    opt-out winning a tie, a keyword STOP covering every purpose — ``smsops.consent``'s
    rule), None when the ledger holds nothing for it. Promotions need a current marketing
    opt-in; service messages need none and stop only on an opt-out that covers service."""
    if kind == "service":
        return "opted_out" if service_last_action == "opt_out" else None
    if kind != "promo":
        raise PolicyError(f"kind: expected 'promo' or 'service', got {kind!r}")
    if marketing_last_action == "opt_in":
        return None
    return "opted_out" if marketing_last_action == "opt_out" else "no_consent"


def exclusion(
    kind: Kind,
    *,
    valid_number: bool,
    erased: bool,
    marketing_last_action: str | None,
    service_last_action: str | None,
    duplicate: bool,
    last_day: int = 0,
    last_week: int = 0,
    caps: FrequencyCaps | None = None,
) -> str | None:
    """The first exclusion of :data:`POLICY_ORDER` (holdout aside) that applies, or None.

    ``duplicate``: another recipient of the audience with a lower ``contact_id`` holds the
    same number and passed the checks before this one. ``last_day`` / ``last_week``: the
    number's promotions in the cap windows (only promotions are capped)."""
    if erased:
        return "erased"
    if not valid_number:
        return "invalid_number"
    verdict = consent_verdict(kind, marketing_last_action, service_last_action)
    if verdict is not None:
        return verdict
    if duplicate:
        return "duplicate"
    if kind == "promo":
        return (caps or FrequencyCaps()).check(last_day, last_week)
    return None


# ---------------------------------------------------------------------------------------
# A/B split


_UNIT_DIGITS = 13  # 52 bits: exact in a double
_UNIT_SCALE = float(16**_UNIT_DIGITS)


def split_unit(campaign_id: int, contact_id: int) -> float:
    """A uniform number in [0, 1) fixed for the pair: the first 52 bits of
    SHA-256(``"<campaign_id>:<contact_id>"``). The engine computes the same in SQL."""
    digest = hashlib.sha256(f"{campaign_id}:{contact_id}".encode()).hexdigest()
    return int(digest[:_UNIT_DIGITS], 16) / _UNIT_SCALE


def assign(
    unit: float,
    variants: Sequence[str],
    *,
    holdout_fraction: float | None = None,
    test_fraction: float | None = None,
) -> str:
    """The group of an eligible recipient with split number ``unit``: ``holdout`` below the
    holdout fraction, then the test share cut evenly across ``variants``, and ``remainder``
    beyond it. Without a test fraction every non-holdout recipient gets a variant."""
    if not variants:
        raise PolicyError("variants: at least one is needed")
    held = holdout_fraction or 0.0
    if unit < held:
        return HOLDOUT
    if test_fraction is None:
        share = 1.0 - held
    elif unit >= held + test_fraction:
        return REMAINDER
    else:
        share = test_fraction
    index = int((unit - held) / share * len(variants))
    return variants[min(index, len(variants) - 1)]
