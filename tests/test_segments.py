"""Segments: the JSON form, the allowlist, compiling to a safe filter, counts that agree with
hand-written SQL on the demo warehouse, the breakdown, samples, saved versions, ready-mades."""

from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pytest

from smsops import i18n, segments, store, warehouse
from smsops.segments import Group, Rule, Segment, SegmentError, all_of, any_of, negate

NOW = datetime.now(UTC).replace(tzinfo=None)
HOSTILE_VALUES = [
    "Москва'; drop table dim_contacts; --",
    "' or '1'='1",
    '"city"',
    "%",
    "_",
    "\\",
    "?",
    "$1",
    "😀 Ё \u202e\u200b",
    "a\x00b",
    "x" * segments.MAX_TEXT_LENGTH,
]
HOSTILE_FIELDS = [
    "city; drop table x",
    '"city"',
    "1=1 --",
    "city) or (1=1",
    "CITY",
    "city ",
    "",
    "attributes",
    "contact_id",
    "external_id",
    "custom.loyalty_tier'; --",
    'custom.loyalty_tier"',
    "custom.unknown_key",
    "custom.",
]


def seg(*items: Rule | Group, match: str = "all") -> Segment:
    return Segment("test", Group(match, items))


def hand_count(where: str, home: Path) -> int:
    return int(warehouse.query(f"select count(*) from dim_contacts where {where}", home=home).iloc[0, 0])


def ts(days: int) -> str:
    return f"timestamp '{(NOW - timedelta(days=days)).isoformat(sep=' ')}'"


@pytest.fixture(scope="module")
def fields(built_home):
    return segments.fields(built_home)


@pytest.fixture(scope="module")
def total(built_home) -> int:
    return hand_count("true", built_home)


# -- the JSON form -------------------------------------------------------------------------

EXAMPLE = {
    "name": "Moscow champions",
    "match": "all",
    "rules": [
        {"field": "rfm_segment", "op": "in", "value": ["champions", "loyal"]},
        {
            "any": [
                {"field": "city", "op": "eq", "value": "Москва"},
                {"field": "last_clicked_at", "op": "within_last_days", "value": 30},
                {"all": [{"field": "age", "op": "between", "value": [25, 40.5]}]},
            ]
        },
        {"not": {"any": [{"field": "custom.loyalty_tier", "op": "eq", "value": "basic"}]}},
        {"field": "marketing_opt_in", "op": "is_true"},
        {"field": "last_order_at", "op": "between", "value": ["2024-01-01", "2024-12-31"]},
    ],
}


def test_json_form_round_trips():
    segment = segments.from_dict(EXAMPLE)
    assert segments.to_dict(segment) == EXAMPLE
    assert segments.from_dict(json.loads(json.dumps(segments.to_dict(segment)))) == segment
    assert segment.root.items[2] == negate(any_of(Rule("custom.loyalty_tier", "eq", "basic")))
    assert segment.root.items[0].value == ("champions", "loyal")  # hashable, immutable


def test_not_of_a_rule_becomes_a_negated_group():
    segment = segments.from_dict({"name": "", "rules": [{"not": {"field": "city", "op": "is_empty"}}]})
    assert segment.root.items == (Group("all", (Rule("city", "is_empty"),), negate=True),)
    assert segments.to_dict(segment)["rules"] == [{"not": {"all": [{"field": "city", "op": "is_empty"}]}}]


