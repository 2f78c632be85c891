"""Campaigns: create one, test it on the team's numbers, check its audience and bill, launch or
schedule it, and follow it."""

from datetime import UTC, datetime, timedelta

import streamlit as st

from pages._palette import palette
from smsops import (
    abtest,
    campaigns,
    composer,
    config,
    i18n,
    jobs,
    policy,
    segments,
    templates,
    unsettled,
    warehouse,
)
from smsops.i18n import _, ngettext

st.title(_("Campaigns"))

snapshot = warehouse.current()
if snapshot is None:
    st.info(_("The warehouse has not been built yet. Run `smsops build` (or `make run`) and reload."))
    st.stop()

zone = config.time_zone()
provider = config.provider_name()
if provider == "sandbox":
    st.caption(
        _(
            ":material/science: Sending goes to the **sandbox**: a local simulator, no real SMS leaves this machine."
        )
    )


FRESH = 3.0  # seconds a background read of the outbox (the list, A/B counts) is shown before it is read again


def waiting(status: jobs.Status, what: str) -> None:
    """Background work this page needs, not done yet: its progress, followed every second; the
    page runs again once it is done."""

    @st.fragment(run_every=1)
    def follow() -> None:
        now = jobs.get(status.key) or status
        if not now.running:
            st.rerun(scope="app")
        st.progress(now.fraction, text=_(now.step) if now.step else what)

    follow()


def changed(campaign_id: int) -> None:
    """A person changed the campaign's outbox: its counts and the list are read again now, not
    after a few seconds."""
    jobs.forget_all(jobs.key("tally", campaign_id))
    jobs.forget_all(jobs.key("campaign list"))
    jobs.forget_all(jobs.key("ab", campaign_id))


def when(moment) -> str:
    """A moment on the team's clock."""
    return i18n.datetime_(moment, tz=zone)


def count_messages(n: int) -> str:
    return ngettext("{n} message", "{n} messages", n).format(n=i18n.number(n))


def bill(cost: dict[str, float]) -> str:
    return ", ".join(i18n.money(amount, currency) for currency, amount in cost.items()) or i18n.money(0)


def status_label(status: str) -> str:
    return i18n.label(campaigns.STATUS_LABELS, status)


KINDS = {"promo": _("Promotion"), "service": _("Service")}


def launched(row) -> bool:
    return row.status not in ("draft", "scheduled")


def campaign_list(listing) -> None:
    """Every campaign with its counts, one row each."""
    st.dataframe(
        [
            {
                _("id"): str(row.campaign_id),
                _("Campaign"): row.name,
                _("Kind"): i18n.label(campaigns.KIND_LABELS, row.kind),
                _("Status"): status_label(row.status),
                _("Starts"): when(row.scheduled_at),
                _("Launched"): when(row.launched_at),
                # frozen at launch: a draft has no audience of its own yet, not an empty one
                _("In the segment"): i18n.number(row.audience) if launched(row) else i18n.MISSING,
                _("Planned"): i18n.number(row.planned) if launched(row) else i18n.MISSING,
                _("Waiting"): i18n.number(row.waiting),
                _("Sent"): i18n.number(row.sent),
                _("Delivered"): i18n.number(row.delivered),
                _("Not sent"): i18n.number(row.not_sent - row.left_out),  # of the planned, as Follow counts
                _("Unknown outcome"): i18n.number(row.unknown),
                _("Cost"): i18n.money(row.cost, row.currency if isinstance(row.currency, str) else "RUB"),
            }
            for row in listing.itertuples()
        ],
        hide_index=True,
        width="stretch",
        column_config={
            _("Starts"): st.column_config.TextColumn(help=_("In {zone}").format(zone=zone)),
            _("Launched"): st.column_config.TextColumn(help=_("In {zone}").format(zone=zone)),
            _("In the segment"): st.column_config.TextColumn(
                help=_("Everyone who matched the segment at launch, frozen into the campaign")
            ),
            _("Planned"): st.column_config.TextColumn(
                help=_("Planned at launch, after consent, duplicates, frequency caps and the control group")
            ),
            _("Not sent"): st.column_config.TextColumn(help=_("Planned but not sent, each with a reason")),
            _("Unknown outcome"): st.column_config.TextColumn(
                help=_("May or may not have reached the recipient; never sent again by itself (see Follow)")
            ),
            _("Cost"): st.column_config.TextColumn(help=_("Of the messages sent so far")),
        },
    )


