"""Compose: write a message and see exactly what each recipient gets, and what it costs."""

import streamlit as st

from pages._palette import palette
from smsops import campaigns, composer, config, encoding, i18n, segments, templates, warehouse
from smsops.i18n import _, ngettext

st.title(_("Compose"))

snapshot = warehouse.current()
if snapshot is None:
    st.info(_("The warehouse has not been built yet. Run `smsops build` (or `make run`) and reload."))
    st.stop()


@st.cache_data(show_spinner=False, max_entries=16)
def audience_choices(build_id: str, saved: tuple[tuple[str, int], ...]) -> dict[str, dict]:
    """Saved segments (latest versions) and the ready-made ones, as JSON definitions; read again
    when a segment is saved (``saved``: each one's name and version), not only after a build."""
    return {key: segments.to_dict(segment) for key, segment in campaigns.audiences().items()}


@st.cache_data(show_spinner=_("Reading the audience…"), max_entries=16)
def audience(build_id: str, definition: dict, columns: tuple[str, ...], kind: str):
    segment = segments.from_dict(definition)
    grouped = segments.recipients(segment, columns, kind=kind, grouped=True)
    sample = segments.recipients(segment, columns, kind=kind, grouped=False, limit=500)
    return grouped, sample


@st.cache_data(show_spinner=False, max_entries=16)
def audience_breakdown(build_id: str, definition: dict) -> segments.Breakdown:
    """Who in the audience matches, and who can be reached (the Segments page's figures)."""
    return segments.breakdown(segments.from_dict(definition))


def rewrite(fix) -> None:
    """A one-click fix of the message text (runs before the text area is drawn again)."""
    st.session_state["compose_text"] = fix(st.session_state["compose_text"])


def segments_count(n: int) -> str:
    return ngettext("{n} segment", "{n} segments", n).format(n=i18n.number(n))


def show(guard: composer.Guard) -> None:
    (st.error if guard.severity == "refuse" else st.warning)(guard.message)


KINDS = {"promo": _("Promotion"), "service": _("Service")}

choices = audience_choices(snapshot.build_id, tuple((s.name, s.version) for s in segments.list_saved()))
top = st.columns([2, 1, 1])
chosen = top[0].selectbox(
    _("Audience"), list(choices), key="compose_audience", format_func=campaigns.audience_label
)
kind = top[1].segmented_control(
    _("Kind"), list(KINDS), default="promo", key="compose_kind", format_func=KINDS.get
)
kind = kind or "promo"
sender = top[2].selectbox(_("Sender"), config.senders(), key="compose_sender")

fields = segments.template_fields()
left, right = st.columns([3, 2])
with left:
    if "compose_text" not in st.session_state:
        st.session_state["compose_text"] = (
            "{{ first_name | default('Здравствуйте') }}, для вас скидка 15% до пятницы: "
            "{{ link('https://shop.example.ru/sale') }}"
        )
    body = st.text_area(_("Message"), key="compose_text", height=140)
    palette(lambda: "compose_text", "compose", fields)
    under_text = st.container()  # what a recipient gets, once the audience is read
    opt_out = config.opt_out_text()
    if kind == "promo":
        opt_out = st.text_input(
            _("Opt-out instruction (added to every promotion)"), value=opt_out, key="compose_opt_out"
        )
    empty = composer.empty_text(body, kind)
    if empty is not None:  # nothing to bill: the footer alone is not a message
        show(empty)
        st.stop()
    source = composer.message_source(body, kind, opt_out)
    try:  # a template past a bound (time, length, loops, nesting) is refused here, before any planning
        template = templates.compile(source, fields)
        static = encoding.analyze(template.render({}))
    except templates.TemplateError as exc:
        st.error(exc.localized())
        st.stop()

    c1, c2, c3 = st.columns(3)
    c1.metric(_("Characters"), i18n.number(static.chars),
              help=_("Of the text without personalisation: each recipient's fields add their own"))  # fmt: skip
    c2.metric(_("Encoding"), static.encoding)
    c3.metric(_("Segments"), i18n.number(static.segments))
    if static.ucs2_chars:
        st.caption(_("UCS-2 because of {reason}.").format(reason=composer.ucs2_reason(static)))
        # the message as sent, as the Segments figure above counts it; offered where it saves
        saved = composer.rewrites(body, kind, opt_out, fields)
        fix1, fix2 = st.columns(2)
        if saved.saves(saved.written, saved.smart):
            fix1.button(
                _("Replace look-alikes ({before} → {after})").format(
                    before=i18n.number(saved.written.segments), after=segments_count(saved.smart.segments)
                ),
                key="fix_smart",
                on_click=rewrite,
                args=(lambda text: encoding.smart_replace(text)[0],),
            )
        if saved.saves(saved.written, saved.transliterated):
            fix2.button(
                _("Transliterate ({before} → {after})").format(
                    before=i18n.number(saved.written.segments),
                    after=segments_count(saved.transliterated.segments),
                ),
                key="fix_translit",
                on_click=rewrite,
                args=(encoding.transliterate,),
            )