def test_a_negated_root_survives_the_json_form(fields):
    segment = Segment("x", Group("any", (Rule("city", "eq", "Москва"),), negate=True))
    again = segments.from_dict(segments.to_dict(segment))
    assert segments.compile(again, fields, now=NOW) == segments.compile(segment, fields, now=NOW)


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        (
            [{"field": "city", "op": "eq", "value": "A"}] * 2
            + [{"field": "age", "op": "gt", "value": "abc"}],
            "rules[2].value: expected a number",
        ),
        ([{"any": [{"field": "city", "op": "like", "value": "A"}]}], "rules[0].any[0].op: unknown operator"),
        ([{"not": {"all": [{"field": "age", "op": "gt", "value": True}]}}], "rules[0].not.all[0].value"),
        ([{"field": "city", "op": "in", "value": []}], "rules[0].value: expected a non-empty list"),
        ([{"field": "city", "op": "in", "value": ["a", 3]}], "rules[0].value[1]: expected a non-empty text"),
        ([{"field": "city", "op": "eq", "value": ""}], "rules[0].value: expected a non-empty text"),
        ([{"field": "city", "op": "is_empty", "value": "x"}], "rules[0].value: 'is_empty' takes no value"),
        ([{"field": "age", "op": "between", "value": [40, 20]}], "rules[0].value: the range is empty"),
        ([{"field": "age", "op": "between", "value": [1]}], "rules[0].value: expected a list of two"),
        ([{"field": "age", "op": "lt", "value": float("nan")}], "rules[0].value: expected a number"),
        (
            [{"field": "last_order_at", "op": "before", "value": "01.02.2024"}],
            "rules[0].value: expected a date",
        ),
        (
            [{"field": "last_order_at", "op": "before", "value": "2024-02-30"}],
            "rules[0].value: expected a date",
        ),
        (
            [{"field": "last_order_at", "op": "within_last_days", "value": 0}],
            "rules[0].value: expected a whole",
        ),
        (
            [{"field": "last_order_at", "op": "within_last_days", "value": 1.5}],
            "rules[0].value: expected a whole",
        ),
        ([{"field": "city", "op": "eq", "value": "A", "sql": "1=1"}], "rules[0]: unexpected key 'sql'"),
        ([{"all": [], "any": []}], "rules[0]: expected a rule"),
        ([{"all": {"field": "city"}}], "rules[0].all: expected a list"),
        (["city = 'A'"], "rules[0]: expected a rule or a group object"),
        ([{"field": "city; drop table x", "op": "eq", "value": "A"}], "rules[0].field: unknown field"),
    ],
)
def test_bad_items_are_named_by_their_path(rules, message):
    with pytest.raises(SegmentError) as info:
        segments.from_dict({"name": "x", "match": "all", "rules": rules})
    assert str(info.value).startswith(message), str(info.value)


def test_segment_level_errors():
    with pytest.raises(SegmentError, match=r"^match:"):
        segments.from_dict({"name": "x", "match": "some", "rules": []})
    with pytest.raises(SegmentError, match=r"^rules: expected a list"):
        segments.from_dict({"name": "x", "rules": {"all": []}})
    with pytest.raises(SegmentError, match=r"^segment: unexpected key 'where'"):
        segments.from_dict({"name": "x", "rules": [], "where": "1=1"})
    with pytest.raises(SegmentError, match=r"^segment: expected an object"):
        segments.from_dict(["x"])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ({"field": "city", "op": "gt", "value": 3}, "rules[0].op: 'gt' does not apply to text field 'city'"),
        ({"field": "age", "op": "eq", "value": "30"}, "rules[0].value: expected a number"),
        ({"field": "city", "op": "eq", "value": 30}, "rules[0].value: expected a non-empty text"),
        (
            {"field": "marketing_opt_in", "op": "eq", "value": True},
            "rules[0].op: 'eq' does not apply to bool",
        ),
        ({"field": "birth_date", "op": "between", "value": [1, 2]}, "rules[0].value[0]: expected a date"),
        (
            {"field": "age", "op": "between", "value": ["2024-01-01", "2024-02-01"]},
            "value[0]: expected a number",
        ),
        ({"field": "phone_e164", "op": "eq", "value": "+79161234567"}, "rules[0].op: 'eq' does not apply"),
        (
            {"field": "first_name", "op": "contains", "value": "Анна"},
            "rules[0].op: 'contains' does not apply",
        ),
        ({"field": "nonexistent", "op": "eq", "value": "x"}, "rules[0].field: unknown field 'nonexistent'"),
    ],
)
def test_rules_are_checked_against_the_fields(fields, rule, message):
    data = {"name": "x", "rules": [rule]}
    with pytest.raises(SegmentError) as info:
        segments.from_dict(data, fields)
    assert message in str(info.value)


