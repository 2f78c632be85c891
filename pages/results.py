"""Results: what a launched campaign achieved, from the published warehouse build."""

import functools
import time

import streamlit as st

from smsops import charts, config, i18n, results, warehouse
from smsops.i18n import _, ngettext


@st.cache_data(show_spinner=False)
def cached(build_id: str, language: str, section: str, *args):
    """``results.<section>(*args)``, cached per published build (a new build refreshes it) and
    language (a verdict is a sentence)."""
    return getattr(results, section)(*args)


def number(label: str, help: str | None = None) -> st.column_config.NumberColumn:
    """A numeric column: its values are formatted by ``results.shown``, so it still sorts as numbers."""
    return st.column_config.NumberColumn(label, help=help)


VARIANT_COLUMNS = {
    "variant": _("Variant"), "audience": number(_("Audience")), "sent": number(_("Sent")),
    "delivered": number(_("Delivered")),
    "awaiting_receipt": number(_("Awaiting receipt"), _("Sent, final receipt not in yet")),
    "clicks": number(_("Clickers")),
    "prefetch_clicks": number(_("Link previews"), _("Not people: left out of the CTR")),
    "converted_recipients": number(_("Converted")), "conversions": number(_("Attributed orders")),
    "revenue": number(_("Revenue")), "cost": number(_("Cost")),
    "replies": number(_("Replies")), "opt_outs": number(_("Opt-outs")), "complaints": number(_("Complaints")),
    "delivery_rate": number(_("Delivery rate")), "delivery_rate_low": number(_("Delivery, 95% low")),
    "delivery_rate_high": number(_("Delivery, 95% high")),
    "click_through_rate": number(_("CTR")), "click_through_rate_low": number(_("CTR, 95% low")),
    "click_through_rate_high": number(_("CTR, 95% high")),
    "conversion_rate": number(_("Conversion rate")), "conversion_rate_low": number(_("Conversion, 95% low")),
    "conversion_rate_high": number(_("Conversion, 95% high")),
    "opt_out_rate": number(_("Opt-out rate")), "opt_out_rate_low": number(_("Opt-outs, 95% low")),
    "opt_out_rate_high": number(_("Opt-outs, 95% high")),
    "complaint_rate": number(_("Complaint rate")), "complaint_rate_low": number(_("Complaints, 95% low")),
    "complaint_rate_high": number(_("Complaints, 95% high")),
    "cost_per_conversion": number(_("Cost per order")),
    "roi": number(_("ROI"), _("(revenue − cost) / cost")),
}  # fmt: skip
BREAKDOWN_COLUMNS = {
    "value": _("Group"), "sent": number(_("Sent")), "delivered": number(_("Delivered")),
    "clicks": number(_("Clickers")), "conversions": number(_("Attributed orders")),
    "revenue": number(_("Revenue")), "cost": number(_("Cost")),
    "click_through_rate": number(_("CTR")), "click_through_rate_low": number(_("CTR, 95% low")),
    "click_through_rate_high": number(_("CTR, 95% high")), "conversion_rate": number(_("Conversion rate")),
    "conversion_rate_low": number(_("Conversion, 95% low")),
    "conversion_rate_high": number(_("Conversion, 95% high")),
}  # fmt: skip
FAILURE_COLUMNS = {
    "error_code": _("Code"), "meaning": st.column_config.TextColumn(_("What it means"), width="large"),
    "messages": number(_("Messages")), "what_to_do": st.column_config.TextColumn(_("What to do"), width="large"),
    "is_permanent": _("Permanent"), "rejected": number(_("Rejected")), "undelivered": number(_("Undelivered")),
    "failed": number(_("Failed")), "provider": _("Provider"),
}  # fmt: skip
REPLY_COLUMNS = {
    "received_at": _("Received"), "variant": _("Variant"), "phone": _("Phone"), "body": _("Reply"),
    "keyword": _("Keyword"), "is_complaint": _("Complaint"),
}  # fmt: skip


def build_is_running() -> bool:
    """A build holds the lock, or the one this session started has not taken it yet."""
    proc = st.session_state.get("refresh_proc")
    return warehouse.build_running() or (proc is not None and proc.poll() is None)


st.title(_("Results"))

snapshot = warehouse.current()
if snapshot is None:
    st.info(_("The warehouse has not been built yet. Run `smsops build` (or `make run`) and reload."))
    st.stop()

if config.provider_name() == "sandbox":
    st.caption(
        _(
            ":material/science: Results of sending to the **sandbox**: a local simulator, no real SMS left this machine."
        )
    )

