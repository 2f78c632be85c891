"""What a launched campaign achieved, read from the marts of the published warehouse build.

One function per section of the Results page: the funnel, the variants with their intervals
and a plain verdict, uplift over the holdout, a breakdown by contact attribute, delivery
failures with what each code means, replies, the time it took people to click, and a
per-message CSV export. All figures come from one snapshot (see ``smsops.warehouse``), so
they agree with each other; a section whose mart the snapshot does not have yet raises
:class:`MartMissing` with what to do.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

import pandas as pd

from smsops import abtest, phones, warehouse
from smsops.policy import HOLDOUT, REMAINDER

Home = str | os.PathLike[str] | None

METRICS = {"ctr": "CTR", "conversion": "conversion rate"}
"""What a verdict can judge: clicks per delivered message, or converted recipients per delivered."""

ATTRIBUTES = {
    "country": "Country",
    "rfm_segment": "RFM group",
    "gender": "Gender",
    "age_band": "Age band",
    "region": "Region",
}
"""The contact attributes ``fct_campaign_segment_performance`` breaks a campaign down by."""

FAILED_STATUSES = ("rejected", "undelivered", "failed")


class MartMissing(warehouse.WarehouseError):
    """The published build lacks a mart or column this section reads."""


class CampaignNotInBuild(LookupError):
    """The campaign has no rows in the published build."""


# ---------------------------------------------------------------------------------------
# Helpers


def _rate(num: float, den: float) -> float | None:
    return num / den if den else None


COLUMNS_SQL = """
select table_name, column_name
from information_schema.columns
where table_name in (select unnest(?::varchar[]))
"""


def missing_columns(needed: dict[str, Iterable[str]], home: Home = None) -> list[str]:
    """``table.column`` names (or whole ``table`` names) of ``needed`` that the published
    build does not have, in the order given."""
    frame = warehouse.query(COLUMNS_SQL, [list(needed)], home=home)
    have: dict[str, set[str]] = {}
    for table, column in frame.itertuples(index=False):
        have.setdefault(table, set()).add(column)
    missing = []
    for table, columns in needed.items():
        if table not in have:
            missing.append(table)
        else:
            missing.extend(f"{table}.{c}" for c in columns if c not in have[table])
    return missing


def require_columns(needed: dict[str, Iterable[str]], section: str, home: Home = None) -> None:
    """Raise :class:`MartMissing`, naming what is missing and what to do, unless the published
    build has every table and column in ``needed``."""
    missing = missing_columns(needed, home)
    if missing:
        snap = warehouse.current(home)
        build = snap.build_id if snap else "?"
        named = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise MartMissing(
            f"{section} needs {named}, which warehouse build {build} does not have: "
            "refresh the metrics (or run `smsops build`) with the current dbt project."
        )


# ---------------------------------------------------------------------------------------
# Campaigns

CAMPAIGNS_SQL = """
select
    campaign_id,
    max(campaign_name) as campaign_name,
    max(campaign_kind) as campaign_kind,
    max(campaign_status) as campaign_status,
    max(launched_at) as launched_at,
    sum(audience) as audience,
    sum(sent) as sent,
    sum(delivered) as delivered,
    sum(clicks) as clicks,
    sum(converted_recipients) filter (where variant <> ?) as converted_recipients,
    sum(revenue) filter (where variant <> ?) as revenue,
    sum(cost) as cost