def test_limits_on_depth_rules_and_list_length(fields):
    def nested(levels: int) -> dict:
        item: dict = {"field": "city", "op": "is_not_empty"}
        for _ in range(levels):
            item = {"any": [item]}
        return {"name": "x", "rules": [item]}

    segments.from_dict(nested(segments.MAX_DEPTH - 1), fields)  # the top level is the first
    with pytest.raises(SegmentError, match="nest at most 8 levels"):
        segments.from_dict(nested(segments.MAX_DEPTH), fields)
    with pytest.raises(SegmentError, match="nest at most 8 levels"):
        segments.from_dict(nested(50_000))  # refused before Python's recursion limit
    chain: dict = {"field": "city", "op": "is_empty"}
    for _ in range(50_000):
        chain = {"not": chain}
    with pytest.raises(SegmentError, match="nest at most 8 levels"):
        segments.from_dict({"name": "x", "rules": [chain]})

    rule = {"field": "age", "op": "gt", "value": 1}
    segments.from_dict({"name": "x", "rules": [rule] * segments.MAX_ITEMS}, fields)
    with pytest.raises(SegmentError, match=r"^rules\[200\]: a segment holds at most 200"):
        segments.from_dict({"name": "x", "rules": [rule] * (segments.MAX_ITEMS + 1)})

    values = [f"v{i}" for i in range(segments.MAX_LIST_VALUES)]
    segments.from_dict({"name": "x", "rules": [{"field": "city", "op": "in", "value": values}]}, fields)
    with pytest.raises(SegmentError, match="at most 10000 values"):
        segments.from_dict({"name": "x", "rules": [{"field": "city", "op": "in", "value": [*values, "x"]}]})

    with pytest.raises(SegmentError, match="text longer than 1000"):
        segments.from_dict(
            {
                "name": "x",
                "rules": [{"field": "city", "op": "eq", "value": "x" * (segments.MAX_TEXT_LENGTH + 1)}],
            }
        )
    # a tree built in Python is held to the same limits when compiled
    deep = Group("all", (Rule("city", "is_empty"),))
    for _ in range(segments.MAX_DEPTH):
        deep = Group("all", (deep,))
    with pytest.raises(SegmentError, match="nest at most 8 levels"):
        segments.compile(Segment("x", deep), fields)


# -- the allowlist -------------------------------------------------------------------------


def test_fields_come_from_the_mart_with_types_labels_and_custom_keys(fields, built_home):
    columns = dict(
        warehouse.query(
            "select column_name, data_type from information_schema.columns where table_name = 'dim_contacts'",
            home=built_home,
        ).itertuples(index=False)
    )
    assert {"contact_id", "external_id", "attributes"}.isdisjoint(fields)
    assert set(columns) - {"contact_id", "external_id", "attributes"} <= set(fields)
    assert fields["city"].type == "text" and fields["city"].label == "City"
    with i18n.language("ru"):
        assert fields["city"].shown_label == "Город"
    assert fields["age"].type == "number" and "between" in fields["age"].ops
    assert fields["marketing_opt_in"].ops == ("is_true", "is_false")
    assert fields["birth_date"].type == "date" and fields["last_order_at"].type == "timestamp"
    assert fields["email"].ops == fields["phone_e164"].ops == ("is_empty", "is_not_empty")
    assert {"custom.loyalty_tier", "custom.store"} <= set(fields)
    assert fields["custom.loyalty_tier"].type == "text" and "in" in fields["custom.loyalty_tier"].ops
    for spec in fields.values():
        assert set(spec.ops) <= set(segments.OPERATORS[spec.type]), spec.name
        assert spec.sql.count("?") == len(spec.params), spec.name
        if not spec.name.startswith("custom."):
            assert spec.sql == f'"{spec.name}"'


def test_custom_keys_that_could_break_a_json_path_are_left_out(tmp_path):
    home = _hand_built_warehouse(
        tmp_path,
        "wh_1",
        [
            (1, "Москва", json.dumps({"tier": "gold", "a'b": "1", 'x"); drop': "2", "ok key.v2": "y"})),
            (2, "Казань", json.dumps({"tier": "basic", "ok key.v2": "n", "email": "a@b.c"})),
            (3, None, None),
        ],
    )
    known = segments.fields(home)
    assert {"custom.tier", "custom.ok key.v2", "custom.email"} <= set(known)
    assert not any("'" in name or '"' in name for name in known)
    assert known["custom.email"].ops == ("is_empty", "is_not_empty")  # looks personal
    dotted = seg(Rule("custom.ok key.v2", "eq", "y"))
    assert segments.count(dotted, home) == 1
    assert segments.count(seg(Rule("custom.tier", "is_empty")), home) == 1
    with pytest.raises(SegmentError, match="unknown field"):
        segments.count(seg(Rule("custom.a'b", "eq", "1")), home)


