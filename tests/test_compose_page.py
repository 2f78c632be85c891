"""The Compose page (AppTest) over the session's built demo warehouse."""

from __future__ import annotations

import apptest
import pytest
from apptest import clear_caches, metric_values
from streamlit.testing.v1 import AppTest

from smsops import composer, i18n, segments, templates


def open_page(page: str = "compose", timeout: float = 60) -> AppTest:
    return apptest.open_in_app(page, timeout)


@pytest.fixture(autouse=True)
def fresh_caches():
    clear_caches()
    yield
    clear_caches()


@pytest.fixture(autouse=True)
def english():
    """The test reads the page in English, and so does what it calls directly (a widget's labels
    are formatted again in the test's thread when it sets a value)."""
    with i18n.language("en"):
        yield


def test_compose_shows_counters_bill_and_previews(built_env):
    at = open_page("compose")
    values = metric_values(at)
    assert values["Encoding"] == "UCS-2"
    assert int(values["Recipients reachable now"].replace(",", "")) > 0
    assert values["Cost"].startswith("RUB ")  # money as the locale writes it: "RUB 1,234"
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


def test_an_empty_message_is_not_billed_and_says_what_to_do(built_env):
    at = open_page()
    at.text_area(key="compose_text").input("  \n ").run()
    assert not at.exception
    assert any("The message is empty" in e.value and "Write the text" in e.value for e in at.error)
    assert not [
        m for m in at.metric if m.label in ("Cost", "Recipients reachable now")
    ]  # no bill for the footer alone


def test_a_long_message_and_an_opt_out_footer_that_does_not_fit_show_what_they_cost(built_env, monkeypatch):
    monkeypatch.setenv("SMSOPS_MAX_PARTS", "2")
    at = open_page()
    at.text_area(key="compose_text").input("Скидка " * 60).run()
    said = [w.value for w in at.warning]
    assert any("over the limit of 2" in w and "RUB" in w for w in said), said
    fits_exactly = "Скидка на всё до пятницы, заходите в магазин на Ленина, 10, ждём вас с 10 до 21"
    at.text_area(key="compose_text").input(fits_exactly[:62]).run()  # 62 + " Отказ: СТОП" > 70
    said = [w.value for w in at.warning]
    assert any("opt-out footer «Отказ: СТОП» does not fit" in w and "more for" in w for w in said), said


def test_compose_reads_in_russian_with_roubles_and_no_raw_codes(built_env, monkeypatch):
    monkeypatch.setenv("SMSOPS_LANGUAGE", "ru")
    with i18n.language("ru"):
        at = open_page()
    values = metric_values(at)
    assert at.title[0].value == "Текст"
    assert values["Кодировка"] == "UCS-2" and values["Стоимость"].endswith("₽")
    bill = at.dataframe[0].value
    assert list(bill.columns) == ["Страна", "Сообщения", "Сегменты", "Стоимость"]
    assert "Россия" in set(bill["Страна"]) and all(c.endswith("₽") for c in bill["Стоимость"])
    captions = [c.value for c in at.caption]
    assert any("получатель наугад" in c or "самое длинное сообщение" in c for c in captions), captions
    shown = [*captions, *(w.value for w in [*at.warning, *at.info, *at.error]), *values, *values.values()]
    assert not [t for t in shown if "None" in t or "nan" in t.split() or "sample" in t or "longest" in t]


def test_fields_and_tracked_links_come_from_the_palette_and_the_preview_shows_them(built_env):
    at = open_page()
    at.text_area(key="compose_text").input("Скидка 10% для вас,").run()
    at.selectbox(key="compose_field").set_value("first_name")
    at.text_input(key="compose_if_empty").input("друзья")
    at.button(key="compose_insert_field").click().run()
    assert (
        at.text_area(key="compose_text").value == "Скидка 10% для вас, {{ first_name | default('друзья') }}"
    )
    at.text_input(key="compose_link").input("shop.example.ru/sale")
    at.button(key="compose_insert_link").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    text = at.text_area(key="compose_text").value
    assert text.endswith("{{ first_name | default('друзья') }} {{ link('https://shop.example.ru/sale') }}")
    assert at.text_input(key="compose_link").value == ""  # ready for the next one
    # right under the text: what a recipient reads, the link as long as its short link
    preview = at.text[0].value
    assert preview.startswith("Скидка 10% для вас, ") and "{{" not in preview and "/xxxxxxxx" in preview

    at.text_input(key="compose_link").input("bit.ly/sale")
    at.button(key="compose_insert_link").click().run()
    assert any("public link shortener" in e.value for e in at.error)
    assert at.text_area(key="compose_text").value == text  # nothing inserted
