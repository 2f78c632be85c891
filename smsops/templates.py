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
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any

import jinja2
from jinja2 import meta, nodes
from jinja2.runtime import ChainableUndefined, Undefined
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from smsops import config
from smsops.encoding import analyze

__all__ = [
    "MAX_SOURCE_CHARS",
    "LengthProfile",
    "LinkSettingsError",
    "Template",
    "TemplateError",
    "TemplateInputError",
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
_MAX_REPEAT = 10_000
_MEMO_SIZE = 4_096  # filtered values remembered per field of a fast template


class _Sandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox that raises our error on unsafe access and bounds ``*`` and ``**``."""

    intercepted_binops = frozenset({"*", "**"})

    def unsafe_undefined(self, obj: Any, attribute: str) -> Undefined:
        raise TemplateSecurityError(
            f"the template reads {attribute!r} of a {type(obj).__name__} value, which is not allowed:"
            " use contact fields, filters and link() only"
        )

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                sized = isinstance(seq, str | list | tuple) and isinstance(times, int)
                if sized and len(seq) * times > _MAX_REPEAT:
                    raise TemplateSecurityError(
                        f"the template repeats a value {times} times: keep results under {_MAX_REPEAT} items"
                    )
        elif isinstance(left, int | float) and isinstance(right, int | float) and abs(right) > 100:
            raise TemplateSecurityError(f"the template raises a number to the power {right}: keep it ≤ 100")
        return super().call_binop(context, operator, left, right)


_ENV = _Sandbox(autoescape=False, undefined=_Missing, finalize=_text)
_ENV.filters.update(_FILTERS)
_ENV.globals.pop("lipsum", None)  # lorem ipsum has no place in an SMS
_ENV.globals["link"] = lambda url=None: ""  # replaced per template, listed here so it is no field
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
        """The message for ``contact``; missing fields render as their default or ""."""
        try:
            return self._render(contact)
        except AttributeError:
            if not isinstance(contact, Mapping):
                raise TemplateInputError(
                    f"a contact must be a mapping of field names to values, got {type(contact).__name__}"
                ) from None
            raise


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
        jinja_template = _ENV.from_string(tree, globals={"link": placeholders.get})
        renderer = _jinja_renderer(jinja_template, used)

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
    def render_jinja(contact: Mapping[str, Any]) -> str:
        context = {}
        get = contact.get
        for name in used:  # None is as missing: it becomes the permissive undefined
            value = get(name)
            if value is not None:
                context[name] = value
        try:
            return template.render(context)
        except TemplateError:
            raise
        except SecurityError as exc:
            raise TemplateSecurityError(f"{exc}: use contact fields, filters and link() only") from None
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

    constants: dict[str, Any] = {"_text": _text, "_field": _field}
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
    lines.append(f'    return f"{"".join(pieces)}"')
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
