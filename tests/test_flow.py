"""One flow from audience to launch (AppTest over the demo base): Compose hands its audience and
text to the new-campaign form, and every screen counts the same audience the same way."""

from __future__ import annotations

import shutil

import pytest
import streamlit as st
from apptest import APP, clear_caches
from streamlit.testing.v1 import AppTest

from smsops import campaigns, i18n, segments

TEXT = "{{ first_name | default('Здравствуйте') }}, для постоянных клиентов скидка 10% до воскресенья"


def open_page(page: str, timeout: float = 120) -> AppTest:
    """The app, then ``pages/<page>.py`` in it (app.py runs first and sets the language)."""
    at = AppTest.from_file(str(APP), default_timeout=timeout)
    at.run()
    at.switch_page(f"pages/{page}.py")
    at.run()
    assert not at.exception, at.exception
    return at


@pytest.fixture(autouse=True)
def english():
    with i18n.language("en"):
        yield


@pytest.fixture
def own_home(built_home, tmp_path, monkeypatch):
    """A copy of the session's built home: drafts and launches write to the store."""
    home = tmp_path / "home"
    shutil.copytree(built_home, home)
    monkeypatch.setenv("SMSOPS_HOME", str(home))
    clear_caches()
    yield home
    clear_caches()
    st.cache_data.clear()


def test_create_a_campaign_from_compose_carries_the_audience_and_the_text(own_home):
    at = open_page("compose")
    at.selectbox(key="compose_audience").set_value("Ready-made: loyal")
    at.text_area(key="compose_text").input(TEXT).run()
    assert not at.exception, at.exception
    at.button(key="compose_to_campaign").click().run()
    assert not at.exception, at.exception

    # the Campaigns page, its new-campaign form filled in and saying where from
    assert at.title[0].value == "Campaigns"
    assert at.text_area(key="new_text_A").value == TEXT
    assert at.selectbox(key="new_audience").value == "Ready-made: loyal"
    assert at.radio(key="new_kind").value == "promo"
    assert any("From Compose" in i.value and "Loyal customers" in i.value for i in at.info)

    # nothing typed twice: a name, and the draft holds Compose's audience and text
    at.switch_page("pages/campaigns.py")  # stay there (AppTest reruns the page it was last sent to)
    at.text_input(key="new_name").input("From compose")
    next(b for b in at.button if b.label == "Create draft").click().run()
    assert any("Draft «From compose» created" in s.value for s in at.success), [e.value for e in at.error]
    draft = next(c for c in campaigns.drafts() if c.name == "From compose")
    assert [v.template_source for v in draft.variants] == [TEXT]
    assert (
        segments.to_dict(draft.segment)["rules"] == segments.to_dict(segments.ready_made()["loyal"])["rules"]
    )
    assert not any("From Compose" in i.value for i in at.info)  # said until the draft is made
