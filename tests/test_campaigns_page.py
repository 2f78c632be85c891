"""The Campaigns page (AppTest): create a draft, check its waterfall and bill, launch once."""

from __future__ import annotations

import shutil

import pytest
import streamlit as st
from apptest import open_page

from smsops import campaigns, segments, store


@pytest.fixture
def own_home(built_home, tmp_path, monkeypatch):
    """A copy of the session's built home: launching writes to the outbox."""
    home = tmp_path / "home"
    shutil.copytree(built_home, home)
    monkeypatch.setenv("SMSOPS_HOME", str(home))
    st.cache_data.clear()
    segments.close_connections()
    yield home
    segments.close_connections()


def test_the_page_lists_campaigns_and_says_it_is_a_sandbox(own_home):
    at = open_page("campaigns", timeout=120)
    assert any("sandbox" in c.value for c in at.caption)
    listing = at.dataframe[0].value
    assert len(listing) == len(campaigns.list_all())


def test_create_check_and_launch_a_campaign_once(own_home):
    at = open_page("campaigns", timeout=120)
    at.text_input(key="new_name").input("Page test promo")
    at.selectbox(key="new_audience").set_value("Ready-made: champions")
    at.text_area(key="new_text_A").input("{{ first_name | default('Здравствуйте') }}, скидка 15% для вас")
    next(b for b in at.button if b.label == "Create draft").click().run()
    assert any("Draft «Page test promo» created" in s.value for s in at.success), [e.value for e in at.error]
    draft = next(c for c in campaigns.drafts() if c.name == "Page test promo")
    at.selectbox(key="launch_pick").set_value(f"Page test promo (id {draft.campaign_id})").run()
    steps = at.table[0].value
    assert "remaining" in steps.columns and len(steps) >= 3
    to_send = int(next(m.value for m in at.metric if m.label == "To send").replace(",", ""))
    assert to_send > 0
    at.button(key="launch_start").click().run()
    at.button(key="launch_confirmed").click().run()
    assert any(f"Campaign {draft.campaign_id} launched" in s.value for s in at.success)
    assert campaigns.plan(draft.campaign_id).already_planned  # a second click plans nothing twice
    conn = store.connect(store.store_path(own_home))
    rows = conn.execute("select count(*), count(distinct contact_id) from messages where campaign_id = ?",
                        (draft.campaign_id,)).fetchone()  # fmt: skip
    assert rows[0] == rows[1] > 0  # one row per contact, however many clicks
    assert campaigns.get(draft.campaign_id).status in ("running", "finished")


def test_follow_shows_the_ab_verdict_of_a_test_campaign(own_home):
    from smsops import abtest, metrics

    results = metrics.variant_results(1)  # the demo's first campaign tested A against B
    assert set(results) == {"A", "B"} and all(trials > 0 for _, trials in results.values())
    verdict = abtest.compare(results)
    at = open_page("campaigns", timeout=120)
    label = next(c for c in at.selectbox(key="follow_pick").options if "(id 1," in c)
    at.selectbox(key="follow_pick").set_value(label).run()
    assert not at.exception
    assert any(verdict.message == m.value for m in [*at.success, *at.info])