# campaigns.list_all() with the unknown outcomes apart from "not sent": read in the background
# (seconds on a large outbox), again every few seconds, and at once when a campaign is added or moves
listed = jobs.run(
    jobs.key("campaign list", *campaigns.signature()), lambda report: unsettled.listing(), fresh_for=FRESH
)
if not listed.ready:
    waiting(listed, _("Reading the campaigns…"))
elif listed.error is not None:
    raise listed.error
elif listed.result.empty:  # a fresh install: say so, not an empty grid
    st.caption(_("No campaigns yet: create the first one below, or from Compose."))
else:
    campaign_list(listed.result)

new_tab, launch_tab, follow_tab = st.tabs([_("New campaign"), _("Test and launch"), _("Follow")])

# --- New ----------------------------------------------------------------------------------

NEW_TEXT = "{{ first_name | default('Здравствуйте') }}, "
LETTERS = "ABCDE"
audiences = campaigns.audiences()
sender_choices = config.senders()


def take_over_from_compose() -> None:
    """Fill the form with what Compose handed over (its "Create a campaign from this"), once."""
    handed = st.session_state.pop("campaign_from_compose", None)
    if handed is None:
        return
    st.session_state["new_variants"] = 1
    st.session_state["new_text_A"] = handed["text"]
    if handed["kind"] in KINDS:
        st.session_state["new_kind"] = handed["kind"]
    if handed["audience"] in audiences:
        st.session_state["new_audience"] = handed["audience"]
    if handed["sender"] in sender_choices:
        st.session_state["new_sender_A"] = handed["sender"]
    st.session_state["new_from_compose"] = handed


def insert_target() -> str:
    """The text the palette inserts into: the variant chosen under the texts, A when there is one."""
    shown = LETTERS[: int(st.session_state.get("new_variants") or 1)]
    chosen = st.session_state.get("new_insert_into") or "A"
    return f"new_text_{chosen if chosen in shown else 'A'}"


@st.cache_data(show_spinner=False, max_entries=16)
def audience_breakdown(build_id: str, definition: dict) -> segments.Breakdown:
    """Who in the audience matches, and who can be reached (the Segments page's figures)."""
    return segments.breakdown(segments.from_dict(definition))


@st.cache_data(show_spinner=False, max_entries=32)
def sample_recipients(build_id: str, definition: dict, columns: tuple[str, ...], kind: str) -> list[dict]:
    """A few recipients of the audience to preview a variant with."""
    return segments.recipients(segments.from_dict(definition), columns, kind=kind, limit=20)


def preview_variant(text: str, kind: str, definition: dict, fields: dict[str, str]) -> None:
    """What a recipient gets from a variant, right under its text, or why it cannot go."""
    empty = composer.empty_text(text, kind)
    if empty is not None:
        st.warning(empty.message)
        return
    try:
        template = templates.compile(composer.message_source(text, kind, config.opt_out_text()), fields)
    except templates.TemplateError as exc:
        st.error(str(exc))
        return
    rows = composer.preview(
        template, sample_recipients(snapshot.build_id, definition, template.fields, kind), sample=1
    )
    if rows:
        row = rows[0]
        st.caption(_("What a recipient gets") + " · " + " · ".join([
            row.encoding,
            ngettext("{n} character", "{n} characters", row.chars).format(n=i18n.number(row.chars)),
            ngettext("{n} segment", "{n} segments", row.segments).format(n=i18n.number(row.segments)),
        ]))  # fmt: skip
        st.text(row.text)


