"""Overview: the base, and what messaging did over the last days."""

import streamlit as st

from smsops import charts, metrics, warehouse


@st.cache_data(show_spinner=False)
def load(build_id: str, days: int):
    """Everything the page shows, cached per published build (a new build refreshes it)."""
    return metrics.overview(days), metrics.daily_activity(days), metrics.consent_mix()


def fmt_rate(value: float | None) -> str:
    return "—" if value is None else f"{value:.1%}"


st.title("Overview")

snapshot = warehouse.current()
if snapshot is None:
    st.info("The warehouse has not been built yet. Run `smsops build` (or `make run`) and reload.")
    st.stop()

days = st.segmented_control(
    "Period", [7, 30, 90], default=30, format_func=lambda d: f"Last {d} days", key="days"
)
days = days or 30
ov, daily, consent = load(snapshot.build_id, days)
st.caption(f"Warehouse build {ov.build_id} · built {ov.built_at:%Y-%m-%d %H:%M} UTC")

st.subheader("Contacts")
c1, c2, c3 = st.columns(3)
c1.metric("Contacts", f"{ov.contacts:,}")
c2.metric("Valid mobile numbers", f"{ov.valid_mobile:,}")
c3.metric(
    "Reachable for marketing", f"{ov.reachable:,}", help="Valid mobile number with a current marketing opt-in"
)
st.caption(f"{fmt_rate(ov.reachable_rate)} of contacts can receive promotions.")

st.subheader(f"Messaging, last {ov.days} days")
row1 = st.columns(4)
row1[0].metric("Messages sent", f"{ov.sent:,}")
row1[1].metric(
    "Delivery rate",
    fmt_rate(ov.delivery_rate),
    help=f"Delivered / settled: messages whose final receipt is in ({ov.awaiting_receipt:,} still awaiting one)",
)
row1[2].metric("CTR", fmt_rate(ov.ctr), help="Messages with at least one click / delivered")
row1[3].metric("Opt-out rate", fmt_rate(ov.opt_out_rate), help="Opt-outs after a message / delivered")
row2 = st.columns(4)
row2[0].metric(
    "Conversions", f"{ov.conversions:,}", help="Orders attributed to a delivered or clicked message"
)
row2[1].metric("Revenue attributed", f"{ov.revenue:,.0f} ₽")
row2[2].metric("Cost", f"{ov.cost:,.0f} ₽")
row2[3].metric("Conversion rate", fmt_rate(ov.conversion_rate), help="Conversions / delivered")

left, right = st.columns([3, 2])
left.altair_chart(charts.daily_activity_chart(daily), width="stretch")
right.altair_chart(charts.consent_mix_chart(consent), width="stretch")
