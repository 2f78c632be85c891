"""Segments: who a campaign is for, kept as data and compiled to one parameterised filter.

A segment is a tree of rules over the columns of the ``dim_contacts`` mart. Its JSON form::

    {"name": "Moscow champions", "match": "all", "rules": [
        {"field": "rfm_segment", "op": "in", "value": ["champions", "loyal"]},
        {"any": [{"field": "city", "op": "eq", "value": "Москва"},
                 {"field": "last_clicked_at", "op": "within_last_days", "value": 30}]},
        {"not": {"field": "custom.loyalty_tier", "op": "eq", "value": "basic"}}]}

``match`` joins the top-level ``rules``; an item is a rule, a group ``{"all": [...]}`` /
``{"any": [...]}``, or a negation ``{"not": item}``. In Python the same tree is made of
:class:`Rule`, :class:`Group` and :class:`Segment`; :func:`from_dict` and :func:`to_dict`
convert (``to_dict`` writes the canonical form, ``{"not": rule}`` comes back as
``{"not": {"all": [rule]}}``). A malformed item raises :class:`SegmentError` whose message
starts with the item's path, e.g. ``rules[2].any[0].value: expected a number``.

Fields. The allowlist is built from the published snapshot itself (``information_schema``
for ``dim_contacts``, cached per build) so a new mart column becomes a field without code;
each field has a type — ``text``, ``number``, ``bool``, ``date`` or ``timestamp`` — and a
label. Keys of the ``attributes`` JSON (custom import columns) become ``custom.<key>`` text
fields: the 50 most common keys matching ``^[\\w .-]{1,64}$``. Left out: ``contact_id`` and
``external_id`` (internal ids) and ``attributes`` itself. Personal identifiers (names,
email, the number, and custom keys that look like them) allow only ``is_empty`` /
``is_not_empty``: a segment must not become a way to look up one person.

Operators and their meaning:

- text: ``eq``, ``neq``, ``in``, ``not_in`` (exact, case-sensitive), ``contains``,
  ``starts_with`` (case-insensitive), ``is_empty`` (null or blank), ``is_not_empty``;
- number: ``eq``, ``neq``, ``gt``, ``gte``, ``lt``, ``lte``, ``between`` ([lo, hi], both
  included), ``is_empty``, ``is_not_empty``;
- bool: ``is_true``, ``is_false`` (false or unknown);
- date and timestamp, with ``YYYY-MM-DD`` values taken as whole UTC days: ``before`` D
  (earlier than D), ``after`` D (later than the day D), ``between`` [D1, D2] (both days
  included), ``within_last_days`` N (the last N × 24 h up to now, UTC),
  ``not_within_last_days`` N (earlier, or never), ``is_empty``, ``is_not_empty``.

An empty value never matches a positive condition and always matches a negative one
(``neq``, ``not_in``, ``not_within_last_days``): "not in Moscow" includes contacts whose city
is unknown. ``not`` is the exact complement, so ``count(s) + count(not s)`` is everyone.
A group without items imposes no condition (a half-built segment counts everyone).
Limits: nesting depth 8, 200 rules and groups, 10,000 values in one list, 1,000 characters
in one text value.

Safety. :func:`compile` returns a WHERE clause whose text depends only on the tree's shape,
fields and operators: every value, list, JSON key and date cutoff is a ``?`` parameter and
every column name comes from the allowlist, quoted. Negations are pushed down to the rules
(De Morgan), so the clause has no ``not (...)`` around nullable logic.

Reading. :func:`count`, :func:`breakdown`, :func:`sample`, :func:`fields`, and for the
composer :func:`template_fields` and :func:`recipients`, read the published snapshot
through a small pool of read-only DuckDB connections. Opening and closing one costs ~15 ms
on the 1M-contact demo, three times a simple count (~5 ms), so a connection goes back to
the pool after use and serves the next call, on any thread (one user at a time). Every
call resolves the warehouse pointer first; when a new build has been published, idle
connections to the previous snapshot are closed at once and busy ones as they are returned,
so no old snapshot file stays open. :func:`close_connections` empties the pool.

Saved segments live in the operational store (table ``segments``): a name with numbered
versions, each the canonical JSON of the definition (never contact ids: a segment is
evaluated again at launch). Saving an unchanged definition returns the existing version.
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import duckdb
import pandas as pd

from smsops import i18n, phones, store, warehouse
from smsops.config import duckdb_settings, time_zone
from smsops.i18n import N_, _

__all__ = [
    "MAX_DEPTH",
    "MAX_ITEMS",
    "MAX_LIST_VALUES",
    "MAX_TEXT_LENGTH",
    "OPERATORS",
    "OP_LABELS",
    "REACH_LABELS",
    "READY_MADE_LABELS",
    "REASON_LABELS",
    "RFM_GROUPS",
    "RFM_LABELS",
    "SAMPLE_COLUMNS",
    "SAMPLE_LABELS",
    "TEMPLATE_COLUMNS",
    "VALUE_LABELS",
    "Breakdown",
    "Field",
    "Group",
    "Rule",
    "SavedSegment",
    "Segment",
    "SegmentError",
    "SegmentNotFound",
    "all_of",
    "any_of",
    "at_risk",
    "breakdown",
    "champions",
    "close_connections",
    "compile",
    "count",
    "country_name",
    "engaged_not_converted",
    "fields",
    "from_dict",
    "hibernating",
    "history",
    "lapsed",
    "list_saved",
    "load",
    "loyal",
    "negate",
    "new_customers",
    "reach_label",
    "ready_made",
    "recent_buyers",
    "recipients",
    "rfm_group",
    "sample",
    "sample_table",
    "save",
    "suggest_values",
    "template_fields",
    "to_dict",
    "validate",
    "value_label",
]

FieldType = Literal["text", "number", "bool", "date", "timestamp"]
Kind = Literal["all", "any"]

MAX_DEPTH = 8
"""Nesting levels of groups, the top level included."""
MAX_ITEMS = 200
"""Rules and groups in one segment."""
MAX_LIST_VALUES = 10_000
"""Values in one ``in`` / ``not_in`` list."""
MAX_TEXT_LENGTH = 1_000
MAX_DAYS = 36_600
MAX_CUSTOM_FIELDS = 50
MAX_NAME_LENGTH = 100

TABLE = "dim_contacts"

_DATE_OPS = (
    "before",
    "after",
    "between",
    "within_last_days",
    "not_within_last_days",
    "is_empty",
    "is_not_empty",
)
OPERATORS: dict[str, tuple[str, ...]] = {
    "text": ("eq", "neq", "in", "not_in", "contains", "starts_with", "is_empty", "is_not_empty"),
    "number": ("eq", "neq", "gt", "gte", "lt", "lte", "between", "is_empty", "is_not_empty"),
    "bool": ("is_true", "is_false"),
    "date": _DATE_OPS,
    "timestamp": _DATE_OPS,
}
"""The operators each field type allows."""

_PRESENCE_OPS = ("is_empty", "is_not_empty")
_ALL_OPS = frozenset(op for ops in OPERATORS.values() for op in ops)
_NO_VALUE_OPS = frozenset({"is_empty", "is_not_empty", "is_true", "is_false"})

OP_LABELS: dict[str, str] = {
    "eq": N_("is"),
    "neq": N_("is not"),
    "in": N_("is any of"),
    "not_in": N_("is none of"),
    "contains": N_("contains"),
    "starts_with": N_("starts with"),
    "is_empty": N_("is empty"),
    "is_not_empty": N_("is not empty"),
    "gt": N_("greater than"),
    "gte": N_("at least"),
    "lt": N_("less than"),
    "lte": N_("at most"),
    "between": N_("between"),
    "is_true": N_("yes"),
    "is_false": N_("no"),
    "before": N_("before"),
    "after": N_("after"),
    "within_last_days": N_("within the last N days"),
    "not_within_last_days": N_("not within the last N days"),
}
"""What each operator reads as (English; shown with ``i18n.label``)."""

REASON_LABELS: dict[str, str] = {
    "empty": N_("no number"),
    "unparseable": N_("number unreadable"),
    "too_short": N_("number too short"),
    "too_long": N_("number too long"),
    "invalid": N_("invalid number"),
    "not_mobile": N_("not a mobile number"),
    "duplicate_phone": N_("number belongs to another contact"),
    "opted_out": N_("opted out"),
    "no_consent": N_("no marketing consent"),
}
"""Labels for the reasons in :class:`Breakdown` (a number's ``phone_reason`` among them)."""

REACH_LABELS: dict[str, str] = {
    "marketing": N_("reachable for promotions"),
    "service_only": N_("service messages only"),
    "unreachable": N_("unreachable"),
}
"""Labels for the reach of a contact (:func:`sample`'s ``reachable``, before the reason)."""

RFM_GROUPS = ("champions", "loyal", "at_risk", "hibernating", "new")

RFM_LABELS: dict[str, str] = {
    "champions": N_("Champions"),
    "loyal": N_("Loyal"),
    "at_risk": N_("At risk"),
    "hibernating": N_("Hibernating"),
    "new": N_("New"),
    "needs_attention": N_("Needs attention"),
    "no_orders": N_("No orders yet"),
    "unknown": N_("Unknown"),
}
"""Labels for the mart's ``rfm_segment`` values."""

READY_MADE_LABELS: dict[str, str] = {
    "champions": N_("Champions: recent, frequent, big spenders"),
    "loyal": N_("Loyal customers"),
    "at_risk": N_("At risk: good customers who stopped buying"),
    "hibernating": N_("Hibernating: long without an order"),
    "new": N_("New customers"),
    "engaged_not_converted": N_("Clicked in the last 30 days, no order since"),
    "lapsed": N_("Bought before, not in the last 180 days"),
}
"""Labels for :func:`ready_made`'s keys."""

VALUE_LABELS: dict[str, dict[str, str]] = {
    "rfm_segment": RFM_LABELS,
    "gender": {"m": N_("male"), "f": N_("female")},
    "phone_reason": REASON_LABELS,
    "number_type": {
        "mobile": N_("mobile"),
        "fixed_line": N_("landline"),
        "fixed_line_or_mobile": N_("landline or mobile"),
        "toll_free": N_("toll-free"),
        "premium_rate": N_("premium rate"),
        "shared_cost": N_("shared cost"),
        "voip": N_("VoIP"),
        "personal_number": N_("personal number"),
        "pager": N_("pager"),
        "uan": N_("company number (UAN)"),
        "voicemail": N_("voicemail"),
        "unknown": N_("unknown"),
    },
    "time_zone_source": {
        "contact": N_("the contact's city or zone"),
        "number": N_("the number"),
        "candidates": N_("several zones possible"),
        "unknown": N_("unknown"),
    },
    "marketing_consent_source": {
        "web_form": N_("web form"),
        "import": N_("import"),
        "keyword_reply": N_("reply to an SMS"),
        "link": N_("unsubscribe link"),
        "api": N_("API"),
        "admin": N_("staff"),
        "provider": N_("SMS provider"),
    },
}
"""Labels for the coded values of some fields (a rule's value, a sample's cell)."""

# Curated labels and palette groups for the mart's columns. A column missing here still
# becomes a field (labelled by its name) as long as its type is one we can filter.
_PROFILE, _NUMBER, _CONSENT = N_("Profile"), N_("Number"), N_("Consent")
_PURCHASES, _ENGAGEMENT, _OTHER = N_("Purchases"), N_("Engagement"), N_("Other")
_CUSTOM = N_("Custom attributes")
_LABELS: dict[str, tuple[str, str]] = {
    "first_name": (N_("First name"), _PROFILE),
    "last_name": (N_("Last name"), _PROFILE),
    "gender": (N_("Gender"), _PROFILE),
    "birth_date": (N_("Birth date"), _PROFILE),
    "age": (N_("Age"), _PROFILE),
    "email": (N_("Email"), _PROFILE),
    "city": (N_("City"), _PROFILE),
    "region": (N_("Region"), _PROFILE),
    "time_zone": (N_("Time zone"), _PROFILE),
    "time_zone_source": (N_("Time zone source"), _PROFILE),
    "time_zone_candidates": (N_("Candidate time zones"), _PROFILE),
    "created_at": (N_("Added"), _PROFILE),
    "phone_e164": (N_("Phone number"), _NUMBER),
    "phone_valid": (N_("Number can receive SMS"), _NUMBER),
    "phone_reason": (N_("Why the number is unusable"), _NUMBER),
    "number_type": (N_("Number type"), _NUMBER),
    "country": (N_("Number country"), _NUMBER),
    "is_duplicate_phone": (N_("Duplicate number"), _NUMBER),
    "price_per_segment": (N_("Price per SMS part"), _NUMBER),
    "price_currency": (N_("Price currency"), _NUMBER),
    "marketing_opt_in": (N_("Marketing opt-in"), _CONSENT),
    "marketing_opt_in_at": (N_("Marketing opt-in date"), _CONSENT),
    "opted_out": (N_("Opted out of marketing"), _CONSENT),
    "opted_out_at": (N_("Opt-out date"), _CONSENT),
    "marketing_consent_source": (N_("Consent source"), _CONSENT),
    "service_opt_in": (N_("Service opt-in"), _CONSENT),
    "service_opted_out": (N_("Opted out of service messages"), _CONSENT),
    "is_reachable_marketing": (N_("Reachable for marketing"), _CONSENT),
    "is_reachable_service": (N_("Reachable for service messages"), _CONSENT),
    "orders_count": (N_("Orders"), _PURCHASES),
    "revenue": (N_("Revenue"), _PURCHASES),
    "average_order_value": (N_("Average order value"), _PURCHASES),
    "first_order_at": (N_("First order"), _PURCHASES),
    "last_order_at": (N_("Last order"), _PURCHASES),
    "days_since_last_order": (N_("Days since last order"), _PURCHASES),
    "favourite_category": (N_("Favourite category"), _PURCHASES),
    "r_score": (N_("R: recency score"), _PURCHASES),
    "f_score": (N_("F: frequency score"), _PURCHASES),
    "m_score": (N_("M: monetary score"), _PURCHASES),
    "rfm_code": (N_("RFM code"), _PURCHASES),
    "rfm_segment": (N_("RFM group"), _PURCHASES),
    "messages_sent": (N_("Messages sent"), _ENGAGEMENT),
    "messages_received": (N_("Messages received"), _ENGAGEMENT),
    "messages_clicked": (N_("Messages clicked"), _ENGAGEMENT),
    "replies": (N_("Replies"), _ENGAGEMENT),
    "last_sent_at": (N_("Last sent"), _ENGAGEMENT),
    "last_delivered_at": (N_("Last delivered"), _ENGAGEMENT),
    "last_clicked_at": (N_("Last click"), _ENGAGEMENT),
    "last_replied_at": (N_("Last reply"), _ENGAGEMENT),
}
_EXCLUDED = frozenset({"contact_id", "external_id", "attributes"})
_PERSONAL = frozenset({"first_name", "last_name", "email", "phone_e164"})
_PERSONAL_KEY = re.compile(
    r"e-?mail|phone|name|passport|address|birth|тел|почт|имя|фамил|отчеств|паспорт|адрес|рожд", re.IGNORECASE
)
_COLUMN = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_CUSTOM_KEY = re.compile(r"[\w .-]{1,64}")
_FIELD_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}|custom\.[\w .-]{1,64}")
_DUCKDB_TYPES: dict[str, FieldType] = {
    "VARCHAR": "text",
    "BOOLEAN": "bool",
    "DATE": "date",
    "TIMESTAMP": "timestamp",
    "TIMESTAMP_S": "timestamp",
    "TIMESTAMP_MS": "timestamp",
    "TIMESTAMP_NS": "timestamp",
    **dict.fromkeys(
        ("TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT", "USMALLINT", "UINTEGER",
         "UBIGINT", "FLOAT", "DOUBLE"),
        "number",
    ),
}  # fmt: skip


