"""Campaigns: create one, test it on the team's numbers, check its audience and bill, launch or
schedule it, and follow it."""

from datetime import UTC, datetime, timedelta

import streamlit as st

from smsops import abtest, campaigns, config, dispatch, policy, segments, unsettled, warehouse

st.title("Campaigns")

snapshot = warehouse.current()
if snapshot is None:
    st.info("The warehouse has not been built yet. Run `smsops build` (or `make run`) and reload.")
    st.stop()

zone = config.time_zone()
provider = config.provider_name()
if provider == "sandbox":
    st.caption(
        ":material/science: Sending goes to the **sandbox**: a local simulator, no real SMS leaves this machine."
    )

listing = unsettled.listing()  # campaigns.list_all() with the unknown outcomes apart from "not sent"
when = "YYYY-MM-DD HH:mm"
for column in ("scheduled_at", "launched_at"):
    listing[column] = listing[column].dt.tz_convert(zone).dt.tz_localize(None)
st.dataframe(
    listing,
    hide_index=True,
    width="stretch",
    column_config={
        "campaign_id": st.column_config.NumberColumn("id", format="%d"),
        "scheduled_at": st.column_config.DatetimeColumn("starts", format=when, help=f"In {zone}"),
        "launched_at": st.column_config.DatetimeColumn("launched", format=when, help=f"In {zone}"),
        "not_sent": st.column_config.NumberColumn("not sent", help="Not sent, each with a reason"),
        "unknown": st.column_config.NumberColumn(
            "unknown outcome",
            help="May or may not have reached the recipient; never sent again by itself (see Follow)",
        ),
        "cost": st.column_config.NumberColumn("cost", format="accounting"),
    },
)

new_tab, launch_tab, follow_tab = st.tabs(["New campaign", "Test and launch", "Follow"])

# --- New ----------------------------------------------------------------------------------

with new_tab:
    variant_count = st.number_input("Variants (A/B test)", 1, 5, 1, key="new_variants",
                                    help="One text box per variant below")  # fmt: skip
    form = st.form("campaign_new")

with form:
    name = st.text_input("Name", key="new_name", placeholder="Black Friday early access")
    kind = st.radio("Kind", ["promo", "service"], horizontal=True, key="new_kind",
                    format_func={"promo": "Promotion", "service": "Service"}.get)  # fmt: skip
    audiences = {f"{s.name} (v{s.version})": (s.name, s.version) for s in segments.list_saved()}
    audiences.update({f"Ready-made: {n}": seg for n, seg in segments.ready_made().items()})
    audience = st.selectbox("Audience", list(audiences), key="new_audience")
    sender_choices = config.senders()
    variants = []
    for i in range(int(variant_count)):
        label = "ABCDE"[i]
        cols = st.columns([4, 1])
        text = cols[0].text_area(f"Variant {label}", key=f"new_text_{label}", height=80,
                                 value="{{ first_name | default('Здравствуйте') }}, ")  # fmt: skip
        sender = cols[1].selectbox("Sender", sender_choices, key=f"new_sender_{label}")
        variants.append(campaigns.Variant(label, text, sender))
    c1, c2, c3 = st.columns(3)
    test = c1.number_input("Test share, %", 5, 100, 100, 5, key="new_test",
                           help="With 2+ variants: the rest gets the winner once the test is decided")  # fmt: skip
    holdout = c2.number_input("Holdout (control group), %", 0, 50, 0, 1, key="new_holdout")
    window = c3.number_input("Judge the test after, hours", 1, 336, 4, key="new_window")
    auto_release = st.checkbox("Send the winner to the rest automatically when the test is decided",
                               key="new_auto_release")  # fmt: skip
    st.markdown("**When and how often**")
    w1, w2, w3 = st.columns(3)
    start = w1.radio("Start", ["now", "at a time"], horizontal=True, key="new_start",
                     help="Launching sends at once; a scheduled campaign starts by itself")  # fmt: skip
    soonest = campaigns.next_start(zone)
    day = w2.date_input(f"Day ({zone})", soonest.date(), key="new_day")
    clock = w3.time_input(f"Time ({zone})", soonest.time(), key="new_time", step=timedelta(minutes=15))
    q1, q2, q3 = st.columns(3)
    quiet = q1.text_input("Quiet hours (recipient's local time)", str(config.quiet_hours()), key="new_quiet",
                          help="start-end, e.g. 21:00-09:00; off for none")  # fmt: skip
    defaults = config.frequency_caps()
    per_day = q2.number_input("Promotions per number a day (0: no cap)", 0, 50, defaults.per_day or 0,
                              key="new_daily")  # fmt: skip
    per_week = q3.number_input("… a week (0: no cap)", 0, 100, defaults.per_week or 0, key="new_weekly")
    if st.form_submit_button("Create draft"):
        testing = len(variants) > 1 and test < 100
        try:
            created = campaigns.create(
                name,
                kind,
                audiences[audience],
                variants,
                test_fraction=test / 100 if testing else None,
                holdout_fraction=holdout / 100 or None,
                quiet=quiet,
                caps=policy.FrequencyCaps(int(per_day) or None, int(per_week) or None),
                scheduled_at=campaigns.local_time(day, clock, zone) if start == "at a time" else None,
                ab_window_hours=float(window) if testing else None,
                auto_release=bool(auto_release and testing),
            )
        except (campaigns.CampaignError, segments.SegmentError, policy.PolicyError) as exc:
            st.error(str(exc))
        else:
            st.success(f"Draft «{created.name}» created (id {created.campaign_id}). Test and launch it next.")