@st.fragment
def new_campaign() -> None:
    """The new-campaign form. A fragment: a text, an inserted field or another audience shows its
    preview at once without running the rest of the page; creating the draft runs it all."""
    origin = st.empty()  # where the form's content came from, said once the form is handled
    variant_count = st.number_input(_("Variants (A/B test)"), 1, 5, "min", key="new_variants",
                                    help=_("One text box per variant below"))  # fmt: skip
    name = st.text_input(_("Campaign name"), key="new_name", placeholder=_("Black Friday early access"))
    kind = st.radio(_("Kind"), list(KINDS), horizontal=True, key="new_kind", format_func=KINDS.get)
    audience = st.selectbox(
        _("Audience"), list(audiences), key="new_audience", format_func=campaigns.audience_label
    )
    definition = segments.to_dict(audiences[audience])
    reach = composer.reach(audience_breakdown(snapshot.build_id, definition), kind)
    st.caption(
        f"{composer.matching_said(reach.matching)} · {composer.reachable_said(reach.reachable, kind)} · "
        + _("the launch shows what it plans, step by step")
    )
    fields = segments.template_fields()
    variants = []
    for letter in LETTERS[: int(variant_count)]:
        text_column, sender_column = st.columns([4, 1])
        with text_column:
            text = st.text_area(_("Variant {name}").format(name=letter), key=f"new_text_{letter}", height=80)
            preview_variant(text, kind, definition, fields)
        sender = sender_column.selectbox(_("Sender"), sender_choices, key=f"new_sender_{letter}")
        variants.append(campaigns.Variant(letter, text, sender))
    if len(variants) > 1:
        st.segmented_control(_("Insert into"), [v.name for v in variants], default="A", key="new_insert_into",
                             format_func=lambda n: _("Variant {name}").format(name=n))  # fmt: skip
    palette(insert_target, "new", fields)
    c1, c2, c3 = st.columns(3)
    holdout = c1.number_input(_("Control group, %"), 0, 50, 0, 1, key="new_holdout",
                              help=_("Recorded, never sent: what they do without the message is the baseline"))  # fmt: skip
    test, window, auto_release = 100, 4, False  # one text: no test to share out, judge or release
    if len(variants) > 1:
        test = c2.number_input(_("Test share, %"), 5, 100, 100, 5, key="new_test",
                               help=_("The rest gets the winner once the test is decided"))  # fmt: skip
        window = c3.number_input(_("Judge the test after, hours"), 1, 336, 4, key="new_window")
        auto_release = st.checkbox(_("Send the winner to the rest automatically when the test is decided"),
                                   key="new_auto_release")  # fmt: skip
    st.markdown(_("**When and how often**"))
    w1, w2, w3 = st.columns(3)
    starts_choices = {"now": _("now"), "at a time": _("at a time")}
    start = w1.radio(_("Start"), list(starts_choices), horizontal=True, key="new_start", format_func=starts_choices.get,
                     help=_("Launching sends at once; a scheduled campaign starts by itself"))  # fmt: skip
    soonest = campaigns.next_start(zone)
    day = w2.date_input(_("Day ({zone})").format(zone=zone), soonest.date(), key="new_day")
    clock = w3.time_input(_("Time ({zone})").format(zone=zone), soonest.time(), key="new_time",
                          step=timedelta(minutes=15))  # fmt: skip
    q1, q2, q3 = st.columns(3)
    quiet = q1.text_input(_("Quiet hours (recipient's local time)"), str(config.quiet_hours()), key="new_quiet",
                          help=_("start-end, e.g. 21:00-09:00; off for none"))  # fmt: skip
    defaults = config.frequency_caps()
    per_day = q2.number_input(_("Promotions per number a day (0: no cap)"), 0, 50, defaults.per_day or 0,
                              key="new_daily")  # fmt: skip
    per_week = q3.number_input(_("… a week (0: no cap)"), 0, 100, defaults.per_week or 0, key="new_weekly")
    if st.button(_("Create draft"), type="primary", key="new_create"):
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
        except (campaigns.CampaignError, policy.PolicyError) as exc:
            st.error(exc.localized())
        except segments.SegmentError as exc:
            st.error(str(exc))
        else:
            st.session_state.pop("new_from_compose", None)
            st.session_state["new_created"] = (created.name, created.campaign_id)
            st.rerun()  # the whole page: the new draft is to be tested and launched next
    handed = st.session_state.get("new_from_compose")
    if handed is not None:
        origin.info(
            _("From Compose: the audience «{audience}» and the text of your message ({kind}). Check them, name "
              "the campaign and create the draft.").format(
                audience=campaigns.audience_label(handed["audience"]),
                kind=i18n.label(campaigns.KIND_LABELS, handed["kind"]),
            ),
            icon=":material/edit_note:",
        )  # fmt: skip


take_over_from_compose()
for letter in LETTERS:
    st.session_state.setdefault(f"new_text_{letter}", NEW_TEXT)

with new_tab:
    created = st.session_state.pop("new_created", None)  # said once, after the page ran again
    if created is not None:
        st.success(
            _("Draft «{name}» created (id {id}). Test and launch it next.").format(
                name=created[0], id=created[1]
            )
        )
    new_campaign()

# --- Test and launch ----------------------------------------------------------------------


def show(guard: composer.Guard) -> None:
    (st.error if guard.severity == "refuse" else st.warning)(guard.message)


