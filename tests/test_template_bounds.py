"""A template a person wrote renders within bounds of time, length, loops and size (DESIGN.md
invariant 11, issue 16): each payload that hung, ate memory or crashed ends quickly in a
TemplateLimitError that names the cause."""

from __future__ import annotations

import time

import pytest

from smsops import i18n, templates
from smsops.templates import TemplateLimitError


def limited(source: str, contact: dict | None = None) -> TemplateLimitError:
    """The limit error that compiling and rendering ``source`` ends in, within a second."""
    started = time.perf_counter()
    with pytest.raises(TemplateLimitError) as caught:
        templates.compile(source).render(contact or {})
    assert time.perf_counter() - started < 2, f"{source[:60]} took too long to be stopped"
    return caught.value


def test_nested_loops_over_big_ranges_end_at_once():
    error = limited("{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}")
    assert error.limit == "loops" and "range()" in str(error)


def test_loops_end_after_the_render_s_budget_of_iterations():
    error = limited("{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}")
    assert error.limit == "loops" and "10,000 times" in str(error)


def test_a_data_dependent_loop_is_stopped_for_that_contact_only():
    template = templates.compile("{% for i in range(n) %}{% for j in range(n) %}{% endfor %}{% endfor %}ok")
    assert template.render({"n": 3}) == "ok"
    with pytest.raises(TemplateLimitError, match="10,000 times"):
        template.render({"n": 5000})


def test_a_slow_render_stops_at_its_time_budget():
    started = time.perf_counter()
    with pytest.raises(TemplateLimitError) as caught:
        templates.compile(
            "{% for i in range(10000) %}{{ range(10000)|map('string')|list|length }}{% endfor %}"
        )
    assert caught.value.limit == "time" and "0.25 s" in str(caught.value)
    assert time.perf_counter() - started < 2


@pytest.mark.parametrize(
    "source",
    [
        "{{ '{:>900000000}'.format('x') }}",
        "{{ '{:.900000000f}'.format(1.5) }}",
        "{{ '{:>{w}}'.format('x', w=900000000) }}",
        "{{ ('{:>900000000}'|safe).format('x') }}",
        "{{ 'x'|center(900000000) }}",
        "{{ 'x'|indent(900000000) }}",
        "{{ 'x'.ljust(900000000) }}",
        "{{ 'x'.rjust(900000000) }}",
        "{{ 'x'.center(900000000) }}",
        "{{ 'x'.zfill(900000000) }}",
        "{{ '%900000000s' % 'x' }}",
        "{{ '%900000000s'|format('x') }}",
        "{{ '%*s'|format(900000000, 'x') }}",
        "{{ 'x' * 900000000 }}",
        "{{ 900000000 * 'x' }}",
    ],
)
def test_padding_formatting_and_repetition_are_bounded(source):
    error = limited(source)
    assert error.limit == "length" and ("4,590" in str(error) or "write the width out" in str(error))


