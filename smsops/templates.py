"""Message personalisation: compile a template once, render it for each contact.

Templates use Jinja syntax in a sandbox: ``{{ first_name | default("клиент") }}``,
``{{ bonus | plural("бонус", "бонуса", "бонусов") }}``, ``{{ total | money }}``,
``{{ due | date("long") }}``, ``{{ link("https://shop.example.ru/sale") }}``.

What a marketer expects, rather than what Jinja does by default:

- a missing field or ``None`` renders as "" and never raises; ``default`` (and its alias
  ``d``) replaces a missing field, ``None`` and blank text alike, not only a missing field;
- control characters other than ``\\n`` are removed from every substituted value;
- ``link(url)`` renders a placeholder exactly as long as the tracked short link that later
  replaces it, so length and segment counts are already final; each distinct address has a
  placeholder of its own (``…/xxxxxxxx``, ``…/xxxxxxx1``, …) so that :mod:`smsops.links` can
  tell them apart when it swaps in each recipient's tokens;
- reaching into Python internals (``''.__class__``, ``.mro()`` …) raises
  :class:`TemplateSecurityError`: at compile time when the template spells it out, at render
  time when a value leads there.

A template made only of text, fields (plain, or through this module's filters with literal
arguments) and links with a literal address is rendered by a generated Python function
(``Template.fast``), some twenty times quicker than Jinja; any other template (``{% if %}``,
loops, arithmetic, Jinja's own filters …) is rendered by Jinja, with the same output.
"""

from __future__ import annotations

import re
import statistics
import threading
import time
import types
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from functools import update_wrapper
from typing import Any

import jinja2
from jinja2 import meta, nodes, pass_environment, pass_eval_context
from jinja2.runtime import ChainableUndefined, LoopContext, Undefined
from jinja2.sandbox import (
    ImmutableSandboxedEnvironment,
    SandboxedEscapeFormatter,
    SandboxedFormatter,
    SecurityError,
)
from jinja2.utils import Namespace
from jinja2.visitor import NodeTransformer
from markupsafe import Markup

from smsops import config
from smsops.encoding import analyze
from smsops.i18n import N_, _

__all__ = [
    "MAX_ITEMS",
    "MAX_LOOP_STEPS",
    "MAX_OUTPUT_CHARS",
    "MAX_RENDER_SECONDS",
    "MAX_SOURCE_CHARS",
    "LengthProfile",
    "LinkSettingsError",
    "Template",
    "TemplateError",
    "TemplateInputError",
    "TemplateLimitError",
    "TemplateRenderError",
    "TemplateSecurityError",
    "TemplateSyntaxError",
    "TemplateTooLongError",
    "compile",
    "length_profile",
    "render_many",
]

MAX_SOURCE_CHARS = 10_000
"""Longest template accepted: far beyond any SMS (a 10-part UCS-2 message is 670 characters)."""

DEFAULT_LINK_BASE = "https://s.example/"
MAX_LINKS = 36
"""Distinct ``link()`` addresses one template may use (each needs a placeholder of its own)."""
LINK_MARKS = "x123456789abcdefghijklmnopqrstuvwxyz"
"""The last character of each distinct link's placeholder, in order of first use."""
NBSP = "\u00a0"


# ---------------------------------------------------------------------------------------
# Errors


class TemplateError(Exception):
    """Base class for errors raised by :mod:`smsops.templates`."""

    def localized(self) -> str:
        """The message in the current language (where it has a translation)."""
        return str(self)


class TemplateInputError(TemplateError, TypeError):
    """A template source, field list or contact of the wrong type."""


class TemplateTooLongError(TemplateError, ValueError):
    """A template source longer than :data:`MAX_SOURCE_CHARS`."""


class LinkSettingsError(TemplateError, ValueError):
    """A link base that is not an https:// address ending in /."""


class TemplateSyntaxError(TemplateError, ValueError):
    """A template that does not parse, or calls a filter or ``link`` wrongly."""

    def __init__(self, message: str, *, line: int, column: int, snippet: str) -> None:
        super().__init__(message)
        self.line = line
        self.column = column
        self.snippet = snippet


class TemplateSecurityError(TemplateError):
    """A template that reaches for Python internals the sandbox does not allow."""


class TemplateRenderError(TemplateError, ValueError):
    """A template that failed for one contact, e.g. comparing a text field with a number."""


class TemplateLimitError(TemplateError, ValueError):
    """A template that went past a bound of one render (DESIGN.md invariant 11): its time, its
    length, its loops, the size of a value or number it builds, its nesting; or that ran out of
    memory. :attr:`limit` says which ("time", "length", "loops", "size", "number", "nesting",
    "memory"); the message names it and what to change."""

    def __init__(self, message: str, /, *, limit: str, **values: Any) -> None:
        super().__init__(message.format(**values) if values else message)
        self.limit = limit
        self.template = message
        self.values = values

    def localized(self) -> str:
        return _(self.template).format(**self.values) if self.values else _(self.template)


# ---------------------------------------------------------------------------------------
# Values

# C0 controls except \n, DEL and C1 controls: invisible, and some would force UCS-2.
_CONTROLS = dict.fromkeys([*range(0x00, 0x0A), *range(0x0B, 0x20), *range(0x7F, 0xA0)])


class _Missing(ChainableUndefined):
    """A missing field: renders as "", and arithmetic, calls and comparisons on it never raise."""

    __slots__ = ()

    def _self(self, *args: Any, **kwargs: Any) -> _Missing:
        return self

    def _false(self, other: Any) -> bool:
        return False

    def _not_a_number(self) -> Any:
        raise TypeError(f"{self._undefined_name or 'a missing field'} has no value")

    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = _self
    __truediv__ = __rtruediv__ = __floordiv__ = __rfloordiv__ = __mod__ = __rmod__ = _self
    __pow__ = __rpow__ = __pos__ = __neg__ = __call__ = _self
    __lt__ = __le__ = __gt__ = __ge__ = _false
    __int__ = __float__ = __complex__ = _not_a_number


def _text(value: Any) -> str:
    """``value`` as it is substituted: "" for None or missing, control characters removed."""
    if value.__class__ is not str:
        if value is None or isinstance(value, Undefined):
            return ""
        value = str(value)
    return value if value.isprintable() else value.translate(_CONTROLS)