@st.dialog(_("Launch campaign"))
def confirm_launch(
    campaign_id: int, to_send: int, cost: str, starts: datetime | None, guards: list[composer.Guard]
) -> None:
    # what needs a person's yes shows its figures beside a box to tick
    for guard in guards:
        if guard.severity == "warn":
            st.warning(guard.message)
    ticked = [
        st.checkbox(guard.confirmation, key=f"launch_confirm_{guard.code}", help=guard.reason)
        for guard in guards
        if guard.severity == "confirm"
    ]
    agreed = all(ticked)
    if starts is not None:
        st.markdown(
            _("Schedule **{messages}** (as of now) for **{cost}**, starting **{when}** ({zone})? The audience is "
              "frozen when it starts.").format(messages=count_messages(to_send), cost=cost, when=when(starts), zone=zone)
        )  # fmt: skip
        if st.button(_("Schedule"), type="primary", key="launch_confirmed", disabled=not agreed):
            try:
                campaigns.schedule(campaign_id)  # idempotent: a second click only sets the same time
            except campaigns.CampaignError as exc:
                st.error(exc.localized())
                return
            st.session_state["scheduled"] = campaign_id
            st.session_state.pop("confirming", None)
            st.rerun()
        return
    st.markdown(
        _("Plan **{messages}** for **{cost}**? The audience is frozen now; sending starts at once (within each "
          "recipient's allowed hours) and can be paused.").format(messages=count_messages(to_send), cost=cost)
    )  # fmt: skip
    if st.button(_("Launch"), type="primary", key="launch_confirmed", disabled=not agreed):
        # in the background (a million recipients take seconds), once: a second click, or another
        # person's, finds the launch running; and campaigns.plan plans nothing twice anyway
        jobs.start(
            jobs.key("launch", campaign_id), lambda report: campaigns.plan(campaign_id, progress=report)
        )
        st.session_state["launching"] = campaign_id
        st.session_state.pop("confirming", None)
        st.rerun()


def launch_progress() -> int | None:
    """The launch this session started: its progress while it runs, then what it planned (or why
    it was refused), said once. The campaign it is launching, while it runs."""
    campaign_id = st.session_state.get("launching")
    if campaign_id is None:
        return None
    status = jobs.wait(jobs.key("launch", campaign_id))
    if status is not None and not status.ready:
        waiting(status, _("Launching campaign {id}…").format(id=campaign_id))
        return campaign_id
    st.session_state.pop("launching", None)
    if status is None:
        return None
    jobs.forget(status.key)
    if isinstance(status.error, campaigns.CampaignError):  # e.g. the audience emptied since the preview
        st.error(status.error.localized())
    elif status.error is not None:
        raise status.error
    else:
        st.session_state["launched"] = (status.result.campaign_id, status.result.to_send)
    return None


