"""Altair chart builders: plain functions of a DataFrame, so they are testable without a page.

Every chart speaks the current language (:mod:`smsops.i18n`): titles, axes, legends and
tooltips through the catalogue, and numbers, months and weekdays as the locale writes them
(a Vega locale built from Babel's data). Every quantitative axis has an explicit format, so an
axis over zeros reads ``0``, never ``0.000000``; a chart with nothing to draw is a short note
("no data yet") under its title instead of empty axes.
"""

from __future__ import annotations

from datetime import timedelta

import altair as alt
import pandas as pd
from babel import Locale
from babel.dates import format_timedelta

from smsops import i18n, metrics
from smsops.i18n import N_, _

COUNT = ",d"
"""Axis and tooltip format of a count: whole numbers with the locale's grouping."""
SHARE_AXIS = "~%"
"""Axis format of a share: no trailing zeros (``5%``, ``2.5%``, ``0%``)."""
SHARE = ".1%"
"""Tooltip and label format of a share."""
DAY_AXIS = "%-d %b"
DAY = "%-d %B %Y"
NOTE_HEIGHT = 60

__all__ = [
    "ACTIVITY_SERIES",
    "BREAKDOWN_RATES",
    "CLICK_TICKS",
    "VARIANT_RATES",
    "after_sending",
    "breakdown_chart",
    "consent_mix_chart",
    "daily_activity_chart",
    "funnel_chart",
    "time_to_click_chart",
    "variants_chart",
    "vega_locale",
]


# ---------------------------------------------------------------------------------------
# The locale and the shared pieces


def vega_locale() -> dict:
    """Vega's number and time locale for the current language, from Babel's data (the same
    separators, currency sign, months and weekdays as :mod:`smsops.i18n` writes)."""
    code = i18n.current()
    locale = Locale.parse(code)
    one = i18n.money(1, digits=0)  # "1 ₽" / "RUB 1": what comes before and after the amount
    before, after = one.split("1", 1)
    months, days = locale.months["format"], locale.days["format"]
    sunday_first = (6, 0, 1, 2, 3, 4, 5)  # Babel counts from Monday, Vega from Sunday
    return {
        "number": {
            "decimal": i18n.number(1.5)[1],
            "thousands": i18n.number(1000)[1],
            "grouping": [3],
            "currency": [before, after],
        },
        "time": {
            "dateTime": "%x, %X",
            "date": "%d.%m.%Y" if code == "ru" else "%m/%d/%Y",
            "time": "%H:%M:%S",
            "periods": [locale.day_periods["format"]["abbreviated"][p] for p in ("am", "pm")],
            "days": [days["wide"][d] for d in sunday_first],
            "shortDays": [days["abbreviated"][d] for d in sunday_first],
            "months": [months["wide"][m] for m in range(1, 13)],
            "shortMonths": [months["abbreviated"][m] for m in range(1, 13)],
        },
    }


def _finish(chart: alt.TopLevelMixin) -> alt.TopLevelMixin:
    """The chart as the current language writes numbers and dates."""
    return chart.configure(locale=vega_locale())


def _note(title: str, text: str) -> alt.TopLevelMixin:
    """A chart's title over a short note, in place of empty axes."""
    note = (
        alt.Chart(pd.DataFrame({"note": [text]}), title=title, height=NOTE_HEIGHT)
        .mark_text(fontSize=14, color="gray")
        .encode(text="note:N")
    )
    return note.configure(locale=vega_locale(), view=alt.ViewConfig(stroke=None))


def _share(column: str, title: str) -> alt.Tooltip:
    return alt.Tooltip(f"{column}:Q", title=title, format=SHARE)


def _count_axis() -> alt.Axis:
    return alt.Axis(format=COUNT, tickMinStep=1)


def _share_axis() -> alt.Axis:
    return alt.Axis(format=SHARE_AXIS)


# ---------------------------------------------------------------------------------------
# Overview

ACTIVITY_SERIES = {"messages_sent": N_("Sent"), "delivered": N_("Delivered"), "clicks": N_("Clicks")}


def daily_activity_chart(frame: pd.DataFrame) -> alt.TopLevelMixin:
    """Daily sent / delivered / clicks as lines over time (``metrics.daily_activity()``); a note
    when nothing was sent in the period."""
    title = _("Messages per day")
    if frame.empty or not frame[list(ACTIVITY_SERIES)].to_numpy().any():
        return _note(title, _("No messages sent in this period yet."))
    long = frame.melt(
        id_vars=["day"], value_vars=list(ACTIVITY_SERIES), var_name="series", value_name="count"
    )
    names = {code: _(text) for code, text in ACTIVITY_SERIES.items()}
    long["series"] = long["series"].map(names)
    chart = (
        alt.Chart(long, title=title)
        .mark_line(point=True)
        .encode(
            x=alt.X("day:T", title=_("Day (UTC)"), axis=alt.Axis(format=DAY_AXIS, labelOverlap="greedy")),
            y=alt.Y("count:Q", title=_("Messages"), axis=_count_axis()),
            color=alt.Color(
                "series:N", title=None, sort=list(names.values()), legend=alt.Legend(orient="bottom")
            ),
            tooltip=[
                alt.Tooltip("day:T", title=_("Day (UTC)"), format=DAY),
                alt.Tooltip("series:N", title=_("Series")),
                alt.Tooltip("count:Q", title=_("Messages"), format=COUNT),
            ],
        )
    )
    return _finish(chart)


