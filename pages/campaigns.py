"""Campaigns: create one, check its audience and bill, launch it, and follow it."""

import streamlit as st

from smsops import abtest, campaigns, config, dispatch, metrics, policy, segments, warehouse

st.title("Campaigns")

snapshot = warehouse.current()
if snapshot is None:
    st.info("The warehouse has not been built yet. Run `smsops build` (or `make run`) and reload.")
    st.stop()

provider = config.provider_name()
if provider == "sandbox":
    st.caption(
        ":material/science: Sending goes to the **sandbox**: a local simulator, no real SMS leaves this machine."
    )

listing = campaigns.list_all()
st.dataframe(
    listing,
    hide_index=True,
    width="stretch",
    column_config={"campaign_id": st.column_config.NumberColumn("id", format="%d")},
)

new_tab, launch_tab, follow_tab = st.tabs(["New campaign", "Check and launch", "Follow"])

# --- New ----------------------------------------------------------------------------------

with new_tab, st.form("campaign_new"):
    name = st.text_input("Name", key="new_name", placeholder="Black Friday early access")
    kind = st.radio("Kind", ["promo", "service"], horizontal=True, key="new_kind",
                    format_func={"promo": "Promotion", "service": "Service"}.get)  # fmt: skip
    audiences = {f"{s.name} (v{s.version})": (s.name, s.version) for s in segments.list_saved()}
    audiences.update({f"Ready-made: {n}": seg for n, seg in segments.ready_made().items()})
    audience = st.selectbox("Audience", list(audiences), key="new_audience")
    variant_count = st.number_input("Variants (A/B test)", 1, 5, 1, key="new_variants")
    sender_choices = config.senders()
    variants = []
    for i in range(int(variant_count)):
        label = "ABCDE"[i]
        cols = st.columns([4, 1])
        text = cols[0].text_area(f"Variant {label}", key=f"new_text_{label}", height=80,
                                 value="{{ first_name | default('Здравствуйте') }}, ")  # fmt: skip
        sender = cols[1].selectbox("Sender", sender_choices, key=f"new_sender_{label}")
        variants.append(campaigns.Variant(label, text, sender))
    c1, c2 = st.columns(2)
    test = c1.slider("Test share (A/B)", 0.05, 1.0, 1.0, 0.05, key="new_test",
                     help="The rest gets the winner once the test is decided")  # fmt: skip
    holdout = c2.slider("Holdout (control group)", 0.0, 0.5, 0.0, 0.01, key="new_holdout")
    if st.form_submit_button("Create draft"):
        try:
            created = campaigns.create(
                name,
                kind,
                audiences[audience],
                variants,
                test_fraction=test if len(variants) > 1 and test < 1 else None,
                holdout_fraction=holdout or None,
            )
        except (campaigns.CampaignError, segments.SegmentError) as exc:
            st.error(str(exc))
        else:
            st.success(
                f"Draft «{created.name}» created (id {created.campaign_id}). Check and launch it next."
            )

# --- Check and launch ---------------------------------------------------------------------


@st.dialog("Launch campaign")
def confirm_launch(campaign_id: int, to_send: int, cost: str) -> None:
    st.write(f"Plan **{to_send:,}** messages for **{cost}**? The audience is frozen now; sending starts at once "
             "(within each recipient's allowed hours) and can be paused.")  # fmt: skip
    if st.button("Launch", type="primary", key="launch_confirmed"):
        result = campaigns.plan(campaign_id)  # idempotent: a second click plans nothing twice
        st.session_state["launched"] = result
        st.session_state.pop("confirming", None)
        st.rerun()


