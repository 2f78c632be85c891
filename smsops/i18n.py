"""The languages the screens speak: one gettext catalogue, numbers, dates and money by Babel.

Every visible string is written in English in the code and goes through :func:`_` (or
:func:`ngettext` for counts); the Russian text lives in ``smsops/locale/ru/LC_MESSAGES/smsops.po``.
Which language a person sees (:func:`choose`): their own choice in the sidebar, else the
deployment's ``SMSOPS_LANGUAGE`` (``ru`` or ``en``), else the browser's, else Russian (our first
users are Russian teams).

The current language is a context variable: the app sets it at the start of each script run
(:func:`use`), and any code running in that run, in the pages or in :mod:`smsops`, translates
with it. Formatting follows it too: :func:`number`, :func:`money`, :func:`percent`,
:func:`date`, :func:`datetime_` (``1 234,50 ₽`` in Russian, ``RUB 1,234.50`` in English).
A missing value shows as :data:`MISSING`, never ``None`` or ``nan``.

How to write a screen:

- ``_("Imported {name}").format(name=...)``: translate first, then format (never an f-string
  inside ``_()``); ``ngettext("{n} message", "{n} messages", n).format(n=number(n))`` for counts.
- Labels kept in module-level tables (a reason code → its text) are marked with :func:`N_` where
  the table is defined and shown with :func:`label` (or ``_()``) where they are shown.
- Values on screen go through :func:`number`, :func:`money`, :func:`percent`, :func:`date` and
  :func:`datetime_`; in a table, format the column into text.
- The Russian texts live in ``smsops/locale/ru/LC_MESSAGES/smsops.po`` and its parts
  ``smsops-<part>.po`` beside it (one per page or area, so that several can be written at once;
  the first translation of a msgid wins). ``tests/test_i18n.py`` lists every string without one.
"""

from __future__ import annotations

import contextvars
import functools
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import date as _date
from datetime import datetime
from pathlib import Path
from typing import Any

from babel import dates as babel_dates
from babel import numbers as babel_numbers

__all__ = [
    "LANGUAGES",
    "MISSING",
    "N_",
    "_",
    "choose",
    "clear",
    "current",
    "date",
    "datetime_",
    "fall_back_on",
    "label",
    "language",
    "money",
    "ngettext",
    "number",
    "percent",
    "use",
]

LANGUAGES = ("ru", "en")
"""What the screens speak; the first is the default."""
MISSING = "—"
LOCALE_DIR = Path(__file__).with_name("locale")
DOMAIN = "smsops"

_CODE_THEN_DIGIT = re.compile(r"^(-?[A-Z]{3})(\d)")

_language: contextvars.ContextVar[str | None] = contextvars.ContextVar("smsops_language", default=None)
_fallback: Callable[[], str | None] | None = None


class _Current:
    """The current language: this context's, else the fallback's (a fragment rerun runs in a
    fresh thread, without the context the app's script run set), else the deployment's
    (``SMSOPS_LANGUAGE``), else Russian."""

    def get(self) -> str:
        code = _language.get()
        if code is None and _fallback is not None:
            try:
                code = _fallback()
            except Exception:  # outside an app run: no session to ask
                code = None
        return code if code in LANGUAGES else choose(None)  # the deployment's, else Russian

    def set(self, code: str) -> contextvars.Token[str | None]:
        return _language.set(code)

    def reset(self, token: contextvars.Token[str | None]) -> None:
        _language.reset(token)


_current = _Current()


def fall_back_on(resolver: Callable[[], str | None]) -> None:
    """Where to find the language when this context has none (the app passes a reader of the
    person's session, so a fragment rerun speaks the person's language)."""
    global _fallback
    _fallback = resolver


def choose(browser: str | None = None, *, person: str | None = None, deployment: str | None = None) -> str:
    """The language to show: the ``person``'s choice, else the ``deployment``'s
    (``$SMSOPS_LANGUAGE`` when not given), else the ``browser``'s locale (``ru-RU``, ``en_GB``…)
    when we speak it, else Russian."""
    if deployment is None:
        deployment = os.environ.get("SMSOPS_LANGUAGE")
    for wanted in (person, deployment, browser):
        code = (wanted or "").strip().replace("_", "-").split("-")[0].lower()
        if code in LANGUAGES:
            return code
    return LANGUAGES[0]


def use(code: str) -> None:
    """Speak ``code`` for the rest of this context (a Streamlit script run)."""
    _current.set(code if code in LANGUAGES else LANGUAGES[0])


def clear() -> None:
    """Forget this context's language: the deployment's (or the fallback's) applies again."""
    _language.set(None)


@contextmanager
def language(code: str) -> Iterator[None]:
    """Speak ``code`` inside the block (tests, exports)."""
    token = _current.set(code if code in LANGUAGES else LANGUAGES[0])
    try:
        yield
    finally:
        _current.reset(token)


def current() -> str:
    return _current.get()