grouped, sample = audience(snapshot.build_id, choices[chosen], template.fields, kind)
reach = composer.reach(audience_breakdown(snapshot.build_id, choices[chosen]), kind)
try:  # a template can fail, or go past a bound, on one recipient's values
    estimate = composer.estimate(template, grouped)
    previews = composer.preview(template, sample)
except templates.TemplateError as exc:
    with under_text:
        st.error(exc.localized())
    st.stop()
warnings = composer.check(
    template,
    kind=kind,
    sender=sender,
    sample_texts=[p.text for p in previews],
    empty_fields=estimate.empty_fields,
    recipients=estimate.messages,
    opt_out=opt_out,
)
longest = max(estimate.segments_histogram, default=0)
per_segment = estimate.total / estimate.segments if estimate.segments else 0.0
currency = estimate.bill.currency or "RUB"
guards = [
    composer.large_send(longest, estimate.bill.totals),
    composer.footer_fit(
        templates.compile(body, fields).render({}), opt_out, kind,
        messages=estimate.messages, per_segment=per_segment, currency=currency,
    ),
    composer.placeholder_links([body]),
]  # fmt: skip

if previews:
    with under_text:
        st.caption(_("What a recipient gets (more below)"))
        st.text(previews[0].text)

with right:
    st.subheader(_("The bill"))
    b1, b2 = st.columns(2)
    b1.metric(
        _("Recipients reachable now"),
        i18n.number(estimate.messages),
        help=_("Contacts in the audience who may get this kind of message now, by the warehouse"),
    )
    b2.metric(_("Segments"), i18n.number(estimate.segments))
    b1.metric(
        _("Cost"), i18n.money(estimate.total, currency, digits=0), help=i18n.money(estimate.total, currency)
    )
    b2.metric(
        _("Per message"),
        i18n.money(estimate.total / estimate.messages, currency) if estimate.messages else i18n.MISSING,
    )
    st.caption(
        f"{composer.reachable_said(estimate.messages, kind)} · {composer.matching_said(reach.matching)}"
    )
    if reach.left_out:
        with st.expander(
            _("Why {n} of those who match cannot get it").format(
                n=i18n.number(reach.matching - reach.reachable)
            )
        ):
            st.table({_("Reason"): [why for why, _n in reach.left_out],
                      _("Contacts"): [i18n.number(n) for _why, n in reach.left_out]})  # fmt: skip
            st.caption(_("A launch checks consent again on the live store, and duplicates within the audience and "
                         "frequency caps: the campaign's Test and launch tab shows what it plans, step by step."))  # fmt: skip
    st.dataframe(
        [
            {
                _("Country"): composer.country_label(c.country),
                _("Messages"): i18n.number(c.messages),
                _("Segments"): i18n.number(c.segments),
                _("Cost"): i18n.money(c.cost, c.currency),
            }
            for c in estimate.bill.by_country
        ],
        hide_index=True,
        width="stretch",
    )
    for guard in guards:
        if guard is not None:
            show(guard)
    for w in warnings:
        (st.error if w.severity == "error" else st.warning if w.severity == "warning" else st.info)(w.message)
    if st.button(_("Create a campaign from this"), type="primary", key="compose_to_campaign",
                 icon=":material/campaign:", help=_("Opens the new-campaign form with this audience and text")):  # fmt: skip
        # the Campaigns page fills its form from this once, so nothing is typed twice
        st.session_state["campaign_from_compose"] = {
            "audience": chosen, "kind": kind, "sender": sender, "text": body,
        }  # fmt: skip
        st.switch_page("pages/campaigns.py")

st.subheader(_("What recipients get"))
for row in previews:
    with st.container(border=True):
        said = [
            row.why_label,
            row.encoding,
            ngettext("{n} character", "{n} characters", row.chars).format(n=i18n.number(row.chars)),
            segments_count(row.segments),
            i18n.money(row.price, row.currency),
        ]
        if row.country:
            said.append(composer.country_label(row.country))
        st.caption(" · ".join(said))
        st.text(row.text)