# --- Which build, and refreshing it --------------------------------------------------------

running = build_is_running()
info_col, button_col = st.columns([3, 1], vertical_alignment="center")
info_col.caption(
    _("Figures from warehouse build {build}, built {when} (in {seconds} s).").format(
        build=snapshot.build_id,
        when=i18n.datetime_(snapshot.built_at, tz=config.time_zone()),
        seconds=i18n.number(snapshot.seconds, 0),
    )
)
if button_col.button(
    _("Refresh metrics"), key="refresh_metrics", icon=":material/refresh:", disabled=running
):
    if build_is_running():
        st.info(_("A build is already running: the figures switch to it when it finishes."))
    else:
        st.session_state["refresh_proc"] = warehouse.build_in_background(refresh=True)
        st.session_state["refresh_started"] = time.monotonic()
        running = True


@st.fragment(run_every=2 if running else None)
def refresh_status(shown_build: str) -> None:
    """While a build runs: its progress, re-checked every 2 s without rerunning the page
    (other pages stay usable). When a new build is published: rerun the page onto it."""
    latest = warehouse.current()
    proc = st.session_state.get("refresh_proc")
    started = st.session_state.get("refresh_started")
    if build_is_running():
        # not a `with` block: leaving one marks the status complete while the build still runs
        status = st.status(_("Refreshing metrics: dbt is building a new snapshot…"))
        if started is not None:  # this session started it: show how far along it should be
            elapsed = time.monotonic() - started
            status.progress(
                min(elapsed / max(snapshot.seconds, 1.0), 0.95),
                text=_("{elapsed} s so far; the last build took {seconds} s").format(
                    elapsed=i18n.number(elapsed, 0), seconds=i18n.number(snapshot.seconds, 0)
                ),
            )
        status.write(_("Other pages stay usable; the figures here switch when the build is published."))
    elif latest is not None and latest.build_id != shown_build:
        st.session_state.pop("refresh_proc", None)
        st.session_state.pop("refresh_started", None)
        st.rerun(scope="app")
    elif proc is not None and proc.poll() not in (None, 0):
        log = config.paths().dbt_artifacts / "background-build.log"
        st.error(
            _("The build failed (exit {code}); the figures are unchanged. See {log}.").format(
                code=proc.returncode, log=log
            )
        )
        st.session_state.pop("refresh_proc", None)
        st.session_state.pop("refresh_started", None)


refresh_status(snapshot.build_id)
build, language = snapshot.build_id, i18n.current()

# --- Campaign -------------------------------------------------------------------------------

listing = cached(build, language, "campaigns_with_results")
if listing.empty:
    st.info(
        _(
            "No launched campaign in this build yet. Launch one on the Campaigns page, then refresh the metrics."
        )
    )
    st.stop()

labels = {int(row.campaign_id): results.campaign_label(row) for row in listing.itertuples(index=False)}
campaign_id = st.selectbox(_("Campaign"), list(labels), format_func=labels.get, key="results_pick")
funnel = cached(build, language, "funnel", campaign_id)

if funnel.sent == 0:
    st.info(
        _(
            "Nothing sent yet for «{name}» in this build ({planned} planned, {suppressed} suppressed, "
            "{holdout} in the holdout). Refresh the metrics once sending has started."
        ).format(
            name=funnel.campaign_name,
            planned=i18n.number(funnel.pending),
            suppressed=i18n.number(funnel.suppressed),
            holdout=i18n.number(funnel.holdout),
        )
    )
    st.stop()

# --- Funnel ---------------------------------------------------------------------------------

