"""What a launched campaign achieved, read from the marts of the published warehouse build.

One function per section of the Results page: the funnel, the variants with their intervals
and a plain verdict, uplift over the holdout, a breakdown by contact attribute, delivery
failures with what each code means, replies, the time it took people to click, and a
per-message CSV export. All figures come from one snapshot (see ``smsops.warehouse``), so
they agree with each other; a section whose mart the snapshot does not have yet raises
:class:`MartMissing` with what to do.

The readers return the warehouse's data (codes, numbers, the reference tables' English texts);
:func:`labelled` and :func:`shown` turn a section's frame into what a table shows in the current
language (:mod:`smsops.i18n`): codes as labels, numbers, money, shares and times formatted, a
missing value as "—".
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

import pandas as pd
from babel import Locale

from smsops import abtest, config, i18n, phones, warehouse
from smsops.i18n import N_, _, ngettext
from smsops.policy import HOLDOUT, REMAINDER

if TYPE_CHECKING:
    from pandas.io.formats.style import Styler

Home = str | os.PathLike[str] | None

METRICS = {"ctr": N_("CTR"), "conversion": N_("conversion rate")}
"""What a verdict can judge: clicks per delivered message, or converted recipients per delivered
(labels: translate with ``i18n.label``)."""

ATTRIBUTES = {
    "country": N_("Country"),
    "rfm_segment": N_("RFM group"),
    "gender": N_("Gender"),
    "age_band": N_("Age band"),
    "region": N_("Region"),
}
"""The contact attributes ``fct_campaign_segment_performance`` breaks a campaign down by."""

CAMPAIGN_STATUSES = {
    "draft": N_("draft"),
    "scheduled": N_("scheduled"),
    "running": N_("sending"),
    "paused": N_("paused"),
    "finished": N_("finished"),
    "cancelled": N_("cancelled"),
}
RFM_GROUPS = {
    "champions": N_("Champions"),
    "loyal": N_("Loyal"),
    "new": N_("New"),
    "at_risk": N_("At risk"),
    "hibernating": N_("Hibernating"),
    "needs_attention": N_("Needs attention"),
    "no_orders": N_("No orders yet"),
}
GENDERS = {"f": N_("female"), "m": N_("male")}
PROVIDERS = {"sandbox": N_("Sandbox (simulator)"), "twilio": "Twilio", "smsru": "SMS.ru", "smsc": "SMSC.ru"}
KEYWORDS = {"stop": N_("opt-out (STOP)"), "start": N_("opt-in (START)"), "help": N_("help")}
VARIANTS = {HOLDOUT: N_("control group"), REMAINDER: N_("rest of the audience")}
"""Labels of the codes the Results page's tables hold (variant names other than these stay as
they are)."""
UNKNOWN_VALUE = "unknown"
"""What the breakdown mart writes for a contact without the attribute."""

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
        named = ", ".join(missing[:3])
        if len(missing) > 3:
            named = _("{named} and {n} more").format(named=named, n=len(missing) - 3)
        raise MartMissing(
            _(
                "{section} needs {named}, which warehouse build {build} does not have: "
                "refresh the metrics (or run `smsops build`) with the current dbt project."
            ).format(section=_(section), named=named, build=build)
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


def campaign_label(row) -> str:
    """A row of :func:`campaigns_with_results` as a person picks it: name, id, status and
    launch date, in the current language."""
    return _("{name} (id {id}, {status}, launched {date})").format(
        name=row.campaign_name,
        id=row.campaign_id,
        status=i18n.label(CAMPAIGN_STATUSES, row.campaign_status),
        date=i18n.date(row.launched_at),
    )


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
        """The funnel as rows: stage (its name in the current language), recipients, share of
        sent, share of the stage before."""
        names = (_("Sent"), _("Delivered"), _("Clicked"), _("Converted"))
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
            _(
                "campaign {id} is not in warehouse build {build}: if it was launched since, refresh the metrics"
            ).format(id=campaign_id, build=snap.build_id if snap else "?")
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
    require_columns({"fct_campaign_performance": VARIANT_COLUMNS}, N_("Comparing variants"), home)
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
    if value >= 0.995:
        return _("over {share}").format(share=i18n.percent(0.99, 0))
    return i18n.percent(value, 0)


def _pct(value: float) -> str:
    return i18n.percent(value, 1)


def verdict(campaign_id: int, metric: str = "ctr", home: Home = None) -> abtest.Verdict | None:
    """Which variant wins on ``metric`` (``ctr`` or ``conversion``) and how sure that is, as
    ``abtest.compare`` decides it, with a plain message in the current language: "B beats A on
    CTR with 97% confidence", or how many more recipients it would take. None for a single
    variant."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}; got {metric!r}")
    frame = warehouse.query(VARIANT_COUNTS_SQL, [int(campaign_id), HOLDOUT, REMAINDER], home=home)
    if len(frame) < 2:
        return None
    column = "clicks" if metric == "ctr" else "converted_recipients"
    counts = {r.variant: (int(getattr(r, column)), int(r.delivered)) for r in frame.itertuples(index=False)}
    label = i18n.label(METRICS, metric)
    result = abtest.compare(counts, metric=label)
    return dataclasses.replace(result, message=verdict_message(result, label))


