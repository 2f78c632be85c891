"""The composer: opt-out footer, content warnings, previews and the whole-audience bill."""

from __future__ import annotations

import pytest

from smsops import composer, encoding, i18n, pricing, templates

FIELDS = ("contact_id", "first_name", "last_name", "city", "country")


@pytest.fixture(autouse=True)
def english():
    """The warnings speak the current language: these tests read them in English."""
    with i18n.language("en"):
        yield


def tpl(source: str) -> templates.Template:
    return templates.compile(source, FIELDS)


def codes(warnings) -> set[str]:
    return {w.code for w in warnings}


def test_promotions_get_the_opt_out_instruction_and_service_messages_do_not():
    assert composer.message_source("Скидка 15%!", "promo") == "Скидка 15%! Отказ: СТОП"
    assert (
        composer.message_source("Скидка 15%!", "promo", "Отказ: СТОП на 900")
        == "Скидка 15%! Отказ: СТОП на 900"
    )
    assert composer.message_source("Заказ передан в доставку", "service") == "Заказ передан в доставку"
    # not twice, and counted in the length
    once = composer.message_source("Скидка 15%! Отказ: СТОП", "promo")
    assert once.count("СТОП") == 1
    assert encoding.analyze(composer.message_source("x" * 60, "promo")).segments == 2


def test_content_check_explains_what_is_wrong():
    t = tpl("СКИДКИ ДО 90% ТОЛЬКО СЕГОДНЯ!!! {{ first_name }} bit.ly/abc")
    found = composer.check(t, kind="promo", sender=None, empty_fields={"first_name": 40}, recipients=100)
    assert {"shortener", "all_caps", "exclamations", "no_sender", "empty_personalisation"} <= codes(found)
    empty = next(w for w in found if w.code == "empty_personalisation")
    assert "40 of 100" in empty.message and "default" in empty.message


def test_a_clean_message_gets_no_warnings_but_the_footer_note():
    t = tpl(
        "{{ first_name | default('Здравствуйте') }}, новая коллекция в магазине: {{ link('https://shop.example.ru/new') }}"
    )
    found = composer.check(t, kind="promo", sender="SHOPMARKET")
    assert codes(found) == {"opt_out_added"}
    assert composer.check(t, kind="service", sender="SHOPMARKET") == []


def test_unknown_fields_bad_senders_and_needless_ucs2_are_flagged():
    t = tpl("Hello {{ nickname }} — your order “A-1” is ready")
    found = composer.check(t, kind="service", sender="TOO-LONG-SENDER")
    assert {"unknown_field", "bad_sender", "needless_ucs2"} <= codes(found)


def test_preview_shows_samples_the_longest_and_a_missing_field():
    t = tpl("{{ first_name | default('клиент') }}, ваш город {{ city | default('—') }}")
    people = [
        {"contact_id": 1, "first_name": "Анна", "city": "Казань", "country": "RU"},
        {"contact_id": 2, "first_name": "Константин-Александр", "city": "Санкт-Петербург", "country": "KZ"},
        {"contact_id": 3, "first_name": None, "city": "Омск", "country": "RU"},
        {"contact_id": 4, "first_name": "Ли", "city": "", "country": None},
    ]
    rows = composer.preview(t, people, sample=2, seed=1)
    whys = {r.why: r for r in rows}
    assert whys["longest"].contact_id == 2
    assert whys["missing first_name"].text.startswith("клиент,")
    assert whys["missing city"].contact_id == 4
    kz = whys["longest"]
    assert kz.price == pytest.approx(kz.segments * pricing.price("KZ").per_segment)


def test_the_estimate_is_exact_per_recipient_and_grouping_changes_nothing():
    t = tpl("{{ first_name | default('клиент') }}, " + "скидка " * 8)
    people = [
        {"first_name": name, "country": c}
        for name, c in [("Анна", "RU"), ("Ли", "RU"), (None, "KZ"), ("Анна", "RU")]
    ]
    each = composer.estimate(t, people)
    expected = sum(encoding.analyze(t.render(p)).segments for p in people)
    assert each.messages == 4 and each.segments == expected
    assert each.empty_fields == {"first_name": 1}
    grouped = composer.estimate(
        t,
        [
            {"first_name": "Анна", "country": "RU", composer.COUNT: 2},
            {"first_name": "Ли", "country": "RU", composer.COUNT: 1},
            {"first_name": None, "country": "KZ", composer.COUNT: 1},
        ],
    )
    assert (grouped.messages, grouped.segments, grouped.total) == (each.messages, each.segments, each.total)
    assert grouped.bill.by_country == each.bill.by_country


