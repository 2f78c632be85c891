"""Message templates: defaults, filters, links, the sandbox, and the fast path matching Jinja's."""

from __future__ import annotations

import dataclasses
from datetime import date, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smsops import templates
from smsops.encoding import GSM7, UCS2, analyze
from smsops.templates import (
    LinkSettingsError,
    TemplateInputError,
    TemplateRenderError,
    TemplateSecurityError,
    TemplateSyntaxError,
    TemplateTooLongError,
    length_profile,
    render_many,
)

NBSP = "\u00a0"
TYPICAL = (
    "{{ first_name | default('клиент') }}, скидка 15% до пятницы: {{ link('https://shop.example.ru/sale') }}"
)


def render(source: str, **contact: object) -> str:
    return templates.compile(source).render(contact)


# ---------------------------------------------------------------------------------------
# Fields and defaults


@pytest.mark.parametrize("value", [None, "", "   ", "\r", "\x07\t", NBSP])
def test_default_replaces_missing_none_and_blank_values(value):
    template = templates.compile("Привет, {{ name | default('клиент') }}!")
    assert template.render({"name": value}) == "Привет, клиент!"
    assert template.render({}) == "Привет, клиент!"


def test_default_alias_d_behaves_the_same():
    assert render("{{ name | d('друг') }}", name="") == "друг"


def test_a_given_value_wins_over_the_default():
    assert render("{{ name | default('клиент') }}", name="Анна") == "Анна"
    assert render("{{ n | default(5) }}", n=0) == "0"


@pytest.mark.parametrize("contact", [{}, {"name": None}, {"name": ""}])
def test_a_field_without_default_renders_empty_never_none(contact):
    template = templates.compile("Привет, {{ name }}!")
    assert template.render(contact) == "Привет, !"


def test_non_text_values_render_as_text():
    assert render("{{ a }} {{ b }} {{ c }}", a=5, b=1.5, c=True) == "5 1.5 True"


def test_control_characters_are_removed_from_values_but_newlines_kept():
    assert render("[{{ name }}]", name="Ан\rна\x00\x1b\u0085\nП") == "[Анна\nП]"
    assert render("[{{ name | default('x') }}]", name="Ан\rна") == "[Анна]"


def test_first_word_and_capitalize():
    assert render("{{ name | first_word }}", name="  Анна Мария ") == "Анна"
    assert render("{{ name | first_word | default('клиент') }}", name=None) == "клиент"
    assert render("{{ name | capitalize }}", name="мАРИЯ") == "МАРИЯ"
    assert render("{{ name | capitalize }}") == ""


# ---------------------------------------------------------------------------------------
# Filters


@pytest.mark.parametrize(
    ("expression", "value", "expected"),
    [
        ("money", 1234.5, f"1{NBSP}234,50{NBSP}₽"),
        ("money(decimals=0)", 1234.5, f"1{NBSP}235{NBSP}₽"),
        ("money(decimals=0)", 2.5, f"3{NBSP}₽"),
        ("money", 0, f"0,00{NBSP}₽"),
        ("money", 1, f"1,00{NBSP}₽"),
        ("money", 1.005, f"1,01{NBSP}₽"),
        ("money", -1234.5, f"-1{NBSP}234,50{NBSP}₽"),
        ("money", -0.001, f"0,00{NBSP}₽"),
        ("money", 1234567, f"1{NBSP}234{NBSP}567,00{NBSP}₽"),
        ("money", "1234,5", f"1{NBSP}234,50{NBSP}₽"),
        ("money", "1 234.5", f"1{NBSP}234,50{NBSP}₽"),
        ("money('USD')", 1234.5, "1,234.50 USD"),
        ("money('EUR', 0)", 1234.5, "1,235 EUR"),
        ("money", None, ""),
        ("money", "abc", ""),
        ("money", True, ""),
        ("money", float("nan"), ""),
        ("money", 1e300, ""),
    ],
)
def test_money(expression, value, expected):
    assert render(f"{{{{ v | {expression} }}}}", v=value) == expected


def test_money_of_a_missing_field_is_empty():
    assert render("{{ total | money }}") == ""