from fct_campaign_performance
where launched_at is not null
group by campaign_id
order by max(launched_at) desc, campaign_id desc
"""


def campaigns_with_results(home: Home = None) -> pd.DataFrame:
    """Every launched campaign in the published build, newest first, with its headline totals
    (campaigns with nothing sent yet included: ``sent`` is 0)."""
    frame = warehouse.query(CAMPAIGNS_SQL, [HOLDOUT, HOLDOUT], home=home)
    for column in ("audience", "sent", "delivered", "clicks", "converted_recipients"):
        frame[column] = frame[column].fillna(0).astype("int64")
    for column in ("revenue", "cost"):
        frame[column] = frame[column].fillna(0.0).astype(float)
    return frame


# ---------------------------------------------------------------------------------------
# Funnel


@dataclass(frozen=True, slots=True)
class Funnel:
    """A campaign's recipients from the audience to a conversion (holdout excluded).

    Sent = settled (the final receipt is in: delivered, undelivered or failed) + awaiting
    receipt (not yet: the receipt may still come, so it is neither delivered nor not).
    Clicks are people's: link previews and scanners are counted apart in ``prefetch_clicks``
    (None when the build predates them)."""

    campaign_id: int
    campaign_name: str
    campaign_status: str
    launched_at: datetime | None
    audience: int
    holdout: int
    suppressed: int
    rejected: int
    pending: int
    sent: int
    delivered: int
    undelivered: int
    failed: int
    settled: int
    awaiting_receipt: int
    clicked: int  # unique clickers
    total_clicks: int
    prefetch_clicks: int | None  # requests by link previews and scanners, not in the clicks
    replies: int
    opt_outs: int
    converted: int  # recipients with at least one attributed order
    conversions: int  # attributed orders
    revenue: float
    cost: float

    @property
    def not_delivered(self) -> int:
        """Messages whose final receipt says undelivered or failed."""
        return self.undelivered + self.failed

    @property
    def delivery_rate(self) -> float | None:
        """Delivered / settled: a message still awaiting its receipt counts in neither."""
        return _rate(self.delivered, self.settled)

    @property
    def click_through_rate(self) -> float | None:
        return _rate(self.clicked, self.delivered)

    @property
    def conversion_rate(self) -> float | None:
        return _rate(self.converted, self.delivered)

    @property
    def opt_out_rate(self) -> float | None:
        return _rate(self.opt_outs, self.delivered)

    @property
    def cost_per_conversion(self) -> float | None:
        """Cost of the whole send per attributed order."""
        return _rate(self.cost, self.conversions)

    def stages(self) -> pd.DataFrame:
        """The funnel as rows: stage, recipients, share of sent, share of the stage before."""
        names = ("Sent", "Delivered", "Clicked", "Converted")
        counts = (self.sent, self.delivered, self.clicked, self.converted)
        previous = (self.sent, *counts[:-1])
        return pd.DataFrame(
            {
                "stage": names,
                "recipients": counts,
                "share_of_sent": [_rate(c, self.sent) for c in counts],
                "share_of_previous": [_rate(c, p) for c, p in zip(counts, previous, strict=True)],
            }
        )


FUNNEL_SQL = """
select
    max(campaign_name) as campaign_name,
    max(campaign_status) as campaign_status,
    max(launched_at) as launched_at,
    coalesce(sum(audience), 0) as audience,
    coalesce(sum(holdout), 0) as holdout,
    coalesce(sum(suppressed), 0) as suppressed,
    coalesce(sum(rejected), 0) as rejected,
    coalesce(sum(pending), 0) as pending,
    coalesce(sum(sent), 0) as sent,
    coalesce(sum(delivered), 0) as delivered,
    coalesce(sum(undelivered), 0) as undelivered,
    coalesce(sum(failed), 0) as failed,
    coalesce(sum({settled}), 0) as settled,
    coalesce(sum({awaiting_receipt}), 0) as awaiting_receipt,
    coalesce(sum(clicks) filter (where variant <> ?), 0) as clicked,
    coalesce(sum(total_clicks) filter (where variant <> ?), 0) as total_clicks,
    coalesce(sum({prefetch_clicks}) filter (where variant <> ?), 0) as prefetch_clicks,
    coalesce(sum(replies) filter (where variant <> ?), 0) as replies,
    coalesce(sum(opt_outs) filter (where variant <> ?), 0) as opt_outs,
    coalesce(sum(converted_recipients) filter (where variant <> ?), 0) as converted,
    coalesce(sum(conversions) filter (where variant <> ?), 0) as conversions,
    coalesce(sum(revenue) filter (where variant <> ?), 0) as revenue,
    coalesce(sum(cost), 0) as cost,
    count(*) as variant_rows
