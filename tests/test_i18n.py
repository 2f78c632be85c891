"""One catalogue, two languages: every visible string has its Russian text, and numbers, money
and dates read as a Russian or an English reader expects."""

from __future__ import annotations

from pathlib import Path

import pytest
from babel.messages.extract import extract_from_file

from smsops import i18n

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [ROOT / "app.py", *sorted((ROOT / "pages").glob("*.py")), *sorted((ROOT / "smsops").rglob("*.py"))]


def extracted() -> dict[str | tuple[str, str], list[str]]:
    """Every string the code passes to _(), N_() or ngettext(), with where it is."""
    found: dict[str | tuple[str, str], list[str]] = {}
    for path in SOURCES:
        for lineno, message, _comments, _context in extract_from_file(
            "python", path, keywords={"_": None, "N_": None, "ngettext": (1, 2)}
        ):
            found.setdefault(message, []).append(f"{path.relative_to(ROOT)}:{lineno}")
    return found


def test_every_visible_string_has_its_russian_text():
    catalogue = i18n._catalogue("ru")
    missing = []
    for message, where in extracted().items():
        key = (message[0], 0) if isinstance(message, tuple) else message
        if key not in catalogue:
            missing.append(f"{message!r} ({where[0]})")
    assert not missing, "no Russian text in smsops/locale/ru/LC_MESSAGES/smsops.po for:\n" + "\n".join(
        missing
    )


def test_plural_forms_in_russian_and_english():
    with i18n.language("ru"):
        assert [i18n.ngettext("{n} message", "{n} messages", n).format(n=n) for n in (1, 3, 5, 21, 11)] == [
            "1 сообщение", "3 сообщения", "5 сообщений", "21 сообщение", "11 сообщений",
        ]  # fmt: skip
    with i18n.language("en"):
        assert i18n.ngettext("{n} message", "{n} messages", 1) == "{n} message"
        assert i18n.ngettext("{n} message", "{n} messages", 2) == "{n} messages"


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("ru", ("1 234,50 ₽", "1 234 567", "12,5 %", "—")),
        ("en", ("RUB 1,234.50", "1,234,567", "12.5%", "—")),
    ],
)
def test_numbers_money_and_missing_values_read_as_the_locale_writes_them(code, expected):
    with i18n.language(code):
        assert (
            i18n.money(1234.5),
            i18n.number(1234567),
            i18n.percent(0.125),
            i18n.number(float("nan")),
        ) == expected
        assert i18n.money(None) == i18n.date(None) == i18n.datetime_("") == "—"
        assert i18n.money(-199018, digits=0) == {"ru": "-199 018 ₽", "en": "-RUB 199,018"}[code]


@pytest.mark.parametrize(
    ("browser", "person", "deployment", "expected"),
    [
        ("en-US", None, "", "en"),
        ("ru-RU", None, "", "ru"),
        ("de-DE", None, "", "ru"),  # neither: Russian
        (None, None, "", "ru"),
        ("en-GB", None, "ru", "ru"),  # the deployment fixes it
        ("en-GB", "ru", "en", "ru"),  # a person's choice wins
    ],
)
def test_the_language_follows_the_person_then_the_deployment_then_the_browser(
    browser, person, deployment, expected
):
    assert i18n.choose(browser, person=person, deployment=deployment) == expected


def test_the_environment_fixes_the_language_for_a_deployment(monkeypatch):
    monkeypatch.setenv("SMSOPS_LANGUAGE", "en")
    assert i18n.choose("ru-RU") == "en"
