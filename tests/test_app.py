"""Pages through Streamlit's AppTest, over the session's built demo warehouse."""

from __future__ import annotations

import pytest
from apptest import clear_caches, metric_values, open_page

from smsops import charts, i18n, metrics, warehouse


@pytest.fixture(autouse=True)
def fresh_caches():
    clear_caches()
    yield
    clear_caches()


@pytest.fixture(autouse=True)
def english():
    """The charts speak the current language: these tests read them in English."""
    with i18n.language("en"):
        yield


def test_overview_shows_the_base_and_messaging_figures(built_env):
    at = open_page()
    values = metric_values(at)
    ov = metrics.overview(30)
    assert values["Contacts"] == f"{ov.contacts:,}"
    assert values["Reachable for marketing"] == f"{ov.reachable:,}"
    assert values["Messages sent"] == f"{ov.sent:,}"
    assert values["Delivery rate"].endswith("%")
    assert {"CTR", "Opt-out rate", "Conversions", "Revenue attributed", "Cost"} <= set(values)
    assert ov.contacts > ov.reachable > 0


def test_overview_period_changes_the_window(built_env):
    at = open_page()
    thirty = metric_values(at)["Messages sent"]
    at.button_group(key="days").set_value(90).run()
    ninety = metric_values(at)["Messages sent"]
    assert int(ninety.replace(",", "")) > int(thirty.replace(",", ""))
    assert any("last 90 days" in s.value for s in at.subheader)


def test_overview_before_the_first_build_says_what_to_do(home):
    at = open_page()
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
    at = open_page()
    caption = " ".join(c.value for c in at.caption)
    assert warehouse.current().build_id in caption