from fct_campaign_performance
where campaign_id = ?
"""


# What a build from before these columns gives instead: settled and awaiting follow from the
# statuses; how many clicks were link previews it cannot tell.
FUNNEL_FALLBACKS = {
    "settled": "delivered + undelivered + failed",
    "awaiting_receipt": "sent - delivered - undelivered - failed",
    "prefetch_clicks": "0",
}


def funnel(campaign_id: int, home: Home = None) -> Funnel:
    """Sent → delivered → clicked → converted for one campaign, with the totals around it."""
    missing = set(missing_columns({"fct_campaign_performance": FUNNEL_FALLBACKS}, home))
    sql = FUNNEL_SQL.format(**{
        column: f"({fallback})" if f"fct_campaign_performance.{column}" in missing else column
        for column, fallback in FUNNEL_FALLBACKS.items()
    })  # fmt: skip
    row = warehouse.query(sql, [HOLDOUT] * 8 + [int(campaign_id)], home=home).iloc[0]
    if not row.variant_rows:
        snap = warehouse.current(home)
        raise CampaignNotInBuild(
            f"campaign {campaign_id} is not in warehouse build {snap.build_id if snap else '?'}: "
            "if it was launched since, refresh the metrics"
        )
    ints = {f.name for f in dataclasses.fields(Funnel)} - {
        "campaign_id", "campaign_name", "campaign_status", "launched_at", "revenue", "cost", "prefetch_clicks",
    }  # fmt: skip
    prefetches = None if "fct_campaign_performance.prefetch_clicks" in missing else int(row.prefetch_clicks)
    return Funnel(
        campaign_id=int(campaign_id),
        campaign_name=str(row.campaign_name),
        campaign_status=str(row.campaign_status),
        launched_at=None if pd.isna(row.launched_at) else row.launched_at.to_pydatetime(),
        revenue=float(row.revenue),
        cost=float(row.cost),
        prefetch_clicks=prefetches,
        **{name: int(row[name]) for name in ints},
    )


# ---------------------------------------------------------------------------------------
# Variants and the verdict

RATES = ("delivery_rate", "click_through_rate", "conversion_rate", "opt_out_rate", "complaint_rate")
VARIANT_COLUMNS = (
    "variant", "audience", "sent", "delivered", "awaiting_receipt", "clicks", "prefetch_clicks",
    "converted_recipients", "conversions",
    "revenue", "cost", "replies", "opt_outs", "complaints",
    *(f"{rate}{end}" for rate in RATES for end in ("", "_low", "_high")),
    "cost_per_conversion", "roi",
)  # fmt: skip

VARIANTS_SQL = f"""
select
    {", ".join(VARIANT_COLUMNS)}
from fct_campaign_performance
where campaign_id = ?
    and variant not in (?, ?)
order by variant
"""


def variants(campaign_id: int, home: Home = None) -> pd.DataFrame:
    """One row per variant (holdout and the not-yet-sent remainder left out): counts, each rate
    with its 95% interval (``_low``/``_high``), cost per conversion and ROI."""
    require_columns({"fct_campaign_performance": VARIANT_COLUMNS}, "Comparing variants", home)
    return warehouse.query(VARIANTS_SQL, [int(campaign_id), HOLDOUT, REMAINDER], home=home)


VARIANT_COUNTS_SQL = """
select
    variant,
    delivered,
    clicks,
    converted_recipients
from fct_campaign_performance
where campaign_id = ?
    and variant not in (?, ?)
order by variant
"""


def _confidence(value: float) -> str:
    return "over 99%" if value >= 0.995 else f"{value:.0%}"


def verdict(campaign_id: int, metric: str = "ctr", home: Home = None) -> abtest.Verdict | None:
    """Which variant wins on ``metric`` (``ctr`` or ``conversion``) and how sure that is, as
    ``abtest.compare`` decides it, with a plain message: "B beats A on CTR with 97%
    confidence", or how many more recipients it would take. None for a single variant."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}; got {metric!r}")
    frame = warehouse.query(VARIANT_COUNTS_SQL, [int(campaign_id), HOLDOUT, REMAINDER], home=home)
    if len(frame) < 2:
        return None
    column = "clicks" if metric == "ctr" else "converted_recipients"
    counts = {r.variant: (int(getattr(r, column)), int(r.delivered)) for r in frame.itertuples(index=False)}
    label = METRICS[metric]
    result = abtest.compare(counts, metric=label)
    return dataclasses.replace(result, message=verdict_message(result, label))