with launch_tab:
    launching = launch_progress()
    drafts = {c.campaign_id: c for c in campaigns.drafts() if c.campaign_id != launching}

    def draft_label(campaign_id: int) -> str:
        c = drafts[campaign_id]
        if c.status == "scheduled":
            return _("{name} (id {id}, scheduled)").format(name=c.name, id=campaign_id)
        return _("{name} (id {id})").format(name=c.name, id=campaign_id)

    if not drafts:
        st.info(_("No draft campaigns. Create one in the first tab."))
    else:
        chosen = drafts[st.selectbox(_("Draft"), list(drafts), key="launch_pick", format_func=draft_label)]
        cid = chosen.campaign_id
        caps = chosen.caps or config.frequency_caps()
        quiet = chosen.quiet or config.quiet_hours()
        settings_line = _("Quiet hours {quiet} · at most {day} a day, {week} a week per number").format(
            quiet=quiet if quiet.start != quiet.end else _("off"),  # none, not "00:00-00:00"
            day=i18n.number(caps.per_day) if caps.per_day else "∞",
            week=i18n.number(caps.per_week) if caps.per_week else "∞",
        )
        if chosen.ab_window_hours:
            settings_line += " · " + _("test judged after {hours} h").format(
                hours=i18n.number(chosen.ab_window_hours)
            )
            settings_line += ", " + (
                _("winner sent automatically") if chosen.auto_release else _("winner sent on your click")
            )
        st.caption(settings_line)
        starts = None
        if chosen.scheduled_at is not None:
            starts = chosen.scheduled_at.astimezone(campaigns.zone_info(zone))
        if chosen.status == "scheduled":
            st.info(
                _("Scheduled: starts by itself at {when} ({zone}) while `smsops serve` runs.").format(
                    when=when(starts), zone=zone
                )
            )
            if st.button(_("Cancel the schedule"), key="unschedule"):
                campaigns.unschedule(cid)
                st.rerun()

        st.markdown(_("**Test send to your own numbers**"))
        t1, t2 = st.columns([4, 1])
        seeds = t1.text_input(_("Seed numbers, comma-separated"), ", ".join(config.seed_numbers()), key="seed_numbers",
                              help=_("Internal numbers; every variant goes to each, through the real provider"))  # fmt: skip
        no_seeds = composer.no_seed_numbers(seeds)
        if no_seeds is not None:
            st.info(no_seeds.message, icon=":material/phone_iphone:")
        if t2.button(_("Send test"), key="test_send", disabled=no_seeds is not None):
            try:
                sent = campaigns.test_send(cid, seeds)
            except campaigns.CampaignError as exc:
                st.error(exc.localized())
            else:
                st.session_state.setdefault("test_sends", {})[cid] = sent
        sent = st.session_state.get("test_sends", {}).get(cid)
        if sent is not None:
            masked = sent.sample_phone.replace("*", r"\*")  # masked digits, not markdown emphasis
            st.caption(
                ngettext(
                    "{n} test message personalised with the data of contact {contact} ({phone}).",
                    "{n} test messages personalised with the data of contact {contact} ({phone}).",
                    sent.messages,
                ).format(n=i18n.number(sent.messages), contact=sent.sample_contact_id, phone=masked)
            )
        tests = campaigns.test_results(cid)
        if len(tests):
            st.table(
                {
                    _("Number"): [n.replace("*", r"\*") for n in tests["number"]],  # masked, not emphasis
                    _("Variant"): list(tests["variant"]),
                    _("State"): [i18n.label(campaigns.STATE_LABELS, s) for s in tests["state"]],
                    _("Provider status"): [
                        i18n.label(campaigns.DELIVERY_LABELS, s if isinstance(s, str) else None)
                        for s in tests["status"]
                    ],
                    _("Why not sent"): [
                        policy.explain(r if isinstance(r, str) else None) for r in tests["reason"]
                    ],
                    _("Sent"): [when(t) for t in tests["sent_at"]],
                }
            )
            st.button(_("Refresh the test's status"), key="test_refresh")

        # a dry run of the launch, in the background (seconds on a large audience), kept a minute
        checked = jobs.run(
            jobs.key("preview", cid, snapshot.build_id),
            lambda report: campaigns.plan(cid, dry_run=True, progress=report),
            fresh_for=60,
        )
        if not checked.ready:
            waiting(checked, _("Checking the audience and the bill…"))
        elif isinstance(checked.error, campaigns.CampaignError):
            st.error(checked.error.localized())
        elif checked.error is not None:
            raise checked.error
        else:
            preview = checked.result
            st.markdown(_("**Audience, step by step**"))
            st.table(
                [
                    {
                        _("Step"): s.label,
                        _("Removed"): i18n.number(s.removed),
                        _("Remaining"): i18n.number(s.remaining),
                    }
                    for s in preview.waterfall
                ]
            )
            st.caption(
                _("{matching} → {planned}; quiet hours delay {deferred} of them, never drop them.").format(
                    matching=composer.matching_said(preview.audience),
                    planned=composer.planned_said(preview.to_send),
                    deferred=i18n.number(preview.deferred),
                )
            )
            reach = composer.reach(
                audience_breakdown(snapshot.build_id, segments.to_dict(chosen.segment)), chosen.kind
            )
            if reach.reachable != preview.to_send:
                st.caption(
                    _("Segments and Compose count {reachable} from the warehouse built {when}; the launch checks "
                      "consent again on the live store, duplicates within this audience and the frequency caps: the "
                      "steps above say whom each one leaves out.").format(
                        reachable=composer.reachable_said(reach.reachable, chosen.kind), when=when(snapshot.built_at)
                    )
                )  # fmt: skip
            cost = bill(preview.cost)
            m1, m2, m3, m4 = st.columns(4)
            m1.metric(_("Planned"), i18n.number(preview.to_send),
                      help=_("After consent, opt-outs, duplicates, frequency caps and the control group"))  # fmt: skip
            m2.metric(_("Deferred by quiet hours"), i18n.number(preview.deferred))
            m3.metric(_("Segments"), i18n.number(preview.segments))
            m4.metric(_("Cost"), cost)
            if preview.awaiting_winner:
                st.caption(
                    ngettext(
                        "{n} more will get the winning variant after the test.",
                        "{n} more will get the winning variant after the test.",
                        preview.awaiting_winner,
                    ).format(n=i18n.number(preview.awaiting_winner))
                )
            guards = campaigns.launch_guards(chosen, preview)
            for guard in guards:
                show(guard)
            refused = any(g.severity == "refuse" for g in guards)
            future = starts if starts is not None and chosen.scheduled_at > datetime.now(UTC) else None
            if st.button(_("Schedule…") if future else _("Launch…"), type="primary", key="launch_start",
                         disabled=refused):  # fmt: skip
                st.session_state["confirming"] = cid
            if st.session_state.get("confirming") == cid and not refused:
                confirm_launch(cid, preview.to_send, cost, future, guards)
    # said once, after the dialog closes: not again beside another draft
    launched = st.session_state.pop("launched", None)
    if launched is not None:
        launched_id, planned = launched
        st.success(
            _("Campaign {id} launched: {messages} planned.").format(
                id=launched_id, messages=count_messages(planned)
            )
        )
    scheduled = st.session_state.pop("scheduled", None)
    if scheduled is not None:
        st.success(_("Campaign {id} scheduled.").format(id=scheduled))

