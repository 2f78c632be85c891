"""Overview: the base, and what messaging did over the last days."""

import streamlit as st

from smsops import charts, config, i18n, metrics, warehouse
from smsops.i18n import _, ngettext


@st.cache_data(show_spinner=False)
def load(build_id: str, days: int):
    """Everything the page shows, cached per published build (a new build refreshes it)."""
    return metrics.overview(days), metrics.daily_activity(days), metrics.consent_mix()


st.title(_("Overview"))

snapshot = warehouse.current()
if snapshot is None:
    st.info(_("The warehouse has not been built yet. Run `smsops build` (or `make run`) and reload."))
    st.stop()

days = st.segmented_control(
    _("Period"),
    [7, 30, 90],
    default=30,
    format_func=lambda d: ngettext("Last {n} day", "Last {n} days", d).format(n=d),
    key="days",
)
days = days or 30
ov, daily, consent = load(snapshot.build_id, days)
st.caption(
    _("Warehouse build {build} · built {when}").format(
        build=ov.build_id, when=i18n.datetime_(ov.built_at, tz=config.time_zone())
    )
)

st.subheader(_("Contacts"))
c1, c2, c3 = st.columns(3)
c1.metric(_("Contacts"), i18n.number(ov.contacts))
c2.metric(_("Valid mobile numbers"), i18n.number(ov.valid_mobile))
c3.metric(
    _("Reachable for marketing"),
    i18n.number(ov.reachable),
    help=_("Valid mobile number with a current marketing opt-in"),
)
st.caption(_("{share} of contacts can receive promotions.").format(share=i18n.percent(ov.reachable_rate)))

st.subheader(ngettext("Messaging, last {n} day", "Messaging, last {n} days", ov.days).format(n=ov.days))
row1 = st.columns(4)
row1[0].metric(_("Messages sent"), i18n.number(ov.sent))
row1[1].metric(
    _("Delivery rate"),
    i18n.percent(ov.delivery_rate),
    help=_("Delivered / settled: messages whose final receipt is in ({n} still awaiting one)").format(
        n=i18n.number(ov.awaiting_receipt)
    ),
)
row1[2].metric(_("CTR"), i18n.percent(ov.ctr), help=_("Messages with at least one click / delivered"))
row1[3].metric(
    _("Opt-out rate"), i18n.percent(ov.opt_out_rate), help=_("Opt-outs after a message / delivered")
)
row2 = st.columns(4)
row2[0].metric(
    _("Conversions"),
    i18n.number(ov.conversions),
    help=_("Orders attributed to a delivered or clicked message"),
)
row2[1].metric(
    _("Revenue attributed"),
    i18n.money(ov.revenue, digits=0),
    help=_("Revenue of the orders attributed to messages"),
)
row2[2].metric(_("Cost"), i18n.money(ov.cost, digits=0), help=_("What the messages sent cost"))
row2[3].metric(_("Conversion rate"), i18n.percent(ov.conversion_rate), help=_("Conversions / delivered"))

left, right = st.columns([3, 2])
left.altair_chart(charts.daily_activity_chart(daily), width="stretch")
right.altair_chart(charts.consent_mix_chart(consent), width="stretch")