# --- Test and launch ----------------------------------------------------------------------


@st.dialog("Launch campaign")
def confirm_launch(campaign_id: int, to_send: int, cost: str, starts: datetime | None) -> None:
    if starts is not None:
        st.write(f"Schedule **{to_send:,}** messages (as of now) for **{cost}**, starting "
                 f"**{starts:%Y-%m-%d %H:%M}** ({zone})? The audience is frozen when it starts.")  # fmt: skip
        if st.button("Schedule", type="primary", key="launch_confirmed"):
            try:
                campaigns.schedule(campaign_id)  # idempotent: a second click only sets the same time
            except campaigns.CampaignError as exc:
                st.error(str(exc))
                return
            st.session_state["scheduled"] = campaign_id
            st.session_state.pop("confirming", None)
            st.rerun()
        return
    st.write(f"Plan **{to_send:,}** messages for **{cost}**? The audience is frozen now; sending starts at once "
             "(within each recipient's allowed hours) and can be paused.")  # fmt: skip
    if st.button("Launch", type="primary", key="launch_confirmed"):
        result = campaigns.plan(campaign_id)  # idempotent: a second click plans nothing twice
        st.session_state["launched"] = result
        st.session_state.pop("confirming", None)
        st.rerun()


with launch_tab:
    drafts = {
        f"{c.name} (id {c.campaign_id}{', scheduled' if c.status == 'scheduled' else ''})": c
        for c in campaigns.drafts()
    }
    if not drafts:
        st.info("No draft campaigns. Create one in the first tab.")
    else:
        chosen = drafts[st.selectbox("Draft", list(drafts), key="launch_pick")]
        cid = chosen.campaign_id
        settings_line = f"Quiet hours {chosen.quiet or config.quiet_hours()}"
        caps = chosen.caps or config.frequency_caps()
        settings_line += f" · at most {caps.per_day or '∞'} a day, {caps.per_week or '∞'} a week per number"
        if chosen.ab_window_hours:
            settings_line += f" · test judged after {chosen.ab_window_hours:g} h"
            settings_line += (
                ", winner sent automatically" if chosen.auto_release else ", winner sent on your click"
            )
        st.caption(settings_line)
        starts = None
        if chosen.scheduled_at is not None:
            starts = chosen.scheduled_at.astimezone(campaigns.zone_info(zone))
        if chosen.status == "scheduled":
            st.info(
                f"Scheduled: starts by itself at {starts:%Y-%m-%d %H:%M} ({zone}) while `smsops serve` runs."
            )
            if st.button("Cancel the schedule", key="unschedule"):
                campaigns.unschedule(cid)
                st.rerun()

        st.markdown("**Test send to your own numbers**")
        t1, t2 = st.columns([4, 1])
        seeds = t1.text_input("Seed numbers, comma-separated", ", ".join(config.seed_numbers()), key="seed_numbers",
                              help="Internal numbers; every variant goes to each, through the real provider")  # fmt: skip
        if t2.button("Send test", key="test_send"):
            try:
                sent = campaigns.test_send(cid, seeds)
            except campaigns.CampaignError as exc:
                st.error(str(exc))
            else:
                st.session_state.setdefault("test_sends", {})[cid] = sent
        sent = st.session_state.get("test_sends", {}).get(cid)
        if sent is not None:
            masked = sent.sample_phone.replace("*", r"\*")  # masked digits, not markdown emphasis
            st.caption(f"{sent.messages} test message(s) personalised with the data of contact "
                       f"{sent.sample_contact_id} ({masked}).")  # fmt: skip
        tests = campaigns.test_results(cid)
        if len(tests):
            shown = tests[["number", "variant", "state", "status", "reason"]].fillna("")
            shown["number"] = shown["number"].str.replace("*", r"\*")  # masked, not markdown emphasis
            st.table(shown.set_index("number"))
            st.button("Refresh the test's status", key="test_refresh")

        try:
            preview = campaigns.plan(cid, dry_run=True)
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
            future = starts if starts is not None and chosen.scheduled_at > datetime.now(UTC) else None
            if st.button("Schedule…" if future else "Launch…", type="primary", key="launch_start"):
                st.session_state["confirming"] = cid
            if st.session_state.get("confirming") == cid:
                confirm_launch(cid, preview.to_send, cost, future)
    launched = st.session_state.get("launched")
    if launched is not None:
        st.success(f"Campaign {launched.campaign_id} launched: {launched.to_send:,} messages planned.")
    if st.session_state.get("scheduled") is not None:
        st.success(f"Campaign {st.session_state['scheduled']} scheduled.")