# -- compiling -----------------------------------------------------------------------------


def test_compiled_sql_holds_no_value_and_only_quoted_allowlisted_columns(fields):
    segment = segments.from_dict(EXAMPLE, fields)
    sql, params = segments.compile(segment, fields, now=NOW)
    for literal in ("champions", "Москва", "basic", "loyalty_tier", "2024", "30", "25", "40.5"):
        assert literal not in sql
    identifiers = set(re.findall(r'"([^"]*)"', sql))
    assert identifiers <= set(fields) | {"attributes"}
    assert sql.count("?") == len(params)
    assert params[0] == ["champions", "loyal"]
    assert NOW - timedelta(days=30) in params


def test_hostile_field_names_are_refused(fields):
    for name in HOSTILE_FIELDS:
        with pytest.raises(SegmentError, match=r"^rules\[0\]\.field: unknown field"):
            segments.compile(seg(Rule(name, "eq", "Москва")), fields)
        with pytest.raises(SegmentError, match=r"^rules\[0\]\.field: unknown field"):
            segments.from_dict({"name": "x", "rules": [{"field": name, "op": "eq", "value": "x"}]}, fields)


def test_hostile_values_never_change_the_query(fields, built_home, total):
    for op in ("eq", "neq", "contains", "starts_with"):
        for field_name in ("city", "custom.loyalty_tier"):
            baseline, _ = segments.compile(seg(Rule(field_name, op, "Москва")), fields, now=NOW)
            for value in HOSTILE_VALUES:
                segment = seg(Rule(field_name, op, value))
                sql, params = segments.compile(segment, fields, now=NOW)
                assert sql == baseline, (op, value)
                assert value in params
                expected = total if op == "neq" else 0
                assert segments.count(segment, built_home) == expected, (op, field_name, value)
    assert hand_count("true", built_home) == total  # the table is still there


def test_a_huge_in_list_is_one_parameter(fields, built_home):
    moscow = hand_count("city = 'Москва'", built_home)
    small = seg(Rule("city", "in", ("Москва", "x")))
    huge_values = (
        *HOSTILE_VALUES,
        *(f"город {i}'--" for i in range(segments.MAX_LIST_VALUES - 12)),
        "Москва",
    )
    huge = seg(Rule("city", "in", huge_values))
    assert len(huge_values) == segments.MAX_LIST_VALUES
    assert segments.compile(small, fields)[0] == segments.compile(huge, fields)[0]
    assert segments.count(huge, built_home) == segments.count(small, built_home) == moscow
    excluded = seg(Rule("city", "not_in", huge_values))
    assert segments.count(excluded, built_home) == hand_count("city <> 'Москва' or city is null", built_home)


def test_like_wildcards_in_a_value_are_plain_characters(built_home):
    assert segments.count(seg(Rule("city", "contains", "%")), built_home) == 0
    assert segments.count(seg(Rule("city", "starts_with", "_")), built_home) == 0


# -- counts agree with SQL written by hand -------------------------------------------------