@pytest.mark.parametrize(
    ("expression", "value", "expected"),
    [
        ("date", "2025-03-08", "8 марта"),
        ("date('long')", "2025-03-08", "8 марта 2025"),
        ("date('numeric')", "2025-03-08", "08.03.2025"),
        ("date", date(2025, 1, 31), "31 января"),
        ("date('long')", datetime(2024, 12, 1, 23, 59), "1 декабря 2024"),
        ("date", "2025-05-09T10:30:00+03:00", "9 мая"),
        ("date", "2025-06-15 08:00", "15 июня"),
        ("date", "08.03.2025", "8 марта"),
        ("date", "2025-13-01", ""),
        ("date", "завтра", ""),
        ("date", None, ""),
        ("date", 20250308, ""),
    ],
)
def test_date(expression, value, expected):
    assert render(f"{{{{ v | {expression} }}}}", v=value) == expected


def test_every_month_in_the_genitive():
    months = [render("{{ v | date }}", v=date(2025, m, 1)).split()[1] for m in range(1, 13)]
    assert months == [
        "января", "февраля", "марта", "апреля", "мая", "июня",
        "июля", "августа", "сентября", "октября", "ноября", "декабря",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, "0 бонусов"),
        (1, "1 бонус"),
        (2, "2 бонуса"),
        (4, "4 бонуса"),
        (5, "5 бонусов"),
        (11, "11 бонусов"),
        (12, "12 бонусов"),
        (14, "14 бонусов"),
        (21, "21 бонус"),
        (22, "22 бонуса"),
        (101, "101 бонус"),
        (111, "111 бонусов"),
        (1.5, "1,5 бонуса"),
        (5.0, "5 бонусов"),
        (-1, "-1 бонус"),
        (-5, "-5 бонусов"),
        ("3", "3 бонуса"),
        (None, ""),
        ("много", ""),
    ],
)
def test_plural(value, expected):
    assert render("{{ n | plural('бонус', 'бонуса', 'бонусов') }}", n=value) == expected


def test_plural_without_the_number():
    assert render("{{ n }} {{ n | plural('бонус', 'бонуса', 'бонусов', number=False) }}", n=22) == "22 бонуса"


@pytest.mark.parametrize(
    ("source", "complaint"),
    [
        ("{{ n | plural('бонус') }}", "three forms"),
        ("{{ d | date('weekday') }}", "'short', 'long', 'numeric'"),
        ("{{ p | money(decimals=9) }}", "0 to 4"),
    ],
)
def test_wrong_literal_filter_arguments_fail_at_compile_time(source, complaint):
    with pytest.raises(TemplateSyntaxError, match="line 1") as caught:
        templates.compile(source)
    assert complaint in str(caught.value)


def test_unknown_filter_names_the_available_ones():
    with pytest.raises(TemplateSyntaxError, match="No filter named 'rubles'") as caught:
        templates.compile("{{ total | rubles }}")
    assert "money" in str(caught.value)


# ---------------------------------------------------------------------------------------
# Links


def test_link_renders_a_placeholder_of_exactly_the_link_length():
    template = templates.compile("Скидка: {{ link('https://shop.example.ru/sale') }}")
    text = template.render({})
    placeholder = text.removeprefix("Скидка: ")
    assert len(placeholder) == len("https://s.example/l/") + 8  # the configured base and a token
    assert placeholder == template.link_placeholder
    assert placeholder.startswith("https://s.example/l/")


def test_each_distinct_link_renders_a_placeholder_of_its_own_on_both_renderers():
    source = "{{ link('https://a.example/1') }} {{ link('https://b.example/2') }} {{ link('https://a.example/1') }}"
    for fast in (True, False):
        template = templates.compile(source, fast=fast)
        a, b = (
            template.link_placeholders["https://a.example/1"],
            template.link_placeholders["https://b.example/2"],
        )
        assert a != b and len(a) == len(b)
        assert template.render({}) == f"{a} {b} {a}"


def test_a_link_inside_a_condition_keeps_its_own_placeholder():
    template = templates.compile(
        "{% if vip %}{{ link('https://a.example/vip') }} {% endif %}{{ link('https://a.example/all') }}"
    )
    assert not template.fast
    assert template.render({"vip": False}) == template.link_placeholders["https://a.example/all"]


def test_a_link_to_an_address_from_a_field_is_refused():
    with pytest.raises(TemplateSyntaxError, match="written out"):
        templates.compile("{{ link(site) }}")


def test_the_link_base_comes_from_the_configuration(monkeypatch):
    monkeypatch.setenv("SMSOPS_LINK_BASE", "https://go.shop.example")
    template = templates.compile("{{ link('https://shop.example/a') }}")
    assert template.render({}) == "https://go.shop.example/xxxxxxxx"


