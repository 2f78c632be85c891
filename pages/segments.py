"""Segments: build an audience from rules and see its size, reach and make-up as you go."""

import uuid
from datetime import date, timedelta

import altair as alt
import pandas as pd
import streamlit as st

from smsops import i18n, segments, warehouse
from smsops.i18n import _

st.title(_("Segments"))

snapshot = warehouse.current()
if snapshot is None:
    st.info(_("The warehouse has not been built yet. Run `smsops build` (or `make run`) and reload."))
    st.stop()

FIELDS = segments.fields()
NAMES = list(FIELDS)
NO_VALUE = ("is_empty", "is_not_empty", "is_true", "is_false")
# labels in this run's language (a widget's format_func is a lookup, not a translation)
FIELD_LABELS = {name: spec.shown_label for name, spec in FIELDS.items()}
OP_LABELS = {op: i18n.label(segments.OP_LABELS, op) for op in segments.OP_LABELS}


def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


def new_rule(field: str = "city") -> dict:
    spec = FIELDS.get(field) or FIELDS[NAMES[0]]
    return {"id": new_id("r"), "field": spec.name, "op": spec.ops[0], "value": None}


def load(definition: dict, name: str | None = None) -> None:
    """Put a segment definition into the editor (under ``name`` when given)."""
    items = []
    for rule in definition.get("rules", []):
        if "field" in rule:
            items.append({**rule, "id": new_id("r")})
        else:
            kind = "all" if "all" in rule else "any"
            items.append({
                "id": new_id("g"), "match": kind,
                "rules": [{**r, "id": new_id("r")} for r in rule[kind] if "field" in r],
            })  # fmt: skip
    st.session_state["seg_items"] = items
    st.session_state["seg_match"] = definition.get("match", "all")
    st.session_state["seg_name"] = name if name is not None else definition.get("name", "")


if "seg_items" not in st.session_state:
    load(segments.to_dict(segments.champions()), i18n.label(segments.READY_MADE_LABELS, "champions"))


@st.cache_data(show_spinner=False, max_entries=64)
def suggestions(build_id: str, field: str) -> list[str]:
    return [value for value, _count in segments.suggest_values(field)]


@st.cache_data(show_spinner=False, max_entries=256)
def measure(build_id: str, definition: dict):
    segment = segments.from_dict(definition)
    return segments.breakdown(segment), segments.sample(segment, n=20)


def value_widget(rule: dict, key: str):
    """The input for a rule's value, fitting the field's type and the operator."""
    spec = FIELDS[rule["field"]]
    op, value = rule["op"], rule.get("value")
    if op in NO_VALUE:
        return None
    if op in ("in", "not_in"):
        current = [v for v in (value or []) if isinstance(v, str)]
        options = sorted(set(suggestions(snapshot.build_id, spec.name)) | set(current))
        shown = {v: segments.value_label(spec.name, v) for v in options}  # codes as their labels
        chosen = st.multiselect(_("values"), options, default=current, key=key, format_func=lambda v: shown.get(v, v),
                                accept_new_options=True, label_visibility="collapsed")  # fmt: skip
        return chosen or None
    if op in ("within_last_days", "not_within_last_days"):
        return int(
            st.number_input(_("days"), 1, 36_600, int(value or 30), key=key, label_visibility="collapsed")
        )
    if spec.type in ("date", "timestamp"):
        if op == "between":
            low, high = value or (str(date.today() - timedelta(days=30)), str(date.today()))
            picked = st.date_input(_("range"), (date.fromisoformat(low), date.fromisoformat(high)), key=key,
                                   label_visibility="collapsed")  # fmt: skip
            return [p.isoformat() for p in picked] if len(picked) == 2 else None
        picked = st.date_input(_("date"), date.fromisoformat(value) if value else date.today(), key=key,
                               label_visibility="collapsed")  # fmt: skip
        return picked.isoformat()
    if spec.type == "number":
        if op == "between":
            low, high = value or (0.0, 100.0)
            a, b = st.columns(2)
            return [a.number_input(_("from"), value=float(low), key=key + "_lo", label_visibility="collapsed"),
                    b.number_input(_("to"), value=float(high), key=key + "_hi", label_visibility="collapsed")]  # fmt: skip
        return st.number_input(_("number"), value=float(value or 0), key=key, label_visibility="collapsed")
    if op in ("eq", "neq"):
        options = sorted(
            set(suggestions(snapshot.build_id, spec.name)) | ({value} if isinstance(value, str) else set())
        )
        shown = {v: segments.value_label(spec.name, v) for v in options}  # codes as their labels
        return st.selectbox(_("value"), options, index=options.index(value) if value in options else None,
                            format_func=lambda v: shown.get(v, v), key=key, accept_new_options=True,
                            label_visibility="collapsed",
                            placeholder=_("Choose or type a value"))  # fmt: skip
    return st.text_input(_("text"), value=value or "", key=key, label_visibility="collapsed") or None