class SegmentError(ValueError):
    """A segment that cannot be used: the message starts with the path of the bad item.

    ``str()`` is the English message (the CLI, the API, logs); :meth:`translated` is the same
    message in the current language, for those a person can meet on a page (their text is
    marked with ``N_`` and its values are given apart)."""

    def __init__(self, text: str, **values: Any) -> None:
        self.text, self.values = text, values
        super().__init__(text.format(**values) if values else text)

    def translated(self) -> str:
        return _(self.text).format(**self.values) if self.values else _(self.text)


class SegmentNotFound(LookupError):
    """No saved segment has that name (or that version)."""


# -- the tree ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rule:
    """One condition: ``field`` ``op`` ``value`` (no value for is_empty, is_true …)."""

    field: str
    op: str
    value: Any = None

    def __post_init__(self) -> None:
        # lists become tuples (hashable, immutable); dates become their ISO text
        value = self.value
        if isinstance(value, list | tuple):
            value = tuple(v.isoformat() if isinstance(v, date) else v for v in value)
        elif isinstance(value, date):
            value = value.isoformat()
        object.__setattr__(self, "value", value)


@dataclass(frozen=True, slots=True)
class Group:
    """Items joined by ``all`` (AND) or ``any`` (OR); ``negate`` turns it into NOT."""

    kind: Kind
    items: tuple[Rule | Group, ...] = ()
    negate: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "items", tuple(self.items))