def verdict_message(result: abtest.Verdict, label: str) -> str:
    """The verdict in one sentence a marketer can repeat."""
    best, runner = result.arms[0], result.arms[1]
    if not best.trials or not runner.trials:
        return f"Not enough delivered messages to compare {label} yet."
    if result.winner is not None:
        others = " and ".join(a.name for a in result.arms[1:])
        return (
            f"{best.name} beats {others} on {label} with {_confidence(result.confidence)} confidence "
            f"({best.rate:.1%} against {runner.rate:.1%} for {runner.name})."
        )
    if result.needed_per_arm is None:
        return f"No difference on {label} so far: {best.name} and {runner.name} both at {best.rate:.1%}."
    have = min(best.trials, runner.trials)
    more = result.needed_per_arm - have
    standing = (
        f"{best.name} {best.rate:.1%} vs {runner.name} {runner.rate:.1%}, "
        f"{_confidence(result.confidence)} confidence"
    )
    if more <= 0:
        return (
            f"No significant difference on {label} ({standing}); the sample is already about the size "
            "that would show one, so the variants perform about the same."
        )
    return (
        f"No significant difference on {label} yet ({standing}); about {more:,} more recipients "
        f"per variant needed ({result.needed_per_arm:,} each in all)."
    )


# ---------------------------------------------------------------------------------------
# Uplift over the holdout


@dataclass(frozen=True, slots=True)
class Uplift:
    """Conversion of those messaged against the holdout that was not."""

    campaign_id: int
    treatment_recipients: int
    treatment_converted: int
    treatment_conversion_rate: float | None
    holdout_recipients: int
    holdout_converted: int
    holdout_conversion_rate: float | None
    uplift: float | None  # treatment rate − holdout rate
    uplift_low: float | None
    uplift_high: float | None
    incremental_conversions: float | None
    incremental_revenue: float | None

    @property
    def significant(self) -> bool:
        """The 95% interval of the uplift excludes zero."""
        if self.uplift_low is None or self.uplift_high is None:
            return False
        return self.uplift_low > 0 or self.uplift_high < 0

    @property
    def message(self) -> str:
        if self.uplift is None:
            return "Uplift cannot be measured yet: no delivered messages or an empty holdout."
        points = f"{self.uplift * 100:+.1f} percentage points"
        interval = ""
        if self.uplift_low is not None and self.uplift_high is not None:
            interval = f" (95% interval {self.uplift_low * 100:+.1f} to {self.uplift_high * 100:+.1f})"
        if self.significant:
            direction = "raised" if self.uplift > 0 else "lowered"
            return f"Messaging {direction} conversion by {points}{interval} against the holdout."
        return f"No significant uplift over the holdout yet: {points}{interval}; the interval includes zero."


UPLIFT_COLUMNS = tuple(f.name for f in dataclasses.fields(Uplift))
UPLIFT_SQL = f"""
select
    {", ".join(UPLIFT_COLUMNS)}
from fct_campaign_uplift
where campaign_id = ?
"""


def _masked(numbers: pd.Series) -> pd.Series:
    return numbers.map(lambda n: phones.mask(None if pd.isna(n) else n))


def _opt(value, cast):
    return None if value is None or pd.isna(value) else cast(value)


def uplift(campaign_id: int, home: Home = None) -> Uplift | None:
    """Uplift over the holdout, or None when the campaign kept no holdout."""
    require_columns({"fct_campaign_uplift": UPLIFT_COLUMNS}, "Uplift over the holdout", home)
    frame = warehouse.query(UPLIFT_SQL, [int(campaign_id)], home=home)
    if frame.empty:
        return None
    row = frame.iloc[0]
    counts = ("treatment_recipients", "treatment_converted", "holdout_recipients", "holdout_converted")
    return Uplift(
        campaign_id=int(campaign_id),
        **{c: int(row[c]) for c in counts},
        **{c: _opt(row[c], float) for c in UPLIFT_COLUMNS if c not in counts and c != "campaign_id"},
    )