# --- Follow -------------------------------------------------------------------------------

DECISIONS = {
    "retry": ("Send them again", "queued to be sent again"),
    "give_up": ("Close them unsent", "closed unsent"),
}


def outcomes(n: int) -> str:
    return f"{n:,} outcome{'' if n == 1 else 's'}"


def messages(n: int) -> str:
    return f"{n:,} message{'' if n == 1 else 's'}"


def forget_settling() -> None:
    st.session_state.pop("settling", None)


@st.dialog("Messages with an unknown outcome", on_dismiss=forget_settling)
def confirm_settle(campaign_id: int, decision: str, count: int) -> None:
    if decision == "retry":
        st.write(f"Send **{messages(count)}** again?")
        st.warning(
            "Some of them may already have reached their recipients: those people will get a second copy.",
            icon=":material/content_copy:",
        )
    else:
        st.write(f"Close **{messages(count)}** unsent? Nobody gets them again; they stay in the campaign as "
                 "*outcome unknown, closed by a person*.")  # fmt: skip
    name = st.text_input("Your name", st.session_state.get("decided_by", ""), key="settle_by",
                         help="Recorded with the decision")  # fmt: skip
    if st.button(DECISIONS[decision][0], type="primary", key="settle_confirmed"):
        if not name.strip():
            st.error("Enter your name: who decided is recorded with the decision.")
            return
        st.session_state["decided_by"] = name.strip()
        # a second click (or a second tab) finds nothing left to decide and changes nothing
        changed = unsettled.decide(campaign_id, decision, by=name)
        st.session_state["settled"] = (campaign_id, decision, changed)
        forget_settling()
        st.rerun()