@dataclass(frozen=True, slots=True)
class Segment:
    """A named tree of rules; ``root`` is the top-level group."""

    name: str
    root: Group = field(default_factory=lambda: Group("all"))


def all_of(*items: Rule | Group) -> Group:
    return Group("all", items)


def any_of(*items: Rule | Group) -> Group:
    return Group("any", items)


def negate(item: Rule | Group) -> Group:
    """NOT ``item``."""
    if isinstance(item, Group) and not item.negate:
        return replace(item, negate=True)
    return Group("all", (item,), negate=True)


@dataclass(frozen=True, slots=True)
class Field:
    """A column (or custom attribute) segments may filter on."""

    name: str
    type: FieldType
    label: str
    group: str
    ops: tuple[str, ...]
    sql: str
    """The SQL expression: a quoted column, or a JSON extraction with ``params``."""
    params: tuple[Any, ...] = ()

    @property
    def shown_label(self) -> str:
        """The label in the current language (a custom attribute's is its key, as imported)."""
        return self.label if self.name.startswith("custom.") else _(self.label)


# -- JSON form -----------------------------------------------------------------------------


def to_dict(segment: Segment) -> dict[str, Any]:
    """The canonical JSON-ready form (see the module docstring)."""
    root = segment.root
    rules = [_item_to_dict(root)] if root.negate else [_item_to_dict(i) for i in root.items]
    return {"name": segment.name, "match": "all" if root.negate else root.kind, "rules": rules}


def _item_to_dict(item: Rule | Group) -> dict[str, Any]:
    if isinstance(item, Rule):
        out: dict[str, Any] = {"field": item.field, "op": item.op}
        if item.value is not None:
            out["value"] = list(item.value) if isinstance(item.value, tuple) else item.value
        return out
    body = {item.kind: [_item_to_dict(i) for i in item.items]}
    return {"not": body} if item.negate else body


def from_dict(data: Mapping[str, Any], fields: Mapping[str, Field] | None = None) -> Segment:
    """Parse and check a segment's JSON form; with ``fields``, check it against them too."""
    if not isinstance(data, Mapping):
        raise SegmentError(f"segment: expected an object, got {type(data).__name__}")
    _no_extra_keys(data, {"name", "match", "rules"}, "segment")
    name = data.get("name", "")
    if not isinstance(name, str) or len(name) > MAX_NAME_LENGTH:
        raise SegmentError(N_("name: expected text of at most {max} characters"), max=MAX_NAME_LENGTH)
    match = data.get("match", "all")
    if match not in ("all", "any"):
        raise SegmentError(f"match: expected 'all' or 'any', got {match!r}")
    rules = data.get("rules", [])
    if not isinstance(rules, list):
        raise SegmentError(f"rules: expected a list, got {type(rules).__name__}")
    counter = [0]
    items = tuple(_parse_item(item, f"rules[{i}]", 1, counter) for i, item in enumerate(rules))
    segment = Segment(name, Group(match, items))
    validate(segment, fields)
    return segment


def _parse_item(data: Any, path: str, depth: int, counter: list[int]) -> Rule | Group:
    counter[0] += 1
    if counter[0] > MAX_ITEMS:
        raise SegmentError(
            N_("{path}: a segment holds at most {max} rules and groups"), path=path, max=MAX_ITEMS
        )
    if not isinstance(data, Mapping):
        raise SegmentError(f"{path}: expected a rule or a group object, got {type(data).__name__}")
    if "field" in data or "op" in data:
        _no_extra_keys(data, {"field", "op", "value"}, path)
        return Rule(data.get("field"), data.get("op"), data.get("value"))
    keys = set(data)
    if len(keys) != 1 or not keys <= {"all", "any", "not"}:
        raise SegmentError(f"{path}: expected a rule {{field, op, value}} or one of 'all', 'any', 'not'")
    if depth + 1 > MAX_DEPTH:
        raise SegmentError(N_("{path}: groups nest at most {max} levels deep"), path=path, max=MAX_DEPTH)
    (kind,) = keys
    if kind == "not":
        # NOT of a plain group is that group negated (one node, one level); NOT of anything
        # else wraps it in a group of its own (one more node and level)
        inner = data["not"]
        plain = isinstance(inner, Mapping) and len(inner) == 1 and next(iter(inner)) in ("all", "any")
        if plain:
            counter[0] -= 1
        return negate(_parse_item(inner, f"{path}.not", depth if plain else depth + 1, counter))
    items = data[kind]
    if not isinstance(items, list):
        raise SegmentError(f"{path}.{kind}: expected a list, got {type(items).__name__}")
    return Group(
        kind, tuple(_parse_item(x, f"{path}.{kind}[{i}]", depth + 1, counter) for i, x in enumerate(items))
    )