def _blank(value: Any) -> bool:
    """Whether ``value`` counts as not given: missing, None, or text with nothing visible."""
    if value is None or isinstance(value, Undefined):
        return True
    return isinstance(value, str) and not _text(value).strip()


def _field(value: Any, default: str) -> str:
    """A field with a default, as substituted (``default`` already passed through ``_text``)."""
    return default if _blank(value) else _text(value)


def _number(value: Any) -> Decimal | None:
    """``value`` as a finite Decimal, or None when it is not a number ("1 234,5" is one)."""
    if value is None or isinstance(value, bool | Undefined):
        return None
    try:
        if isinstance(value, float):
            number = Decimal(repr(value))
        elif isinstance(value, int | Decimal):
            number = Decimal(value)
        else:
            raw = str(value).strip()
            for space in (" ", NBSP, "\u202f", "_"):
                raw = raw.replace(space, "")
            number = Decimal(raw.replace(",", "."))
    except (InvalidOperation, ValueError, TypeError):
        return None
    return number if number.is_finite() else None


# ---------------------------------------------------------------------------------------
# Filters and globals


def _default(value: Any, default_value: Any = "", boolean: bool = False) -> Any:
    """Jinja's ``default``, except that None and blank text count as missing too."""
    if _blank(value) or (boolean and not value):
        return default_value
    return value


def _money(value: Any, currency: str = "RUB", decimals: int = 2) -> str:
    """``1234.5`` → "1 234,50 ₽" (no-break spaces); other currencies → "1,234.50 USD"."""
    if not isinstance(decimals, int) or isinstance(decimals, bool) or not 0 <= decimals <= 4:
        raise ValueError(f"money(decimals={decimals!r}): give a whole number from 0 to 4")
    if not isinstance(currency, str) or not currency.strip():
        raise ValueError(f"money(currency={currency!r}): give a currency code such as 'RUB' or 'USD'")
    amount = _number(value)
    if amount is None:
        return ""
    try:
        amount = amount.quantize(Decimal(1).scaleb(-decimals), rounding=ROUND_HALF_UP)
    except InvalidOperation:  # more digits than a Decimal holds: not a real price
        return ""
    if not amount:
        amount = abs(amount)  # no "-0,00"
    if currency.strip().upper() in {"RUB", "RUR", "₽"}:
        digits = f"{abs(amount):,.{decimals}f}".replace(",", NBSP).replace(".", ",")
        return f"{'-' if amount < 0 else ''}{digits}{NBSP}₽"
    return f"{amount:,.{decimals}f} {currency.strip()}"


_MONTHS = (
    "января", "февраля", "марта", "апреля", "мая", "июня",
    "июля", "августа", "сентября", "октября", "ноября", "декабря",
)  # fmt: skip
_DATE_STYLES = ("short", "long", "numeric")


def _as_date(value: Any) -> date | None:
    try:
        if isinstance(value, datetime):
            return value.date()
        if isinstance(value, date):
            return value
        if isinstance(value, str):
            raw = value.strip()
            if re.fullmatch(r"\d{1,2}\.\d{1,2}\.\d{4}", raw):
                return datetime.strptime(raw, "%d.%m.%Y").date()
            try:
                return date.fromisoformat(raw)
            except ValueError:
                return datetime.fromisoformat(raw).date()
    except (ValueError, TypeError, OverflowError):
        pass
    return None


def _date(value: Any, style: str = "short") -> str:
    """``"2025-03-08"`` → "8 марта"; ``"long"`` → "8 марта 2025"; ``"numeric"`` → "08.03.2025".

    Takes a date, a datetime, or ISO (or DD.MM.YYYY) text; anything else renders as "".
    """
    if style not in _DATE_STYLES:
        raise ValueError(f"date({style!r}): the style is one of {', '.join(map(repr, _DATE_STYLES))}")
    day = _as_date(value)
    if day is None:
        return ""
    if style == "numeric":
        return f"{day.day:02d}.{day.month:02d}.{day.year}"
    month = _MONTHS[day.month - 1]
    return f"{day.day} {month} {day.year}" if style == "long" else f"{day.day} {month}"


def _plural_form(number: Decimal, one: str, few: str, many: str) -> str:
    if number != number.to_integral_value():
        return few  # "1,5 бонуса"
    n = abs(int(number))
    if n % 10 == 1 and n % 100 != 11:
        return one
    if 2 <= n % 10 <= 4 and not 12 <= n % 100 <= 14:
        return few
    return many


def _plural(value: Any, *forms: str, number: bool = True) -> str:
    """``5 | plural("бонус", "бонуса", "бонусов")`` → "5 бонусов"; ``number=False`` → "бонусов"."""
    if len(forms) != 3 or not all(isinstance(form, str) for form in forms):
        raise ValueError(
            f"plural{forms!r}: give three forms, for 1, 2 and 5, as in plural('бонус', 'бонуса', 'бонусов')"
        )
    amount = _number(value)
    if amount is None:
        return ""
    form = _plural_form(amount, *forms)
    if not number:
        return form
    if amount == amount.to_integral_value():
        shown = str(int(amount))
    else:
        shown = format(amount.normalize(), "f").replace(".", ",")
    return f"{shown} {form}"


def _first_word(value: Any) -> str:
    """The first word: "Анна Мария" → "Анна"; "" for nothing."""
    words = _text(value).split()
    return words[0] if words else ""


def _capitalize(value: Any) -> str:
    """The first letter in upper case, the rest kept ("мАРИЯ-Луиза" → "МАРИЯ-Луиза"; unlike Jinja's)."""
    text = _text(value)
    return text[:1].upper() + text[1:]


_FILTERS: dict[str, Callable[..., Any]] = {
    "default": _default,
    "d": _default,
    "money": _money,
    "date": _date,
    "plural": _plural,
    "first_word": _first_word,
    "capitalize": _capitalize,
}
# A value each filter accepts, to check literal arguments at compile time.
_FILTER_SAMPLES: dict[str, Any] = {"money": 1, "date": date(2025, 1, 1), "plural": 1}
_DEFAULT_FILTERS = frozenset({"default", "d"})
_MEMO_SIZE = 4_096  # filtered values remembered per field of a fast template