def test_warnings_and_previews_read_in_russian():
    t = tpl("{{ first_name }}, СКИДКИ ДО 90% ТОЛЬКО СЕГОДНЯ!!!")
    with i18n.language("ru"):
        checked = composer.check(
            t, kind="promo", sender=None, empty_fields={"first_name": 40}, recipients=100
        )
        found = {w.code: w.message for w in checked}
        assert found["empty_personalisation"].startswith("У {{ first_name }} нет значения по умолчанию")
        assert "у 40 из 100 получателей его нет" in found["empty_personalisation"]
        assert found["exclamations"] == "Серии вроде «!!!» выглядят как спам и для фильтров, и для людей."
        rows = composer.preview(t, [{"contact_id": 1, "first_name": None, "country": "KZ"}], sample=1)
        assert {r.why_label for r in rows} >= {"самое длинное сообщение", "без {{ first_name }}"}
        assert composer.country_label("KZ") == "Казахстан" and composer.country_label(None) == "другие страны"


# -- the palette: fields and tracked links without writing template syntax ----------------------


def test_the_palette_writes_a_field_as_a_template_renders_it():
    assert composer.field_snippet("first_name") == "{{ first_name }}"
    greeting = composer.field_snippet("first_name", "Здравствуйте")
    assert greeting == "{{ first_name | default('Здравствуйте') }}"
    assert tpl(greeting).render({"first_name": "Анна"}) == "Анна"
    assert tpl(greeting).render({}) == "Здравствуйте"
    assert not tpl(greeting).missing_default  # no "has no default" warning for what the palette wrote
    # money and dates read as such; what a contact without them reads is written as given, quotes and all
    assert composer.field_snippet("revenue") == "{{ revenue | money }}"
    assert (
        templates.compile(composer.field_snippet("revenue")).render({"revenue": 1500}) == "1\xa0500,00\xa0₽"
    )
    assert templates.compile(composer.field_snippet("last_order_at")).render(
        {"last_order_at": "2025-03-04"}
    ) == ("4 марта")
    for odd in ("It's", "a\\b", "}} {% if x %}", "две\nстроки"):
        assert templates.compile(composer.field_snippet("city", odd)).render({}) == odd
    with pytest.raises(composer.PaletteError, match="not a field"):
        composer.field_snippet("first name")


@pytest.mark.parametrize(
    ("typed", "address"),
    [
        ("https://shop.example.ru/sale", "https://shop.example.ru/sale"),
        ("  shop.example.ru/sale?utm_source=sms ", "https://shop.example.ru/sale?utm_source=sms"),
        ("http://shop.example.ru", "http://shop.example.ru"),
        ("https://магазин.рф/акция", "https://магазин.рф/акция"),
    ],
)
def test_a_tracked_link_is_checked_and_written_out_in_full(typed, address):
    assert composer.tracked_address(typed) == address
    snippet = composer.link_snippet(typed)
    assert snippet == f"{{{{ link('{address}') }}}}"
    assert templates.compile(snippet).links == (address,)


@pytest.mark.parametrize(
    ("typed", "said"),
    [
        ("", "Give the address"),
        ("shop", "no site name"),
        ("https://localhost/sale", "no site name"),
        ("https://shop.example.ru/a b", "no spaces"),
        ("https://shop.example.ru/'x'", "quotes"),
        ("ftp://shop.example.ru/file", "start the address with https://"),
        ("bit.ly/abc", "public link shortener"),
    ],
)
def test_an_address_that_cannot_be_tracked_says_what_to_write(typed, said):
    with pytest.raises(composer.PaletteError, match=said):
        composer.link_snippet(typed)


def test_inserting_appends_with_a_space_where_one_is_needed():
    assert composer.insert("", "{{ city }}") == "{{ city }}"
    assert composer.insert("Привет,", "{{ first_name }}") == "Привет, {{ first_name }}"
    assert composer.insert("Привет, ", "{{ first_name }}") == "Привет, {{ first_name }}"
    assert composer.insert("Ждём вас (", "{{ city }}") == "Ждём вас ({{ city }}"
    typed = "{% if city %}Ждём в {{ city }}{% endif %}"  # Jinja as typed stays as it was
    assert composer.insert(typed, composer.link_snippet("shop.example.ru")).startswith(typed + " {{ link(")


def test_an_audience_count_says_what_it_counts_and_why_the_others_are_left_out():
    from smsops import segments

    breakdown = segments.Breakdown(
        total=3677, reachable_marketing=2386, service_only=1100, unreachable=191,
        service_only_reasons={"no_consent": 1000, "opted_out": 100},
        unreachable_reasons={"not_mobile": 150, "duplicate_phone": 41},
        by_country={}, by_rfm_segment={}, build_id="b",
    )  # fmt: skip
    promo = composer.reach(breakdown, "promo")
    assert (promo.matching, promo.reachable) == (3677, 2386)
    assert sum(n for _why, n in promo.left_out) == 3677 - 2386
    assert promo.left_out[0] == ("service messages only: no marketing consent", 1000)
    service = composer.reach(breakdown, "service")
    assert service.reachable == 2386 + 1100 and sum(n for _why, n in service.left_out) == 191
    assert composer.matching_said(3677) == "3,677 match the segment"
    assert composer.matching_said(1) == "1 matches the segment"
    assert composer.reachable_said(2386, "promo") == "2,386 reachable for promotions now"
    assert composer.planned_said(2429) == "2,429 planned after consent, duplicates and frequency caps"
