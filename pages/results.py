"""Results: what a launched campaign achieved, from the published warehouse build."""

import functools
import time

import streamlit as st

from smsops import charts, config, results, warehouse


@st.cache_data(show_spinner=False)
def cached(build_id: str, section: str, *args):
    """``results.<section>(*args)``, cached per published build (a new build refreshes it)."""
    return getattr(results, section)(*args)


def fmt_rate(value: float | None) -> str:
    return "—" if value is None else f"{value:.1%}"


def percent(label: str) -> st.column_config.NumberColumn:
    return st.column_config.NumberColumn(label, format="percent")


def money(label: str) -> st.column_config.NumberColumn:
    return st.column_config.NumberColumn(label, format="%.0f")


VARIANT_COLUMNS = {
    "variant": "Variant", "audience": "Audience", "sent": "Sent", "delivered": "Delivered",
    "awaiting_receipt": st.column_config.NumberColumn("Awaiting receipt", help="Sent, final receipt not in yet"),
    "clicks": "Clickers",
    "prefetch_clicks": st.column_config.NumberColumn("Link previews", help="Not people: left out of the CTR"),
    "converted_recipients": "Converted", "conversions": "Orders",
    "revenue": money("Revenue, ₽"), "cost": money("Cost, ₽"),
    "replies": "Replies", "opt_outs": "Opt-outs", "complaints": "Complaints",
    "delivery_rate": percent("Delivery rate"), "delivery_rate_low": percent("Delivery 95% low"),
    "delivery_rate_high": percent("Delivery 95% high"),
    "click_through_rate": percent("CTR"), "click_through_rate_low": percent("CTR 95% low"),
    "click_through_rate_high": percent("CTR 95% high"),
    "conversion_rate": percent("Conversion rate"), "conversion_rate_low": percent("Conv. 95% low"),
    "conversion_rate_high": percent("Conv. 95% high"),
    "opt_out_rate": percent("Opt-out rate"), "opt_out_rate_low": percent("Opt-out 95% low"),
    "opt_out_rate_high": percent("Opt-out 95% high"),
    "complaint_rate": percent("Complaint rate"), "complaint_rate_low": percent("Complaint 95% low"),
    "complaint_rate_high": percent("Complaint 95% high"),
    "cost_per_conversion": money("Cost per order, ₽"),
    "roi": st.column_config.NumberColumn("ROI", format="%.2f", help="(revenue − cost) / cost"),
}  # fmt: skip
BREAKDOWN_COLUMNS = {
    "value": "Value", "sent": "Sent", "delivered": "Delivered", "clicks": "Clickers", "conversions": "Orders",
    "revenue": money("Revenue, ₽"), "cost": money("Cost, ₽"),
    "click_through_rate": percent("CTR"), "click_through_rate_low": percent("CTR 95% low"),
    "click_through_rate_high": percent("CTR 95% high"), "conversion_rate": percent("Conversion rate"),
    "conversion_rate_low": percent("Conv. 95% low"), "conversion_rate_high": percent("Conv. 95% high"),
}  # fmt: skip
FAILURE_COLUMNS = {
    "error_code": "Code", "meaning": st.column_config.TextColumn("What it means", width="large"),
    "messages": "Messages", "what_to_do": st.column_config.TextColumn("What to do", width="large"),
    "is_permanent": "Permanent", "rejected": "Rejected", "undelivered": "Undelivered", "failed": "Failed",
    "provider": "Provider",
}  # fmt: skip
REPLY_COLUMNS = {
    "received_at": st.column_config.DatetimeColumn("Received (UTC)", format="YYYY-MM-DD HH:mm"),
    "variant": "Variant", "phone": "Phone", "body": "Reply", "keyword": "Keyword", "is_complaint": "Complaint",
}  # fmt: skip


def build_is_running() -> bool:
    """A build holds the lock, or the one this session started has not taken it yet."""
    proc = st.session_state.get("refresh_proc")
    return warehouse.build_running() or (proc is not None and proc.poll() is None)


st.title("Results")

snapshot = warehouse.current()
if snapshot is None:
    st.info("The warehouse has not been built yet. Run `smsops build` (or `make run`) and reload.")
    st.stop()

if config.provider_name() == "sandbox":
    st.caption(
        ":material/science: Results of sending to the **sandbox**: a local simulator, no real SMS left "
        "this machine."
    )

# --- Which build, and refreshing it --------------------------------------------------------