# --- Follow -------------------------------------------------------------------------------


def outcomes(n: int) -> str:
    return ngettext("{n} outcome", "{n} outcomes", n).format(n=i18n.number(n))


def decided(decision: str, n: int, by: str) -> str:
    if decision == "retry":
        said = ngettext(
            "{messages} queued to be sent again; recorded as decided by {name}.",
            "{messages} queued to be sent again; recorded as decided by {name}.",
            n,
        )
    else:
        said = ngettext(
            "{messages} closed unsent; recorded as decided by {name}.",
            "{messages} closed unsent; recorded as decided by {name}.",
            n,
        )
    return said.format(messages=count_messages(n), name=by)


def forget_settling() -> None:
    st.session_state.pop("settling", None)


@st.dialog(_("Messages with an unknown outcome"), on_dismiss=forget_settling)
def confirm_settle(campaign_id: int, decision: str, count: int) -> None:
    if decision == "retry":
        st.markdown(_("Send **{messages}** again?").format(messages=count_messages(count)))
        st.warning(
            _("Some of them may already have reached their recipients: those people will get a second copy."),
            icon=":material/content_copy:",
        )
    else:
        st.markdown(
            _("Close **{messages}** unsent? Nobody gets them again; they stay in the campaign as *outcome unknown, "
              "closed by a person*.").format(messages=count_messages(count))
        )  # fmt: skip
    name = st.text_input(_("Your name"), st.session_state.get("decided_by", ""), key="settle_by",
                         help=_("Recorded with the decision"))  # fmt: skip
    button = _("Send them again") if decision == "retry" else _("Close them unsent")
    if st.button(button, type="primary", key="settle_confirmed"):
        if not name.strip():
            st.error(_("Enter your name: who decided is recorded with the decision."))
            return
        st.session_state["decided_by"] = name.strip()
        # a second click (or a second tab) finds nothing left to decide and changes nothing
        changed_rows = unsettled.decide(campaign_id, decision, by=name)
        changed(campaign_id)
        st.session_state["settled"] = (campaign_id, decision, changed_rows)
        forget_settling()
        st.rerun()


def unknown_outcomes(pending: unsettled.Unsettled) -> None:
    """How many messages have an unknown outcome, which settle by themselves and which need a person."""
    parts = []
    if pending.awaiting_lookup:
        parts.append(
            ngettext(
                "{n} is being checked with the provider",
                "{n} are being checked with the provider",
                pending.awaiting_lookup,
            ).format(n=i18n.number(pending.awaiting_lookup))
        )
    if pending.needs_a_person:
        parts.append(
            ngettext("{n} needs your decision", "{n} need your decision", pending.needs_a_person).format(
                n=i18n.number(pending.needs_a_person)
            )
        )
    st.warning(
        _("**{n} with an unknown outcome**: {parts}.").format(
            n=i18n.number(pending.total), parts=", ".join(parts)
        ),
        icon=":material/help:",
    )
    st.caption(
        _("The request for each of these messages timed out or was cut off, or the provider's answer could "
          "not be recorded: they may or may not have reached their recipients. They are never sent again "
          "automatically. Those being checked settle by themselves once the provider can no longer accept "
          "them late; the others wait for your decision.")
    )  # fmt: skip


