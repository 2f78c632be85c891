"""What messages cost: price per segment by destination country (the `sms_prices` seed)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from smsops.reference import sms_prices

DEFAULT_COUNTRY = "ZZ"


@dataclass(frozen=True, slots=True)
class Price:
    """The price of one segment to ``country`` (``ZZ``: the default for unlisted countries)."""

    country: str
    currency: str
    per_segment: float
    is_default: bool


@dataclass(frozen=True, slots=True)
class CountryCost:
    country: str
    currency: str
    messages: int
    segments: int
    cost: float


@dataclass(frozen=True, slots=True)
class Estimate:
    """The bill for a set of messages, in total and by destination country."""

    messages: int
    segments: int
    totals: dict[str, float]  # currency -> amount
    by_country: tuple[CountryCost, ...]  # most expensive first

    @property
    def total(self) -> float:
        """The amount when every price is in one currency (the usual case)."""
        if len(self.totals) > 1:
            raise ValueError(f"the estimate spans several currencies: {', '.join(sorted(self.totals))}")
        return next(iter(self.totals.values()), 0.0)

    @property
    def currency(self) -> str | None:
        return next(iter(self.totals), None) if len(self.totals) == 1 else None


def price(country: str | None) -> Price:
    """The price of one segment to ``country`` (ISO code); unknown or None → the default row."""
    table = sms_prices()
    key = (country or "").upper()
    if key in table and key != DEFAULT_COUNTRY:
        currency, per_segment = table[key]
        return Price(key, currency, per_segment, is_default=False)
    currency, per_segment = table[DEFAULT_COUNTRY]
    return Price(key or DEFAULT_COUNTRY, currency, per_segment, is_default=True)


def message_cost(segments: int, country: str | None) -> float:
    """What one message of ``segments`` segments to ``country`` costs."""
    if segments < 0:
        raise ValueError(f"segments cannot be negative, got {segments}")
    return round(segments * price(country).per_segment, 4)


def estimate(messages: Iterable[tuple[str | None, int]]) -> Estimate:
    """The bill for ``(country, segments)`` pairs, one per message."""
    return estimate_totals((country, 1, segments) for country, segments in messages)


def estimate_totals(groups: Iterable[tuple[str | None, int, int]]) -> Estimate:
    """The bill for ``(country, messages, segments)`` totals, e.g. computed in SQL."""
    per_country: dict[str, list[int]] = {}
    for country, count, segments in groups:
        if segments < 0 or count < 0:
            raise ValueError(
                f"counts cannot be negative: {count} messages, {segments} segments for {country or 'unknown country'}"
            )
        tally = per_country.setdefault((country or DEFAULT_COUNTRY).upper(), [0, 0])
        tally[0] += count
        tally[1] += segments
    rows = []
    totals: dict[str, float] = {}
    for country, (count, segments) in per_country.items():
        p = price(country)
        cost = round(segments * p.per_segment, 2)
        rows.append(CountryCost(country, p.currency, count, segments, cost))
        totals[p.currency] = round(totals.get(p.currency, 0.0) + cost, 2)
    rows.sort(key=lambda r: (-r.cost, r.country))
    return Estimate(
        messages=sum(r.messages for r in rows),
        segments=sum(r.segments for r in rows),
        totals=totals,
        by_country=tuple(rows),
    )