OPERATOR_CASES = [
    (Rule("city", "eq", "Москва"), "city = 'Москва'"),
    (Rule("city", "neq", "Москва"), "city <> 'Москва' or city is null"),
    (Rule("city", "in", ("Москва", "Казань")), "city in ('Москва', 'Казань')"),
    (Rule("city", "not_in", ("Москва", "Казань")), "city not in ('Москва', 'Казань') or city is null"),
    (Rule("city", "contains", "БУРГ"), "lower(city) like '%бург%'"),
    (Rule("city", "starts_with", "санкт"), "lower(city) like 'санкт%'"),
    (Rule("city", "is_empty"), "city is null or trim(city) = ''"),
    (Rule("city", "is_not_empty"), "trim(city) <> ''"),
    (Rule("first_name", "is_empty"), "first_name is null or trim(first_name) = ''"),
    (Rule("orders_count", "eq", 2), "orders_count = 2"),
    (Rule("orders_count", "neq", 0), "orders_count <> 0"),
    (Rule("revenue", "gt", 10000.5), "revenue > 10000.5"),
    (Rule("orders_count", "gte", 3), "orders_count >= 3"),
    (Rule("age", "lt", 30), "age < 30"),
    (Rule("age", "lte", 30), "age <= 30"),
    (Rule("age", "between", (25, 35)), "age between 25 and 35"),
    (Rule("age", "is_empty"), "age is null"),
    (Rule("average_order_value", "is_not_empty"), "average_order_value is not null"),
    (Rule("marketing_opt_in", "is_true"), "marketing_opt_in"),
    (Rule("opted_out", "is_false"), "not opted_out"),
    (Rule("birth_date", "before", "1990-01-01"), "birth_date < date '1990-01-01'"),
    (Rule("birth_date", "after", "1990-01-01"), "birth_date > date '1990-01-01'"),
    (Rule("birth_date", "between", ("1980-01-01", "1989-12-31")), "year(birth_date) between 1980 and 1989"),
    (Rule("birth_date", "is_empty"), "birth_date is null"),
    (Rule("last_order_at", "within_last_days", 30), f"last_order_at >= {ts(30)}"),
    (Rule("last_order_at", "not_within_last_days", 30), f"last_order_at < {ts(30)} or last_order_at is null"),
    (Rule("last_clicked_at", "within_last_days", 60), f"last_clicked_at >= {ts(60)}"),
    (Rule("last_order_at", "is_empty"), "last_order_at is null"),
    (Rule("last_order_at", "is_not_empty"), "last_order_at is not null"),
    (
        Rule("last_order_at", "before", (NOW - timedelta(days=90)).date().isoformat()),
        f"last_order_at::date < date '{(NOW - timedelta(days=90)).date().isoformat()}'",
    ),
    (
        Rule("last_order_at", "after", (NOW - timedelta(days=90)).date().isoformat()),
        f"last_order_at::date > date '{(NOW - timedelta(days=90)).date().isoformat()}'",
    ),
    (
        Rule(
            "last_order_at",
            "between",
            ((NOW - timedelta(days=60)).date().isoformat(), (NOW - timedelta(days=30)).date().isoformat()),
        ),
        f"last_order_at::date between date '{(NOW - timedelta(days=60)).date().isoformat()}'"
        f" and date '{(NOW - timedelta(days=30)).date().isoformat()}'",
    ),
    (Rule("custom.loyalty_tier", "eq", "gold"), "attributes->>'$.loyalty_tier' = 'gold'"),
    (
        Rule("custom.loyalty_tier", "in", ("gold", "silver")),
        "attributes->>'$.loyalty_tier' in ('gold', 'silver')",
    ),
    (Rule("custom.store", "is_empty"), "attributes->>'$.store' is null"),
    (Rule("rfm_segment", "eq", "champions"), "rfm_segment = 'champions'"),
    (Rule("country", "neq", "RU"), "country is distinct from 'RU'"),
]


@pytest.mark.parametrize(
    ("rule", "where"), OPERATOR_CASES, ids=lambda c: f"{c.field}-{c.op}" if isinstance(c, Rule) else "sql"
)
def test_each_operator_counts_what_hand_written_sql_counts(rule, where, built_home, total):
    expected = hand_count(where, built_home)
    assert segments.count(seg(rule), built_home, now=NOW) == expected
    # NOT is the exact complement, empty values included
    assert segments.count(seg(negate(rule)), built_home, now=NOW) == total - expected


def test_the_demo_exercises_the_operators(built_home, total):
    """Guard against a cross-check that passes because everything is zero."""
    non_trivial = [where for _, where in OPERATOR_CASES if 0 < hand_count(where, built_home) < total]
    assert len(non_trivial) >= len(OPERATOR_CASES) - 3


def test_nested_groups_count_what_hand_written_sql_counts(built_home, total):
    segment = seg(
        any_of(
            all_of(Rule("city", "eq", "Москва"), Rule("orders_count", "gte", 2)),
            all_of(
                Rule("last_clicked_at", "within_last_days", 60), negate(Rule("rfm_segment", "eq", "at_risk"))
            ),
        ),
        negate(any_of(Rule("opted_out", "is_true"), Rule("phone_valid", "is_false"))),
    )
    where = f"""
        ((city = 'Москва' and orders_count >= 2)
         or (last_clicked_at >= {ts(60)} and rfm_segment <> 'at_risk'))
        and not opted_out and phone_valid
    """
    expected = hand_count(where, built_home)
    assert 0 < expected < total
    assert segments.count(segment, built_home, now=NOW) == expected
    assert segments.count(Segment("n", negate(segment.root)), built_home, now=NOW) == total - expected
    either = seg(Rule("city", "eq", "Москва"), Rule("age", "lt", 30), match="any")
    assert segments.count(either, built_home) == hand_count("city = 'Москва' or age < 30", built_home)