def follow_counts(campaign_id: int) -> campaigns.Tally:
    """A launched campaign's progress against what its launch planned, all from one read of its
    outbox: sent and not sent only grow while it sends."""
    # one read of a large outbox takes a moment: kept for a few seconds (reruns between the
    # fragment's own runs reuse it), read again at once when a campaign moves (pause, finish…)
    counted = jobs.run(
        jobs.key("tally", campaign_id, *campaigns.signature()),
        lambda report: campaigns.tally(campaign_id),
        fresh_for=FRESH - 0.5,
    )
    if not counted.ready:
        waiting(counted, _("Counting the campaign's messages…"))
        st.stop()  # Follow is the page's last part: nothing below it needs the counts
    if counted.error is not None:
        raise counted.error
    counts = counted.result
    pending = unsettled.Unsettled(campaign_id, counts.unknown)
    status = status_label(counts.status)
    if pending.total:
        in_flight = counts.due + counts.waiting + counts.sending
        waiting_for = _("waiting for {outcomes}").format(outcomes=outcomes(pending.total))
        status = f"{status} · {waiting_for}" if in_flight and counts.status != "finished" else waiting_for
    st.progress(
        counts.fraction,
        text=ngettext(
            "{done} of {planned} planned message done · {status}",
            "{done} of {planned} planned messages done · {status}",
            counts.planned,
        ).format(done=i18n.number(counts.done), planned=i18n.number(counts.planned), status=status),
    )
    st.caption(
        _("At launch: {matching} → {planned}.").format(
            matching=composer.matching_said(counts.in_segment), planned=composer.planned_said(counts.planned)
        )
    )
    if counts.left_out:
        with st.expander(_("Who was left out at launch, and why")):
            st.table([{_("Reason"): policy.explain(reason), _("Contacts"): i18n.number(n)}
                      for reason, n in counts.left_out.items()])  # fmt: skip
    if pending.total:
        unknown_outcomes(pending)
    f1, f2, f3, f4 = st.columns(4)
    f1.metric(_("Submitted"), i18n.number(counts.sent), help=_("Handed to the provider"))
    f2.metric(_("Due now"), i18n.number(counts.due))
    f3.metric(_("Waiting"), i18n.number(counts.waiting))
    f4.metric(_("Not sent"), i18n.number(counts.not_sent),
              help=_("Planned but not sent, each with a reason; an unknown outcome is counted apart"))  # fmt: skip
    if pending.needs_a_person:
        d1, d2, _rest = st.columns([1, 1, 2])
        if counts.status in ("running", "paused") and d1.button(
            _("Send them again…"), key="settle_retry", help=_("Some recipients may get a second copy")
        ):
            st.session_state["settling"] = (campaign_id, "retry", pending.needs_a_person)
            st.rerun()  # the whole page, where the confirmation opens
        if d2.button(
            _("Close them unsent…"),
            key="settle_give_up",
            help=_("Nobody gets them; recorded as your decision"),
        ):
            st.session_state["settling"] = (campaign_id, "give_up", pending.needs_a_person)
            st.rerun()
    if counts.reasons:
        st.table([{_("Reason"): policy.explain(reason), _("Messages"): i18n.number(n)}
                  for reason, n in counts.reasons.items()])  # fmt: skip
    return counts


FOLLOW_EVERY = timedelta(seconds=3)  # how often progress is read again while it can move by itself


def follow_live(campaign_id: int, refreshing: bool) -> campaigns.Tally:
    """The progress part of Follow: a fragment that runs again every ``FOLLOW_EVERY`` while the
    campaign's counts can move (``refreshing``). When a run of its own finds that this changed,
    the whole page runs again, so that it starts or stops refreshing (the list and buttons too)."""
    counts = follow_counts(campaign_id)
    if counts.moving != refreshing and not st.session_state.get("follow_inline"):
        st.rerun()  # not from within a run of the whole page: a click later in it would be lost
    return counts