def verdict_message(result: abtest.Verdict, label: str) -> str:
    """The verdict in one sentence a marketer can repeat, in the current language."""
    best, runner = result.arms[0], result.arms[1]
    if not best.trials or not runner.trials:
        return _("Not enough delivered messages to compare {metric} yet.").format(metric=label)
    if result.winner is not None:
        others = _(" and ").join(a.name for a in result.arms[1:])
        return _(
            "{best} beats {others} on {metric} with {confidence} confidence "
            "({best_rate} against {runner_rate} for {runner})."
        ).format(
            best=best.name, others=others, metric=label, confidence=_confidence(result.confidence),
            best_rate=_pct(best.rate), runner_rate=_pct(runner.rate), runner=runner.name,
        )  # fmt: skip
    if result.needed_per_arm is None:
        return _("No difference on {metric} so far: {best} and {runner} both at {rate}.").format(
            metric=label, best=best.name, runner=runner.name, rate=_pct(best.rate)
        )
    have = min(best.trials, runner.trials)
    more = result.needed_per_arm - have
    standing = _("{best} {best_rate} vs {runner} {runner_rate}, {confidence} confidence").format(
        best=best.name, best_rate=_pct(best.rate), runner=runner.name, runner_rate=_pct(runner.rate),
        confidence=_confidence(result.confidence),
    )  # fmt: skip
    if more <= 0:
        return _(
            "No significant difference on {metric} ({standing}); the sample is already about the size "
            "that would show one, so the variants perform about the same."
        ).format(metric=label, standing=standing)
    return _(
        "No significant difference on {metric} yet ({standing}); about {more} more recipients "
        "per variant needed ({needed} each in all)."
    ).format(
        metric=label, standing=standing, more=i18n.number(more), needed=i18n.number(result.needed_per_arm)
    )