# ---------------------------------------------------------------------------------------
# Bounds of one render (DESIGN.md invariant 11): a template a person wrote runs within limits of
# time, length, loops and value sizes, whatever it or a contact holds. The fast path needs none of
# this (text and fields only); the Jinja path pays for it only in loops, calls, ``~``, ``+``, ``*``,
# ``%``, ``**`` and the few filters that can make text longer than their input.

MAX_OUTPUT_CHARS = 4_590
"""Longest message a template may render: three times what 10 GSM-7 parts hold (10 × 153)."""
MAX_LOOP_STEPS = 10_000
"""Loop iterations and calls one render may make, all loops together."""
MAX_RENDER_SECONDS = 0.25
"""Time one render may take, counted from its first loop iteration or call."""
MAX_ITEMS = 10_000
"""Items a list, tuple, dict or namespace built by a template may hold, nested ones counted."""
MAX_INT_BITS = 4_096
"""Largest whole number a template may compute (about 1,233 digits)."""


class _Budget:
    """What one render has used so far; created at its first loop iteration or call."""

    __slots__ = ("chars", "deadline", "steps")

    def __init__(self) -> None:
        self.steps = 0
        self.chars = 0
        self.deadline = time.perf_counter() + MAX_RENDER_SECONDS

    def step(self) -> None:
        self.steps += 1
        if self.steps > MAX_LOOP_STEPS:
            raise TemplateLimitError(
                N_("the template loops or calls more than {steps:,} times for one message: loop over less"),
                limit="loops",
                steps=MAX_LOOP_STEPS,
            )
        if not self.steps & 15 and time.perf_counter() > self.deadline:
            raise TemplateLimitError(
                N_("the template took longer than {seconds:g} s to render one message: simplify its loops"),
                limit="time",
                seconds=MAX_RENDER_SECONDS,
            )

    def emit(self, chars: int) -> None:
        self.chars += chars
        if self.chars > MAX_OUTPUT_CHARS:
            raise _too_long()


class _State(threading.local):
    budget: _Budget | None = None


_state = _State()


def _budget() -> _Budget:
    budget = _state.budget
    if budget is None:
        budget = _state.budget = _Budget()
    return budget


def _too_long() -> TemplateLimitError:
    return TemplateLimitError(
        N_("the message would be longer than {chars:,} characters ({parts} SMS parts): shorten the"
           " template or what its loops repeat"),
        limit="length",
        chars=MAX_OUTPUT_CHARS,
        parts=MAX_OUTPUT_CHARS // 153,
    )  # fmt: skip


def _too_wide(width: int) -> TemplateLimitError:
    return TemplateLimitError(
        N_("the template pads, repeats or formats text to {width:,} characters: keep it under {chars:,}"),
        limit="length",
        width=width,
        chars=MAX_OUTPUT_CHARS,
    )


def _limit_from(exc: BaseException) -> TemplateLimitError:
    """RecursionError, MemoryError or OverflowError as the template error that names it."""
    if isinstance(exc, RecursionError):
        return TemplateLimitError(
            N_("the template nests too deeply (RecursionError): use fewer nested brackets, blocks or"
               " macro calls"),
            limit="nesting",
        )  # fmt: skip
    if isinstance(exc, MemoryError):
        return TemplateLimitError(
            N_("the template ran out of memory (MemoryError): make what it builds smaller"), limit="memory"
        )
    return TemplateLimitError(
        N_("a number in the template is too large ({error}: {detail})"),
        limit="number",
        error=type(exc).__name__,
        detail=str(exc),
    )


def _items(value: Any) -> int:
    """Items in ``value`` and in everything it holds (a value held twice counts twice); stops
    counting past :data:`MAX_ITEMS`, so it is cheap whatever ``value`` is."""
    count = 0
    stack = [value]
    while stack and count <= MAX_ITEMS:
        item = stack.pop()
        cls = item.__class__
        if cls is list or cls is tuple or cls is set or cls is frozenset:
            count += len(item)
            stack.extend(item)
        elif cls is dict:
            count += len(item)
            stack.extend(item.values())
        elif cls is _Namespace:
            held = object.__getattribute__(item, "_held")
            count += len(held)
            stack.extend(held.values())
    return count


def _checked(value: Any) -> Any:
    """``value`` when it is within the bounds on what a template builds, else the error."""
    cls = value.__class__
    if cls is str or cls is Markup:
        if len(value) > MAX_OUTPUT_CHARS:
            raise _too_wide(len(value))
    elif cls is int:
        if value.bit_length() > MAX_INT_BITS:
            raise _too_big()
    elif cls in _CONTAINERS and _items(value) > MAX_ITEMS:
        raise _too_many()
    return value


def _too_many() -> TemplateLimitError:
    return TemplateLimitError(
        N_("the template builds a list of more than {items:,} items: keep it smaller"),
        limit="size",
        items=MAX_ITEMS,
    )


def _too_big() -> TemplateLimitError:
    return TemplateLimitError(
        N_("the template computes a number of more than {bits:,} bits"), limit="number", bits=MAX_INT_BITS
    )


# Called from the code Jinja generates (see _bound_tree): loops, output inside loops, ``~``,
# and list, tuple and dict literals.


def _loop_items(iterable: Any) -> Iterator[Any]:
    budget = _budget()
    for item in iterable:
        budget.step()
        yield item


def _emitted(value: Any) -> str:
    text = _jinja_text(value)
    _budget().emit(len(text))
    return text


def _joined(*parts: Any) -> str:
    return _checked("".join([part if part.__class__ is str else str(part) for part in parts]))


_built = _checked


def _jinja_text(value: Any) -> str:
    """:func:`_text` for the Jinja path, where a value may be one a template built."""
    if value.__class__ is str:
        if len(value) > MAX_OUTPUT_CHARS:
            raise _too_long()
        return value if value.isprintable() else value.translate(_CONTROLS)
    return _text(_checked(value))