@pytest.mark.parametrize(
    "source",
    [
        "{% for i in range(10000) %}{{ 'xxxxxxxxxx' }}{% endfor %}",
        "{% for i in range(1000) %}yyyyyyyyyy{% endfor %}",
        "{% set s %}{% for i in range(10000) %}xxxxxxxxxx{% endfor %}{% endset %}{{ s|length }}",
        "{% macro m() %}{% for i in range(10000) %}xxxxxxxxxx{% endfor %}{% endmacro %}{{ m()|length }}",
        "{{ ('x' * 4000)|replace('x', 'yyyy') }}",
        "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    ],
)
def test_a_huge_output_built_in_a_loop_is_stopped(source):
    assert limited(source).limit == "length"


def test_a_message_is_never_longer_than_the_limit():
    longest = templates.MAX_OUTPUT_CHARS
    assert 10 * 153 <= longest <= 4 * 10 * 153  # at least 10 GSM-7 parts, at most a few times that
    assert len(templates.compile("{{ 'ab' * 2295 }}").render({})) == longest
    with pytest.raises(TemplateLimitError, match="longer than 4,590"):
        templates.compile("{{ name }}!").render({"name": "x" * longest})


@pytest.mark.parametrize(
    "source",
    [
        "{{ " + "(" * 500 + "1" + ")" * 500 + " }}",
        "{% macro m(n) %}{{ m(n + 1) }}{% endmacro %}{{ m(0) }}",
        "{% for i in items recursive %}{{ loop([1, 2]) }}{% endfor %}",
    ],
)
def test_deep_nesting_is_a_template_error_naming_recursion(source):
    error = limited(source, {"items": [1]})
    assert error.limit == "nesting" and "RecursionError" in str(error)


def test_memory_error_is_a_template_error_naming_it():
    class Huge:
        def __str__(self) -> str:
            raise MemoryError

    for source in ("{{ value }}", "{% if value %}{{ value }}{% endif %}"):
        error = limited(source, {"value": Huge()})
        assert error.limit == "memory" and "MemoryError" in str(error)


@pytest.mark.parametrize(
    "source",
    [
        "{{ (10.0 ** 100) ** 100 }}",
        "{{ (1e308 * 10)|int }}",
        "{% set n = (2 ** 100) ** 40 %}{{ n * n }}",
        "{{ ((2 ** 100) ** 100) ** 100 }}",
    ],
)
def test_overflow_and_huge_numbers_are_template_errors(source):
    assert limited(source).limit == "number"


def test_overflow_error_is_named():
    assert "OverflowError" in str(limited("{{ (10.0 ** 100) ** 100 }}"))


@pytest.mark.parametrize(
    "source",
    [
        "{% macro m(x, n) %}{% if n %}{{ m([x, x], n - 1) }}{% else %}{{ x }}{% endif %}{% endmacro %}{{ m(1, 60) }}",
        "{% set ns = namespace(a=1) %}{% set ns.a = ns %}{{ ns }}",
        "{{ [1]|batch(900000000, fill_with=0)|list }}",
        "{{ 'abc'|slice(900000000)|list }}",
        "{{ [0] * 900000000 }}",
    ],
)
def test_values_a_template_builds_are_bounded_in_size(source):
    assert limited(source).limit == "size"


def test_bounds_leave_ordinary_templates_alone():
    contact = {"first_name": "Анна", "tags": ["обувь", "сумки"], "bonus": 42, "total": 1234.5}
    source = (
        "{{ first_name }}, {% for t in tags %}{{ t }}{% if not loop.last %}, {% endif %}{% endfor %}:"
        " {{ '{:>5}'.format(bonus) }} {{ '%05d' % bonus }} {{ [first_name, 'Иван']|join(' и ') }}"
        " {{ total | money }} {{ 'x'|center(5) }}|{% set ns = namespace(n=0) %}"
        "{% for i in range(3) %}{% set ns.n = ns.n + i %}{% endfor %}{{ ns.n }} {{ 'abc' ~ bonus }}"
    )
    assert templates.compile(source).render(contact) == (
        "Анна, обувь, сумки:    42 00042 Анна и Иван 1\u00a0234,50\u00a0₽   x  |3 abc42"
    )


def test_a_limit_error_reads_in_russian():
    error = limited("{{ 'x'|center(900000000) }}")
    with i18n.language("ru"):
        assert "900000000 символов" in error.localized()


@pytest.mark.parametrize(
    ("source", "said"),
    [
        ("{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}", "range()"),
        ("{{ 'x'|center(900000000) }}", "900,000,000 characters"),
        ("{{ " + "(" * 500 + "1" + ")" * 500 + " }}", "RecursionError"),
        ("{% for i in range(1000) %}{{ first_name }}{% endfor %}", "longer than 4,590 characters"),
    ],
)
def test_compose_shows_a_template_past_its_bounds_as_an_error_before_planning(built_env, source, said):
    import apptest

    apptest.clear_caches()
    with i18n.language("en"):
        at = apptest.open_in_app("compose", 60)
        at.text_area(key="compose_text").input(source).run(timeout=60)
    assert not at.exception
    errors = [e.value for e in at.error]
    assert any(said in e for e in errors), errors
    assert not at.metric or "Cost" not in {m.label for m in at.metric}  # nothing was estimated
