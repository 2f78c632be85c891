"""Figures the Overview shows, read from the marts of the published warehouse."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pandas as pd

from smsops import warehouse
from smsops.i18n import N_

Home = str | os.PathLike[str] | None


@dataclass(frozen=True, slots=True)
class Overview:
    """Headline figures: the base now, and messaging over the last ``days`` days."""

    build_id: str
    built_at: datetime
    days: int
    contacts: int
    valid_mobile: int
    reachable: int
    sent: int
    delivered: int
    settled: int  # sent, and the final receipt (delivered, undelivered, failed) is in
    clicked: int
    conversions: int
    revenue: float
    opt_outs: int
    cost: float

    @property
    def reachable_rate(self) -> float | None:
        return _rate(self.reachable, self.contacts)

    @property
    def awaiting_receipt(self) -> int:
        """Sent messages whose final receipt has not come yet."""
        return self.sent - self.settled

    @property
    def delivery_rate(self) -> float | None:
        """Delivered / settled: a message still awaiting its receipt is neither delivered nor not."""
        return _rate(self.delivered, self.settled)

    @property
    def ctr(self) -> float | None:
        """Unique clicks per delivered message."""
        return _rate(self.clicked, self.delivered)

    @property
    def conversion_rate(self) -> float | None:
        return _rate(self.conversions, self.delivered)

    @property
    def opt_out_rate(self) -> float | None:
        """Opt-outs that followed a message, per delivered message."""
        return _rate(self.opt_outs, self.delivered)


def _rate(num: float, den: float) -> float | None:
    return num / den if den else None


def _since(days: int) -> datetime:
    return (datetime.now(UTC) - timedelta(days=days)).replace(tzinfo=None)


BASE_SQL = """
select
    count(*) as contacts,
    count(*) filter (where phone_valid) as valid_mobile,
    count(*) filter (where is_reachable_marketing) as reachable
from dim_contacts
"""

WINDOW_SQL = """
select
    count(*) filter (where sent_at is not null) as sent,
    count(*) filter (where status = 'delivered') as delivered,
    count(*) filter (where sent_at is not null and status in ('delivered', 'undelivered', 'failed')) as settled,
    count(*) filter (where clicked) as clicked,
    coalesce(sum(conversions) filter (where not is_holdout), 0) as conversions,
    coalesce(sum(revenue) filter (where not is_holdout), 0) as revenue,
    count(*) filter (where opted_out_after) as opt_outs,
    coalesce(sum(cost), 0) as cost
from fct_messages
where planned_at >= ?
"""


def overview(days: int = 30, home: Home = None) -> Overview:
    """Headline figures from ``dim_contacts`` and ``fct_messages``."""
    snap = warehouse.current(home)
    if snap is None:
        raise warehouse.WarehouseError("the warehouse has not been built yet: run `smsops build`")
    base = warehouse.query(BASE_SQL, home=home).iloc[0]
    window = warehouse.query(WINDOW_SQL, [_since(days)], home=home).iloc[0]
    return Overview(
        build_id=snap.build_id,
        built_at=snap.built_at,
        days=days,
        contacts=int(base.contacts),
        valid_mobile=int(base.valid_mobile),
        reachable=int(base.reachable),
        sent=int(window.sent),
        delivered=int(window.delivered),
        settled=int(window.settled),
        clicked=int(window.clicked),
        conversions=int(window.conversions),
        revenue=float(window.revenue),
        opt_outs=int(window.opt_outs),
        cost=float(window.cost),
    )


DAILY_SQL = """
select
    day,
    messages_sent,
    delivered,
    clicks,
    conversions,
    revenue
from fct_daily_kpis
where day >= ?
order by day
"""


def daily_activity(days: int = 30, home: Home = None) -> pd.DataFrame:
    """One row per day of the window (days without messages as zeros): messages sent,
    delivered, clicks, conversions, revenue."""
    start = _since(days).date()
    frame = warehouse.query(DAILY_SQL, [start], home=home)
    frame["day"] = pd.to_datetime(frame["day"])
    every_day = pd.date_range(start, datetime.now(UTC).date(), freq="D", name="day")
    return frame.set_index("day").reindex(every_day, fill_value=0).reset_index()


CONSENT_MIX_SQL = """
select
    case
        when not phone_valid then 'no_valid_number'
        when opted_out then 'opted_out'
        when is_reachable_marketing then 'marketing_opt_in'
        when service_opt_in then 'service_only'
        else 'no_consent'
    end as consent_state,
    count(*) as contacts
from dim_contacts
group by 1
"""

CONSENT_STATES = {
    "marketing_opt_in": N_("Marketing opt-in"),
    "service_only": N_("Service messages only"),
    "no_consent": N_("No consent recorded"),
    "opted_out": N_("Opted out"),
    "no_valid_number": N_("No valid mobile number"),
}
"""What may be sent to a contact: its code in :func:`consent_mix`, and its label (translate with
``i18n.label``)."""

CONSENT_ORDER = tuple(CONSENT_STATES)


def consent_mix(home: Home = None) -> pd.DataFrame:
    """Contacts by what may be sent to them (``consent_state``: a code of
    :data:`CONSENT_STATES`), in a fixed order with zeros kept."""
    frame = warehouse.query(CONSENT_MIX_SQL, home=home)
    counts = dict(zip(frame["consent_state"], frame["contacts"], strict=True))
    return pd.DataFrame(
        {"consent_state": list(CONSENT_ORDER), "contacts": [int(counts.get(s, 0)) for s in CONSENT_ORDER]}
    )


VARIANTS_SQL = """
select
    variant,
    delivered,
    clicks,
    converted_recipients
from fct_campaign_performance
where campaign_id = ?
    and variant not in ('holdout', 'remainder')
order by variant
"""


def variant_results(campaign_id: int, metric: str = "ctr", home: Home = None) -> dict[str, tuple[int, int]]:
    """``{variant: (successes, delivered)}`` for an A/B verdict: clicks (``ctr``) or converted
    recipients (``conversion``) per delivered message, from the published build."""
    if metric not in ("ctr", "conversion"):
        raise ValueError(f"metric must be 'ctr' or 'conversion', got {metric!r}")
    frame = warehouse.query(VARIANTS_SQL, [int(campaign_id)], home=home)
    column = "clicks" if metric == "ctr" else "converted_recipients"
    return {
        row.variant: (int(getattr(row, column)), int(row.delivered)) for row in frame.itertuples(index=False)
    }