class _Namespace(Namespace):
    """Jinja's ``namespace()``, whose attributes are bounded like any value a template builds."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self = args[0]
        held = {name: _checked(value) for name, value in dict(*args[1:], **kwargs).items()}
        Namespace.__init__(self, held)
        object.__setattr__(self, "_held", held)
        _checked(self)

    def __setitem__(self, name: str, value: Any) -> None:
        object.__getattribute__(self, "_held")[name] = value
        try:
            _checked(self)
        except TemplateLimitError:
            del object.__getattribute__(self, "_held")[name]
            raise
        super().__setitem__(name, value)


_CONTAINERS = frozenset({list, tuple, dict, set, frozenset, _Namespace})


def _range(*args: Any) -> range:
    """``range()`` for templates: no longer than a render may loop."""
    numbers = range(*args)
    if len(numbers) > MAX_LOOP_STEPS:
        raise TemplateLimitError(
            N_("range() of {count:,} numbers is longer than a template may loop ({steps:,})"),
            limit="loops",
            count=len(numbers),
            steps=MAX_LOOP_STEPS,
        )
    return numbers


_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")


def _check_percent(text: str) -> None:
    """Refuse a ``%`` format whose width or precision is past the bound, or taken from an argument."""
    for width, precision in _PERCENT_SPEC.findall(text):
        for number in (width, precision):
            if number == "*":
                raise TemplateLimitError(
                    N_("the template takes a width from an argument (%*): write the width out"),
                    limit="length",
                )
            if number and (len(number) > 12 or int(number) > MAX_OUTPUT_CHARS):
                raise _too_wide(int(number) if len(number) <= 18 else 10**18)


def _check_spec(spec: str) -> None:
    """Refuse a ``str.format`` spec (``>900``, ``.500f`` …) whose width or precision is past the bound."""
    for number in re.findall(r"\d+", spec):
        if len(number) > 12 or int(number) > MAX_OUTPUT_CHARS:
            raise _too_wide(int(number) if len(number) <= 18 else 10**18)


class _BoundedFormatter(SandboxedFormatter):
    def format_field(self, value: Any, format_spec: str) -> Any:
        _check_spec(format_spec)
        return _checked(super().format_field(value, format_spec))


class _BoundedEscapeFormatter(SandboxedEscapeFormatter):
    def format_field(self, value: Any, format_spec: str) -> Any:
        _check_spec(format_spec)
        return _checked(super().format_field(value, format_spec))


def _check_text_call(method: Any, text: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Before a str method runs: no width past the bound (``ljust``, ``center``, ``zfill`` …), no
    ``replace`` that would make text past it."""
    for arg in (*args, *kwargs.values()):
        if arg.__class__ is int and arg > MAX_OUTPUT_CHARS:
            raise _too_wide(arg)
    if (
        method.__name__ == "replace"
        and len(args) >= 2
        and isinstance(args[0], str)
        and isinstance(args[1], str)
    ):
        grows = len(args[1]) - len(args[0])
        if grows > 0 and len(text) + (text.count(args[0]) * grows) > MAX_OUTPUT_CHARS:
            raise _too_long()


# Jinja's filters that can make text longer than their input, bounded first.


def _bounded_filters(filters: Mapping[str, Callable[..., Any]]) -> dict[str, Callable[..., Any]]:
    center, indent, fmt, replace = filters["center"], filters["indent"], filters["format"], filters["replace"]
    join, wordwrap, tojson = filters["join"], filters["wordwrap"], filters["tojson"]
    batch, slice_ = filters["batch"], filters["slice"]

    def do_center(value: Any, width: int = 80) -> str:
        if isinstance(width, int) and width > MAX_OUTPUT_CHARS:
            raise _too_wide(width)
        return center(value, width)

    def do_indent(s: Any, width: int | str = 4, first: bool = False, blank: bool = False) -> str:
        if isinstance(width, int) and width > MAX_OUTPUT_CHARS:
            raise _too_wide(width)
        return _checked(indent(s, _checked(width), first, blank))

    def do_format(value: Any, *args: Any, **kwargs: Any) -> str:
        _check_percent(str(value))
        return _checked(fmt(value, *args, **kwargs))

    @pass_eval_context
    def do_replace(eval_ctx: Any, s: Any, old: Any, new: Any, count: int | None = None) -> str:
        if isinstance(s, str) and isinstance(old, str) and isinstance(new, str):
            _check_text_call(str.replace, s, (old, new), {})
        return _checked(replace(eval_ctx, s, old, new, count))

    @pass_eval_context
    def do_join(eval_ctx: Any, value: Any, d: str = "", attribute: Any = None) -> str:
        return _checked(join(eval_ctx, value, d, attribute))

    @pass_environment
    def do_wordwrap(environment: Any, s: Any, width: int = 79, *args: Any, **kwargs: Any) -> str:
        return _checked(wordwrap(environment, s, width, *args, **kwargs))

    @pass_eval_context
    def do_tojson(eval_ctx: Any, value: Any, indent: int | None = None) -> Any:
        if isinstance(indent, int) and indent > 100:
            raise _too_wide(indent)
        return _checked(tojson(eval_ctx, _checked(value), indent))

    def do_batch(value: Any, linecount: int, fill_with: Any = None) -> Any:
        if isinstance(linecount, int) and linecount > MAX_ITEMS:
            raise _too_many()
        return batch(
            value, linecount, _checked(fill_with) if fill_with.__class__ in _CONTAINERS else fill_with
        )

    @pass_eval_context
    def do_slice(eval_ctx: Any, value: Any, slices: int, fill_with: Any = None) -> Any:
        if isinstance(slices, int) and slices > MAX_ITEMS:
            raise _too_many()
        return slice_(eval_ctx, value, slices, fill_with)

    return {
        "center": do_center, "indent": do_indent, "format": do_format, "replace": do_replace,
        "join": do_join, "wordwrap": do_wordwrap, "tojson": do_tojson, "batch": do_batch, "slice": do_slice,
    }  # fmt: skip