def consent_mix_chart(frame: pd.DataFrame) -> alt.TopLevelMixin:
    """Contacts by consent state (``metrics.consent_mix()``: codes of ``metrics.CONSENT_STATES``),
    as horizontal bars; a note when there are no contacts."""
    title = _("Who may be messaged")
    if frame.empty or not frame["contacts"].any():
        return _note(title, _("No contacts yet."))
    data = frame.assign(state=[i18n.label(metrics.CONSENT_STATES, code) for code in frame["consent_state"]])
    chart = (
        alt.Chart(data, title=title)
        .mark_bar()
        .encode(
            x=alt.X("contacts:Q", title=_("Contacts"), axis=_count_axis()),
            y=alt.Y("state:N", title=None, sort=list(data["state"]), axis=alt.Axis(labelLimit=240)),
            color=alt.Color("state:N", legend=None, sort=list(data["state"])),
            tooltip=[
                alt.Tooltip("state:N", title=_("Consent")),
                alt.Tooltip("contacts:Q", title=_("Contacts"), format=COUNT),
            ],
        )
    )
    return _finish(chart)


# ---------------------------------------------------------------------------------------
# Results


def funnel_chart(stages: pd.DataFrame) -> alt.TopLevelMixin:
    """Recipients at each funnel stage (``results.Funnel.stages()``), labelled with the share
    of those sent; a note when nothing was sent."""
    title = _("Funnel: sent → delivered → clicked → converted")
    if stages.empty or not stages["recipients"].iloc[0]:
        return _note(title, _("Nothing sent yet."))
    order = list(stages["stage"])
    base = alt.Chart(stages).encode(
        y=alt.Y("stage:N", title=None, sort=order),
        x=alt.X("recipients:Q", title=_("Recipients"), axis=_count_axis()),
    )
    bars = base.mark_bar().encode(
        color=alt.Color("stage:N", legend=None, sort=order),
        tooltip=[
            alt.Tooltip("stage:N", title=_("Stage")),
            alt.Tooltip("recipients:Q", title=_("Recipients"), format=COUNT),
            _share("share_of_sent", _("Share of sent")),
            _share("share_of_previous", _("Share of the stage before")),
        ],
    )
    labels = base.mark_text(align="left", dx=4).encode(text=alt.Text("share_of_sent:Q", format=SHARE))
    return _finish((bars + labels).properties(title=title))


VARIANT_RATES = {
    "click_through_rate": N_("CTR (clicks / delivered)"),
    "conversion_rate": N_("Conversion rate (converted / delivered)"),
    "delivery_rate": N_("Delivery rate (delivered / settled)"),
    "opt_out_rate": N_("Opt-out rate (opt-outs / delivered)"),
}
RATE_NAMES = {
    "click_through_rate": N_("CTR"),
    "conversion_rate": N_("Conversion rate"),
    "delivery_rate": N_("Delivery rate"),
    "opt_out_rate": N_("Opt-out rate"),
}


def variants_chart(frame: pd.DataFrame, rate: str = "click_through_rate") -> alt.TopLevelMixin:
    """Each variant's ``rate`` as a point with its 95% interval as an error bar (columns
    ``<rate>``, ``<rate>_low``, ``<rate>_high`` of ``results.variants()``); variants without
    a rate yet (nothing delivered) are left out, and a note stands in when none has one."""
    if rate not in VARIANT_RATES:
        raise ValueError(f"rate must be one of {', '.join(VARIANT_RATES)}; got {rate!r}")
    axis_title = _(VARIANT_RATES[rate])
    title = _("{rate} by variant, with 95% intervals").format(rate=_(RATE_NAMES[rate]))
    data = frame[["variant", rate, f"{rate}_low", f"{rate}_high"]].rename(
        columns={rate: "rate", f"{rate}_low": "low", f"{rate}_high": "high"}
    )
    data = data[data["rate"].notna()]
    if data.empty:
        return _note(title, _("No delivered messages yet."))
    base = alt.Chart(data).encode(y=alt.Y("variant:N", title=_("Variant")))
    bars = base.mark_errorbar(ticks=True).encode(
        x=alt.X("low:Q", title=axis_title, axis=_share_axis()), x2="high:Q"
    )
    points = base.mark_point(filled=True, size=80).encode(
        x=alt.X("rate:Q", title=axis_title, axis=_share_axis()),
        color=alt.Color("variant:N", legend=None),
        tooltip=[
            alt.Tooltip("variant:N", title=_("Variant")),
            _share("rate", _("Rate")),
            _share("low", _("95% low")),
            _share("high", _("95% high")),
        ],
    )
    return _finish((bars + points).properties(title=title))