def test_link_base_is_configurable_and_counted_by_analyze():
    template = templates.compile(
        "Sale: {{ link('https://shop.example.com/a') }}", link_base="https://go.shop.example/"
    )
    text = template.render({})
    assert text == "Sale: https://go.shop.example/xxxxxxxx"
    analysis = analyze(text)
    assert analysis.encoding == GSM7
    assert analysis.units == 6 + len("https://go.shop.example/") + 8


def test_links_lists_the_literal_addresses_in_order():
    template = templates.compile(
        "{{ link('https://a.example/1') }} {{ link('https://b.example/2') }} {{ link('https://a.example/1') }}"
    )
    assert template.links == ("https://a.example/1", "https://b.example/2")


def test_a_link_base_that_is_not_an_address_is_rejected():
    for base in ("s.example/", "https://s.example", "https://ы.example/", 5):
        with pytest.raises(LinkSettingsError, match="link_base"):
            templates.compile("x", link_base=base)


@pytest.mark.parametrize(
    "call", ["link('shop.example.ru')", "link(5)", "link()", "link('https://a.ru', 'b')"]
)
def test_link_needs_one_full_address(call):
    with pytest.raises(TemplateSyntaxError, match="link"):
        templates.compile(f"Скидка: {{{{ {call} }}}}")


# ---------------------------------------------------------------------------------------
# What compiling reports


def test_fields_are_listed_in_order_without_helpers():
    template = templates.compile(
        "{{ first_name }} {{ link('https://a.example/x') }} {% for i in range(2) %}{{ i }}{% endfor %}"
        " {{ total | money }} {{ first_name }}"
    )
    assert template.fields == ("first_name", "total")


def test_unknown_fields_are_reported():
    source = "{{ first_name }}, у вас {{ bonus | plural('бонус', 'бонуса', 'бонусов') }} {{ city }}"
    template = templates.compile(source, ["first_name", "bonus"])
    assert template.unknown_fields == ("city",)
    assert (
        templates.compile(source, {"first_name": "Имя", "bonus": "Бонусы", "city": "Город"}).unknown_fields
        == ()
    )
    assert templates.compile(source).unknown_fields == ()


def test_missing_default_lists_fields_that_may_render_empty():
    template = templates.compile(
        "{{ first_name | default('клиент') }} {{ last_name }} {{ city | upper | default('') }}"
        "{% if orders_count > 3 %}{{ orders_count }}{% endif %}"
        "{{ nick if nick else 'друг' }} {{ (bonus | default(0)) | plural('бонус', 'бонуса', 'бонусов') }}"
        " {{ total | money }}"
    )
    assert template.missing_default == ("last_name", "total")


def test_a_field_used_once_with_and_once_without_default_is_missing_one():
    assert templates.compile("{{ a | default('x') }} {{ a }}").missing_default == ("a",)


def test_syntax_error_names_line_column_and_snippet():
    source = "Привет, {{ first_name }}!\nСкидка {{ discount | }} до пятницы"
    with pytest.raises(TemplateSyntaxError) as caught:
        templates.compile(source)
    error = caught.value
    assert isinstance(error, ValueError)
    assert error.line == 2
    assert error.column == 8
    assert "line 2, column 8" in str(error)
    assert "{{ discount | }}" in str(error)


def test_unclosed_block_is_a_syntax_error():
    with pytest.raises(TemplateSyntaxError, match="endif"):
        templates.compile("{% if vip %}Только для вас")


# ---------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("source", [None, 5, b"{{ name }}", ["{{ name }}"]])
def test_source_must_be_text(source):
    with pytest.raises(TemplateInputError, match="must be str") as caught:
        templates.compile(source)
    assert isinstance(caught.value, TypeError)


def test_bytes_source_says_to_decode():
    with pytest.raises(TemplateInputError, match="decode"):
        templates.compile(b"x")


def test_a_megabyte_template_is_rejected_naming_its_length():
    with pytest.raises(TemplateTooLongError, match="1,000,000 characters") as caught:
        templates.compile("a" * 1_000_000)
    assert isinstance(caught.value, ValueError)
    longest = templates.MAX_OUTPUT_CHARS
    assert templates.compile("a" * longest).render({}) == "a" * longest
    with pytest.raises(templates.TemplateLimitError, match="longer than 4,590 characters"):
        templates.compile("a" * templates.MAX_SOURCE_CHARS)  # source fits, but no message is that long


def test_fields_given_as_one_string_are_rejected():
    with pytest.raises(TemplateInputError, match="list"):
        templates.compile("{{ name }}", "name")