class _Bounds(NodeTransformer):
    """Rewrites a parsed template so that the code Jinja generates counts loop iterations and the
    output inside loops, and checks what ``~`` and list, tuple and dict literals build."""

    def __init__(self) -> None:
        self.loops = 0

    def visit_For(self, node: nodes.For) -> nodes.For:
        node.iter = _call("_loop_items", self.visit(node.iter), lineno=node.lineno)
        if node.test is not None:
            node.test = self.visit(node.test)
        self.loops += 1
        node.body = [self.visit(child) for child in node.body]
        self.loops -= 1
        node.else_ = [self.visit(child) for child in node.else_]
        return node

    def visit_Output(self, node: nodes.Output) -> nodes.Output:
        if not self.loops:
            return self.generic_visit(node)
        node.nodes = [
            _call(
                "_emitted",
                nodes.Const(child.data) if isinstance(child, nodes.TemplateData) else self.visit(child),
                lineno=child.lineno,
            )
            for child in node.nodes
        ]
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Expr:
        return _call("_joined", *[self.visit(child) for child in node.nodes], lineno=node.lineno)

    def _literal(self, node: nodes.Expr) -> nodes.Expr:
        node = self.generic_visit(node)
        if getattr(node, "ctx", "load") != "load":
            return node
        try:
            node.as_const()
        except nodes.Impossible:
            return _call("_built", node, lineno=node.lineno)
        return node

    visit_List = visit_Tuple = visit_Dict = _literal


def _call(name: str, *args: nodes.Expr, lineno: int | None = None) -> nodes.Call:
    call = nodes.Call(nodes.ImportedName(f"{__name__}.{name}"), list(args), [], None, None)
    call.set_environment(_ENV)
    return call.set_lineno(lineno or 1)


class _Links:
    """``link()`` in a compiled template: the placeholder of each literal address."""

    __slots__ = ("placeholders",)

    def __init__(self, placeholders: Mapping[str, str]) -> None:
        self.placeholders = placeholders

    def __call__(self, url: Any = None) -> str | None:
        return self.placeholders.get(url)


class _Sandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox that raises our errors on unsafe access and keeps what a template
    computes within the bounds above: calls count against the render's budget, and ``*``, ``**``,
    ``+``, ``%`` and ``str.format`` are checked before they run."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def unsafe_undefined(self, obj: Any, attribute: str) -> Undefined:
        raise TemplateSecurityError(
            f"the template reads {attribute!r} of a {type(obj).__name__} value, which is not allowed:"
            " use contact fields, filters and link() only"
        )

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if isinstance(seq, str | list | tuple) and isinstance(times, int):
                    bound = MAX_OUTPUT_CHARS if isinstance(seq, str) else MAX_ITEMS
                    if len(seq) * times > bound:
                        raise TemplateLimitError(
                            N_(
                                "the template repeats a value {times:,} times: keep the result under {bound:,}"
                            ),
                            limit="length" if isinstance(seq, str) else "size",
                            times=times,
                            bound=bound,
                        )
            ints = isinstance(left, int) and isinstance(right, int)
            if ints and left.bit_length() + right.bit_length() > MAX_INT_BITS:
                raise _too_big()
        elif operator == "**":
            if isinstance(left, int | float) and isinstance(right, int | float):
                if abs(right) > 100:
                    raise TemplateLimitError(
                        N_("the template raises a number to the power {power}: keep it ≤ 100"),
                        limit="number",
                        power=right,
                    )
                if (
                    isinstance(left, int)
                    and isinstance(right, int)
                    and left.bit_length() * right > MAX_INT_BITS
                ):
                    raise _too_big()
        elif operator == "%" and isinstance(left, str):
            _check_percent(left)
        return _checked(super().call_binop(context, operator, left, right))

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        if __obj.__class__ is _Links:  # ours, and as cheap as a dict lookup: not counted
            return __obj(*args, **kwargs)
        budget = _state.budget
        if budget is None:
            budget = _state.budget = _Budget()
        budget.step()
        if __obj.__class__ is LoopContext:  # loop(children) in a recursive loop
            if args:
                args = (_loop_items(args[0]), *args[1:])
        else:
            owner = getattr(__obj, "__self__", None)
            if owner.__class__ is str or owner.__class__ is Markup:
                _check_text_call(__obj, owner, args, kwargs)
        return _checked(super().call(__context, __obj, *args, **kwargs))

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        """``str.format`` and ``format_map`` as Jinja's sandbox runs them, with widths bounded."""
        if not isinstance(value, types.MethodType | types.BuiltinMethodType) or value.__name__ not in (
            "format",
            "format_map",
        ):
            return None
        owner = value.__self__
        if not isinstance(owner, str):
            return None
        formatter: SandboxedFormatter
        if isinstance(owner, Markup):
            formatter = _BoundedEscapeFormatter(self, escape=owner.escape)
        else:
            formatter = _BoundedFormatter(self)
        is_map = value.__name__ == "format_map"

        def wrapper(*args: Any, **kwargs: Any) -> str:
            if is_map:
                if kwargs or len(args) != 1:
                    raise TypeError("format_map() takes exactly one mapping")
                kwargs, args = args[0], ()
            return _checked(type(owner)(formatter.vformat(owner, args, kwargs)))

        return update_wrapper(wrapper, value)


_ENV = _Sandbox(autoescape=False, undefined=_Missing, finalize=_jinja_text)
_ENV.filters.update(_FILTERS)
_ENV.filters.update(_bounded_filters(_ENV.filters))
_ENV.globals.pop("lipsum", None)  # lorem ipsum has no place in an SMS
_ENV.globals["link"] = lambda url=None: ""  # replaced per template, listed here so it is no field
_ENV.globals["range"] = _range
_ENV.globals["namespace"] = _Namespace
_GLOBALS = frozenset(_ENV.globals)


# ---------------------------------------------------------------------------------------
# Templates


