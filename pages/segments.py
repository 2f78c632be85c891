"""Segments: build an audience from rules and see its size, reach and make-up as you go."""

import uuid
from datetime import date, timedelta

import altair as alt
import pandas as pd
import streamlit as st

from smsops import segments, warehouse

st.title("Segments")

snapshot = warehouse.current()
if snapshot is None:
    st.info("The warehouse has not been built yet. Run `smsops build` (or `make run`) and reload.")
    st.stop()

FIELDS = segments.fields()
NAMES = list(FIELDS)


def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


def new_rule(field: str = "city") -> dict:
    spec = FIELDS.get(field) or FIELDS[NAMES[0]]
    return {"id": new_id("r"), "field": spec.name, "op": spec.ops[0], "value": None}


def load(definition: dict) -> None:
    """Put a segment definition into the editor."""
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
    st.session_state["seg_name"] = definition.get("name", "")


if "seg_items" not in st.session_state:
    load(segments.to_dict(segments.champions()))


@st.cache_data(show_spinner=False, max_entries=64)
def suggestions(build_id: str, field: str) -> list[str]:
    return [value for value, _ in segments.suggest_values(field)]


@st.cache_data(show_spinner=False, max_entries=256)
def measure(build_id: str, definition: dict):
    segment = segments.from_dict(definition)
    return segments.breakdown(segment), segments.sample(segment, n=20)


def value_widget(rule: dict, key: str):
    """The input for a rule's value, fitting the field's type and the operator."""
    spec = FIELDS[rule["field"]]
    op, value = rule["op"], rule.get("value")
    if op in ("is_empty", "is_not_empty", "is_true", "is_false"):
        return None
    if op in ("in", "not_in"):
        options = suggestions(snapshot.build_id, spec.name)
        current = [v for v in (value or []) if isinstance(v, str)]
        chosen = st.multiselect("values", sorted(set(options) | set(current)), default=current, key=key,
                                accept_new_options=True, label_visibility="collapsed")  # fmt: skip
        return chosen or None
    if op in ("within_last_days", "not_within_last_days"):
        return int(
            st.number_input("days", 1, 36_600, int(value or 30), key=key, label_visibility="collapsed")
        )
    if spec.type in ("date", "timestamp"):
        if op == "between":
            low, high = value or (str(date.today() - timedelta(days=30)), str(date.today()))
            picked = st.date_input("range", (date.fromisoformat(low), date.fromisoformat(high)), key=key,
                                   label_visibility="collapsed")  # fmt: skip
            return [p.isoformat() for p in picked] if len(picked) == 2 else None
        picked = st.date_input("date", date.fromisoformat(value) if value else date.today(), key=key,
                               label_visibility="collapsed")  # fmt: skip
        return picked.isoformat()
    if spec.type == "number":
        if op == "between":
            low, high = value or (0.0, 100.0)
            a, b = st.columns(2)
            return [a.number_input("from", value=float(low), key=key + "_lo", label_visibility="collapsed"),
                    b.number_input("to", value=float(high), key=key + "_hi", label_visibility="collapsed")]  # fmt: skip
        return st.number_input("number", value=float(value or 0), key=key, label_visibility="collapsed")
    if op in ("eq", "neq"):
        options = suggestions(snapshot.build_id, spec.name)
        current = value if isinstance(value, str) else None
        return st.selectbox("value", sorted(set(options) | ({current} if current else set())),
                            index=None if current is None else sorted(set(options) | {current}).index(current),
                            key=key, accept_new_options=True, label_visibility="collapsed",
                            placeholder="Choose or type a value")  # fmt: skip
    return st.text_input("text", value=value or "", key=key, label_visibility="collapsed") or None


def rule_row(rule: dict, remove_from: list) -> None:
    """One rule: field, operator, value and a remove button."""
    c1, c2, c3, c4 = st.columns([3, 3, 4, 1], vertical_alignment="center")
    field = c1.selectbox("field", NAMES, index=NAMES.index(rule["field"]) if rule["field"] in NAMES else 0,
                         format_func=lambda n: FIELDS[n].label, key=f"{rule['id']}_field",
                         label_visibility="collapsed")  # fmt: skip
    if field != rule["field"]:
        rule.update(field=field, op=FIELDS[field].ops[0], value=None)
    ops = FIELDS[field].ops
    op = c2.selectbox("operator", ops, index=ops.index(rule["op"]) if rule["op"] in ops else 0,
                      format_func=lambda o: segments.OP_LABELS.get(o, o), key=f"{rule['id']}_op_{field}",
                      label_visibility="collapsed")  # fmt: skip
    if op != rule["op"]:
        rule.update(op=op, value=None)
    with c3:
        rule["value"] = value_widget(rule, f"{rule['id']}_value_{field}_{op}")
    if c4.button("✕", key=f"{rule['id']}_remove", help="Remove this rule"):
        remove_from.remove(rule)
        st.rerun()