def arms_frame(result: abtest.Verdict) -> pd.DataFrame:
    """The verdict's variants as rows (for a build without the variants mart): ``variant``,
    ``delivered``, ``observed_rate`` and its 95% interval (``_low``/``_high``)."""
    return pd.DataFrame(
        {
            "variant": [a.name for a in result.arms],
            "delivered": [a.trials for a in result.arms],
            "observed_rate": [a.rate for a in result.arms],
            "observed_rate_low": [a.low for a in result.arms],
            "observed_rate_high": [a.high for a in result.arms],
        }
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
    def incremental_conversions_low(self) -> float | None:
        """The low end of the 95% interval of :attr:`incremental_conversions`."""
        return None if self.uplift_low is None else self.uplift_low * self.treatment_recipients

    @property
    def incremental_conversions_high(self) -> float | None:
        return None if self.uplift_high is None else self.uplift_high * self.treatment_recipients

    @property
    def message(self) -> str:
        """What the uplift says, in the current language."""
        if self.uplift is None:
            return _("Uplift cannot be measured yet: no delivered messages or an empty holdout.")
        points = _("{points} percentage points").format(points=_signed(self.uplift * 100, 1))
        interval = ""
        if self.uplift_low is not None and self.uplift_high is not None:
            interval = _(" (95% interval {low} to {high})").format(
                low=_signed(self.uplift_low * 100, 1), high=_signed(self.uplift_high * 100, 1)
            )
        if self.significant:
            if self.uplift > 0:
                text = _("Messaging raised conversion by {points}{interval} against the holdout.")
            else:
                text = _("Messaging lowered conversion by {points}{interval} against the holdout.")
            return text.format(points=points, interval=interval)
        return _(
            "No significant uplift over the holdout yet: {points}{interval}; the interval includes zero."
        ).format(points=points, interval=interval)


def _signed(value: float, digits: int = 0) -> str:
    """``+1.5`` / ``−2`` in the locale's digits, with a true minus sign."""
    rounded = round(value, digits)
    text = i18n.number(abs(rounded), digits)
    if rounded > 0:
        return "+" + text
    return "−" + text if rounded < 0 else text


def incremental_conversions_text(lift: Uplift) -> tuple[str, str]:
    """The uplift's extra converted recipients as a page shows them: a whole, signed estimate
    (``+13``) and a sentence with what it is and its 95% interval."""
    if lift.incremental_conversions is None:
        return i18n.MISSING, _("Cannot be estimated yet: no delivered messages or an empty holdout.")
    estimate = _signed(lift.incremental_conversions)
    if lift.incremental_conversions_low is None or lift.incremental_conversions_high is None:
        return estimate, _("An estimate: converted recipients beyond what the holdout's rate predicts.")
    return estimate, _(
        "An estimate: converted recipients beyond what the holdout's rate predicts; "
        "95% interval {low} to {high}."
    ).format(low=_signed(lift.incremental_conversions_low), high=_signed(lift.incremental_conversions_high))


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
    require_columns({"fct_campaign_uplift": UPLIFT_COLUMNS}, N_("Uplift over the holdout"), home)
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
        N_("The breakdown by segment"),
        home,
    )
    frame = warehouse.query(BREAKDOWN_SQL, [int(campaign_id), attribute], home=home)
    frame["value"] = frame["value"].fillna(UNKNOWN_VALUE)
    return frame


def value_label(attribute: str, value: str | None) -> str:
    """A breakdown value as a person reads it: a country's name, an RFM group's or a gender's
    label; other values (regions, age bands) as they are; "Unknown" for a missing one."""
    if value is None or value == UNKNOWN_VALUE or pd.isna(value):
        return _("Unknown")
    if attribute == "country":
        return Locale.parse(i18n.current()).territories.get(str(value), str(value))
    table = {"rfm_segment": RFM_GROUPS, "gender": GENDERS}.get(attribute)
    return i18n.label(table, value) if table else str(value)


# ---------------------------------------------------------------------------------------
# Delivery failures