@dataclass(frozen=True, slots=True)
class Template:
    """A compiled message template; :meth:`render` personalises it for one contact."""

    source: str
    fields: tuple[str, ...]
    """Contact fields the template uses, in order of first use."""
    unknown_fields: tuple[str, ...]
    """Used fields that are not among the ``fields`` given to :func:`compile`."""
    missing_default: tuple[str, ...]
    """Fields rendered somewhere with neither a ``default`` nor an ``{% if %}`` on them."""
    links: tuple[str, ...]
    """Literal addresses passed to ``link()``, in order, without repeats."""
    link_placeholder: str
    """What the first address renders: as long as the short link that replaces it."""
    link_placeholders: Mapping[str, str]
    """Each address in :attr:`links` and the placeholder it renders (all of the same length)."""
    fast: bool
    """True when rendered by the generated function, False when by Jinja."""
    _render: Callable[[Mapping[str, Any]], str] = field(repr=False, compare=False)

    def render(self, contact: Mapping[str, Any]) -> str:
        """The message for ``contact``; missing fields render as their default or "".

        Raises :class:`TemplateLimitError` when the message would be longer than
        :data:`MAX_OUTPUT_CHARS` or the render goes past another bound."""
        try:
            return self._render(contact)  # both renderers check the length (MAX_OUTPUT_CHARS)
        except AttributeError:
            if not isinstance(contact, Mapping):
                raise TemplateInputError(
                    f"a contact must be a mapping of field names to values, got {type(contact).__name__}"
                ) from None
            raise
        except (RecursionError, MemoryError, OverflowError) as exc:
            raise _limit_from(exc) from None


@dataclass(frozen=True, slots=True)
class LengthProfile:
    """How long a template's messages come out over a list of contacts."""

    count: int
    typical: int
    """Median length in characters."""
    worst: int
    """Longest length in characters."""
    worst_text: str
    segments_typical: int
    segments_worst: int
    segments_total: int
    """Segments over all messages: what the send is billed for."""
    encodings: dict[str, int]
    """Messages per encoding (GSM-7, UCS-2)."""
    empty_fields: dict[str, int]
    """Per used field, the contacts that had no value and so got the default or ""."""


def compile(  # shadows the builtin on purpose: callers write templates.compile(...)
    source: str,
    fields: Iterable[str] | Mapping[str, str] | None = None,
    *,
    link_base: str | None = None,
    fast: bool = True,
) -> Template:
    """Compile ``source``, checking it against the known ``fields`` (None: don't check).

    ``link()`` renders ``link_base`` (by default the configured one, :func:`smsops.config.link_base`)
    followed by a token's length of "x": the length of the short link that replaces it.
    ``fast=False`` forces the Jinja renderer even for a simple template (to compare or measure).
    """
    if not isinstance(source, str):
        raise TemplateInputError(
            f"a template source must be str, got {type(source).__name__}: {source!r:.40}"
            + (" (decode bytes first)" if isinstance(source, bytes | bytearray) else "")
        )
    if len(source) > MAX_SOURCE_CHARS:
        raise TemplateTooLongError(
            f"the template is {len(source):,} characters long; the limit is {MAX_SOURCE_CHARS:,}"
            " (a 10-part message holds at most 1,530): shorten it"
        )
    known = _known_fields(fields)
    if link_base is None:
        link_base = config.link_base()
    placeholder = _placeholder(link_base)

    try:
        return _compile(source, known, placeholder, fast)
    except (RecursionError, MemoryError, OverflowError) as exc:
        raise _limit_from(exc) from None


def _compile(source: str, known: frozenset[str] | None, placeholder: str, fast: bool) -> Template:
    try:
        tree = _ENV.parse(source)
    except jinja2.TemplateSyntaxError as exc:
        raise _syntax_error(exc, source) from None
    _check(tree, source)

    try:
        undeclared = meta.find_undeclared_variables(tree) - _GLOBALS
    except jinja2.TemplateSyntaxError as exc:  # an unknown filter or test
        raise _syntax_error(exc, source) from None
    used = tuple(dict.fromkeys(n.name for n in tree.find_all(nodes.Name) if n.name in undeclared))
    links = tuple(
        dict.fromkeys(
            call.args[0].value
            for call in tree.find_all(nodes.Call)
            if _is_link_call(call) and call.args and isinstance(call.args[0], nodes.Const)
        )
    )
    bare = _bare_fields(tree, set(used))
    if len(links) > MAX_LINKS:
        raise TemplateSyntaxError(
            f"the template links to {len(links)} different addresses; at most {MAX_LINKS} can be tracked"
        )
    placeholders = {url: placeholder[:-1] + LINK_MARKS[i] for i, url in enumerate(links)}

    renderer = _fast_renderer(tree, placeholders) if fast else None
    is_fast = renderer is not None
    if renderer is None:
        _Bounds().visit(tree)
        jinja_template = _ENV.from_string(tree, globals={"link": _Links(placeholders)})
        renderer = _jinja_renderer(jinja_template, used)
    try:  # what goes past a bound with no field at all does for every contact: say so now
        if len(renderer({})) > MAX_OUTPUT_CHARS:
            raise _too_long()
    except TemplateLimitError:
        raise
    except TemplateError:
        pass  # depends on the contact: reported for each one that fails

    return Template(
        source=source,
        fields=used,
        unknown_fields=() if known is None else tuple(name for name in used if name not in known),
        missing_default=tuple(name for name in used if name in bare),
        links=links,
        link_placeholder=placeholder,
        link_placeholders=placeholders,
        fast=is_fast,
        _render=renderer,
    )


def render_many(template: Template, contacts: Iterable[Mapping[str, Any]]) -> list[str]:
    """The message for each of ``contacts``, in order."""
    render = template.render
    return [render(contact) for contact in contacts]


def length_profile(template: Template, contacts: Iterable[Mapping[str, Any]]) -> LengthProfile:
    """Lengths, segments and encodings of ``template`` over ``contacts``, and which fields were empty."""
    render = template.render
    fields = template.fields
    empty = dict.fromkeys(fields, 0)
    seen: dict[str, tuple[int, str]] = {}  # rendered text -> (segments, encoding)
    lengths: list[int] = []
    segments: list[int] = []
    encodings: dict[str, int] = {}
    worst_text = ""
    for contact in contacts:
        text = render(contact)
        for name in fields:
            if _blank(contact.get(name)):
                empty[name] += 1
        cost = seen.get(text)
        if cost is None:
            analysis = analyze(text)
            cost = seen[text] = (analysis.segments, analysis.encoding)
        lengths.append(len(text))
        segments.append(cost[0])
        encodings[cost[1]] = encodings.get(cost[1], 0) + 1
        if len(text) > len(worst_text):
            worst_text = text
    if not lengths:
        return LengthProfile(0, 0, 0, "", 0, 0, 0, {}, empty)
    return LengthProfile(
        count=len(lengths),
        typical=statistics.median_low(lengths),
        worst=len(worst_text),
        worst_text=worst_text,
        segments_typical=statistics.median_low(segments),
        segments_worst=max(segments),
        segments_total=sum(segments),
        encodings=encodings,
        empty_fields=empty,
    )


