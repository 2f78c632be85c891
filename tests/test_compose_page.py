"""The Compose page (AppTest) over the session's built demo warehouse."""

from __future__ import annotations

import pytest
from apptest import clear_caches, metric_values, open_page

from smsops import composer, segments, templates


@pytest.fixture(autouse=True)
def fresh_caches():
    clear_caches()
    yield
    clear_caches()


def test_compose_shows_counters_bill_and_previews(built_env):
    at = open_page("compose")
    values = metric_values(at)
    assert values["Encoding"] == "UCS-2"
    assert int(values["Recipients"].replace(",", "")) > 0
    assert values["Cost"].endswith("RUB")
    texts = [t.value for t in at.text]
    assert texts and all(t.endswith("Отказ: СТОП") for t in texts)  # promotions carry the opt-out


def test_typing_a_template_updates_the_counters_and_the_warnings(built_env):
    at = open_page("compose")
    at.text_area(key="compose_text").input("СКИДКИ!!! {{ first_name }} bit.ly/x").run()
    assert not at.exception
    shown = " ".join(m.value for m in [*at.warning, *at.error, *at.info])
    assert "shortener" in shown or "bit.ly" in shown
    assert "!!!" in shown
    assert "default" in shown  # first_name without a default


def test_service_messages_have_no_opt_out_and_look_alikes_can_be_fixed(built_env):
    at = open_page("compose")
    at.segmented_control(key="compose_kind").set_value("service").run()
    at.text_area(key="compose_text").input("Your order “A-1” is ready — thanks!").run()
    assert metric_values(at)["Encoding"] == "UCS-2"
    assert all("СТОП" not in t.value for t in at.text)
    at.button(key="fix_smart").click().run()
    assert metric_values(at)["Encoding"] == "GSM-7"
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
