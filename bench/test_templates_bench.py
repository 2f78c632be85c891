"""Template rendering benchmarks: the fast path, the Jinja fallback, and a length profile.

Run with `pytest -m bench -s bench/test_templates_bench.py -p no:cacheprovider`.
The target is ≥ 200,000 renders per second on one core for the typical template.
"""

from __future__ import annotations

import random
import time

import pytest

from smsops import templates

pytestmark = pytest.mark.bench

TYPICAL = (
    "{{ first_name | default('клиент') }}, скидка 15% до пятницы: {{ link('https://shop.example.ru/sale') }}"
)
RICHER = (
    "{{ first_name | default('Клиент') }}, у вас {{ bonus | plural('бонус', 'бонуса', 'бонусов') }}"
    "{% if orders_count > 3 %} и статус VIP{% endif %}. Сгорят {{ expires | date }}: {{ link('https://shop.example.ru/b') }}"
)
FILTERED = (
    "{{ first_name | first_word | default('Клиент') }}, у вас {{ bonus | plural('бонус', 'бонуса', 'бонусов') }},"
    " сгорят {{ expires | date }}: {{ link('https://shop.example.ru/b') }}"
)
NAMES = ["Анна", "Иван", "Мария", "Алексей", "Ольга", "Дмитрий", "Екатерина", "Сергей", "Anna", "John"]


def synthetic_contacts(n: int, seed: int = 1) -> list[dict[str, object]]:
    """Contacts shaped like a CRM export: some names missing, None or blank."""
    rng = random.Random(seed)
    contacts = []
    for i in range(n):
        contact: dict[str, object] = {
            "phone": f"+7916{i:07d}",
            "city": rng.choice(["Москва", "Казань", "Тверь"]),
            "bonus": rng.randrange(0, 3000),
            "orders_count": rng.randrange(0, 10),
            "expires": f"2025-{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d}",
        }
        roll = rng.random()
        if roll < 0.8:
            contact["first_name"] = rng.choice(NAMES) + ("" if roll < 0.5 else f"-{i % 97}")
        elif roll < 0.9:
            contact["first_name"] = None
        elif roll < 0.95:
            contact["first_name"] = ""
        contacts.append(contact)
    return contacts


def renders_per_second(
    template: templates.Template, contacts: list[dict[str, object]], rounds: int = 3
) -> float:
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        templates.render_many(template, contacts)
        best = min(best, time.perf_counter() - started)
    return len(contacts) / best


@pytest.fixture(scope="module")
def contacts() -> list[dict[str, object]]:
    return synthetic_contacts(200_000)


def test_fast_path_renders(contacts):
    template = templates.compile(TYPICAL, ["first_name"])
    assert template.fast
    rate = renders_per_second(template, contacts)
    print(f"\nfast path, typical template: {rate:,.0f} renders/s ({1e6 / rate:.2f} µs each)")
    assert rate >= 200_000

    template = templates.compile(FILTERED)
    assert template.fast
    rate = renders_per_second(template, contacts)
    print(
        f"fast path, fields through plural/date/first_word: {rate:,.0f} renders/s ({1e6 / rate:.2f} µs each)"
    )


def test_jinja_fallback_renders(contacts):
    for label, source in (("typical template forced to Jinja", TYPICAL), ("richer template", RICHER)):
        template = templates.compile(source, fast=False)
        assert not template.fast
        rate = renders_per_second(template, contacts[:50_000])
        print(f"\nJinja fallback, {label}: {rate:,.0f} renders/s ({1e6 / rate:.2f} µs each)")


def test_length_profile_of_100k(contacts):
    for label, source in (("typical", TYPICAL), ("richer, Jinja", RICHER)):
        template = templates.compile(source)
        started = time.perf_counter()
        profile = templates.length_profile(template, contacts[:100_000])
        seconds = time.perf_counter() - started
        print(
            f"\nlength_profile, {label} template, 100,000 contacts: {seconds:.2f} s"
            f" (typical {profile.typical} chars / {profile.segments_typical} seg,"
            f" worst {profile.worst} chars / {profile.segments_worst} seg, empty {profile.empty_fields})"
        )
        assert profile.count == 100_000