def test_a_contact_must_be_a_mapping():
    with pytest.raises(TemplateInputError, match="mapping"):
        templates.compile("{{ name }}").render(["Анна"])


def test_template_is_immutable():
    template = templates.compile("x")
    with pytest.raises(dataclasses.FrozenInstanceError):
        template.source = "y"


# ---------------------------------------------------------------------------------------
# Sandbox


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ name.__class__.mro() }}",
        "{{ name['__class__'] }}",
        "{{ cycler.__init__.__globals__ }}",
    ],
)
def test_sandbox_rejects_internals_spelled_out_at_compile_time(source):
    with pytest.raises(TemplateSecurityError, match="not"):
        templates.compile(source)


@pytest.mark.parametrize(
    ("source", "contact"),
    [
        ("{{ name[key] }}", {"name": "Анна", "key": "__class__"}),
        ("{{ kind.mro() }}", {"kind": int}),
        ("{{ name[key]() }}", {"name": "Анна", "key": "__subclasshook__"}),
        ("{{ '{0.__class__}'.format(name) }}", {"name": "Анна"}),
    ],
)
def test_sandbox_blocks_internals_reached_through_values_at_render_time(source, contact):
    template = templates.compile(source)
    with pytest.raises(TemplateSecurityError):
        template.render(contact)


def test_sandbox_bounds_repetition_and_powers():
    with pytest.raises(templates.TemplateLimitError, match="repeats"):
        render("{{ 'x' * 1000000 }}")
    with pytest.raises(templates.TemplateLimitError, match="power"):
        render("{{ 9 ** 999999 }}")
    assert render("{{ '-' * 3 }}") == "---"


def test_sandbox_does_not_let_a_template_change_a_contact():
    contact = {"tags": ["vip"]}
    with pytest.raises(TemplateSecurityError):
        templates.compile("{{ tags.append('x') }}").render(contact)
    assert contact == {"tags": ["vip"]}


# ---------------------------------------------------------------------------------------
# Fast path and Jinja fallback


def test_typical_template_takes_the_fast_path():
    template = templates.compile(TYPICAL, ["first_name"])
    assert template.fast
    assert (
        template.render({"first_name": "Анна"}) == "Анна, скидка 15% до пятницы: https://s.example/l/xxxxxxxx"
    )
    assert not templates.compile(TYPICAL, fast=False).fast


def test_fields_through_this_modules_filters_take_the_fast_path():
    template = templates.compile(
        "{{ name | first_word | capitalize }}, {{ bonus | plural('бонус', 'бонуса', 'бонусов') }}"
    )
    assert template.fast
    assert template.render({"name": "анна мария", "bonus": 21}) == "Анна, 21 бонус"
    assert not templates.compile("{{ name | upper }}").fast
    assert not templates.compile("{{ total | money(currency) }}").fast


def test_remembered_filter_results_tell_values_apart_by_type():
    template = templates.compile("{{ n | plural('бонус', 'бонуса', 'бонусов') }}")
    for _ in range(2):
        assert [template.render({"n": n}) for n in (1, True, "1", 1.5, None)] == [
            "1 бонус",
            "",
            "1 бонус",
            "1,5 бонуса",
            "",
        ]


def test_remembered_filter_results_keep_equal_values_that_print_differently_apart():
    template = templates.compile("{{ v | first_word }}")
    assert [template.render({"v": v}) for v in (0.0, -0.0, 1, 1.0)] == ["0.0", "-0.0", "1", "1.0"]


def test_non_simple_template_falls_back_to_jinja_and_works():
    template = templates.compile(
        "{{ name | default('Клиент') }}{% if orders_count > 3 %}, спасибо, что вы с нами{% endif %}!"
    )
    assert not template.fast
    assert template.render({"name": "Анна", "orders_count": 5}) == "Анна, спасибо, что вы с нами!"
    assert template.render({"name": "Анна", "orders_count": 1}) == "Анна!"
    assert template.render({"orders_count": None}) == "Клиент!"
    assert template.render({}) == "Клиент!"


def test_arithmetic_and_calls_on_missing_fields_render_empty():
    assert render("[{{ x + 1 }}|{{ name.upper() }}|{{ a.b.c }}|{{ -x }}]") == "[|||]"


def test_a_value_of_the_wrong_type_raises_a_render_error():
    template = templates.compile("{% if orders_count > 3 %}VIP{% endif %}")
    with pytest.raises(TemplateRenderError, match="TypeError"):
        template.render({"orders_count": "много"})