def _no_extra_keys(data: Mapping[str, Any], allowed: set[str], path: str) -> None:
    extra = sorted(str(k) for k in data if k not in allowed)
    if extra:
        raise SegmentError(f"{path}: unexpected key {extra[0]!r} (allowed: {', '.join(sorted(allowed))})")


# -- validation ----------------------------------------------------------------------------


def validate(segment: Segment, fields: Mapping[str, Field] | None = None) -> None:
    """Raise :class:`SegmentError` for the first bad item; with ``fields``, also check each
    rule's field, operator and value type against the allowlist."""
    if not isinstance(segment, Segment) or not isinstance(segment.root, Group):
        raise SegmentError("segment: expected a Segment with a Group as its root")
    if not isinstance(segment.name, str) or len(segment.name) > MAX_NAME_LENGTH:
        raise SegmentError(N_("name: expected text of at most {max} characters"), max=MAX_NAME_LENGTH)
    counter = 0
    for path, node, depth in _walk(segment.root, "rules", 1):
        if depth > MAX_DEPTH:
            raise SegmentError(N_("{path}: groups nest at most {max} levels deep"), path=path, max=MAX_DEPTH)
        if path != "rules":
            counter += 1
            if counter > MAX_ITEMS:
                raise SegmentError(
                    N_("{path}: a segment holds at most {max} rules and groups"), path=path, max=MAX_ITEMS
                )
        if isinstance(node, Group):
            if node.kind not in ("all", "any"):
                raise SegmentError(f"{path}: a group is 'all' or 'any', got {node.kind!r}")
        elif isinstance(node, Rule):
            _check_rule(node, path, fields)
        else:
            raise SegmentError(f"{path}: expected a Rule or a Group, got {type(node).__name__}")


def _walk(group: Group, path: str, depth: int) -> Iterator[tuple[str, Rule | Group, int]]:
    """Every node with its path; the root's items are ``rules[i]``."""
    yield path, group, depth
    if not isinstance(group, Group) or not isinstance(group.items, tuple):
        return
    for i, item in enumerate(group.items):
        item_path = _item_path(path, group, i)
        if isinstance(item, Group):
            yield from _walk(item, item_path, depth + 1)
        else:
            yield item_path, item, depth


def _item_path(path: str, group: Group, i: int) -> str:
    if path == "rules" and not group.negate:
        return f"rules[{i}]"
    return f"{path}{'.not' if group.negate else ''}.{group.kind}[{i}]"


def _check_rule(rule: Rule, path: str, fields: Mapping[str, Field] | None) -> None:
    if not isinstance(rule.field, str) or not _FIELD_NAME.fullmatch(rule.field):
        raise SegmentError(f"{path}.field: unknown field {rule.field!r}")
    if rule.op not in _ALL_OPS:
        raise SegmentError(f"{path}.op: unknown operator {rule.op!r}; known: {', '.join(sorted(_ALL_OPS))}")
    ftype: FieldType | None = None
    if fields is not None:
        spec = fields.get(rule.field)
        if spec is None:
            raise SegmentError(
                N_("{path}.field: unknown field {field!r}: the contacts' data has no such column (any more)"),
                path=path,
                field=rule.field,
            )
        if rule.op not in spec.ops:
            raise SegmentError(
                N_("{path}.op: {op!r} does not apply to {type} field {field!r}; use one of: {ops}"),
                path=path,
                op=rule.op,
                type=spec.type,
                field=rule.field,
                ops=", ".join(spec.ops),
            )
        ftype = spec.type
    _check_value(rule.op, rule.value, ftype, f"{path}.value")


def _check_value(op: str, value: Any, ftype: FieldType | None, path: str) -> None:
    """``ftype`` None: only what the operator alone tells (before the fields are known)."""
    if op in _NO_VALUE_OPS:
        if value is not None:
            raise SegmentError(f"{path}: {op!r} takes no value")
    elif op in ("in", "not_in"):
        if not isinstance(value, tuple) or not value:
            raise SegmentError(f"{path}: expected a non-empty list of texts")
        if len(value) > MAX_LIST_VALUES:
            raise SegmentError(
                N_("{path}: at most {max} values, got {n}"), path=path, max=MAX_LIST_VALUES, n=len(value)
            )
        for i, item in enumerate(value):
            _check_text(item, f"{path}[{i}]")
    elif op in ("contains", "starts_with"):
        _check_text(value, path)
    elif op in ("gt", "gte", "lt", "lte"):
        _check_number(value, path)
    elif op in ("before", "after"):
        _check_date(value, path)
    elif op in ("within_last_days", "not_within_last_days"):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_DAYS:
            raise SegmentError(
                N_("{path}: expected a whole number of days from 1 to {max}, got {value!r}"),
                path=path,
                max=MAX_DAYS,
                value=value,
            )
    elif op in ("eq", "neq"):
        if ftype == "text" or (ftype is None and isinstance(value, str)):
            _check_text(value, path)
        elif ftype is None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise SegmentError(f"{path}: expected a text or a number, got {value!r}")
        else:
            _check_number(value, path)
    elif op == "between":
        if not isinstance(value, tuple) or len(value) != 2:
            raise SegmentError(f"{path}: expected a list of two values [from, to]")
        dates = ftype in ("date", "timestamp") or (ftype is None and isinstance(value[0], str))
        check = _check_date if dates else _check_number
        low, high = (check(v, f"{path}[{i}]") for i, v in enumerate(value))
        if low > high:
            raise SegmentError(
                N_("{path}: the range is empty: {low!r} is after {high!r}"),
                path=path,
                low=value[0],
                high=value[1],
            )


def _check_text(value: Any, path: str) -> str:
    if not isinstance(value, str) or not value:
        raise SegmentError(N_("{path}: expected a non-empty text, got {value!r}"), path=path, value=value)
    if len(value) > MAX_TEXT_LENGTH:
        raise SegmentError(N_("{path}: text longer than {max} characters"), path=path, max=MAX_TEXT_LENGTH)
    return value