@functools.cache
def _catalogue(code: str) -> dict[str | tuple[str, int], str]:
    """msgid (or (msgid, plural form)) → translation, read with Babel from the domain's .po file
    and its parts (``smsops-<part>.po`` beside it: one page's strings each, so that pages can be
    translated side by side; the first translation of a msgid wins)."""
    from babel.messages.pofile import read_po

    folder = LOCALE_DIR / code / "LC_MESSAGES"
    table: dict[str | tuple[str, int], str] = {}
    for path in [folder / f"{DOMAIN}.po", *sorted(folder.glob(f"{DOMAIN}-*.po"))]:
        if path.exists():
            with path.open("rb") as fh:
                _read_into(table, read_po(fh, locale=code))
    return table


def _read_into(table: dict[str | tuple[str, int], str], catalog: Any) -> None:
    for message in catalog:
        if not message.id or message.fuzzy:
            continue
        if isinstance(message.id, tuple):
            for form, text in enumerate(message.string or ()):
                if text:
                    table.setdefault((message.id[0], form), text)
        elif message.string:
            table.setdefault(message.id, message.string)


@functools.cache
def _plural_rule(code: str) -> Any:
    from babel import Locale

    return Locale.parse(code).plural_form


_PLURAL_INDEX = {"ru": {"one": 0, "few": 1, "many": 2, "other": 2}, "en": {"one": 0, "other": 1}}


def _(text: str) -> str:
    """``text`` in the current language (itself when there is no translation)."""
    code = _current.get()
    if code == "en":
        return text
    return _catalogue(code).get(text, text)  # type: ignore[return-value]


def N_(text: str) -> str:
    """Mark ``text`` for the catalogue without translating it now: for labels kept in module-level
    tables (a reason code → its text), translated with :func:`_` where they are shown."""
    return text


def label(table: dict[str, str], code: str | None) -> str:
    """A code's label from a table of :func:`N_`-marked texts, in the current language; the code
    itself (never ``None``) when the table does not know it."""
    if code is None:
        return MISSING
    text = table.get(code)
    return _(text) if text is not None else code


def ngettext(singular: str, plural: str, n: int) -> str:
    """The form of a counted phrase for ``n`` (Russian has three: 1 сообщение, 2 сообщения,
    5 сообщений). Format the count in afterwards: ``ngettext("{n} message", "{n} messages", n)``."""
    code = _current.get()
    category = _plural_rule(code)(abs(n))
    if code == "en":
        return singular if category == "one" else plural
    form = _PLURAL_INDEX.get(code, {}).get(category, 0)
    found = _catalogue(code).get((singular, form))
    return found or (singular if category == "one" else plural)  # type: ignore[return-value]


def _missing(value: object) -> bool:
    """None, NaN, NaT or pandas' NA."""
    import pandas as pd

    return value is None or (pd.api.types.is_scalar(value) and bool(pd.isna(value)))


def number(value: float | int | None, digits: int | None = None) -> str:
    """``1 234`` / ``1,234``; ``digits`` fixes the decimals."""
    if _missing(value):
        return MISSING
    if digits is None:
        return babel_numbers.format_decimal(value, locale=_current.get()).replace("\xa0", " ")
    pattern = "#,##0" + ("." + "0" * digits if digits else "")
    return babel_numbers.format_decimal(value, format=pattern, locale=_current.get()).replace("\xa0", " ")


def money(value: float | int | None, currency: str = "RUB", digits: int = 2) -> str:
    """``1 234,50 ₽`` / ``RUB 1,234.50``: the locale's pattern and sign, ``digits`` decimals."""
    if _missing(value):
        return MISSING
    from babel import Locale

    code = _current.get()
    pattern = Locale.parse(code).currency_formats["standard"].pattern
    if digits != 2:
        pattern = pattern.replace("0.00", "0" + ("." + "0" * digits if digits else ""))
    text = babel_numbers.format_currency(value, currency, format=pattern, locale=code, currency_digits=False)
    return _CODE_THEN_DIGIT.sub(r"\1 \2", text.replace("\xa0", " "))  # "RUB 1,234.50", not "RUB1,234.50"


def percent(value: float | None, digits: int = 1) -> str:
    """A share (0.125) as ``12,5 %`` / ``12.5%`` (the locale's own pattern)."""
    if _missing(value):
        return MISSING
    from babel import Locale

    code = _current.get()
    pattern = Locale.parse(code).percent_formats[None].pattern
    if digits:
        pattern = pattern.replace("#0", "#0." + "0" * digits, 1)
    return babel_numbers.format_percent(value, format=pattern, locale=code).replace("\xa0", " ")


def date(value: _date | datetime | str | None, form: str = "medium") -> str:
    if _missing(value) or value == "":
        return MISSING
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return babel_dates.format_date(value, format=form, locale=_current.get())


def datetime_(value: datetime | str | None, form: str = "short", tz: str | None = None) -> str:
    """A moment in ``tz`` (the team's zone when given; naive values are UTC)."""
    if _missing(value) or value == "":
        return MISSING
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:
        from datetime import UTC

        value = value.replace(tzinfo=UTC)
    return babel_dates.format_datetime(value, format=form, tzinfo=tz, locale=_current.get())