with follow_tab:
    live = {c.campaign_id: c for c in campaigns.launched()}
    open_by_campaign = unsettled.by_campaign()

    def follow_label(campaign_id: int) -> str:
        c, pending = live[campaign_id], open_by_campaign.get(campaign_id)
        status = f"waiting for {outcomes(pending.total)}" if pending and c.status == "finished" else c.status
        return f"{c.name} (id {campaign_id}, {status})"

    if not live:
        st.info("No launched campaigns yet.")
    else:
        # picked by id: the label changes with the status, the choice must not
        followed = live[st.selectbox("Campaign", list(live), key="follow_pick", format_func=follow_label)]
        cid = followed.campaign_id
        progress = dispatch.progress(cid)
        pending = unsettled.count(cid)
        settled_rows = progress.done - pending.total  # an unknown outcome is not done
        status = progress.status
        if pending.total:
            in_flight = progress.states.get("planned", 0) + progress.states.get("sending", 0)
            waiting_for = f"waiting for {outcomes(pending.total)}"
            status = f"{status} · {waiting_for}" if in_flight and status != "finished" else waiting_for
        st.progress(
            settled_rows / progress.total if progress.total else 1.0,
            text=f"{settled_rows:,} of {progress.total:,} done · {status}",
        )
        if pending.total:
            parts = []
            if pending.awaiting_lookup:
                verb = "is" if pending.awaiting_lookup == 1 else "are"
                parts.append(f"{pending.awaiting_lookup:,} {verb} being checked with the provider")
            if pending.needs_a_person:
                verb = "needs" if pending.needs_a_person == 1 else "need"
                parts.append(f"{pending.needs_a_person:,} {verb} your decision")
            st.warning(
                f"**{pending.total:,} with an unknown outcome**: {', '.join(parts)}.", icon=":material/help:"
            )
            st.caption(
                "The request for each of these messages timed out or was cut off, or the provider's answer "
                "could not be recorded: they may or may not have reached their recipients. They are never "
                "sent again automatically. Those being checked settle by themselves once the provider can "
                "no longer accept them late; the others wait for your decision."
            )
        f1, f2, f3, f4 = st.columns(4)
        f1.metric("Submitted", f"{progress.submitted:,}")
        f2.metric("Due now", f"{progress.due:,}")
        f3.metric("Waiting", f"{progress.waiting:,}")
        f4.metric("Not sent", f"{settled_rows - progress.submitted:,}",
                  help="Not sent, each with a reason; an unknown outcome is counted apart")  # fmt: skip
        if pending.needs_a_person:
            d1, d2, _ = st.columns([1, 1, 2])
            if progress.status in ("running", "paused") and d1.button(
                "Send them again…", key="settle_retry", help="Some recipients may get a second copy"
            ):
                st.session_state["settling"] = (cid, "retry", pending.needs_a_person)
            if d2.button(
                "Close them unsent…", key="settle_give_up", help="Nobody gets them; recorded as your decision"
            ):
                st.session_state["settling"] = (cid, "give_up", pending.needs_a_person)
        settling = st.session_state.get("settling")
        if settling is not None and settling[0] == cid:
            confirm_settle(*settling)
        settled = st.session_state.pop("settled", None)  # said once, after the dialog closes
        if settled is not None and settled[0] == cid:
            _, decision, changed = settled
            if changed:
                st.success(f"{messages(changed)} {DECISIONS[decision][1]}; "
                           f"recorded as decided by {st.session_state.get('decided_by', '—')}.")  # fmt: skip
            else:
                st.info("Nothing left to decide: these messages were settled already (by a lookup or another "
                        "person). Nothing was changed.")  # fmt: skip
        if progress.reasons:
            st.table({policy.explain(r): n for r, n in progress.reasons.items()})
        metric = st.session_state.get("ab_metric") or "ctr"
        results = campaigns.variant_counts(cid, metric)
        if len(results) >= 2:
            st.markdown("**A/B test**")
            st.segmented_control("Judge by", ["ctr", "conversion"], default="ctr", key="ab_metric",
                                 format_func={"ctr": "clicks (CTR)", "conversion": "conversions"}.get)  # fmt: skip
            verdict = abtest.compare(results, metric="CTR" if metric == "ctr" else "conversion")
            st.table([{"variant": a.name, "delivered": a.trials, "rate": f"{a.rate:.2%}",
                       "95% interval": f"{a.low:.2%} – {a.high:.2%}"} for a in verdict.arms])  # fmt: skip
            (st.success if verdict.winner else st.info)(verdict.message)
            if metric == "ctr":
                st.caption("Deliveries and clicks as they arrive (the operational store).")
            else:
                st.caption(
                    f"Conversions from warehouse build {snapshot.build_id}: refresh the build for newer ones."
                )
            waiting = progress.reasons.get("awaiting_winner", 0)
            if waiting and followed.ab_window_hours and followed.launched_at:
                judged = followed.launched_at + timedelta(hours=followed.ab_window_hours)
                how = "automatically" if followed.auto_release else "when you click"
                st.caption(f"The test is judged at {judged.astimezone(campaigns.zone_info(zone)):%Y-%m-%d %H:%M} "
                           f"({zone}); the other {waiting:,} get the winner {how}.")  # fmt: skip
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