UNKNOWN_CODE = N_("Unknown code: not in the reference table of error codes")
NO_CODE = N_("The provider gave no error code")

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
    whether it is permanent and what to do (the reference table's English: :func:`labelled`
    translates it); codes the reference table lacks say so."""
    require_columns(
        {"sms_error_codes": ("provider", "error_code", "meaning", "is_permanent", "what_to_do")},
        N_("Explaining delivery failures"),
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
    require_columns({"fct_replies": ("inbound_id", "campaign_id", *REPLY_COLUMNS)}, N_("Replies"), home)
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


def within(minutes: int) -> str:
    """``within 1 minute``, ``within 47 minutes``, ``within 3 hours``, ``within 2 days``: whole
    minutes below two hours, then hours (rounded up) below two days, then days (rounded up)."""
    if minutes < 120:
        return ngettext("within {n} minute", "within {n} minutes", minutes).format(n=i18n.number(minutes))
    if minutes < 48 * 60:
        hours = math.ceil(minutes / 60)
        return ngettext("within {n} hour", "within {n} hours", hours).format(n=i18n.number(hours))
    days = math.ceil(minutes / (24 * 60))
    return ngettext("within {n} day", "within {n} days", days).format(n=i18n.number(days))


def time_to_click_summary(frame: pd.DataFrame) -> str | None:
    """How soon the clickers clicked (from :func:`time_to_click`) in one sentence: "Half of the
    clickers clicked within 12 minutes of sending; 90% within 3 hours." None when nobody
    clicked."""
    half, most = minutes_until(frame, 0.5), minutes_until(frame, 0.9)
    if half is None or most is None:
        return None
    return _("Half of the clickers clicked {half} of sending; {share} {most}.").format(
        half=within(half), share=i18n.percent(0.9, 0), most=within(most)
    )


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


# ---------------------------------------------------------------------------------------
# Tables as the page shows them

MONEY_COLUMNS = ("revenue", "cost", "cost_per_conversion")
SHARE_ENDINGS = ("_rate", "_rate_low", "_rate_high")
PROSE_COLUMNS = ("meaning", "what_to_do")
"""Columns holding the reference tables' English sentences, translated by the catalogue."""


def labelled(frame: pd.DataFrame, attribute: str | None = None) -> pd.DataFrame:
    """``frame`` with its codes as labels in the current language: providers, reply keywords,
    the holdout and remainder variants, the breakdown's ``value`` of ``attribute``, the error
    codes' meanings and advice; flags as yes / no. A missing value stays missing (shown as "—")."""
    out = frame.copy()
    codes = {"provider": PROVIDERS, "keyword": KEYWORDS, "variant": VARIANTS}
    for column, table in codes.items():
        if column in out:
            out[column] = [None if _gone(v) else (_(table[v]) if v in table else v) for v in out[column]]
    for column in PROSE_COLUMNS:
        if column in out:
            out[column] = [None if _gone(v) else _(str(v)) for v in out[column]]
    if attribute is not None and "value" in out:
        out["value"] = [value_label(attribute, v) for v in out["value"]]
    for column in out.columns:
        if out[column].dtype == bool or column.startswith("is_"):
            out[column] = [None if _gone(v) else (_("yes") if v else _("no")) for v in out[column]]
    return out


def _gone(value: object) -> bool:
    return value is None or (pd.api.types.is_scalar(value) and bool(pd.isna(value)))


def _formatter(column: str, series: pd.Series):
    if column in MONEY_COLUMNS:
        return lambda v: i18n.money(v, digits=0)
    if column.endswith(SHARE_ENDINGS):
        return lambda v: i18n.percent(v, 1)
    if column == "roi":
        return lambda v: i18n.number(v, 2)
    if pd.api.types.is_datetime64_any_dtype(series):
        zone = config.time_zone()
        return lambda v: i18n.datetime_(v.to_pydatetime(), tz=zone)
    if pd.api.types.is_integer_dtype(series):
        return i18n.number
    if pd.api.types.is_float_dtype(series):
        return lambda v: i18n.number(v, 0) if float(v).is_integer() else i18n.number(v, 2)
    return lambda v: str(v)


def shown(frame: pd.DataFrame, attribute: str | None = None) -> Styler:
    """A section's frame as a table shows it, in the current language: codes as labels
    (:func:`labelled`), money in roubles, rates (``*_rate``, ``*_rate_low``, ``*_rate_high``)
    as percentages, counts grouped as the locale writes them, times in the team's zone, a
    missing value as "—". The numbers underneath stay numbers, so a column sorts as numbers."""
    data = labelled(frame, attribute)
    formats = {column: _formatter(column, data[column]) for column in data.columns}
    return data.style.format(formats, na_rep=i18n.MISSING)