# ---------------------------------------------------------------------------------------
# Breakdown by contact attribute

BREAKDOWN_COLUMNS = (
    "value", "sent", "delivered", "clicks", "conversions", "revenue", "cost",
    "click_through_rate", "click_through_rate_low", "click_through_rate_high",
    "conversion_rate", "conversion_rate_low", "conversion_rate_high",
)  # fmt: skip
BREAKDOWN_SQL = f"""
select
    {", ".join(BREAKDOWN_COLUMNS)}
from fct_campaign_segment_performance
where campaign_id = ?
    and attribute = ?
order by delivered desc, value
"""


def breakdown(campaign_id: int, attribute: str = "country", home: Home = None) -> pd.DataFrame:
    """The campaign's results per value of one contact attribute (``ATTRIBUTES``), the
    largest groups first, with CTR and conversion intervals."""
    if attribute not in ATTRIBUTES:
        raise ValueError(f"attribute must be one of {', '.join(ATTRIBUTES)}; got {attribute!r}")
    require_columns(
        {"fct_campaign_segment_performance": ("campaign_id", "attribute", *BREAKDOWN_COLUMNS)},
        "The breakdown by segment",
        home,
    )
    frame = warehouse.query(BREAKDOWN_SQL, [int(campaign_id), attribute], home=home)
    frame["value"] = frame["value"].fillna("unknown")
    return frame


# ---------------------------------------------------------------------------------------
# Delivery failures

UNKNOWN_CODE = "Unknown code: not in the reference table of error codes"
NO_CODE = "The provider gave no error code"

FAILURES_SQL = """
with

failed as (

    select
        provider,
        cast(error_code as varchar) as error_code,
        count(*) filter (where status = 'rejected') as rejected,
        count(*) filter (where status = 'undelivered') as undelivered,
        count(*) filter (where status = 'failed') as failed,
        count(*) as messages
    from fct_messages
    where campaign_id = ?
        and status in ('rejected', 'undelivered', 'failed')
    group by 1, 2

),

codes as (

    select
        provider,
        cast(error_code as varchar) as error_code,
        meaning,
        is_permanent,
        what_to_do
    from sms_error_codes

)

select
    failed.provider,
    failed.error_code,
    failed.messages,
    failed.rejected,
    failed.undelivered,
    failed.failed,
    coalesce(
        own.meaning,
        as_twilio.meaning,
        case when failed.error_code is null then ? else ? end
    ) as meaning,
    coalesce(own.is_permanent, as_twilio.is_permanent) as is_permanent,
    coalesce(own.what_to_do, as_twilio.what_to_do) as what_to_do
from failed
left join codes as own
    on failed.provider = own.provider
    and failed.error_code = own.error_code
-- the sandbox speaks Twilio's wire protocol and answers with Twilio's codes
left join codes as as_twilio
    on failed.provider = 'sandbox'
    and as_twilio.provider = 'twilio'
    and failed.error_code = as_twilio.error_code
order by failed.messages desc, failed.error_code
"""


def failures(campaign_id: int, home: Home = None) -> pd.DataFrame:
    """Messages that were not delivered, by provider and error code, with what the code means,
    whether it is permanent and what to do; codes the reference table lacks say so."""
    require_columns(
        {"sms_error_codes": ("provider", "error_code", "meaning", "is_permanent", "what_to_do")},
        "Explaining delivery failures",
        home,
    )
    return warehouse.query(FAILURES_SQL, [int(campaign_id), NO_CODE, UNKNOWN_CODE], home=home)


# ---------------------------------------------------------------------------------------
# Replies

REPLY_COLUMNS = ("received_at", "variant", "phone_e164", "body", "keyword", "is_complaint")
REPLIES_SQL = f"""
select
    {", ".join(REPLY_COLUMNS)}
from fct_replies
where campaign_id = ?
order by received_at desc, inbound_id desc
"""


