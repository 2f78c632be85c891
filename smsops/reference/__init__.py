"""Reference data shipped with smsops (cities and their time zones, SMS prices)."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import cache
from importlib import resources

from smsops.config import dbt_project_dir


@dataclass(frozen=True, slots=True)
class City:
    city: str
    region: str
    country: str
    time_zone: str
    weight: float


@cache
def cities() -> tuple[City, ...]:
    """Known cities with their region, country and IANA time zone."""
    with resources.files(__package__).joinpath("cities.csv").open(encoding="utf-8") as fh:
        return tuple(
            City(r["city"], r["region"], r["country"], r["time_zone"], float(r["weight"]))
            for r in csv.DictReader(fh)
        )


@cache
def sms_prices() -> dict[str, tuple[str, float]]:
    """Price per SMS segment by country: ``{country: (currency, price)}``; ``ZZ`` is the
    default row. Read from the dbt seed, so Python and the marts agree."""
    with open(dbt_project_dir() / "seeds" / "sms_prices.csv", encoding="utf-8") as fh:
        return {r["country"]: (r["currency"], float(r["price_per_segment"])) for r in csv.DictReader(fh)}