# ---------------------------------------------------------------------------------------
# Compiling


def _known_fields(fields: Iterable[str] | Mapping[str, str] | None) -> frozenset[str] | None:
    if fields is None:
        return None
    if isinstance(fields, str) or not isinstance(fields, Iterable):
        raise TemplateInputError(
            f"fields must be a list (or mapping) of field names, got {type(fields).__name__}: {fields!r:.40}"
        )
    names = frozenset(fields)
    wrong = [name for name in names if not isinstance(name, str)]
    if wrong:
        raise TemplateInputError(f"field names must be str, got {wrong[0]!r}")
    return names


def _placeholder(base: str) -> str:
    if not isinstance(base, str) or not base.isascii() or not re.fullmatch(r"https?://[^\s/]+/\S*", base):
        raise LinkSettingsError(
            f"link_base must be an ASCII address starting with https:// and ending in /, got {base!r}"
        )
    return base + "x" * config.LINK_TOKEN_LENGTH


def _is_link_call(node: nodes.Call) -> bool:
    return isinstance(node.node, nodes.Name) and node.node.name == "link"


def _check(tree: nodes.Template, source: str) -> None:
    """Reject, with the line, what would fail for every contact: internals, bad links, bad filter arguments."""
    for node in tree.find_all((nodes.Getattr, nodes.Getitem)):
        name = node.attr if isinstance(node, nodes.Getattr) else getattr(node.arg, "value", None)
        if isinstance(name, str) and name.startswith("_"):
            raise TemplateSecurityError(
                f"line {node.lineno}: the template reads {name!r}, a Python internal that templates may"
                " not touch: use contact fields, filters and link() only"
            )
    for call in tree.find_all(nodes.Call):
        if not _is_link_call(call):
            continue
        example = "link('https://shop.example.ru/sale')"
        if len(call.args) != 1 or call.kwargs or call.dyn_args or call.dyn_kwargs:
            raise _error_at(call.lineno, source, f"link() takes one address, as in {example}", "link(")
        url = call.args[0]
        if not isinstance(url, nodes.Const):
            raise _error_at(
                call.lineno, source,
                f"link() needs the address written out, as in {example}: an address taken from a"
                " contact field cannot be tracked", "link(",
            )  # fmt: skip
        if not (isinstance(url.value, str) and re.fullmatch(r"https?://[^\s/]+\S*", url.value)):
            raise _error_at(
                call.lineno, source, f"link({url.value!r}): give the full address, as in {example}", "link("
            )
    for node in tree.find_all(nodes.Filter):
        sample = _FILTER_SAMPLES.get(node.name)
        if sample is None or node.dyn_args or node.dyn_kwargs:
            continue
        args = [*node.args, *(kw.value for kw in node.kwargs)]
        if all(isinstance(arg, nodes.Const) for arg in args):
            try:
                _FILTERS[node.name](
                    sample, *(a.value for a in node.args), **{kw.key: kw.value.value for kw in node.kwargs}
                )
            except ValueError as exc:
                raise _error_at(node.lineno, source, str(exc), node.name) from None
            except TypeError as exc:
                raise _error_at(node.lineno, source, f"{node.name}: {exc}", node.name) from None


def _bare_fields(tree: nodes.Template, used: set[str]) -> set[str]:
    """Fields output somewhere without a ``default`` around them or an ``if`` testing them."""
    bare: set[str] = set()

    def visit(node: nodes.Node, output: bool, guarded: frozenset[str]) -> None:
        if isinstance(node, nodes.Name):
            if output and node.name in used and node.name not in guarded:
                bare.add(node.name)
            return
        if isinstance(node, nodes.Filter) and node.name in _DEFAULT_FILTERS:
            for arg in [*node.args, *(kw.value for kw in node.kwargs)]:
                visit(arg, output, guarded)
            return
        if isinstance(node, nodes.If | nodes.CondExpr) and node.test is not None:
            visit(node.test, False, guarded)
            tested = guarded | {
                name.name
                for name in (node.test, *node.test.find_all(nodes.Name))
                if isinstance(name, nodes.Name)
            }
            for child in node.iter_child_nodes(exclude=("test",)):
                visit(child, output, tested)
            return
        output = output or isinstance(node, nodes.Output)
        for child in node.iter_child_nodes():
            visit(child, output, guarded)

    visit(tree, False, frozenset())
    return bare


def _syntax_error(exc: jinja2.TemplateSyntaxError, source: str) -> TemplateSyntaxError:
    quoted = re.findall(r"'([^']+)'", exc.message or "")
    fix = (
        "Fix the {{ … }} or {% … %} there: a field is written {{ first_name }},"
        " with a fallback {{ first_name | default('клиент') }}."
    )
    if (exc.message or "").startswith("No filter named"):
        ours = ", ".join(name for name in _FILTERS if name != "d")
        fix = f"Use one of {ours}, or a Jinja built-in such as upper, lower, trim, replace."
    return _error_at(exc.lineno or 1, source, exc.message or "invalid syntax", *quoted, fix=fix)


def _error_at(line: int, source: str, problem: str, *hints: str, fix: str = "") -> TemplateSyntaxError:
    """A :class:`TemplateSyntaxError` pointing at the best guess of the column on ``line``."""
    lines = re.split(r"\r\n|\r|\n", source)
    line = min(max(line, 1), len(lines))
    text = lines[line - 1]
    index = _guess_column(text, hints)
    start = max(0, index - 30)
    snippet = text[start : index + 40]
    message = f"line {line}, column {index + 1}: {problem}\n    {snippet}\n    {' ' * (index - start)}^" + (
        f"\n{fix}" if fix else ""
    )
    return TemplateSyntaxError(message, line=line, column=index + 1, snippet=snippet)


