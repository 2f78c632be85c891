"""Compose: write a message and see exactly what each recipient gets, and what it costs."""

import streamlit as st

from smsops import composer, config, encoding, segments, templates, warehouse

st.title("Compose")

snapshot = warehouse.current()
if snapshot is None:
    st.info("The warehouse has not been built yet. Run `smsops build` (or `make run`) and reload.")
    st.stop()


@st.cache_data(show_spinner=False)
def audience_choices(build_id: str) -> dict[str, dict]:
    """Saved segments (latest versions) and the ready-made ones, as JSON definitions."""
    choices = {f"{s.name} (v{s.version})": segments.to_dict(s.segment) for s in segments.list_saved()}
    choices.update(
        {f"Ready-made: {name}": segments.to_dict(seg) for name, seg in segments.ready_made().items()}
    )
    return choices


@st.cache_data(show_spinner="Reading the audience…", max_entries=16)
def audience(build_id: str, definition: dict, columns: tuple[str, ...], kind: str):
    segment = segments.from_dict(definition)
    grouped = segments.recipients(segment, columns, kind=kind, grouped=True)
    sample = segments.recipients(segment, columns, kind=kind, grouped=False, limit=500)
    return grouped, sample


def rewrite(fix) -> None:
    """A one-click fix of the message text (runs before the text area is drawn again)."""
    st.session_state["compose_text"] = fix(st.session_state["compose_text"])


choices = audience_choices(snapshot.build_id)
top = st.columns([2, 1, 1])
chosen = top[0].selectbox("Audience", list(choices), key="compose_audience")
kind = top[1].segmented_control(
    "Kind", ["promo", "service"], default="promo", key="compose_kind",
    format_func={"promo": "Promotion", "service": "Service"}.get,
)  # fmt: skip
kind = kind or "promo"
sender = top[2].selectbox("Sender", config.senders(), key="compose_sender")

fields = segments.template_fields()
left, right = st.columns([3, 2])
with left:
    if "compose_text" not in st.session_state:
        st.session_state["compose_text"] = (
            "{{ first_name | default('Здравствуйте') }}, для вас скидка 15% до пятницы: "
            "{{ link('https://shop.example.ru/sale') }}"
        )
    body = st.text_area("Message", key="compose_text", height=140)
    st.caption("Fields: " + " ".join(f"`{{{{ {name} }}}}`" for name in fields))
    opt_out = config.opt_out_text()
    if kind == "promo":
        opt_out = st.text_input(
            "Opt-out instruction (added to every promotion)", value=opt_out, key="compose_opt_out"
        )
    source = composer.message_source(body, kind, opt_out)
    try:
        template = templates.compile(source, fields)
    except templates.TemplateError as exc:
        st.error(str(exc))
        st.stop()

    static = encoding.analyze(template.render({}))
    c1, c2, c3 = st.columns(3)
    c1.metric("Characters (no personalisation)", static.chars)
    c2.metric("Encoding", static.encoding)
    c3.metric("Segments", static.segments)
    if static.ucs2_chars:
        st.caption("UCS-2 because of " + composer.ucs2_reason(static) + ".")
        saved = encoding.savings(body)
        fix1, fix2 = st.columns(2)
        fix1.button(
            f"Replace look-alikes ({saved.original_segments} → {saved.smart_segments} segments)",
            key="fix_smart",
            on_click=rewrite,
            args=(lambda text: encoding.smart_replace(text)[0],),
        )
        fix2.button(
            f"Transliterate ({saved.original_segments} → {saved.transliterated_segments} segments)",
            key="fix_translit",
            on_click=rewrite,
            args=(encoding.transliterate,),
        )

grouped, sample = audience(snapshot.build_id, choices[chosen], template.fields, kind)
estimate = composer.estimate(template, grouped)
previews = composer.preview(template, sample)
warnings = composer.check(
    template,
    kind=kind,
    sender=sender,
    sample_texts=[p.text for p in previews],
    empty_fields=estimate.empty_fields,
    recipients=estimate.messages,
    opt_out=opt_out,
)

with right:
    st.subheader("The bill")
    b1, b2 = st.columns(2)
    b1.metric(
        "Recipients",
        f"{estimate.messages:,}",
        help="Contacts in the audience who may get this kind of message",
    )
    b2.metric("Segments", f"{estimate.segments:,}")
    b1.metric(
        "Cost", f"{estimate.total:,.0f} {estimate.bill.currency or ''}", help=f"{estimate.total:,.2f} exactly"
    )
    b2.metric("Per message", f"{estimate.total / estimate.messages:,.2f}" if estimate.messages else "—")
    st.dataframe(
        [
            {"country": c.country, "messages": c.messages, "segments": c.segments, "cost": c.cost}
            for c in estimate.bill.by_country
        ],
        hide_index=True,
        width="stretch",
    )
    for w in warnings:
        (st.error if w.severity == "error" else st.warning if w.severity == "warning" else st.info)(w.message)

st.subheader("What recipients get")
for row in previews:
    with st.container(border=True):
        st.caption(
            f"{row.why} · {row.encoding} · {row.chars} characters · {row.segments} segment(s) · "
            f"{row.price:.2f} {row.currency}" + (f" · {row.country}" if row.country else "")
        )
        st.text(row.text)