def _check_number(value: Any, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise SegmentError(N_("{path}: expected a number, got {value!r}"), path=path, value=value)
    if abs(value) > 1e15:
        raise SegmentError(N_("{path}: number out of range: {value!r}"), path=path, value=value)
    return value


def _check_date(value: Any, path: str) -> date:
    if isinstance(value, str) and len(value) == 10:
        try:
            return date.fromisoformat(value)
        except ValueError:
            pass
    raise SegmentError(N_("{path}: expected a date as YYYY-MM-DD, got {value!r}"), path=path, value=value)


# -- compiling -----------------------------------------------------------------------------

# Each operator as (matches, does not match). Both are false for a row where they do not
# hold, NULL included, so negations pushed down by De Morgan stay exact. Slots: {c} the
# field's expression, {v} / {lo} / {hi} bound values.
_SQL: dict[str, tuple[str, str]] = {
    "eq": ("{c} = {v}", "({c} <> {v} or {c} is null)"),
    "in": ("list_contains({v}, {c})", "(not list_contains({v}, {c}) or {c} is null)"),
    "contains": ("contains(lower({c}), lower({v}))", "(not contains(lower({c}), lower({v})) or {c} is null)"),
    "starts_with": (
        "starts_with(lower({c}), lower({v}))",
        "(not starts_with(lower({c}), lower({v})) or {c} is null)",
    ),
    "gt": ("{c} > {v}", "({c} <= {v} or {c} is null)"),
    "gte": ("{c} >= {v}", "({c} < {v} or {c} is null)"),
    "lt": ("{c} < {v}", "({c} >= {v} or {c} is null)"),
    "lte": ("{c} <= {v}", "({c} > {v} or {c} is null)"),
    "between": ("{c} between {lo} and {hi}", "({c} < {lo} or {c} > {hi} or {c} is null)"),
    "between_days": ("({c} >= {lo} and {c} < {hi})", "({c} < {lo} or {c} >= {hi} or {c} is null)"),
    "is_true": ("{c}", "{c} is not true"),
    "is_empty": ("{c} is null", "{c} is not null"),
    "is_empty_text": ("({c} is null or trim({c}) = '')", "trim({c}) <> ''"),
}
_SQL["gte_days"] = _SQL["gte"]
_SQL["lt_days"] = _SQL["lt"]
_SLOT = re.compile(r"\{(\w+)\}")
_COMPLEMENTS = {
    "neq": "eq",
    "not_in": "in",
    "is_false": "is_true",
    "is_not_empty": "is_empty",
    "not_within_last_days": "within_last_days",
}


def compile(
    segment: Segment, fields: Mapping[str, Field], *, now: datetime | None = None
) -> tuple[str, list[Any]]:
    """The segment as a WHERE clause over ``dim_contacts`` (no ``where``) and its parameters.

    ``now`` (default: the current UTC time) anchors ``within_last_days``."""
    validate(segment, fields)
    if now is None:
        now = datetime.now(UTC)
    if now.tzinfo is not None:
        now = now.astimezone(UTC).replace(tzinfo=None)
    params: list[Any] = []
    clause = _compile_group(segment.root, False, fields, now, params)
    return (clause or "true"), params


def _compile_group(
    group: Group, negated: bool, fields: Mapping[str, Field], now: datetime, params: list[Any]
) -> str | None:
    negated ^= group.negate
    parts = []
    for item in group.items:
        if isinstance(item, Group):
            sql = _compile_group(item, negated, fields, now, params)
        else:
            sql = _compile_rule(item, negated, fields[item.field], now, params)
        if sql is not None:
            parts.append(sql)
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0]
    joiner = " and " if (group.kind == "all") != negated else " or "
    return "(" + joiner.join(parts) + ")"


def _compile_rule(rule: Rule, negated: bool, spec: Field, now: datetime, params: list[Any]) -> str:
    op, value = rule.op, rule.value
    if op in _COMPLEMENTS:
        op, negated = _COMPLEMENTS[op], not negated
    slots: dict[str, Any] = {}
    days = spec.type in ("date", "timestamp")
    if op == "is_empty" and spec.type == "text":
        op = "is_empty_text"
    elif op == "in":
        slots["v"] = list(value)
    elif op == "between" and days:
        op = "between_days"
        slots["lo"] = _day_start(date.fromisoformat(value[0]), spec.type)
        slots["hi"] = _day_start(date.fromisoformat(value[1]) + timedelta(days=1), spec.type)
    elif op == "between":
        slots["lo"], slots["hi"] = value
    elif op == "before":
        op, slots["v"] = "lt_days", _day_start(date.fromisoformat(value), spec.type)
    elif op == "after":
        op, slots["v"] = "gte_days", _day_start(date.fromisoformat(value) + timedelta(days=1), spec.type)
    elif op == "within_last_days":
        cutoff = now - timedelta(days=value)
        op, slots["v"] = "gte_days", (cutoff.date() if spec.type == "date" else cutoff)
    elif value is not None:
        slots["v"] = value
    template = _SQL[op][1 if negated else 0]

    def fill(match: re.Match[str]) -> str:
        name = match.group(1)
        if name == "c":
            params.extend(spec.params)
            return spec.sql
        params.append(slots[name])
        return "?"

    return _SLOT.sub(fill, template)


def _day_start(day: date, ftype: str) -> date | datetime:
    return day if ftype == "date" else datetime(day.year, day.month, day.day)


# -- the allowlist -------------------------------------------------------------------------

_fields_lock = threading.Lock()
_fields_cache: dict[Path, dict[str, Field]] = {}


def fields(home: str | Path | None = None) -> dict[str, Field]:
    """The fields of the published snapshot, by name (mart columns, then ``custom.*``)."""
    with _connection(home) as (conn, snapshot):
        return _fields(conn, snapshot)


def _fields(conn: duckdb.DuckDBPyConnection, snapshot: warehouse.Snapshot) -> dict[str, Field]:
    with _fields_lock:
        cached = _fields_cache.get(snapshot.path)
    if cached is not None:
        return cached
    columns = conn.execute(
        "select column_name, data_type from information_schema.columns"
        " where table_name = ? and table_schema = 'main' order by ordinal_position",
        [TABLE],
    ).fetchall()
    if not columns:
        raise warehouse.WarehouseError(f"the published warehouse has no {TABLE}: run `smsops build`")
    out: dict[str, Field] = {}
    names = {name for name, _type in columns}
    for name, data_type in columns:
        ftype = _DUCKDB_TYPES.get(data_type) or ("number" if data_type.startswith("DECIMAL") else None)
        if name in _EXCLUDED or ftype is None or not _COLUMN.fullmatch(name):
            continue
        label, group = _LABELS.get(name, (name.replace("_", " ").capitalize(), _OTHER))
        ops = _PRESENCE_OPS if name in _PERSONAL else OPERATORS[ftype]
        out[name] = Field(name, ftype, label, group, ops, f'"{name}"')
    if "attributes" in names:
        keys = conn.execute(
            f"""
            select key
            from (select unnest(json_keys(attributes)) as key from {TABLE} where attributes is not null)
            group by key
            order by count(*) desc, key
            limit {MAX_CUSTOM_FIELDS * 4}
            """
        ).fetchall()
        usable = [key for (key,) in keys if _CUSTOM_KEY.fullmatch(key)][:MAX_CUSTOM_FIELDS]
        for key in usable:
            ops = _PRESENCE_OPS if _PERSONAL_KEY.search(key) else OPERATORS["text"]
            # the key travels as a bound JSON path; the regex keeps quotes out of it
            out[f"custom.{key}"] = Field(
                f"custom.{key}",
                "text",
                key,
                _CUSTOM,
                ops,
                'json_extract_string("attributes", ?)',
                (f'$."{key}"',),
            )
    with _fields_lock:
        for stale in [p for p in _fields_cache if p.parent == snapshot.path.parent]:
            del _fields_cache[stale]
        _fields_cache[snapshot.path] = out
    return out


# -- reading the warehouse -----------------------------------------------------------------


