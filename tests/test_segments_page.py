"""The Segments page (AppTest): add rules, see the count change, save."""

from __future__ import annotations

import pytest
from apptest import clear_caches, open_page
from streamlit.testing.v1 import AppTest

from smsops import segments


@pytest.fixture(autouse=True)
def fresh_caches():
    clear_caches()
    yield
    clear_caches()


def count(at: AppTest) -> int:
    return int(next(m.value for m in at.metric if m.label == "Contacts").replace(",", ""))


def test_the_page_opens_on_champions_with_live_figures(built_env):
    at = open_page("segments")
    assert count(at) == segments.count(segments.champions()) > 0
    figures = {m.label: int(m.value.replace(",", "")) for m in at.metric}
    assert figures["Reachable for promotions"] + figures["Service messages only"] + figures[
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