CLICK_TICKS = (1, 5, 15, 60, 240, 1440, 4320, 10080)
"""Minutes marked on the time-to-click axis: a minute, five, a quarter, an hour, four hours, a
day, three days, a week (spaced so that their labels never overlap on the log-like axis)."""


def after_sending(minutes: float, form: str = "long") -> str:
    """A wait as the locale says it: ``47 minutes`` / ``47 минут``, ``3 hours`` (whole
    minutes below two hours, whole hours below two days); ``form="short"`` for axis labels
    (``15 min``, ``1 hr`` / ``15 мин``, ``1 ч``)."""
    return format_timedelta(
        timedelta(minutes=float(minutes)), threshold=2 if form == "long" else 1, granularity="minute",
        format=form, locale=i18n.current(),
    )  # fmt: skip


def _tick_labels(ticks: list[int]) -> str:
    """A Vega expression that writes each tick of the time axis as a short wait."""
    cases = " : ".join(f"datum.value == {t} ? {after_sending(t, 'short')!r}" for t in ticks)
    return f"{cases} : ''" if cases else "''"


def time_to_click_chart(frame: pd.DataFrame) -> alt.TopLevelMixin:
    """The cumulative share of clickers by minutes since sending (``results.time_to_click()``),
    on a log-like time axis marked in minutes, hours and days (most clicks come in the first
    hour); a note when nobody clicked."""
    title = _("Time to first click")
    if frame.empty:
        return _note(title, _("Nobody has clicked a link yet."))
    last = int(frame["minutes"].max())
    ticks = [t for t in CLICK_TICKS if t <= max(last, 60)]
    data = frame.assign(after=[after_sending(m + 1) for m in frame["minutes"]])
    chart = (
        alt.Chart(data, title=title)
        .mark_line(interpolate="step-after", point=True)
        .encode(
            x=alt.X(
                "minutes:Q",
                title=_("Time after sending (log scale)"),
                scale=alt.Scale(type="symlog", domain=[0, max(last, 60)]),
                axis=alt.Axis(values=ticks, labelExpr=_tick_labels(ticks), labelOverlap="greedy", grid=True),
            ),
            y=alt.Y(
                "cumulative_share:Q",
                title=_("Share of clickers (cumulative)"),
                axis=_share_axis(),
                scale=alt.Scale(domain=[0, 1]),
            ),
            tooltip=[
                alt.Tooltip("after:N", title=_("Time after sending")),
                alt.Tooltip("cumulative_clickers:Q", title=_("Clickers so far"), format=COUNT),
                _share("cumulative_share", _("Share of clickers")),
            ],
        )
    )
    return _finish(chart)


BREAKDOWN_RATES = {
    "click_through_rate": N_("CTR (clicks / delivered)"),
    "conversion_rate": N_("Conversion rate (conversions / delivered)"),
}


def _in_a_sentence(name: str) -> str:
    """A label as it reads inside a sentence: "Country" → "country", "RFM group" stays."""
    if len(name) > 1 and name[0].isupper() and not name[1].isupper():
        return name[0].lower() + name[1:]
    return name


def breakdown_chart(
    frame: pd.DataFrame, attribute_title: str, rate: str = "click_through_rate"
) -> alt.TopLevelMixin:
    """``rate`` per value of one attribute (``results.breakdown()``) as bars with their 95%
    intervals; the bar's tooltip says how many were delivered, so small groups read as such.
    Groups with nothing delivered have no rate and are left out; a note when none is left."""
    if rate not in BREAKDOWN_RATES:
        raise ValueError(f"rate must be one of {', '.join(BREAKDOWN_RATES)}; got {rate!r}")
    axis_title = _(BREAKDOWN_RATES[rate])
    title = _("{rate} by {attribute}").format(
        rate=_(RATE_NAMES[rate]), attribute=_in_a_sentence(attribute_title)
    )
    data = frame[["value", "delivered", rate, f"{rate}_low", f"{rate}_high"]].rename(
        columns={rate: "rate", f"{rate}_low": "low", f"{rate}_high": "high"}
    )
    data = data[(data["delivered"] > 0) & data["rate"].notna()]  # no rate without a delivered message
    if data.empty:
        return _note(title, _("No delivered messages yet."))
    order = list(data["value"])
    base = alt.Chart(data).encode(
        y=alt.Y("value:N", title=attribute_title, sort=order, axis=alt.Axis(labelLimit=200))
    )
    bars = base.mark_bar(opacity=0.7).encode(
        x=alt.X("rate:Q", title=axis_title, axis=_share_axis()),
        tooltip=[
            alt.Tooltip("value:N", title=attribute_title),
            alt.Tooltip("delivered:Q", title=_("Delivered"), format=COUNT),
            _share("rate", _("Rate")),
            _share("low", _("95% low")),
            _share("high", _("95% high")),
        ],
    )
    errors = base.mark_errorbar(ticks=True).encode(
        x=alt.X("low:Q", title=axis_title, axis=_share_axis()), x2="high:Q"
    )
    return _finish((bars + errors).properties(title=title))