def test_an_empty_group_imposes_no_condition(built_home, total):
    assert segments.count(Segment("everyone"), built_home) == total
    half_built = seg(Rule("city", "eq", "Москва"), any_of(), negate(all_of()))
    assert segments.count(half_built, built_home) == hand_count("city = 'Москва'", built_home)


# -- breakdown and sample ------------------------------------------------------------------


def test_breakdown_adds_up_and_agrees_with_the_mart(built_home):
    segment = seg(Rule("rfm_segment", "in", ("champions", "loyal", "at_risk", "no_orders")))
    b = segments.breakdown(segment, built_home)
    assert b.total == segments.count(segment, built_home) > 0
    assert b.total == b.reachable_marketing + b.service_only + b.unreachable
    assert sum(b.unreachable_reasons.values()) == b.unreachable
    assert sum(b.service_only_reasons.values()) == b.service_only
    assert sum(b.by_country.values()) == sum(b.by_rfm_segment.values()) == b.total
    assert set(b.by_rfm_segment) <= {"champions", "loyal", "at_risk", "no_orders"}
    where = "rfm_segment in ('champions', 'loyal', 'at_risk', 'no_orders')"
    assert b.reachable_marketing == hand_count(
        f"{where} and phone_valid and marketing_opt_in and not opted_out and not is_duplicate_phone",
        built_home,
    )
    assert b.unreachable_reasons.get("not_mobile", 0) == hand_count(
        f"{where} and not phone_valid and phone_reason = 'not_mobile'", built_home
    )
    assert b.unreachable_reasons.get("duplicate_phone", 0) == hand_count(
        f"{where} and phone_valid and is_duplicate_phone", built_home
    )
    assert b.reachable_marketing > 0 and b.service_only > 0 and b.unreachable > 0
    assert set(b.unreachable_reasons) <= set(segments.REASON_LABELS)
    assert list(b.by_country.values()) == sorted(b.by_country.values(), reverse=True)
    assert b.build_id == warehouse.current(built_home).build_id


def test_breakdown_of_an_empty_segment_is_zero(built_home):
    b = segments.breakdown(seg(Rule("city", "eq", "Атлантида")), built_home)
    assert (b.total, b.reachable_marketing, b.service_only, b.unreachable) == (0, 0, 0, 0)
    assert b.by_country == b.by_rfm_segment == {}


def test_sample_masks_numbers_and_shows_no_internal_ids(built_home):
    segment = seg(Rule("city", "eq", "Москва"))
    frame = segments.sample(segment, n=15, seed=3, home=built_home)
    assert len(frame) == 15
    assert list(frame.columns) == list(segments.SAMPLE_COLUMNS)
    assert {"phone_e164", "external_id", "email", "attributes"}.isdisjoint(frame.columns)
    assert (frame["city"] == "Москва").all()
    full_numbers = set(
        warehouse.query("select phone_e164 from dim_contacts", home=built_home)["phone_e164"].dropna()
    )
    for cell in frame.astype(str).to_numpy().ravel():
        assert cell not in full_numbers
    assert frame["phone"].map(lambda phone: "*" in phone or phone == "—").all()
    assert frame.equals(segments.sample(segment, n=15, seed=3, home=built_home))
    assert not frame["contact_id"].equals(
        segments.sample(segment, n=15, seed=4, home=built_home)["contact_id"]
    )
    assert frame["reachable"].str.match(r"^(marketing|(service_only|unreachable): \w+)$").all()
    few = segments.sample(seg(Rule("city", "eq", "Атлантида")), home=built_home)
    assert few.empty and list(few.columns) == list(segments.SAMPLE_COLUMNS)


