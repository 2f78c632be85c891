"""Altair chart builders: plain functions of a DataFrame, so they are testable without a page."""

from __future__ import annotations

import altair as alt
import pandas as pd

ACTIVITY_SERIES = {"messages_sent": "Sent", "delivered": "Delivered", "clicks": "Clicks"}


def daily_activity_chart(frame: pd.DataFrame) -> alt.Chart:
    """Daily sent / delivered / clicks as lines over time."""
    long = frame.melt(
        id_vars=["day"], value_vars=list(ACTIVITY_SERIES), var_name="series", value_name="count"
    )
    long["series"] = long["series"].map(ACTIVITY_SERIES)
    return (
        alt.Chart(long, title="Messages per day")
        .mark_line(point=True)
        .encode(
            x=alt.X("day:T", title="Day (UTC)"),
            y=alt.Y("count:Q", title="Messages"),
            color=alt.Color("series:N", title=None, sort=list(ACTIVITY_SERIES.values())),
            tooltip=[alt.Tooltip("day:T", title="Day"), "series:N", alt.Tooltip("count:Q", format=",")],
        )
    )


def consent_mix_chart(frame: pd.DataFrame) -> alt.Chart:
    """Contacts by consent state, as horizontal bars."""
    return (
        alt.Chart(frame, title="Who may be messaged")
        .mark_bar()
        .encode(
            x=alt.X("contacts:Q", title="Contacts"),
            y=alt.Y(
                "consent_state:N",
                title=None,
                sort=list(frame["consent_state"]),
                axis=alt.Axis(labelLimit=220),
            ),
            color=alt.Color("consent_state:N", legend=None),
            tooltip=[alt.Tooltip("consent_state:N", title="State"), alt.Tooltip("contacts:Q", format=",")],
        )
    )


def _percent(column: str, title: str) -> alt.Tooltip:
    return alt.Tooltip(f"{column}:Q", title=title, format=".1%")


def funnel_chart(stages: pd.DataFrame) -> alt.Chart:
    """Recipients at each funnel stage (``results.Funnel.stages()``), labelled with the share
    of those sent."""
    order = list(stages["stage"])
    base = alt.Chart(stages).encode(
        y=alt.Y("stage:N", title=None, sort=order),
        x=alt.X("recipients:Q", title="Recipients"),
    )
    bars = base.mark_bar().encode(
        color=alt.Color("stage:N", legend=None, sort=order),
        tooltip=[
            alt.Tooltip("stage:N", title="Stage"),
            alt.Tooltip("recipients:Q", title="Recipients", format=","),
            _percent("share_of_sent", "Share of sent"),
            _percent("share_of_previous", "Share of the stage before"),
        ],
    )
    labels = base.mark_text(align="left", dx=4).encode(text=alt.Text("share_of_sent:Q", format=".1%"))
    return (bars + labels).properties(title="Funnel: sent → delivered → clicked → converted")


VARIANT_RATES = {
    "click_through_rate": "CTR (clicks / delivered)",
    "conversion_rate": "Conversion rate (converted / delivered)",
    "delivery_rate": "Delivery rate (delivered / settled)",
    "opt_out_rate": "Opt-out rate (opt-outs / delivered)",
}