st.subheader(_("Funnel"))
m = st.columns(4)
m[0].metric(_("Sent"), i18n.number(funnel.sent))
m[1].metric(
    _("Delivered"),
    i18n.number(funnel.delivered),
    help=_("Delivery rate {rate} of settled messages").format(rate=i18n.percent(funnel.delivery_rate)),
)
m[2].metric(
    _("Clicked"),
    i18n.number(funnel.clicked),
    help=_("Unique clickers (people, not link previews); CTR {rate}").format(
        rate=i18n.percent(funnel.click_through_rate)
    ),
)
m[3].metric(
    _("Converted"),
    i18n.number(funnel.converted),
    help=_("Conversion rate {rate}").format(rate=i18n.percent(funnel.conversion_rate)),
)
m = st.columns(4)
m[0].metric(
    _("Awaiting receipt"),
    i18n.number(funnel.awaiting_receipt),
    help=_(
        "Sent, but the provider's final receipt has not come yet: it may still come (or be looked up "
        "at the provider), so these are neither delivered nor not delivered, and the delivery rate "
        "leaves them out."
    ),
)
m[1].metric(
    _("Not delivered"),
    i18n.number(funnel.not_delivered),
    help=_(
        "The final receipt says so: {undelivered} undelivered, {failed} failed (see Delivery failures below)."
    ).format(undelivered=i18n.number(funnel.undelivered), failed=i18n.number(funnel.failed)),
)
m[2].metric(
    _("Delivery rate"),
    i18n.percent(funnel.delivery_rate),
    help=_(
        "Delivered / settled: of the {settled} messages whose final receipt is in (delivered or not). "
        "Messages awaiting their receipt are not counted."
    ).format(settled=i18n.number(funnel.settled)),
)
m[3].metric(
    _("Link previews"),
    i18n.number(funnel.prefetch_clicks),
    help=_(
        "Requests for the links by link previews and scanners (messaging apps drawing a preview, "
        "mail and security scanners, HEAD requests): recorded, but not people, so left out of the "
        "clicks and the CTR."
    ),
)
m = st.columns(4)
m[0].metric(
    _("Revenue attributed"),
    i18n.money(funnel.revenue, digits=0),
    help=ngettext("From {n} attributed order", "From {n} attributed orders", funnel.conversions).format(
        n=i18n.number(funnel.conversions)
    ),
)
m[1].metric(_("Cost"), i18n.money(funnel.cost, digits=0))
m[2].metric(
    _("Cost per order"),
    i18n.money(funnel.cost_per_conversion, digits=0),
    help=_("Cost of the whole send per attributed order"),
)
m[3].metric(_("CTR"), i18n.percent(funnel.click_through_rate), help=_("Unique clickers / delivered"))
st.altair_chart(charts.funnel_chart(funnel.stages()), width="stretch")
st.caption(
    _("Converted: delivered recipients with an order attributed to this message (clicked or not).")
    + " "
    + (
        ngettext(
            "Delivered counts final receipts only: {n} sent message is still awaiting its receipt.",
            "Delivered counts final receipts only: {n} sent messages are still awaiting theirs.",
            funnel.awaiting_receipt,
        ).format(n=i18n.number(funnel.awaiting_receipt))
        + " "
        if funnel.awaiting_receipt
        else ""
    )
    + _(
        "Not sent: {suppressed} suppressed by policy, {rejected} rejected by the provider, "
        "{pending} still planned; {holdout} held out on purpose."
    ).format(
        suppressed=i18n.number(funnel.suppressed),
        rejected=i18n.number(funnel.rejected),
        pending=i18n.number(funnel.pending),
        holdout=i18n.number(funnel.holdout),
    )
)

# --- Variants -------------------------------------------------------------------------------

st.subheader(_("Variants"))
metric = st.segmented_control(
    _("Judge by"),
    list(results.METRICS),
    default="ctr",
    key="results_metric",
    format_func=lambda code: i18n.label(results.METRICS, code),
)
metric = metric or "ctr"
rate = "click_through_rate" if metric == "ctr" else "conversion_rate"
verdict = cached(build, language, "verdict", campaign_id, metric)
if verdict is None:
    st.caption(_("A single variant: there is nothing to compare."))
else:
    (st.success if verdict.winner else st.info)(verdict.message)
try:
    by_variant = cached(build, language, "variants", campaign_id)
except results.MartMissing as exc:
    st.caption(str(exc))
    if verdict is not None:
        st.dataframe(
            results.shown(results.arms_frame(verdict)),
            hide_index=True,
            column_config={
                "variant": _("Variant"), "delivered": number(_("Delivered")),
                "observed_rate": number(i18n.label(results.METRICS, metric)),
                "observed_rate_low": number(_("95% low")), "observed_rate_high": number(_("95% high")),
            },
        )  # fmt: skip
else:
    if len(by_variant) > 1:
        st.altair_chart(charts.variants_chart(by_variant, rate), width="stretch")
    st.dataframe(results.shown(by_variant), hide_index=True, width="stretch", column_config=VARIANT_COLUMNS)

# --- Uplift ---------------------------------------------------------------------------------

st.subheader(_("Uplift over the holdout"))
try:
    lift = cached(build, language, "uplift", campaign_id)
except results.MartMissing as exc:
    st.caption(str(exc))
