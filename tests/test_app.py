"""Pages through Streamlit's AppTest, over the session's built demo warehouse."""

from __future__ import annotations

from pathlib import Path

import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from smsops import charts, metrics, warehouse

APP = Path(__file__).resolve().parent.parent / "app.py"


@pytest.fixture(autouse=True)
def fresh_caches():
    st.cache_data.clear()
    st.cache_resource.clear()
    yield
    st.cache_data.clear()


def run_app(timeout: float = 60) -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=timeout)
    at.run()
    assert not at.exception, at.exception
    return at


def metric_values(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def test_overview_shows_the_base_and_messaging_figures(built_env):
    at = run_app()
    values = metric_values(at)
    ov = metrics.overview(30)
    assert values["Contacts"] == f"{ov.contacts:,}"
    assert values["Reachable for marketing"] == f"{ov.reachable:,}"
    assert values["Messages sent"] == f"{ov.sent:,}"
    assert values["Delivery rate"].endswith("%")
    assert {"CTR", "Opt-out rate", "Conversions", "Revenue attributed", "Cost"} <= set(values)
    assert ov.contacts > ov.reachable > 0


def test_overview_period_changes_the_window(built_env):
    at = run_app()
    thirty = metric_values(at)["Messages sent"]
    at.button_group(key="days").set_value(90).run()
    ninety = metric_values(at)["Messages sent"]
    assert int(ninety.replace(",", "")) > int(thirty.replace(",", ""))
    assert any("last 90 days" in s.value for s in at.subheader)


def test_overview_before_the_first_build_says_what_to_do(home):
    at = run_app()
    assert not at.metric
    assert any("smsops build" in i.value for i in at.info)


def test_chart_builders_title_and_label_their_axes(built_env):
    daily = charts.daily_activity_chart(metrics.daily_activity(90)).to_dict()
    assert daily["title"] == "Messages per day"
    assert daily["encoding"]["x"]["title"] and daily["encoding"]["y"]["title"] == "Messages"
    mix = metrics.consent_mix()
    assert list(mix["consent_state"]) == list(metrics.CONSENT_ORDER)
    assert mix["contacts"].sum() == metrics.overview().contacts
    assert charts.consent_mix_chart(mix).to_dict()["encoding"]["x"]["title"] == "Contacts"


def test_overview_reads_the_newest_published_build(built_env):
    at = run_app()
    caption = " ".join(c.value for c in at.caption)
    assert warehouse.current().build_id in caption