names = st.sampled_from(["first_name", "city", "bonus", "x"])
values = st.one_of(
    st.none(),
    st.just(""),
    st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=12),
    st.sampled_from([" ", "\r", "\t\n", NBSP, "Анна", "Ёжик\r\n"]),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True),
    st.booleans(),
    st.dates(),
    st.sampled_from(["2025-03-08", "08.03.2025", "1 234,5", "-3", "21"]),
)
literal_text = st.text(
    st.characters(codec="utf-8", exclude_categories=["Cs"], exclude_characters="{}%#\r"), max_size=15
)
default_text = st.text(st.characters(whitelist_categories=["Lu", "Ll", "Nd", "Zs"]), max_size=8)
parts = st.one_of(
    literal_text,
    names.map(lambda name: f"{{{{ {name} }}}}"),
    st.tuples(names, default_text).map(lambda nd: f"{{{{ {nd[0]} | default({nd[1]!r}) }}}}"),
    st.tuples(names, st.integers(0, 99)).map(lambda nd: f"{{{{ {nd[0]} | d({nd[1]}) }}}}"),
    st.just("{{ link('https://shop.example.ru/sale') }}"),
    st.just("{{ 'ёлка\\x07' }}"),
    names.map(lambda name: f"{{{{ {name} | money }}}}"),
    names.map(lambda name: f"{{{{ {name} | money('USD', 0) }}}}"),
    names.map(lambda name: f"{{{{ {name} | date('long') | default('скоро') }}}}"),
    names.map(lambda name: f"{{{{ {name} | plural('бонус', 'бонуса', 'бонусов') }}}}"),
    names.map(lambda name: f"{{{{ {name} | first_word | capitalize | d('друг') }}}}"),
    names.map(lambda name: f"{{{{ {name} | default('нет', true) }}}}"),
)


@settings(max_examples=400, deadline=None)
@given(pieces=st.lists(parts, max_size=6), contacts=st.lists(st.dictionaries(names, values), max_size=5))
def test_fast_path_renders_exactly_like_jinja(pieces, contacts):
    source = "".join(pieces)
    fast = templates.compile(source)
    slow = templates.compile(source, fast=False)
    assert fast.fast
    assert not slow.fast
    assert (fast.fields, fast.missing_default, fast.links) == (slow.fields, slow.missing_default, slow.links)
    for contact in contacts:
        assert fast.render(contact) == slow.render(contact)


def test_render_many_keeps_order():
    template = templates.compile("{{ name | default('клиент') }}")
    assert render_many(template, [{"name": "Анна"}, {}, {"name": "Ян"}]) == ["Анна", "клиент", "Ян"]


# ---------------------------------------------------------------------------------------
# Length profile


def test_length_profile_finds_the_worst_case_and_empty_fields():
    template = templates.compile("Hi {{ name | default('there') }}, {{ link('https://shop.example.com/a') }}")
    contacts = [
        {"name": "Ann"},
        {"name": "Bob"},
        {"name": ""},
        {},
        {"name": "Bartholomew-Alexander"},
        {"name": "Аня"},
    ]
    profile = length_profile(template, contacts)
    assert profile.count == 6
    assert profile.worst_text == "Hi Bartholomew-Alexander, https://s.example/l/xxxxxxxx"
    assert profile.worst == len(profile.worst_text)
    assert profile.typical == len("Hi Ann, https://s.example/l/xxxxxxxx")
    assert profile.encodings == {GSM7: 5, UCS2: 1}
    assert profile.segments_typical == 1
    assert profile.segments_worst == 1
    assert profile.segments_total == 6
    assert profile.empty_fields == {"name": 2}


def test_length_profile_counts_multi_segment_messages():
    template = templates.compile("{{ text }}")
    profile = length_profile(template, [{"text": "a" * 161}, {"text": "я" * 71}, {"text": "short"}])
    assert profile.segments_worst == 2
    assert profile.segments_total == 5
    assert profile.worst == 161


def test_length_profile_of_no_contacts_is_empty():
    profile = length_profile(templates.compile("{{ name }}"), [])
    assert (profile.count, profile.worst, profile.worst_text, profile.encodings) == (0, 0, "", {})
    assert profile.empty_fields == {"name": 0}


def test_cyrillic_template_is_ucs2():
    text = templates.compile(TYPICAL).render({"first_name": "Anna"})
    analysis = analyze(text)
    assert analysis.encoding == UCS2
    assert analysis.units == len(text)