def replies(campaign_id: int, reveal: bool = False, home: Home = None) -> pd.DataFrame:
    """Replies to the campaign, newest first, with the keyword they matched (STOP…) and
    whether they read as a complaint. Phone numbers masked unless ``reveal``."""
    require_columns({"fct_replies": ("inbound_id", "campaign_id", *REPLY_COLUMNS)}, "Replies", home)
    frame = warehouse.query(REPLIES_SQL, [int(campaign_id)], home=home)
    phone = frame.pop("phone_e164")
    frame.insert(2, "phone", phone if reveal else _masked(phone))
    return frame


# ---------------------------------------------------------------------------------------
# Time to click

TIME_TO_CLICK_SQL = """
with

clickers as (

    select
        floor(
            greatest(extract(epoch from (first_clicked_at - sent_at)), 0) / 60
        ) as minutes
    from fct_messages
    where campaign_id = ?
        and not is_holdout
        and sent_at is not null
        and first_clicked_at is not null

),

per_minute as (

    select
        cast(minutes as bigint) as minutes,
        count(*) as clickers
    from clickers
    group by 1

)

select
    minutes,
    clickers,
    sum(clickers) over (order by minutes) as cumulative_clickers,
    cast(sum(clickers) over (order by minutes) as double precision)
        / sum(clickers) over () as cumulative_share
from per_minute
order by minutes
"""


def time_to_click(campaign_id: int, home: Home = None) -> pd.DataFrame:
    """The cumulative share of clickers by whole minutes from sending to their first click:
    ``minutes``, ``clickers`` who first clicked in that minute, ``cumulative_clickers``,
    ``cumulative_share`` (0–1) and ``hours``. Empty when nobody clicked."""
    frame = warehouse.query(TIME_TO_CLICK_SQL, [int(campaign_id)], home=home)
    frame["cumulative_clickers"] = frame["cumulative_clickers"].astype("int64")
    frame["hours"] = frame["minutes"] / 60
    return frame


def minutes_until(frame: pd.DataFrame, share: float = 0.5) -> int | None:
    """Minutes after sending by which ``share`` of the clickers had clicked (from
    :func:`time_to_click`), or None when nobody clicked."""
    if not 0 < share <= 1:
        raise ValueError(f"share must be in (0, 1]; got {share!r}")
    reached = frame[frame["cumulative_share"] >= share - 1e-12]
    return None if reached.empty else int(reached["minutes"].iloc[0]) + 1


# ---------------------------------------------------------------------------------------
# Export

EXPORT_COLUMNS = (
    "message_id", "campaign_id", "variant", "contact_id", "phone_e164", "status", "is_holdout",
    "skip_reason", "error_code", "provider", "segments", "cost", "currency", "sent_at",
    "delivered_at", "first_clicked_at", "clicks", "replies", "replied_stop", "opted_out_after",
    "converted", "conversions", "revenue",
)  # fmt: skip
OPTIONAL_EXPORT_COLUMNS = ("attributed_touch", "prefetch_clicks")


def export_frame(campaign_id: int, reveal: bool = False, home: Home = None) -> pd.DataFrame:
    """One row per outbox row of the campaign (holdout and suppressed included, with their
    reason). Phone numbers masked unless ``reveal``."""
    optional = {f"fct_messages.{c}" for c in OPTIONAL_EXPORT_COLUMNS}
    missing = missing_columns({"fct_messages": (*EXPORT_COLUMNS, *OPTIONAL_EXPORT_COLUMNS)}, home)
    if set(missing) - optional:
        require_columns({"fct_messages": EXPORT_COLUMNS}, "The export", home)
    columns = [c for c in (*EXPORT_COLUMNS, *OPTIONAL_EXPORT_COLUMNS) if f"fct_messages.{c}" not in missing]
    frame = warehouse.query(
        f"select {', '.join(columns)} from fct_messages where campaign_id = ? order by message_id",
        [int(campaign_id)],
        home=home,
    )
    phone = frame.pop("phone_e164")
    frame.insert(4, "phone", phone if reveal else _masked(phone))
    return frame


def export_csv(campaign_id: int, reveal: bool = False, home: Home = None) -> bytes:
    """:func:`export_frame` as CSV (UTF-8 with a byte-order mark, so spreadsheet programs read
    Cyrillic right)."""
    return export_frame(campaign_id, reveal, home).to_csv(index=False).encode("utf-8-sig")