class _Pool:
    """Idle read-only connections per snapshot file; only the newest snapshot of each
    warehouse keeps any (see the module docstring)."""

    max_idle = 8

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: dict[Path, list[duckdb.DuckDBPyConnection]] = {}
        self._latest: dict[Path, Path] = {}  # warehouse folder -> newest snapshot file seen

    @contextmanager
    def connection(
        self, home: str | Path | None
    ) -> Iterator[tuple[duckdb.DuckDBPyConnection, warehouse.Snapshot]]:
        snapshot = warehouse.current(home)
        if snapshot is None:
            raise warehouse.WarehouseError("the warehouse has not been built yet: run `smsops build`")
        path = snapshot.path
        with self._lock:
            previous = self._latest.get(path.parent)
            stale = []
            if previous != path:
                self._latest[path.parent] = path
                stale = self._idle.pop(previous, []) if previous is not None else []
            idle = self._idle.get(path)
            conn = idle.pop() if idle else None
        for old in stale:
            old.close()
        if conn is None:
            try:
                conn = duckdb.connect(str(path), read_only=True, config=duckdb_settings())
            except duckdb.Error as exc:
                raise warehouse.WarehouseError(f"cannot open the warehouse snapshot {path}: {exc}") from exc
        healthy = False
        try:
            yield conn, snapshot
            healthy = True
        except (SegmentError, SegmentNotFound):
            healthy = True
            raise
        finally:
            with self._lock:
                keep = (
                    healthy
                    and self._latest.get(path.parent) == path
                    and len(self._idle.get(path, ())) < self.max_idle
                )
                if keep:
                    self._idle.setdefault(path, []).append(conn)
            if not keep:
                conn.close()

    def close_all(self) -> None:
        with self._lock:
            idle, self._idle, self._latest = self._idle, {}, {}
        for conns in idle.values():
            for conn in conns:
                conn.close()


_pool = _Pool()


def _connection(home: str | Path | None):
    return _pool.connection(home)


def close_connections() -> None:
    """Close every pooled warehouse connection (connections in use close when returned)."""
    _pool.close_all()


def _run(conn: duckdb.DuckDBPyConnection, sql: str, params: Sequence[Any]) -> list[tuple]:
    try:
        return conn.execute(sql, params).fetchall()
    except duckdb.Error as exc:
        raise warehouse.WarehouseError(f"segment query failed: {exc}") from exc


def count(segment: Segment, home: str | Path | None = None, *, now: datetime | None = None) -> int:
    """How many contacts the segment holds in the published snapshot."""
    with _connection(home) as (conn, snapshot):
        where, params = compile(segment, _fields(conn, snapshot), now=now)
        return _run(conn, f"select count(*) from {TABLE} where {where}", params)[0][0]


@dataclass(frozen=True, slots=True)
class Breakdown:
    """Who in a segment can be messaged, and why the rest cannot.

    ``total = reachable_marketing + service_only + unreachable``. A contact is reachable
    for marketing with a valid mobile number it owns (not a duplicate of another contact's)
    and a current marketing opt-in; service-only when such a number may get service
    messages but not marketing (reasons ``no_consent`` / ``opted_out``); unreachable
    otherwise, for the first of: the number's ``phone_reason`` (``not_mobile``,
    ``too_short`` …), ``duplicate_phone``, ``opted_out`` (of service messages too).
    Countries without a known number are ``"unknown"``. Dicts are ordered largest first.
    """

    total: int
    reachable_marketing: int
    service_only: int
    unreachable: int
    service_only_reasons: dict[str, int]
    unreachable_reasons: dict[str, int]
    by_country: dict[str, int]
    by_rfm_segment: dict[str, int]
    build_id: str


_REACH = """
        case
            when not coalesce(phone_valid, false) then 'unreachable'
            when is_duplicate_phone then 'unreachable'
            when marketing_opt_in and not opted_out then 'marketing'
            when is_reachable_service then 'service_only'
            else 'unreachable'
        end"""
_REASON = """
        case
            when not coalesce(phone_valid, false) then coalesce(phone_reason, 'invalid')
            when is_duplicate_phone then 'duplicate_phone'
            when marketing_opt_in and not opted_out then null
            when is_reachable_service and opted_out then 'opted_out'
            when is_reachable_service then 'no_consent'
            else 'opted_out'
        end"""


def breakdown(segment: Segment, home: str | Path | None = None, *, now: datetime | None = None) -> Breakdown:
    """The segment's size split by reachability, country and RFM group, in one query."""
    with _connection(home) as (conn, snapshot):
        where, params = compile(segment, _fields(conn, snapshot), now=now)
        rows = _run(
            conn,
            f"""
            with audience as (
                select
                    coalesce(country, 'unknown') as country,
                    coalesce(rfm_segment, 'unknown') as rfm_segment,
                    {_REACH} as reach,
                    {_REASON} as reason
                from {TABLE}
                where {where}
            )
            select
                grouping(reach, reason) = 0 as is_reach,
                grouping(country) = 0 as is_country,
                reach,
                reason,
                country,
                rfm_segment,
                count(*) as contacts
            from audience
            group by grouping sets ((reach, reason), (country), (rfm_segment))
            order by contacts desc
            """,
            params,
        )
        build_id = snapshot.build_id
    reach = {"marketing": 0, "service_only": 0, "unreachable": 0}
    reasons: dict[str, dict[str, int]] = {"service_only": {}, "unreachable": {}}
    by_country: dict[str, int] = {}
    by_rfm: dict[str, int] = {}
    for is_reach, is_country, kind, reason, country, rfm, n in rows:
        if is_reach:
            reach[kind] += n
            if reason is not None:
                reasons[kind][reason] = reasons[kind].get(reason, 0) + n
        elif is_country:
            by_country[country] = n
        else:
            by_rfm[rfm] = n
    return Breakdown(
        total=sum(reach.values()),
        reachable_marketing=reach["marketing"],
        service_only=reach["service_only"],
        unreachable=reach["unreachable"],
        service_only_reasons=reasons["service_only"],
        unreachable_reasons=reasons["unreachable"],
        by_country=by_country,
        by_rfm_segment=by_rfm,
        build_id=build_id,
    )


SAMPLE_COLUMNS = (
    "contact_id", "first_name", "phone", "reachable", "city", "age", "gender", "country",
    "rfm_segment", "orders_count", "revenue", "last_order_at", "favourite_category", "last_clicked_at",
)  # fmt: skip