def rule_row(rule: dict, remove_from: list) -> None:
    """One rule: field, operator, value and a remove button."""
    c1, c2, c3, c4 = st.columns([3, 3, 4, 1], vertical_alignment="center")
    field = c1.selectbox(_("field"), NAMES, index=NAMES.index(rule["field"]) if rule["field"] in NAMES else 0,
                         format_func=FIELD_LABELS.get, key=f"{rule['id']}_field",
                         label_visibility="collapsed")  # fmt: skip
    if field != rule["field"]:
        rule.update(field=field, op=FIELDS[field].ops[0], value=None)
    ops = FIELDS[field].ops
    op = c2.selectbox(_("operator"), ops, index=ops.index(rule["op"]) if rule["op"] in ops else 0,
                      format_func=lambda o: OP_LABELS.get(o, o), key=f"{rule['id']}_op_{field}",
                      label_visibility="collapsed")  # fmt: skip
    if op != rule["op"]:
        rule.update(op=op, value=None)
    with c3:
        rule["value"] = value_widget(rule, f"{rule['id']}_value_{field}_{op}")
    if c4.button("✕", key=f"{rule['id']}_remove", help=_("Remove this rule")):
        remove_from.remove(rule)
        st.rerun()


def definition() -> dict:
    """The editor's state as a segment definition (rules without a value yet are left out)."""

    def complete(rule: dict) -> bool:
        return rule["op"] in NO_VALUE or rule.get("value") is not None

    rules = []
    for item in st.session_state["seg_items"]:
        if "field" in item:
            if complete(item):
                rules.append({k: item[k] for k in ("field", "op", "value")})
        else:
            inner = [{k: r[k] for k in ("field", "op", "value")} for r in item["rules"] if complete(r)]
            if inner:
                rules.append({item["match"]: inner})
    return {
        "name": st.session_state.get("seg_name") or _("Untitled"),
        "match": st.session_state["seg_match"],
        "rules": rules,
    }


# --- Start from ---------------------------------------------------------------------------

# what to start from: key -> (what the list shows, the definition, the name it gets)
starts: dict[str, tuple[str, dict, str]] = {"": (_("(keep editing)"), {}, "")}
for kept in segments.list_saved():
    title = _("Saved: {name} (version {version})").format(name=kept.name, version=kept.version)
    starts[f"saved:{kept.name}:{kept.version}"] = (title, segments.to_dict(kept.segment), kept.name)
for key, ready in segments.ready_made().items():
    title = i18n.label(segments.READY_MADE_LABELS, key)
    starts[f"ready:{key}"] = (_("Ready-made: {name}").format(name=title), segments.to_dict(ready), title)
start = st.selectbox(_("Start from"), list(starts), key="seg_start", format_func=lambda s: starts[s][0])
if start and st.session_state.get("seg_loaded") != start:
    _title, chosen, given = starts[start]
    load(chosen, given)
    st.session_state["seg_loaded"] = start
    st.rerun()

# --- Rules --------------------------------------------------------------------------------

MATCH = {"all": _("all of the rules"), "any": _("any of the rules")}
GROUP_MATCH = {"all": _("all of these"), "any": _("any of these")}
st.segmented_control(_("Contacts who match"), ["all", "any"], key="seg_match", format_func=MATCH.get)
items = st.session_state["seg_items"]
for item in list(items):
    if "field" in item:
        rule_row(item, items)
    else:
        with st.container(border=True):
            head, drop = st.columns([10, 1], vertical_alignment="center")
            item["match"] = head.segmented_control(
                _("group"), ["all", "any"], default=item["match"], key=f"{item['id']}_match",
                format_func=GROUP_MATCH.get, label_visibility="collapsed",
            ) or item["match"]  # fmt: skip
            if drop.button("✕", key=f"{item['id']}_remove", help=_("Remove this group")):
                items.remove(item)
                st.rerun()
            for rule in list(item["rules"]):
                rule_row(rule, item["rules"])
            if st.button(_("Add a rule to this group"), key=f"{item['id']}_add"):
                item["rules"].append(new_rule())
                st.rerun()