def test_suggested_values_are_the_common_ones(built_home):
    cities = segments.suggest_values("city", built_home, limit=3)
    assert cities[0] == ("Москва", hand_count("city = 'Москва'", built_home)) and len(cities) == 3
    tiers = segments.suggest_values("custom.loyalty_tier", built_home)
    assert {value for value, _ in tiers} == {"basic", "silver", "gold"}
    assert [n for _, n in tiers] == sorted((n for _, n in tiers), reverse=True)
    assert segments.suggest_values("phone_e164", built_home) == []
    with pytest.raises(SegmentError):
        segments.suggest_values("city; drop table x", built_home)


# -- recipients, for the composer ----------------------------------------------------------


def test_template_fields_are_message_friendly_columns_and_custom_keys(built_home):
    names = segments.template_fields(built_home)
    assert {"first_name", "city", "orders_count", "favourite_category", "loyalty_tier", "store"} <= set(names)
    assert {"phone_e164", "email", "contact_id", "external_id", "marketing_opt_in"}.isdisjoint(names)
    with i18n.language("ru"):
        assert segments.template_fields(built_home)["first_name"] == "Имя"
    with i18n.language("en"):
        assert segments.template_fields(built_home)["first_name"] == "First name"


def test_recipients_are_everyone_who_may_get_the_kind(built_home):
    segment = seg(Rule("rfm_segment", "in", ("champions", "loyal")))
    b = segments.breakdown(segment, built_home)
    columns = ("first_name", "loyalty_tier", "no_such_field", "country")
    promo = segments.recipients(segment, columns, kind="promo", grouped=True, home=built_home)
    assert sum(row["_recipients"] for row in promo) == b.reachable_marketing
    assert {tuple(row) for row in promo} == {("country", "first_name", "loyalty_tier", "_recipients")}
    service = segments.recipients(segment, columns, kind="service", grouped=True, home=built_home)
    assert sum(row["_recipients"] for row in service) == hand_count(
        "rfm_segment in ('champions', 'loyal') and phone_valid and not is_duplicate_phone and is_reachable_service",
        built_home,
    )
    some = segments.recipients(segment, ("first_name",), limit=7, home=built_home)
    assert len(some) == 7 and set(some[0]) == {"contact_id", "country", "first_name"}
    assert some == segments.recipients(segment, ("first_name",), limit=7, home=built_home)
    everyone = segments.recipients(segment, (), home=built_home)
    assert len(everyone) == b.reachable_marketing
    with pytest.raises(SegmentError, match=r"^kind:"):
        segments.recipients(segment, (), kind="spam", home=built_home)  # type: ignore[arg-type]


# -- ready-made segments -------------------------------------------------------------------


def test_ready_made_segments_compile_against_the_mart_and_count(built_home, fields):
    counts = {}
    for key, segment in segments.ready_made().items():
        segments.compile(segment, fields)
        counts[key] = segments.count(segment, built_home)
        assert counts[key] >= 0
    assert counts["champions"] > 0
    for group in segments.RFM_GROUPS:
        assert counts[group] == hand_count(f"rfm_segment = '{group}'", built_home)
    assert segments.count(segments.lapsed(180), built_home, now=NOW) == hand_count(
        f"orders_count >= 1 and (last_order_at < {ts(180)} or last_order_at is null)", built_home
    )
    assert segments.count(segments.engaged_not_converted(30), built_home, now=NOW) == hand_count(
        f"last_clicked_at >= {ts(30)} and (last_order_at < {ts(30)} or last_order_at is null)", built_home
    )
    category = segments.suggest_values("favourite_category", built_home, limit=1)[0][0]
    recent = segments.recent_buyers(category, 90)
    assert segments.count(recent, built_home, now=NOW) == hand_count(
        f"favourite_category = '{category}' and last_order_at >= {ts(90)}", built_home
    )
    assert segments.champions() == segments.rfm_group("champions")
    with pytest.raises(SegmentError):
        segments.rfm_group("vip")


# -- saved segments ------------------------------------------------------------------------


