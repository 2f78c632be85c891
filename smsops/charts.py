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