add1, add2, _spacer = st.columns([1, 1, 4])
if add1.button(_("Add rule"), key="seg_add_rule"):
    items.append(new_rule())
    st.rerun()
if add2.button(_("Add group"), key="seg_add_group"):
    items.append({"id": new_id("g"), "match": "any", "rules": [new_rule(), new_rule("rfm_segment")]})
    st.rerun()

# --- Size and make-up ---------------------------------------------------------------------

current = definition()
try:
    segment = segments.from_dict(current)
    breakdown, sample = measure(snapshot.build_id, current)
except segments.SegmentError as exc:
    st.error(exc.translated())
    st.stop()

m1, m2, m3, m4 = st.columns(4)
m1.metric(_("Contacts that match the segment"), i18n.number(breakdown.total),
          help=_("Everyone the rules select, whatever their number or consent"))  # fmt: skip
m2.metric(_("Reachable for promotions now"), i18n.number(breakdown.reachable_marketing),
          help=_("A valid mobile number of their own and a marketing opt-in: what Compose counts as recipients. "
                 "A launch checks consent again, and duplicates and frequency caps"))  # fmt: skip
m3.metric(_("Service messages only"), i18n.number(breakdown.service_only))
m4.metric(_("Unreachable"), i18n.number(breakdown.unreachable))


def bars(counts: dict[str, str | int], label, title: str, what: str) -> alt.Chart:
    """Contacts per value (largest first), the values as labels."""
    frame = pd.DataFrame(
        [(label(value), n, i18n.number(n)) for value, n in counts.items()],
        columns=["label", "contacts", "shown"],
    )
    return alt.Chart(frame, title=title).mark_bar().encode(
        x=alt.X("contacts:Q", title=_("Contacts"), axis=alt.Axis(format="d", tickMinStep=1)),
        y=alt.Y("label:N", sort="-x", title=None),
        tooltip=[alt.Tooltip("label:N", title=what), alt.Tooltip("shown:N", title=_("Contacts"))],
    )  # fmt: skip


if breakdown.total:
    left, right = st.columns(2)
    left.altair_chart(
        bars(breakdown.by_country, segments.country_name, _("By country of the number"), _("Country")),
        width="stretch",
    )
    right.altair_chart(
        bars(breakdown.by_rfm_segment, lambda g: i18n.label(segments.RFM_LABELS, g), _("By RFM group"),
             _("RFM group")),
        width="stretch",
    )  # fmt: skip
else:
    st.info(_("No contact matches these rules."))

reasons = [
    (segments.reach_label(f"{reach}: {reason}"), n)
    for reach, counts in (("unreachable", breakdown.unreachable_reasons),
                          ("service_only", breakdown.service_only_reasons))
    for reason, n in counts.items()
]  # fmt: skip
if reasons:
    with st.expander(_("Why some contacts cannot get promotions")):
        st.table(
            pd.DataFrame(
                [(text, i18n.number(n)) for text, n in reasons], columns=[_("Reason"), _("Contacts")]
            ),
            hide_index=True,
        )

st.subheader(_("A sample of the segment"))
shown_sample = segments.sample_table(sample)
st.dataframe(
    shown_sample,
    hide_index=True,
    width="stretch",
    column_config={c: _(segments.SAMPLE_LABELS[c]) for c in shown_sample.columns},
)

# --- Save ---------------------------------------------------------------------------------

with st.form("seg_save_form"):
    name = st.text_input(_("Segment name"), key="seg_name")
    if st.form_submit_button(_("Save segment")):
        try:
            saved = segments.save(name, segments.from_dict({**current, "name": name}))
        except segments.SegmentError as exc:
            st.error(exc.translated())
        else:
            st.success(
                _("Saved «{name}», version {version}. Campaigns evaluate it again at launch.").format(
                    name=saved.name, version=saved.version
                )
            )