with launch_tab:
    drafts = {f"{c.name} (id {c.campaign_id})": c.campaign_id for c in campaigns.drafts()}
    if not drafts:
        st.info("No draft campaigns. Create one in the first tab.")
    else:
        chosen = st.selectbox("Draft", list(drafts), key="launch_pick")
        try:
            preview = campaigns.plan(drafts[chosen], dry_run=True)
        except campaigns.CampaignError as exc:
            st.error(str(exc))
        else:
            st.markdown("**Audience, step by step**")
            st.table(
                [{"step": s.label, "removed": s.removed, "remaining": s.remaining} for s in preview.waterfall]
            )
            m1, m2, m3, m4 = st.columns(4)
            m1.metric("To send", f"{preview.to_send:,}")
            m2.metric("Deferred by quiet hours", f"{preview.deferred:,}")
            m3.metric("Segments", f"{preview.segments:,}")
            cost = ", ".join(f"{amount:,.2f} {currency}" for currency, amount in preview.cost.items()) or "0"
            m4.metric("Cost", cost)
            if preview.awaiting_winner:
                st.caption(f"{preview.awaiting_winner:,} more will get the winning variant after the test.")
            if st.button("Launch…", type="primary", key="launch_start"):
                st.session_state["confirming"] = drafts[chosen]
            if st.session_state.get("confirming") == drafts[chosen]:
                confirm_launch(drafts[chosen], preview.to_send, cost)
    launched = st.session_state.get("launched")
    if launched is not None:
        st.success(f"Campaign {launched.campaign_id} launched: {launched.to_send:,} messages planned.")

# --- Follow -------------------------------------------------------------------------------

with follow_tab:
    live = {f"{c.name} (id {c.campaign_id}, {c.status})": c.campaign_id for c in campaigns.launched()}
    if not live:
        st.info("No launched campaigns yet.")
    else:
        picked = st.selectbox("Campaign", list(live), key="follow_pick")
        cid = live[picked]
        progress = dispatch.progress(cid)
        st.progress(
            progress.fraction, text=f"{progress.done:,} of {progress.total:,} done · {progress.status}"
        )
        f1, f2, f3, f4 = st.columns(4)
        f1.metric("Submitted", f"{progress.submitted:,}")
        f2.metric("Due now", f"{progress.due:,}")
        f3.metric("Waiting", f"{progress.waiting:,}")
        f4.metric("Not sent", f"{progress.total - progress.submitted - progress.due - progress.waiting:,}")
        if progress.reasons:
            st.table({policy.explain(r): n for r, n in progress.reasons.items()})
        results = metrics.variant_results(cid, st.session_state.get("ab_metric", "ctr"))
        if len(results) >= 2:
            st.markdown("**A/B test**")
            st.segmented_control("Judge by", ["ctr", "conversion"], default="ctr", key="ab_metric",
                                 format_func={"ctr": "clicks (CTR)", "conversion": "conversions"}.get)  # fmt: skip
            verdict = abtest.compare(
                results, metric="CTR" if st.session_state.get("ab_metric", "ctr") == "ctr" else "conversion"
            )
            st.table([{"variant": a.name, "delivered": a.trials, "rate": f"{a.rate:.2%}",
                       "95% interval": f"{a.low:.2%} – {a.high:.2%}"} for a in verdict.arms])  # fmt: skip
            (st.success if verdict.winner else st.info)(verdict.message)
            st.caption(
                f"Figures from warehouse build {warehouse.current().build_id}: refresh the build for newer ones."
            )
            waiting = progress.reasons.get("awaiting_winner", 0)
            if (
                verdict.winner
                and waiting
                and st.button(f"Send {verdict.winner} to the other {waiting:,}", key="release_winner")
            ):
                released = campaigns.release_remainder(cid, verdict.winner)
                st.success(f"{released:,} messages of {verdict.winner} planned.")
        b1, b2, b3, b4 = st.columns(4)
        if progress.status == "running" and b1.button("Pause", key="follow_pause"):
            campaigns.pause(cid)
            st.rerun()
        if progress.status == "paused" and b1.button("Resume", key="follow_resume"):
            campaigns.resume(cid)
            st.rerun()
        if progress.status in ("running", "paused") and b2.button("Cancel the rest", key="follow_cancel"):
            campaigns.cancel(cid)
            st.rerun()
        if b3.button("Retry the failed", key="follow_retry"):
            st.info(f"{campaigns.retry_failed(cid):,} message(s) queued again.")
        b4.button("Refresh", key="follow_refresh")