def definition() -> dict:
    """The editor's state as a segment definition (rules without a value yet are left out)."""

    def complete(rule: dict) -> bool:
        return (
            rule["op"] in ("is_empty", "is_not_empty", "is_true", "is_false") or rule.get("value") is not None
        )

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
        "name": st.session_state.get("seg_name") or "Untitled",
        "match": st.session_state["seg_match"],
        "rules": rules,
    }


# --- Start from ---------------------------------------------------------------------------

starts = {"": None}
starts.update({f"Saved: {s.name} (v{s.version})": segments.to_dict(s.segment) for s in segments.list_saved()})
starts.update({f"Ready-made: {name}": segments.to_dict(seg) for name, seg in segments.ready_made().items()})
start = st.selectbox("Start from", list(starts), key="seg_start", format_func=lambda s: s or "(keep editing)")
if start and st.session_state.get("seg_loaded") != start:
    load(starts[start])
    st.session_state["seg_loaded"] = start
    st.rerun()

# --- Rules --------------------------------------------------------------------------------

st.segmented_control("Contacts who match", ["all", "any"], key="seg_match",
                     format_func={"all": "all of the rules", "any": "any of the rules"}.get)  # fmt: skip
items = st.session_state["seg_items"]
for item in list(items):
    if "field" in item:
        rule_row(item, items)
    else:
        with st.container(border=True):
            head, drop = st.columns([10, 1], vertical_alignment="center")
            item["match"] = head.segmented_control(
                "group", ["all", "any"], default=item["match"], key=f"{item['id']}_match",
                format_func={"all": "all of these", "any": "any of these"}.get, label_visibility="collapsed",
            ) or item["match"]  # fmt: skip
            if drop.button("✕", key=f"{item['id']}_remove", help="Remove this group"):
                items.remove(item)
                st.rerun()
            for rule in list(item["rules"]):
                rule_row(rule, item["rules"])
            if st.button("Add a rule to this group", key=f"{item['id']}_add"):
                item["rules"].append(new_rule())
                st.rerun()

add1, add2, _ = st.columns([1, 1, 4])
if add1.button("Add rule", key="seg_add_rule"):
    items.append(new_rule())
    st.rerun()
if add2.button("Add group", key="seg_add_group"):
    items.append({"id": new_id("g"), "match": "any", "rules": [new_rule(), new_rule("rfm_segment")]})
    st.rerun()

# --- Size and make-up ---------------------------------------------------------------------

current = definition()
try:
    segment = segments.from_dict(current)
    breakdown, sample = measure(snapshot.build_id, current)
except segments.SegmentError as exc:
    st.error(str(exc))
    st.stop()

m1, m2, m3, m4 = st.columns(4)
m1.metric("Contacts", f"{breakdown.total:,}")
m2.metric("Reachable for promotions", f"{breakdown.reachable_marketing:,}")
m3.metric("Service messages only", f"{breakdown.service_only:,}")
m4.metric("Unreachable", f"{breakdown.unreachable:,}")

left, right = st.columns(2)
by_country = pd.DataFrame(list(breakdown.by_country.items()), columns=["country", "contacts"])
left.altair_chart(
    alt.Chart(by_country, title="By country of the number").mark_bar().encode(
        x=alt.X("contacts:Q", title="Contacts"), y=alt.Y("country:N", sort="-x", title=None),
        tooltip=["country", alt.Tooltip("contacts:Q", format=",")],
    ),
    width="stretch",
)  # fmt: skip
by_rfm = pd.DataFrame(list(breakdown.by_rfm_segment.items()), columns=["rfm_segment", "contacts"])
right.altair_chart(
    alt.Chart(by_rfm, title="By RFM group").mark_bar().encode(
        x=alt.X("contacts:Q", title="Contacts"), y=alt.Y("rfm_segment:N", sort="-x", title=None),
        tooltip=["rfm_segment", alt.Tooltip("contacts:Q", format=",")],
    ),
    width="stretch",
)  # fmt: skip
reasons = {
    **breakdown.unreachable_reasons,
    **{f"service only: {k}": v for k, v in breakdown.service_only_reasons.items()},
}
if reasons:
    with st.expander("Why some contacts cannot get promotions"):
        st.table(
            {segments.REASON_LABELS.get(k.removeprefix("service only: "), k): v for k, v in reasons.items()}
        )

st.subheader("A sample of the segment")
st.dataframe(sample.drop(columns=["contact_id"]), hide_index=True, width="stretch")

# --- Save ---------------------------------------------------------------------------------

with st.form("seg_save_form"):
    name = st.text_input("Name", key="seg_name")
    if st.form_submit_button("Save segment"):
        try:
            saved = segments.save(name, segments.from_dict({**current, "name": name}))
        except segments.SegmentError as exc:
            st.error(str(exc))
        else:
            st.success(
                f"Saved «{saved.name}», version {saved.version}. Campaigns evaluate it again at launch."
            )