def _guess_column(text: str, hints: Iterable[str]) -> int:
    """0-based column of the likely culprit: a {{ }} that fails alone, an unclosed tag, a quoted token."""
    for match in re.finditer(r"\{\{.*?\}\}", text):
        try:
            _ENV.parse(match.group())
        except jinja2.TemplateSyntaxError:
            return match.start()
    for opener, closer in (("{{", "}}"), ("{%", "%}")):
        at = text.rfind(opener)
        if at >= 0 and text.find(closer, at) < 0:
            return at
    for hint in hints:
        at = text.find(hint)
        if at >= 0:
            return at
    at = text.find("{")
    return max(at, 0)


# ---------------------------------------------------------------------------------------
# Rendering


def _jinja_renderer(template: jinja2.Template, used: tuple[str, ...]) -> Callable[[Mapping[str, Any]], str]:
    root, new_context = template.root_render_func, template.new_context

    def render_jinja(contact: Mapping[str, Any]) -> str:
        context = {}
        get = contact.get
        for name in used:  # None is as missing: it becomes the permissive undefined
            value = get(name)
            if value is not None:
                context[name] = value
        _state.budget = None  # a fresh budget, made at the first loop iteration or call
        try:
            # joined at C speed: output inside loops is counted as it is made (_emitted), and the
            # few pieces outside loops are each bounded, so the text is checked once, whole
            text = "".join(root(new_context(context)))
            if len(text) > MAX_OUTPUT_CHARS:
                raise _too_long()
            return text
        except TemplateError:
            raise
        except SecurityError as exc:
            raise TemplateSecurityError(f"{exc}: use contact fields, filters and link() only") from None
        except (RecursionError, MemoryError, OverflowError) as exc:
            raise _limit_from(exc) from None
        except Exception as exc:
            raise TemplateRenderError(
                f"the template failed for this contact ({type(exc).__name__}: {exc});"
                " check the field types, or guard the field with {% if … %} or default(…)"
            ) from exc

    return render_jinja


_Part = str | tuple[str, str | None] | tuple[str, Callable[[Any], str]]
"""Literal text; (field, default text or None); or (field, function of the raw value)."""


def _fast_renderer(
    tree: nodes.Template, placeholders: Mapping[str, str]
) -> Callable[[Mapping[str, Any]], str] | None:
    """A generated function for a template of text, fields, literal links, and fields through this
    module's filters with literal arguments; None for any other template."""
    parts: list[_Part] = []
    for output in tree.body:
        if not isinstance(output, nodes.Output):
            return None
        for node in output.nodes:
            part = _simple_part(node, placeholders)
            if part is None:
                return None
            if isinstance(part, str) and parts and isinstance(parts[-1], str):
                parts[-1] += part
            else:
                parts.append(part)

    constants: dict[str, Any] = {"_text": _text, "_field": _field, "_too_long": _too_long}
    lines = ["def render_fast(contact):", "    get = contact.get"]
    pieces = []
    for i, part in enumerate(parts):
        if isinstance(part, str):
            constants[f"L{i}"] = part
            pieces.append(f"{{L{i}}}")
            continue
        name, how = part
        lines.append(f"    v{i} = get({name!r})")
        if how is None:
            lines += [
                f"    if v{i}.__class__ is not str or not v{i}.isprintable():",
                f"        v{i} = _text(v{i})",
            ]
        elif isinstance(how, str):
            constants[f"D{i}"] = how
            lines += [
                f"    if v{i}.__class__ is not str or not v{i}.isprintable():",
                f"        v{i} = _field(v{i}, D{i})",
                f"    elif not v{i}.strip():",
                f"        v{i} = D{i}",
            ]
        else:
            constants[f"F{i}"] = how
            lines.append(f"    v{i} = F{i}(v{i})")
        pieces.append(f"{{v{i}}}")
    lines += [
        f'    text = f"{"".join(pieces)}"',
        f"    if len(text) > {MAX_OUTPUT_CHARS}:",
        "        raise _too_long()",
        "    return text",
    ]
    namespace = dict(constants)
    exec("\n".join(lines), namespace)  # names and literals enter only as repr() or via the namespace
    return namespace["render_fast"]


def _simple_part(node: nodes.Node, placeholders: Mapping[str, str]) -> _Part | None:
    """One piece of a simple template, or None when the node needs Jinja."""
    if isinstance(node, nodes.TemplateData):
        return node.data
    if isinstance(node, nodes.Const):
        return _text(node.value)
    if isinstance(node, nodes.Call):
        simple_link = _is_link_call(node) and len(node.args) == 1 and isinstance(node.args[0], nodes.Const)
        return placeholders[node.args[0].value] if simple_link else None
    chain: list[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]] = []
    while isinstance(node, nodes.Filter):
        literal = all(isinstance(arg, nodes.Const) for arg in [*node.args, *(kw.value for kw in node.kwargs)])
        if node.name not in _FILTERS or not literal or node.dyn_args or node.dyn_kwargs:
            return None
        kwargs = {kw.key: kw.value.value for kw in node.kwargs}
        chain.append((_FILTERS[node.name], tuple(arg.value for arg in node.args), kwargs))
        node = node.node
    if not isinstance(node, nodes.Name) or node.name in _GLOBALS:
        return None
    if not chain:
        return (node.name, None)
    if len(chain) == 1 and chain[0][0] is _default and len(chain[0][1]) <= 1 and not chain[0][2]:
        return (node.name, _text(chain[0][1][0]) if chain[0][1] else "")
    chain.reverse()
    return (node.name, _filtered(tuple(chain)))


def _filtered(
    chain: tuple[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]], ...],
) -> Callable[[Any], str]:
    """A raw value through ``chain`` as Jinja would take it (None and missing become undefined),
    remembering the texts of the most common values: the filters are pure, and values repeat."""
    missing = _Missing()
    memo: dict[str | int, str] = {}

    def compute(value: Any) -> str:
        if value is None:
            value = missing
        for function, args, kwargs in chain:
            value = function(value, *args, **kwargs)
        return _text(value)

    def apply(value: Any) -> str:
        if value.__class__ is not str and value.__class__ is not int:  # equal values may print apart
            return compute(value)
        text = memo.get(value)
        if text is None:
            text = compute(value)
            if len(memo) < _MEMO_SIZE:
                memo[value] = text
        return text

    return apply