running = build_is_running()
info_col, button_col = st.columns([3, 1], vertical_alignment="center")
info_col.caption(
    f"Figures from warehouse build {snapshot.build_id}, built {snapshot.built_at:%Y-%m-%d %H:%M} UTC "
    f"(in {snapshot.seconds:.0f} s)."
)
if button_col.button("Refresh metrics", key="refresh_metrics", icon=":material/refresh:", disabled=running):
    if build_is_running():
        st.info("A build is already running: the figures switch to it when it finishes.")
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
        with st.status("Refreshing metrics: dbt is building a new snapshot…"):
            if started is not None:  # this session started it: show how far along it should be
                elapsed = time.monotonic() - started
                st.progress(min(elapsed / max(snapshot.seconds, 1.0), 0.95),
                            text=f"{elapsed:.0f} s so far; the last build took {snapshot.seconds:.0f} s")  # fmt: skip
            st.write("Other pages stay usable; the figures here switch when the build is published.")
    elif latest is not None and latest.build_id != shown_build:
        st.session_state.pop("refresh_proc", None)
        st.session_state.pop("refresh_started", None)
        st.rerun(scope="app")
    elif proc is not None and proc.poll() not in (None, 0):
        log = config.paths().dbt_artifacts / "background-build.log"
        st.error(f"The build failed (exit {proc.returncode}); the figures are unchanged. See {log}.")
        st.session_state.pop("refresh_proc", None)
        st.session_state.pop("refresh_started", None)


refresh_status(snapshot.build_id)
build = snapshot.build_id

# --- Campaign -------------------------------------------------------------------------------

listing = cached(build, "campaigns_with_results")
if listing.empty:
    st.info(
        "No launched campaign in this build yet. Launch one on the Campaigns page, then refresh the metrics."
    )
    st.stop()

choices = {
    f"{row.campaign_name} (id {row.campaign_id}, {row.campaign_status}, "
    f"launched {row.launched_at:%Y-%m-%d})": int(row.campaign_id)
    for row in listing.itertuples(index=False)
}
campaign_id = choices[st.selectbox("Campaign", list(choices), key="results_pick")]
funnel = cached(build, "funnel", campaign_id)

if funnel.sent == 0:
    st.info(
        f"Nothing sent yet for «{funnel.campaign_name}» in this build ({funnel.pending:,} planned, "
        f"{funnel.suppressed:,} suppressed, {funnel.holdout:,} in the holdout). Refresh the metrics once "
        "sending has started."
    )
    st.stop()

# --- Funnel ---------------------------------------------------------------------------------

st.subheader("Funnel")
m = st.columns(4)
m[0].metric("Sent", f"{funnel.sent:,}")
m[1].metric(
    "Delivered",
    f"{funnel.delivered:,}",
    help=f"Delivery rate {fmt_rate(funnel.delivery_rate)} of settled messages",
)
m[2].metric(
    "Clicked",
    f"{funnel.clicked:,}",
    help=f"Unique clickers (people, not link previews); CTR {fmt_rate(funnel.click_through_rate)}",
)
m[3].metric("Converted", f"{funnel.converted:,}", help=f"Conversion rate {fmt_rate(funnel.conversion_rate)}")
m = st.columns(4)
m[0].metric(
    "Awaiting receipt",
    f"{funnel.awaiting_receipt:,}",
    help="Sent, but the provider's final receipt has not come yet: it may still come (or be looked up "
    "at the provider), so these are neither delivered nor not delivered, and the delivery rate "
    "leaves them out.",
)
m[1].metric(
    "Not delivered",
    f"{funnel.not_delivered:,}",
    help=f"The final receipt says so: {funnel.undelivered:,} undelivered, {funnel.failed:,} failed "
    "(see Delivery failures below).",
)
m[2].metric(
    "Delivery rate",
    fmt_rate(funnel.delivery_rate),
    help=f"Delivered / settled: of the {funnel.settled:,} messages whose final receipt is in "
    "(delivered or not). Messages awaiting their receipt are not counted.",
)
m[3].metric(
    "Link previews",
    "—" if funnel.prefetch_clicks is None else f"{funnel.prefetch_clicks:,}",
    help="Requests for the links by link previews and scanners (messaging apps drawing a preview, "
    "mail and security scanners, HEAD requests): recorded, but not people, so left out of the "
    "clicks and the CTR.",
)
m = st.columns(4)
m[0].metric("Revenue attributed", f"{funnel.revenue:,.0f} ₽", help=f"{funnel.conversions:,} orders")
m[1].metric("Cost", f"{funnel.cost:,.0f} ₽")
per_order = funnel.cost_per_conversion
m[2].metric("Cost per order", "—" if per_order is None else f"{per_order:,.0f} ₽")
m[3].metric("CTR", fmt_rate(funnel.click_through_rate), help="Unique clickers / delivered")
st.altair_chart(charts.funnel_chart(funnel.stages()), width="stretch")
st.caption(
    "Converted: delivered recipients with an order attributed to this message (clicked or not). "
    + (
        f"Delivered counts final receipts only: {funnel.awaiting_receipt:,} sent messages are still awaiting theirs. "
        if funnel.awaiting_receipt
        else ""
    )
    + f"Not sent: {funnel.suppressed:,} suppressed by policy, {funnel.rejected:,} rejected by the provider, "
    f"{funnel.pending:,} still planned; {funnel.holdout:,} held out on purpose."
)

# --- Variants -------------------------------------------------------------------------------

st.subheader("Variants")
metric = st.segmented_control(
    "Judge by", list(results.METRICS), default="ctr", key="results_metric", format_func=results.METRICS.get
)
metric = metric or "ctr"
verdict = cached(build, "verdict", campaign_id, metric)
if verdict is None:
    st.caption("A single variant: there is nothing to compare.")
else:
    (st.success if verdict.winner else st.info)(verdict.message)