else:
    if lift is None:
        st.caption(_("This campaign kept no holdout, so its uplift cannot be measured."))
    else:
        u = st.columns(4)
        u[0].metric(
            _("Messaged: conversion"),
            i18n.percent(lift.treatment_conversion_rate),
            help=_("{converted} of {recipients} messaged recipients converted").format(
                converted=i18n.number(lift.treatment_converted),
                recipients=i18n.number(lift.treatment_recipients),
            ),
        )
        u[1].metric(
            _("Holdout: conversion"),
            i18n.percent(lift.holdout_conversion_rate),
            help=_("{converted} of {recipients} in the holdout converted (they were sent nothing)").format(
                converted=i18n.number(lift.holdout_converted), recipients=i18n.number(lift.holdout_recipients)
            ),
        )
        extra, extra_help = results.incremental_conversions_text(lift)
        u[2].metric(_("Extra buyers (est.)"), extra, help=extra_help)
        u[3].metric(
            _("Extra revenue (est.)"),
            i18n.money(lift.incremental_revenue, digits=0),
            help=_(
                "An estimate: revenue of the messaged recipients minus what the holdout's revenue per "
                "person predicts for as many. A small holdout makes it noisy."
            ),
        )
        (st.success if lift.significant else st.info)(lift.message)

# --- Breakdown ------------------------------------------------------------------------------

st.subheader(_("By segment"))
attribute = st.segmented_control(
    _("Break down by"),
    list(results.ATTRIBUTES),
    default="country",
    key="results_attribute",
    format_func=lambda code: i18n.label(results.ATTRIBUTES, code),
)
attribute = attribute or "country"
try:
    parts = cached(build, language, "breakdown", campaign_id, attribute)
except results.MartMissing as exc:
    st.caption(str(exc))
else:
    if parts.empty:
        st.caption(_("No recipients to break down."))
    else:
        attribute_title = i18n.label(results.ATTRIBUTES, attribute)
        chart = charts.breakdown_chart(results.labelled(parts, attribute), attribute_title, rate)
        st.altair_chart(chart, width="stretch")
        st.dataframe(
            results.shown(parts, attribute), hide_index=True, width="stretch", column_config=BREAKDOWN_COLUMNS
        )

# --- Failures -------------------------------------------------------------------------------

st.subheader(_("Delivery failures"))
try:
    failed = cached(build, language, "failures", campaign_id)
except results.MartMissing as exc:
    st.caption(str(exc))
else:
    if failed.empty and funnel.awaiting_receipt:
        st.caption(
            ngettext(
                "No failure reported so far; {n} message is still awaiting its receipt.",
                "No failure reported so far; {n} messages are still awaiting their receipt.",
                funnel.awaiting_receipt,
            ).format(n=i18n.number(funnel.awaiting_receipt))
        )
    elif failed.empty:
        st.caption(_("Every message sent was delivered."))
    else:
        st.dataframe(
            results.shown(failed),
            hide_index=True,
            width="stretch",
            column_order=list(FAILURE_COLUMNS),
            column_config=FAILURE_COLUMNS,
        )

# --- Opt-outs and replies -------------------------------------------------------------------

st.subheader(_("Opt-outs and replies"))
r = st.columns(3)
r[0].metric(
    _("Opt-outs"),
    i18n.number(funnel.opt_outs),
    help=_("{rate} of delivered").format(rate=i18n.percent(funnel.opt_out_rate)),
)
r[1].metric(_("Replies"), i18n.number(funnel.replies))
reveal = st.toggle(_("Show full phone numbers"), key="results_reveal")
try:
    answers = cached(build, language, "replies", campaign_id, reveal)
except results.MartMissing as exc:
    st.caption(str(exc))
else:
    r[2].metric(_("Complaints"), i18n.number(int(answers["is_complaint"].fillna(False).sum())))
    if answers.empty:
        st.caption(_("No replies."))
    else:
        st.dataframe(results.shown(answers), hide_index=True, width="stretch", column_config=REPLY_COLUMNS)

# --- Time to click --------------------------------------------------------------------------

st.subheader(_("Time to click"))
clicks = cached(build, language, "time_to_click", campaign_id)
if clicks.empty:
    st.caption(_("Nobody clicked a link in this campaign."))
else:
    st.altair_chart(charts.time_to_click_chart(clicks), width="stretch")
    st.caption(results.time_to_click_summary(clicks))

# --- Export ---------------------------------------------------------------------------------

st.subheader(_("Export"))
full = st.toggle(_("Full phone numbers in the export"), key="export_reveal")
st.download_button(
    _("Per-message results (CSV)"),
    functools.partial(results.export_csv, campaign_id, full),  # written only when clicked
    f"campaign_{campaign_id}_results.csv",
    "text/csv",
    key="export_csv",
    icon=":material/download:",
)
