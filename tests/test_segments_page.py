"""The Segments page (AppTest): add rules, see the count change, save."""

from __future__ import annotations

import re

import apptest
import pytest
from apptest import clear_caches
from streamlit.testing.v1 import AppTest

from smsops import segments


def open_page(page: str, timeout: float = 60) -> AppTest:
    return apptest.open_in_app(page, timeout)


@pytest.fixture(autouse=True)
def fresh_caches():
    clear_caches()
    yield
    clear_caches()


def count(at: AppTest) -> int:
    return int(
        next(m.value for m in at.metric if m.label == "Contacts that match the segment").replace(",", "")
    )


def test_the_page_opens_on_champions_with_live_figures(built_env):
    at = open_page("segments")
    assert count(at) == segments.count(segments.champions()) > 0
    figures = {m.label: int(m.value.replace(",", "")) for m in at.metric}
    assert figures["Reachable for promotions now"] + figures["Service messages only"] + figures[
        "Unreachable"
    ] == count(at)
    sample = at.dataframe[0].value
    assert all("***" in p or p == "—" for p in sample["phone"])


def test_adding_a_rule_narrows_the_count_and_saving_versions_it(built_env):
    at = open_page("segments")
    before = count(at)
    at.button(key="seg_add_rule").click().run()
    rule_id = at.session_state["seg_items"][-1]["id"]
    at.selectbox(key=f"{rule_id}_field").set_value("city").run()
    at.selectbox(key=f"{rule_id}_op_city").set_value("eq").run()
    at.selectbox(key=f"{rule_id}_value_city_eq").set_value("Москва").run()
    assert not at.exception
    after = count(at)
    assert 0 < after < before
    expected = segments.count(
        segments.from_dict(
            {
                "name": "x",
                "match": "all",
                "rules": [
                    *segments.to_dict(segments.champions())["rules"],
                    {"field": "city", "op": "eq", "value": "Москва"},
                ],
            }
        )
    )
    assert after == expected
    at.text_input(key="seg_name").input("Champions in Moscow")
    next(b for b in at.button if b.label == "Save segment").click().run()
    assert any("version 1" in s.value for s in at.success)
    assert "Champions in Moscow" in [s.name for s in segments.list_saved()]


def test_switching_match_to_any_widens_the_count(built_env):
    at = open_page("segments")
    at.button(key="seg_add_rule").click().run()
    rule_id = at.session_state["seg_items"][-1]["id"]
    at.selectbox(key=f"{rule_id}_value_city_eq").set_value("Москва").run()
    narrow = count(at)
    at.segmented_control(key="seg_match").set_value("any").run()
    assert count(at) > narrow


def test_the_page_reads_in_russian_with_labels_not_codes(built_env, monkeypatch):
    monkeypatch.setenv("SMSOPS_LANGUAGE", "ru")
    at = open_page("segments")
    assert [t.value for t in at.title] == ["Сегменты"]
    figures = {m.label: m.value for m in at.metric}
    assert list(figures) == [
        "Подходят под сегмент",
        "Можно отправлять рекламу сейчас",
        "Только сервисные",
        "Недоступны",
    ]
    assert int(figures["Подходят под сегмент"].replace(" ", "")) == segments.count(segments.champions())
    assert at.session_state["seg_name"] == "Чемпионы: покупают часто, недавно и на большие суммы"
    # the champions rule reads as words in one language: field, operator, value
    rule = at.session_state["seg_items"][0]["id"]
    shown = [(s.options[s.index], s.options) for s in (
        at.selectbox(key=f"{rule}_field"), at.selectbox(key=f"{rule}_op_rfm_segment"),
        at.selectbox(key=f"{rule}_value_rfm_segment_eq"),
    )]  # fmt: skip
    assert [label for label, _ in shown] == ["RFM-группа", "равно", "Чемпионы"]
    assert "Требуют внимания" in shown[2][1] and "needs_attention" not in shown[2][1]
    assert not any(" / " in option for _, options in shown[:2] for option in options)
    assert at.selectbox(key="seg_start").options[0] == "(продолжить редактирование)"
    # the sample: labels, the locale's numbers, money and dates, "—" for a gap
    sample = at.dataframe[0].value
    cells = {str(v) for v in sample.to_numpy().ravel()}
    assert not cells & {"None", "nan", "NaN", "<NA>", "NaT"}
    assert set(sample["rfm_segment"]) == {"Чемпионы"}
    for reach in sample["reachable"]:  # "недоступен: не мобильный номер", never "unreachable: not_mobile"
        kind, _sep, reason = reach.partition(": ")
        assert kind in {"можно отправлять рекламу", "только сервисные", "недоступен"}, reach
        assert not re.search(r"[A-Za-z_]", reason), reach
    assert {"Россия"} <= set(sample["country"]) and not set(sample["country"]) & {"RU", "unknown"}
    assert set(sample["gender"]) <= {"мужской", "женский", "—"}
    assert all(v == "—" or v.endswith(" ₽") for v in sample["revenue"])
    assert any("," in v and " " in v for v in sample["revenue"])  # 12 345,00 ₽
    reasons = at.table[0].value if at.table else None
    if reasons is not None:
        assert list(reasons.columns) == ["Причина", "Контакты"]
        assert not {str(v) for v in reasons.iloc[:, 0]} & {"no_consent", "opted_out", "not_mobile"}