try:
    by_variant = cached(build, "variants", campaign_id)
except results.MartMissing as exc:
    st.caption(str(exc))
    if verdict is not None:
        st.table([{"variant": a.name, "delivered": a.trials, "rate": f"{a.rate:.2%}",
                   "95% interval": f"{a.low:.2%} – {a.high:.2%}"} for a in verdict.arms])  # fmt: skip
else:
    if len(by_variant) > 1:
        rate = "click_through_rate" if metric == "ctr" else "conversion_rate"
        st.altair_chart(charts.variants_chart(by_variant, rate), width="stretch")
    st.dataframe(by_variant, hide_index=True, width="stretch", column_config=VARIANT_COLUMNS)

# --- Uplift ---------------------------------------------------------------------------------

st.subheader("Uplift over the holdout")
try:
    lift = cached(build, "uplift", campaign_id)
except results.MartMissing as exc:
    st.caption(str(exc))
else:
    if lift is None:
        st.caption("This campaign kept no holdout, so its uplift cannot be measured.")
    else:
        u = st.columns(4)
        u[0].metric("Messaged: conversion", fmt_rate(lift.treatment_conversion_rate),
                    help=f"{lift.treatment_converted:,} of {lift.treatment_recipients:,}")  # fmt: skip
        u[1].metric("Holdout: conversion", fmt_rate(lift.holdout_conversion_rate),
                    help=f"{lift.holdout_converted:,} of {lift.holdout_recipients:,}")  # fmt: skip
        u[2].metric("Incremental conversions", "—" if lift.incremental_conversions is None
                    else f"{lift.incremental_conversions:,.1f}")  # fmt: skip
        u[3].metric("Incremental revenue", "—" if lift.incremental_revenue is None
                    else f"{lift.incremental_revenue:,.0f} ₽")  # fmt: skip
        (st.success if lift.significant else st.info)(lift.message)

# --- Breakdown ------------------------------------------------------------------------------

st.subheader("By segment")
attribute = st.segmented_control(
    "Break down by", list(results.ATTRIBUTES), default="country", key="results_attribute",
    format_func=results.ATTRIBUTES.get,
)  # fmt: skip
attribute = attribute or "country"
try:
    parts = cached(build, "breakdown", campaign_id, attribute)
except results.MartMissing as exc:
    st.caption(str(exc))
else:
    if parts.empty:
        st.caption("No recipients to break down.")
    else:
        rate = "click_through_rate" if metric == "ctr" else "conversion_rate"
        st.altair_chart(charts.breakdown_chart(parts, results.ATTRIBUTES[attribute], rate), width="stretch")
        st.dataframe(parts, hide_index=True, width="stretch", column_config=BREAKDOWN_COLUMNS)

# --- Failures -------------------------------------------------------------------------------

st.subheader("Delivery failures")
try:
    failed = cached(build, "failures", campaign_id)
except results.MartMissing as exc:
    st.caption(str(exc))
else:
    if failed.empty and funnel.awaiting_receipt:
        st.caption(
            f"No failure reported so far; {funnel.awaiting_receipt:,} messages are still awaiting their receipt."
        )
    elif failed.empty:
        st.caption("Every message sent was delivered.")
    else:
        st.dataframe(failed, hide_index=True, width="stretch", column_order=list(FAILURE_COLUMNS),
                     column_config=FAILURE_COLUMNS)  # fmt: skip

# --- Opt-outs and replies -------------------------------------------------------------------

st.subheader("Opt-outs and replies")
r = st.columns(3)
r[0].metric("Opt-outs", f"{funnel.opt_outs:,}", help=f"{fmt_rate(funnel.opt_out_rate)} of delivered")
r[1].metric("Replies", f"{funnel.replies:,}")
reveal = st.toggle("Show full phone numbers", key="results_reveal")
try:
    answers = cached(build, "replies", campaign_id, reveal)
except results.MartMissing as exc:
    st.caption(str(exc))
else:
    r[2].metric("Complaints", f"{int(answers['is_complaint'].fillna(False).sum()):,}")
    if answers.empty:
        st.caption("No replies.")
    else:
        st.dataframe(answers, hide_index=True, width="stretch", column_config=REPLY_COLUMNS)

# --- Time to click --------------------------------------------------------------------------

st.subheader("Time to click")
clicks = cached(build, "time_to_click", campaign_id)
if clicks.empty:
    st.caption("Nobody clicked a link in this campaign.")
else:
    st.altair_chart(charts.time_to_click_chart(clicks), width="stretch")
    half, most = results.minutes_until(clicks, 0.5), results.minutes_until(clicks, 0.9)
    st.caption(f"Half of the clickers clicked within {half:,} minutes of sending; 90% within {most:,}.")

# --- Export ---------------------------------------------------------------------------------

st.subheader("Export")
full = st.toggle("Full phone numbers in the export", key="export_reveal")
st.download_button(
    "Per-message results (CSV)",
    functools.partial(results.export_csv, campaign_id, full),  # written only when clicked
    f"campaign_{campaign_id}_results.csv",
    "text/csv",
    key="export_csv",
    icon=":material/download:",
)