with follow_tab:
    live = {c.campaign_id: c for c in campaigns.launched()}
    open_by_campaign = unsettled.by_campaign()

    def follow_label(campaign_id: int) -> str:
        c, pending = live[campaign_id], open_by_campaign.get(campaign_id)
        if pending and c.status == "finished":
            status = _("waiting for {outcomes}").format(outcomes=outcomes(pending.total))
        else:
            status = status_label(c.status)
        return _("{name} (id {id}, {status})").format(name=c.name, id=campaign_id, status=status)

    if not live:
        st.info(_("No launched campaigns yet."))
    else:
        # picked by id: the label changes with the status, the choice must not
        followed = live[st.selectbox(_("Campaign"), list(live), key="follow_pick", format_func=follow_label)]
        cid = followed.campaign_id
        looked_up = open_by_campaign[cid].awaiting_lookup if cid in open_by_campaign else 0
        refreshing = campaigns.still_moving(followed.status, looked_up)
        st.session_state["follow_inline"] = True  # the fragment runs within this run of the page
        try:
            counts = st.fragment(follow_live, run_every=FOLLOW_EVERY if refreshing else None)(cid, refreshing)
        finally:
            st.session_state.pop("follow_inline", None)
        settling = st.session_state.get("settling")
        if settling is not None and settling[0] == cid:
            confirm_settle(*settling)
        settled = st.session_state.pop("settled", None)  # said once, after the dialog closes
        if settled is not None and settled[0] == cid:
            _cid, decision, count = settled
            if count:
                st.success(decided(decision, count, st.session_state.get("decided_by", i18n.MISSING)))
            else:
                st.info(_("Nothing left to decide: these messages were settled already (by a lookup or another "
                          "person). Nothing was changed."))  # fmt: skip
        metric = st.session_state.get("ab_metric") or "ctr"
        results = {}
        if len(followed.variants) >= 2:  # an A/B test: its counts, read in the background
            counted = jobs.run(
                jobs.key("ab", cid, metric),
                lambda report: campaigns.variant_counts(cid, metric),
                fresh_for=FRESH,
            )
            if not counted.ready:
                waiting(counted, _("Counting the variants' results…"))
            elif counted.error is not None:
                raise counted.error
            else:
                results = counted.result
        if len(results) >= 2:
            st.markdown(_("**A/B test**"))
            metrics = {"ctr": _("clicks (CTR)"), "conversion": _("conversions")}
            st.segmented_control(_("Judge by"), list(metrics), default="ctr", key="ab_metric",
                                 format_func=metrics.get)  # fmt: skip
            verdict = abtest.compare(results, metric="CTR" if metric == "ctr" else "conversion")
            st.table(
                [
                    {
                        _("Variant"): a.name,
                        _("Delivered"): i18n.number(a.trials),
                        _("Rate"): i18n.percent(a.rate, 2),
                        _("95% interval"): f"{i18n.percent(a.low, 2)} – {i18n.percent(a.high, 2)}",
                    }
                    for a in verdict.arms
                ]
            )
            (st.success if verdict.winner else st.info)(verdict.message)
            if metric == "ctr":
                st.caption(_("Deliveries and clicks as they arrive (the operational store)."))
            else:
                st.caption(
                    _(
                        "Conversions from the warehouse build of {when}: refresh the build for newer ones."
                    ).format(when=when(snapshot.built_at))
                )
            waiting = counts.reasons.get("awaiting_winner", 0)
            if waiting and followed.ab_window_hours and followed.launched_at:
                judged = followed.launched_at + timedelta(hours=followed.ab_window_hours)
                how = _("automatically") if followed.auto_release else _("when you click")
                st.caption(
                    _("The test is judged at {when} ({zone}); the other {n} get the winner {how}.").format(
                        when=when(judged), zone=zone, n=i18n.number(waiting), how=how
                    )
                )
            if (
                verdict.winner
                and waiting
                and st.button(
                    _("Send {winner} to the other {n}").format(winner=verdict.winner, n=i18n.number(waiting)),
                    key="release_winner",
                )
            ):
                released = campaigns.release_remainder(cid, verdict.winner)
                changed(cid)
                st.success(
                    ngettext(
                        "{n} message of {winner} planned.", "{n} messages of {winner} planned.", released
                    ).format(n=i18n.number(released), winner=verdict.winner)
                )
        b1, b2, b3, b4 = st.columns(4)
        if counts.status == "running" and b1.button(_("Pause"), key="follow_pause"):
            campaigns.pause(cid)
            changed(cid)
            st.rerun()
        if counts.status == "paused" and b1.button(_("Resume"), key="follow_resume"):
            campaigns.resume(cid)
            changed(cid)
            st.rerun()
        if counts.status in ("running", "paused") and b2.button(_("Cancel the rest"), key="follow_cancel"):
            campaigns.cancel(cid)
            changed(cid)
            st.rerun()
        if b3.button(_("Retry the failed"), key="follow_retry"):
            retried = campaigns.retry_failed(cid)
            changed(cid)
            st.info(
                ngettext("{n} message queued again.", "{n} messages queued again.", retried).format(
                    n=i18n.number(retried)
                )
            )
        b4.button(_("Refresh"), key="follow_refresh")