def test_saving_versions_only_changed_definitions(home):
    moscow = seg(Rule("city", "eq", "Москва"))
    first = segments.save("Москва", moscow, created_by="anna", home=home)
    assert (first.name, first.version, first.created_by) == ("Москва", 1, "anna")
    assert first.segment == Segment("Москва", moscow.root)
    again = segments.save("Москва", Segment("another label", moscow.root), created_by="ivan", home=home)
    assert again == first  # the same definition: the existing version, as it was
    wider = seg(Rule("city", "in", ("Москва", "Казань")))
    second = segments.save(" Москва ", wider, home=home)
    assert second.version == 2 and second.segment.root == wider.root
    back = segments.save("Москва", moscow, home=home)
    assert back.version == 3  # going back is a change too

    assert segments.load("Москва", home=home) == back
    assert segments.load("Москва", 2, home=home) == second
    assert [s.version for s in segments.history("Москва", home=home)] == [1, 2, 3]
    segments.save("Champions", segments.champions(), home=home)
    assert [(s.name, s.version) for s in segments.list_saved(home=home)] == [("Champions", 1), ("Москва", 3)]
    assert first.created_at.tzinfo is UTC and first.created_at <= datetime.now(UTC)


def test_a_saved_segment_keeps_its_definition_not_contacts(home):
    segments.save("lapsed", segments.lapsed(90), home=home)
    conn = sqlite3.connect(store.store_path(home))
    try:
        (definition,) = conn.execute("select definition from segments").fetchone()
    finally:
        conn.close()
    assert json.loads(definition) == segments.to_dict(Segment("lapsed", segments.lapsed(90).root))
    assert segments.load("lapsed", home=home).segment == Segment("lapsed", segments.lapsed(90).root)


def test_unknown_saved_segments_and_bad_names(home):
    with pytest.raises(segments.SegmentNotFound, match="no saved segment is named 'nope'"):
        segments.load("nope", home=home)
    segments.save("x", seg(Rule("city", "is_empty")), home=home)
    with pytest.raises(segments.SegmentNotFound, match="has no version 7; the latest is 1"):
        segments.load("x", 7, home=home)
    with pytest.raises(segments.SegmentNotFound):
        segments.history("nope", home=home)
    for bad in ("", "   ", "a\nb", "x" * 101):
        with pytest.raises(SegmentError, match=r"^name:"):
            segments.save(bad, seg(), home=home)
    with pytest.raises(SegmentError, match=r"^rules\[0\]\.op"):
        segments.save("bad", seg(Rule("city", "like", "x")), home=home)
    assert [s.name for s in segments.list_saved(home=home)] == ["x"]


# -- connections ---------------------------------------------------------------------------


def _hand_built_warehouse(home: Path, name: str, rows: list[tuple]) -> Path:
    """A tiny published snapshot with just what counting needs."""
    directory = home / "warehouse"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.duckdb"
    conn = duckdb.connect(str(path))
    try:
        conn.execute("create table dim_contacts (contact_id bigint, city varchar, attributes varchar)")
        conn.executemany("insert into dim_contacts values (?, ?, ?)", rows)
    finally:
        conn.close()
    pointer = {"build_id": name, "path": str(path), "built_at": datetime.now(UTC).isoformat(), "seconds": 0.1}
    (directory / "current.json").write_text(json.dumps(pointer))
    return home


def _open_files() -> set[str]:
    fds = Path("/proc/self/fd")
    out = set()
    for fd in fds.iterdir():
        with contextlib.suppress(OSError):  # an fd closed while listing
            out.add(os.readlink(fd))
    return out


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="needs /proc to see open files")
def test_a_new_build_closes_connections_to_the_old_snapshot(tmp_path):
    home = _hand_built_warehouse(tmp_path, "wh_a", [(1, "Москва", None), (2, "Казань", None)])
    moscow = seg(Rule("city", "eq", "Москва"))
    assert segments.count(moscow, home) == 1
    old = str(tmp_path / "warehouse" / "wh_a.duckdb")
    assert old in _open_files()  # pooled for the next count

    _hand_built_warehouse(tmp_path, "wh_b", [(1, "Москва", None), (2, "Москва", None), (3, None, None)])
    assert segments.count(moscow, home) == 2  # the new build, at once
    assert old not in _open_files()
    assert segments.count(seg(Rule("city", "neq", "Москва")), home) == 1

    segments.close_connections()
    assert str(tmp_path / "warehouse" / "wh_b.duckdb") not in _open_files()


def test_counting_before_any_build_says_what_to_do(home):
    with pytest.raises(warehouse.WarehouseError, match="smsops build"):
        segments.count(seg(), home)