def sample(
    segment: Segment,
    n: int = 20,
    seed: int = 0,
    home: str | Path | None = None,
    *,
    now: datetime | None = None,
) -> pd.DataFrame:
    """Up to ``n`` contacts of the segment, the same ones for the same seed and build.

    Numbers are masked (``phone``); ``reachable`` reads ``marketing``,
    ``service_only: <reason>`` or ``unreachable: <reason>`` (the reasons of
    :class:`Breakdown`); no internal id but ``contact_id``."""
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 1_000:
        raise SegmentError(f"n: expected a whole number from 1 to 1000, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise SegmentError(f"seed: expected a whole number, got {seed!r}")
    with _connection(home) as (conn, snapshot):
        where, params = compile(segment, _fields(conn, snapshot), now=now)
        sql = f"""
            select
                contact_id,
                first_name,
                phone_e164,
                {_REACH} as reach,
                {_REASON} as reason,
                city,
                age,
                gender,
                country,
                rfm_segment,
                orders_count,
                revenue,
                last_order_at,
                favourite_category,
                last_clicked_at
            from {TABLE}
            where {where}
            order by hash(contact_id, ?), contact_id
            limit ?
        """
        try:
            frame = conn.execute(sql, [*params, seed, n]).df()
        except duckdb.Error as exc:
            raise warehouse.WarehouseError(f"segment query failed: {exc}") from exc
    frame["phone"] = [
        phones.mask(v) if isinstance(v, str) else phones.mask(None) for v in frame["phone_e164"]
    ]
    frame["reachable"] = [
        kind if reason is None or pd.isna(reason) else f"{kind}: {reason}"
        for kind, reason in zip(frame["reach"], frame["reason"], strict=True)
    ]
    return frame[list(SAMPLE_COLUMNS)].reset_index(drop=True)


SAMPLE_LABELS: dict[str, str] = {
    "first_name": N_("First name"),
    "phone": N_("Phone number"),
    "reachable": N_("Can get"),
    "city": N_("City"),
    "age": N_("Age"),
    "gender": N_("Gender"),
    "country": N_("Number country"),
    "rfm_segment": N_("RFM group"),
    "orders_count": N_("Orders"),
    "revenue": N_("Revenue"),
    "last_order_at": N_("Last order"),
    "favourite_category": N_("Favourite category"),
    "last_clicked_at": N_("Last click"),
}
"""Column headers of :func:`sample_table` (English; shown with ``_()``)."""


def value_label(field_name: str, value: Any) -> str:
    """A field's value as a person reads it, in the current language: a code (``needs_attention``,
    ``m``, ``RU``) as its label, a missing value as "—", anything else as itself."""
    if _missing(value):
        return i18n.MISSING
    if field_name == "country":
        return country_name(str(value))
    labels = VALUE_LABELS.get(field_name)
    return i18n.label(labels, str(value)) if labels is not None else str(value)


def country_name(code: str | None) -> str:
    """``RU`` as "Россия" / "Russia"; ``unknown`` (no known number) as such."""
    if code is None or code == "unknown":
        return _("Unknown")
    from babel import Locale

    return Locale.parse(i18n.current()).territories.get(code, code)


def reach_label(reachable: str) -> str:
    """:func:`sample`'s ``reachable`` (``service_only: no_consent``) in words."""
    kind, _sep, reason = reachable.partition(": ")
    text = i18n.label(REACH_LABELS, kind)
    return f"{text}: {i18n.label(REASON_LABELS, reason)}" if reason else text


def sample_table(frame: pd.DataFrame) -> pd.DataFrame:
    """:func:`sample` as a page shows it: every cell text in the current language (codes as
    labels, numbers, money and times by the locale, the team's zone), a gap as "—", no id.
    The columns keep their names; :data:`SAMPLE_LABELS` holds their headers."""
    zone = time_zone()
    shown = {
        "reachable": reach_label,
        "age": lambda v: i18n.number(v, 0),
        "orders_count": lambda v: i18n.number(v, 0),
        "revenue": lambda v: i18n.money(v),
        "last_order_at": lambda v: i18n.datetime_(v, tz=zone),
        "last_clicked_at": lambda v: i18n.datetime_(v, tz=zone),
    }
    out = pd.DataFrame(index=frame.index)
    for column in (c for c in SAMPLE_COLUMNS if c in frame.columns and c != "contact_id"):
        show = shown.get(column, lambda v, c=column: value_label(c, v))
        out[column] = pd.Series(
            [i18n.MISSING if _missing(v) else show(v) for v in frame[column]], index=frame.index, dtype=object
        )
    return out


def _missing(value: Any) -> bool:
    return value is None or (pd.api.types.is_scalar(value) and bool(pd.isna(value)))


def suggest_values(
    field_name: str, home: str | Path | None = None, *, limit: int = 50
) -> list[tuple[str, int]]:
    """The most common values of a text field with their counts (for an ``in`` picker).
    Personal fields (names, numbers, emails) suggest nothing."""
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 1_000:
        raise SegmentError(f"limit: expected a whole number from 1 to 1000, got {limit!r}")
    with _connection(home) as (conn, snapshot):
        spec = _fields(conn, snapshot).get(field_name)
        if spec is None:
            raise SegmentError(f"field: unknown field {field_name!r}")
        if spec.type != "text" or "in" not in spec.ops:
            return []
        rows = _run(
            conn,
            f"""
            select value, count(*) as n
            from (select {spec.sql} as value from {TABLE})
            where value is not null and trim(value) <> ''
            group by value
            order by n desc, value
            limit ?
            """,
            [*spec.params, limit],
        )
    return [(value, n) for value, n in rows]


# -- recipients, for the composer ----------------------------------------------------------

TEMPLATE_COLUMNS = (
    "first_name", "last_name", "gender", "age", "birth_date", "city", "region",
    "orders_count", "revenue", "average_order_value", "first_order_at", "last_order_at",
    "days_since_last_order", "favourite_category", "rfm_segment",
)  # fmt: skip
"""Mart columns a message may be personalised with (custom attributes are added to them)."""

_TEMPLATE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_MAY_GET = {
    "promo": "coalesce(phone_valid, false) and not is_duplicate_phone and marketing_opt_in and not opted_out",
    "service": "coalesce(phone_valid, false) and not is_duplicate_phone and is_reachable_service",
}


def template_fields(home: str | Path | None = None) -> dict[str, str]:
    """Fields a message template may use, name -> label (in the current language):
    :data:`TEMPLATE_COLUMNS` present in the mart, then custom attributes whose key is a plain
    identifier (``{{ loyalty_tier }}``)."""
    with _connection(home) as (conn, snapshot):
        known = _fields(conn, snapshot)
        return {
            name: _(label) if name in _LABELS else label
            for name, (_sql, _params, label) in _template_fields(known).items()
        }


def _template_fields(known: Mapping[str, Field]) -> dict[str, tuple[str, tuple[Any, ...], str]]:
    out = {name: (known[name].sql, (), known[name].label) for name in TEMPLATE_COLUMNS if name in known}
    for spec in known.values():
        key = spec.name.removeprefix("custom.")
        if key != spec.name and _TEMPLATE_NAME.fullmatch(key) and key not in out and key not in known:
            out[key] = (spec.sql, spec.params, spec.label)
    return out


def recipients(
    segment: Segment,
    columns: Sequence[str],
    *,
    kind: Literal["promo", "service"] = "promo",
    grouped: bool = False,
    limit: int | None = None,
    seed: int = 0,
    home: str | Path | None = None,
    now: datetime | None = None,
) -> list[dict[str, Any]]:
    """The segment's contacts who may get a ``kind`` message, with the template ``columns``.

    Who may get it, by the mart: a valid mobile number the contact owns (not a duplicate)
    with a marketing opt-in (``promo``) or without a service opt-out (``service``); the
    dispatcher still checks the live ledger at sending time. Each row has ``country`` and
    the requested columns that are :func:`template_fields` (other names are left out, so
    they render empty and ``composer.check`` reports them). ``grouped``: one row per
    distinct combination with its size under ``composer.COUNT``, every recipient counted;
    otherwise single contacts with ``contact_id``, a stable sample of ``limit`` when given.
    """
    from smsops.composer import COUNT

    if kind not in _MAY_GET:
        raise SegmentError(f"kind: expected 'promo' or 'service', got {kind!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise SegmentError(f"limit: expected a positive whole number, got {limit!r}")
    if isinstance(columns, str):
        raise SegmentError("columns: expected a list of field names, not one text")
    with _connection(home) as (conn, snapshot):
        known = _fields(conn, snapshot)
        where, where_params = compile(segment, known, now=now)
        usable = _template_fields(known)
        chosen = list(dict.fromkeys(c for c in columns if c in usable and c not in ("country", "contact_id")))
        select = [f'{usable[c][0]} as "{c}"' for c in chosen]
        params = [p for c in chosen for p in usable[c][1]]
        if grouped:
            sql = f"""
                select country, {", ".join([*select, f'count(*) as "{COUNT}"'])}
                from {TABLE}
                where ({where}) and {_MAY_GET[kind]}
                group by all
            """
            tail: list[Any] = []
        else:
            sql = f"""
                select {", ".join(["contact_id", "country", *select])}
                from {TABLE}
                where ({where}) and {_MAY_GET[kind]}
                order by hash(contact_id, ?), contact_id
            """
            tail = [seed]
            if limit is not None:
                sql += " limit ?"
                tail.append(limit)
        try:
            result = conn.execute(sql, [*params, *where_params, *tail])
            names = [d[0] for d in result.description]
            rows = result.fetchall()
        except duckdb.Error as exc:
            raise warehouse.WarehouseError(f"segment query failed: {exc}") from exc
    return [dict(zip(names, row, strict=True)) for row in rows]


# -- ready-made segments -------------------------------------------------------------------


def rfm_group(group: str) -> Segment:
    """Contacts in one named RFM group (champions, loyal, at_risk, hibernating, new)."""
    if group not in RFM_GROUPS:
        raise SegmentError(f"group: expected one of {', '.join(RFM_GROUPS)}, got {group!r}")
    return Segment(f"RFM: {group}", all_of(Rule("rfm_segment", "eq", group)))


def champions() -> Segment:
    return rfm_group("champions")


def loyal() -> Segment:
    return rfm_group("loyal")


def at_risk() -> Segment:
    return rfm_group("at_risk")


def hibernating() -> Segment:
    return rfm_group("hibernating")


def new_customers() -> Segment:
    return rfm_group("new")


def recent_buyers(category: str, days: int = 30) -> Segment:
    """Contacts whose favourite category is ``category`` and who ordered in the last
    ``days`` days (the mart keeps the last order, not the last order per category)."""
    return Segment(
        f"Recent buyers: {category}, {days} d",
        all_of(
            Rule("favourite_category", "eq", category),
            Rule("last_order_at", "within_last_days", days),
        ),
    )


def engaged_not_converted(days: int = 30) -> Segment:
    """Clicked a message in the last ``days`` days and have not ordered since the window
    began (so not since that click)."""
    return Segment(
        f"Engaged, not converted: {days} d",
        all_of(
            Rule("last_clicked_at", "within_last_days", days),
            Rule("last_order_at", "not_within_last_days", days),
        ),
    )


def lapsed(days: int = 180) -> Segment:
    """Bought at least once, but not in the last ``days`` days."""
    return Segment(
        f"Lapsed: {days} d",
        all_of(
            Rule("orders_count", "gte", 1),
            Rule("last_order_at", "not_within_last_days", days),
        ),
    )


def ready_made() -> dict[str, Segment]:
    """The ready-made segments that need no parameter, by a short key."""
    made = {group: rfm_group(group) for group in RFM_GROUPS}
    made["engaged_not_converted"] = engaged_not_converted()
    made["lapsed"] = lapsed()
    return made


# -- saved segments ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SavedSegment:
    """One version of a saved segment."""

    name: str
    version: int
    segment: Segment
    created_at: datetime
    created_by: str | None


def save(
    name: str, segment: Segment, created_by: str | None = None, home: str | Path | None = None
) -> SavedSegment:
    """Save ``segment`` under ``name``: a new version when the definition changed, else the
    latest version as it is."""
    name = _check_name(name)
    if created_by is not None and (not isinstance(created_by, str) or len(created_by) > 200):
        raise SegmentError("created_by: expected text of at most 200 characters")
    segment = replace(segment, name=name)
    validate(segment)
    definition = _canonical(segment)
    conn = store.open_store(home)
    try:
        with store.transaction(conn):
            row = conn.execute(
                "select version, definition, created_at, created_by from segments"
                " where name = ? order by version desc limit 1",
                (name,),
            ).fetchone()
            if row is not None and row[1] == definition:
                return _saved(name, *row)
            version = 1 if row is None else row[0] + 1
            created_at = datetime.now(UTC).replace(tzinfo=None).isoformat(sep=" ", timespec="seconds")
            conn.execute(
                "insert into segments (name, version, definition, created_at, created_by) values (?, ?, ?, ?, ?)",
                (name, version, definition, created_at, created_by),
            )
            return _saved(name, version, definition, created_at, created_by)
    finally:
        conn.close()


def load(name: str, version: int | None = None, home: str | Path | None = None) -> SavedSegment:
    """A saved segment: its latest version, or ``version``."""
    sql = "select version, definition, created_at, created_by from segments where name = ?"
    args: tuple[Any, ...] = (name,)
    if version is None:
        sql += " order by version desc limit 1"
    else:
        sql += " and version = ?"
        args += (version,)
    with _store(home) as conn:
        row = conn.execute(sql, args).fetchone()
        latest = None
        if row is None and version is not None:
            latest = conn.execute("select max(version) from segments where name = ?", (name,)).fetchone()[0]
    if row is None:
        if latest is not None:
            raise SegmentNotFound(f"segment {name!r} has no version {version}; the latest is {latest}")
        raise SegmentNotFound(f"no saved segment is named {name!r}")
    return _saved(name, *row)


def list_saved(home: str | Path | None = None) -> list[SavedSegment]:
    """The latest version of every saved segment, by name."""
    with _store(home) as conn:
        rows = conn.execute(
            """
            select name, version, definition, created_at, created_by
            from segments
            where (name, version) in (select name, max(version) from segments group by name)
            order by name
            """
        ).fetchall()
    return [_saved(*row) for row in rows]


def history(name: str, home: str | Path | None = None) -> list[SavedSegment]:
    """Every version of a saved segment, oldest first."""
    with _store(home) as conn:
        rows = conn.execute(
            "select version, definition, created_at, created_by from segments where name = ? order by version",
            (name,),
        ).fetchall()
    if not rows:
        raise SegmentNotFound(f"no saved segment is named {name!r}")
    return [_saved(name, *row) for row in rows]


@contextmanager
def _store(home: str | Path | None):
    conn = store.open_store(home)
    try:
        yield conn
    finally:
        conn.close()


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not name.strip():
        raise SegmentError(N_("name: a saved segment needs a name"))
    name = name.strip()
    if len(name) > MAX_NAME_LENGTH or any(ch < " " for ch in name):
        raise SegmentError(N_("name: at most {max} characters, no control characters"), max=MAX_NAME_LENGTH)
    return name


def _canonical(segment: Segment) -> str:
    return json.dumps(to_dict(segment), ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def _saved(name: str, version: int, definition: str, created_at: str, created_by: str | None) -> SavedSegment:
    return SavedSegment(
        name=name,
        version=version,
        segment=from_dict(json.loads(definition)),
        created_at=datetime.fromisoformat(created_at).replace(tzinfo=UTC),
        created_by=created_by,
    )