def variants_chart(frame: pd.DataFrame, rate: str = "click_through_rate") -> alt.Chart:
    """Each variant's ``rate`` as a point with its 95% interval as an error bar (columns
    ``<rate>``, ``<rate>_low``, ``<rate>_high`` of ``results.variants()``)."""
    if rate not in VARIANT_RATES:
        raise ValueError(f"rate must be one of {', '.join(VARIANT_RATES)}; got {rate!r}")
    title = VARIANT_RATES[rate]
    data = frame[["variant", rate, f"{rate}_low", f"{rate}_high"]].rename(
        columns={rate: "rate", f"{rate}_low": "low", f"{rate}_high": "high"}
    )
    base = alt.Chart(data).encode(y=alt.Y("variant:N", title="Variant"))
    bars = base.mark_errorbar(ticks=True).encode(
        x=alt.X("low:Q", title=title, axis=alt.Axis(format="%")), x2="high:Q"
    )
    points = base.mark_point(filled=True, size=80).encode(
        x=alt.X("rate:Q", title=title, axis=alt.Axis(format="%")),
        color=alt.Color("variant:N", legend=None),
        tooltip=[
            alt.Tooltip("variant:N", title="Variant"),
            _percent("rate", "Rate"),
            _percent("low", "95% low"),
            _percent("high", "95% high"),
        ],
    )
    return (bars + points).properties(title=f"{title.split(' (')[0]} by variant, with 95% intervals")


CLICK_TICKS = (0, 1, 5, 15, 30, 60, 120, 240, 480, 720, 1440, 2880, 4320, 10080)
"""Minutes marked on the time-to-click axis: a minute, a quarter, an hour … a day … a week."""


def time_to_click_chart(frame: pd.DataFrame) -> alt.Chart:
    """The cumulative share of clickers by minutes since sending (``results.time_to_click()``),
    on a log-like time axis: most clicks come in the first hour."""
    return (
        alt.Chart(frame, title="Time to first click")
        .mark_line(interpolate="step-after", point=True)
        .encode(
            x=alt.X(
                "minutes:Q",
                title="Minutes after sending",
                scale=alt.Scale(type="symlog"),
                axis=alt.Axis(values=[t for t in CLICK_TICKS if t <= max(frame["minutes"].max(), 60)]),
            ),
            y=alt.Y(
                "cumulative_share:Q",
                title="Share of clickers (cumulative)",
                axis=alt.Axis(format="%"),
                scale=alt.Scale(domain=[0, 1]),
            ),
            tooltip=[
                alt.Tooltip("minutes:Q", title="Minutes after sending"),
                alt.Tooltip("cumulative_clickers:Q", title="Clickers so far", format=","),
                _percent("cumulative_share", "Share of clickers"),
            ],
        )
    )


BREAKDOWN_RATES = {
    "click_through_rate": "CTR (clicks / delivered)",
    "conversion_rate": "Conversion rate (conversions / delivered)",
}


def breakdown_chart(frame: pd.DataFrame, attribute_title: str, rate: str = "click_through_rate") -> alt.Chart:
    """``rate`` per value of one attribute (``results.breakdown()``) as bars with their 95%
    intervals; the bar's tooltip says how many were delivered, so small groups read as such."""
    if rate not in BREAKDOWN_RATES:
        raise ValueError(f"rate must be one of {', '.join(BREAKDOWN_RATES)}; got {rate!r}")
    title = BREAKDOWN_RATES[rate]
    data = frame[["value", "delivered", rate, f"{rate}_low", f"{rate}_high"]].rename(
        columns={rate: "rate", f"{rate}_low": "low", f"{rate}_high": "high"}
    )
    data = data[data["delivered"] > 0]  # no rate without a delivered message
    order = list(data["value"])
    base = alt.Chart(data).encode(
        y=alt.Y("value:N", title=attribute_title, sort=order, axis=alt.Axis(labelLimit=200))
    )
    bars = base.mark_bar(opacity=0.7).encode(
        x=alt.X("rate:Q", title=title, axis=alt.Axis(format="%")),
        tooltip=[
            alt.Tooltip("value:N", title=attribute_title),
            alt.Tooltip("delivered:Q", title="Delivered", format=","),
            _percent("rate", "Rate"),
            _percent("low", "95% low"),
            _percent("high", "95% high"),
        ],
    )
    errors = base.mark_errorbar(ticks=True).encode(
        x=alt.X("low:Q", title=title, axis=alt.Axis(format="%")), x2="high:Q"
    )
    return (bars + errors).properties(title=f"{title.split(' (')[0]} by {attribute_title.lower()}")
