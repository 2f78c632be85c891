"""The Compose page (AppTest) over the session's built demo warehouse."""

from __future__ import annotations

from pathlib import Path

import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from smsops import composer, segments, templates

APP = Path(__file__).resolve().parent.parent / "app.py"


@pytest.fixture(autouse=True)
def fresh_caches():
    st.cache_data.clear()
    segments.close_connections()
    yield
    st.cache_data.clear()
    segments.close_connections()


def compose_page() -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=60)
    at.switch_page("pages/compose.py")
    at.run()
    assert not at.exception, at.exception
    return at


def metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def test_compose_shows_counters_bill_and_previews(built_env):
    at = compose_page()
    values = metrics(at)
    assert values["Encoding"] == "UCS-2"
    assert int(values["Recipients"].replace(",", "")) > 0
    assert values["Cost"].endswith("RUB")
    texts = [t.value for t in at.text]
    assert texts and all(t.endswith("Отказ: СТОП") for t in texts)  # promotions carry the opt-out


def test_typing_a_template_updates_the_counters_and_the_warnings(built_env):
    at = compose_page()
    at.text_area(key="compose_text").input("СКИДКИ!!! {{ first_name }} bit.ly/x").run()
    assert not at.exception
    shown = " ".join(m.value for m in [*at.warning, *at.error, *at.info])
    assert "shortener" in shown or "bit.ly" in shown
    assert "!!!" in shown
    assert "default" in shown  # first_name without a default


def test_service_messages_have_no_opt_out_and_look_alikes_can_be_fixed(built_env):
    at = compose_page()
    at.segmented_control(key="compose_kind").set_value("service").run()
    at.text_area(key="compose_text").input("Your order “A-1” is ready — thanks!").run()
    assert metrics(at)["Encoding"] == "UCS-2"
    assert all("СТОП" not in t.value for t in at.text)
    at.button(key="fix_smart").click().run()
    assert metrics(at)["Encoding"] == "GSM-7"
    assert at.text_area(key="compose_text").value == 'Your order "A-1" is ready - thanks!'


def test_the_bill_matches_rendering_every_recipient(built_env):
    segment = segments.champions()
    template = templates.compile(
        "{{ first_name | default('клиент') }}, для вас подарок " * 2, segments.template_fields()
    )
    grouped = segments.recipients(segment, template.fields, kind="promo", grouped=True)
    every = segments.recipients(segment, template.fields, kind="promo", grouped=False)
    assert composer.estimate(template, grouped).segments == composer.estimate(template, every).segments
    assert composer.estimate(template, grouped).messages == len(every)
