"""What each recipient gets, and what it costs, before anyone presses Launch.

The composer works on a template (``smsops.templates``) and the recipients' fields:

- :func:`message_source` appends the opt-out instruction to promotional messages (service
  messages get none), so it is rendered, measured and paid for like the rest of the text;
- :func:`check` gives warnings with reasons (links to public shorteners that operators
  block, all capitals, ``!!!``, a missing or invalid sender ID, personalisation that will come
  out empty, characters that force UCS-2 needlessly, a long message); it never edits the text;
- :func:`preview` renders a handful of sampled recipients plus the worst cases (the longest
  message, and recipients whose fields are missing so their defaults show);
- :func:`estimate` renders the message for every recipient, not a sample, and adds up the
  segments and the bill by country;
- the guards (:class:`Guard`) decide what stops a send or needs a person's explicit yes, each
  with its reason and the way out: :func:`empty_text`, :func:`large_send`, :func:`footer_fit`,
  :func:`no_recipients`, :func:`no_seed_numbers` and :func:`placeholder_links`. The pages show
  them; :mod:`smsops.campaigns` refuses a launch on the same ones;
- :func:`reach` and the ``…_said`` texts: an audience's counts, each saying what it counts, in the
  same words on every screen (match the segment, reachable now, planned);
- the palette: :func:`field_snippet` and :func:`link_snippet` write a field or a tracked link
  (:func:`tracked_address` checks the address) for :func:`insert` to add to a text, so nobody
  has to learn the template syntax (which still works as typed).

Every text here is written in English and read in the current language (:mod:`smsops.i18n`).
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from smsops import config, encoding, i18n, policy, pricing, segments, senders, templates
from smsops.i18n import N_, _, ngettext

Kind = Literal["promo", "service"]

DEFAULT_OPT_OUT = "Отказ: СТОП"
"""Appended to promotional messages; an install sets its own with $SMSOPS_OPT_OUT_TEXT
(``smsops.config.opt_out_text``), e.g. «Отказ: СТОП на 900»."""

# Public shorteners that Russian operators and carriers elsewhere filter or block.
SHORTENERS = frozenset({
    "bit.ly", "tinyurl.com", "goo.gl", "t.co", "is.gd", "ow.ly", "cutt.ly", "clck.ru", "vk.cc",
    "u.to", "rebrand.ly", "shorturl.at", "tiny.cc", "bitly.com", "rb.gy", "s.id", "t.ly", "qps.ru",
})  # fmt: skip
_URL = re.compile(r"(?:https?://)?((?:[\w-]+\.)+[a-z]{2,})(?:/\S*)?", re.IGNORECASE)
_BANGS = re.compile(r"[!?]{3,}")
LONG_MESSAGE_SEGMENTS = 3


@dataclass(frozen=True, slots=True)
class ContentWarning:
    """Something about the message a person should look at, and why."""

    code: str
    message: str
    severity: Literal["info", "warning", "error"] = "warning"


def message_source(body: str, kind: Kind, opt_out: str | None = DEFAULT_OPT_OUT) -> str:
    """The template that is actually sent: promotions end with the opt-out instruction."""
    body = body.rstrip()
    if kind == "service" or not opt_out or not opt_out.strip():
        return body
    footer = opt_out.strip()
    if body.endswith(footer):
        return body
    return f"{body} {footer}" if body else footer


def check(
    template: templates.Template,
    *,
    kind: Kind,
    sender: str | None,
    sample_texts: Sequence[str] = (),
    empty_fields: Mapping[str, int] | None = None,
    recipients: int | None = None,
    opt_out: str | None = DEFAULT_OPT_OUT,
) -> list[ContentWarning]:
    """Warnings for a template (and, when given, messages rendered from it)."""
    found: list[ContentWarning] = []
    text = template.source
    for host in sorted({m.group(1).lower() for m in _URL.finditer(text)}):
        if host in SHORTENERS or any(host.endswith("." + s) for s in SHORTENERS):
            found.append(ContentWarning(
                "shortener",
                _("{host} is a public link shortener: operators often block such messages. Use {link} and "
                  "smsops shortens and tracks it on your own domain.").format(
                    host=host, link='link("https://your-site/…")'
                ),
            ))  # fmt: skip
    letters = [ch for ch in _static_text(text) if ch.isalpha()]
    if len(letters) >= 12 and sum(ch.isupper() for ch in letters) / len(letters) > 0.6:
        found.append(
            ContentWarning(
                "all_caps", _("Most of the text is in capitals: it reads as shouting and looks like spam.")
            )
        )
    if _BANGS.search(text):
        found.append(
            ContentWarning("exclamations", _("Runs like «!!!» look like spam to filters and to people."))
        )
    if not sender:
        found.append(
            ContentWarning(
                "no_sender", _("Choose a sender ID: without one the provider picks a number."), "error"
            )
        )
    else:
        try:
            senders.validate(sender)
        except senders.SenderError as exc:
            found.append(ContentWarning("bad_sender", str(exc), "error"))
    for name in template.unknown_fields:
        found.append(ContentWarning(
            "unknown_field",
            _("{field} is not a field of your contacts: it will always be empty.").format(field=f"{{{{ {name} }}}}"),
            "error",
        ))  # fmt: skip
    for name in template.missing_default:
        if name in template.unknown_fields:
            continue
        missing = (empty_fields or {}).get(name)
        share = ""
        if missing and recipients:
            share = (
                " ("
                + ngettext(
                    "{missing} of {n} recipient has none", "{missing} of {n} recipients have none", recipients
                ).format(missing=i18n.number(missing), n=i18n.number(recipients))
                + ")"
            )
        found.append(ContentWarning(
            "empty_personalisation",
            _("{field} has no default{share}: write {fixed}.").format(
                field=f"{{{{ {name} }}}}", share=share, fixed=f'{{{{ {name} | default("…") }}}}'
            ),
            "warning" if missing or empty_fields is None else "info",
        ))  # fmt: skip
    if kind == "promo" and opt_out and opt_out.strip() and opt_out.strip() not in text:
        found.append(
            ContentWarning(
                "opt_out_added",
                _("«{footer}» is added at the end of every promotion.").format(footer=opt_out.strip()),
                "info",
            )
        )
    static = encoding.analyze(_static_text(text))
    if static.encoding == encoding.UCS2:
        smart = encoding.analyze(_static_text(text), smart=True)
        if smart.encoding == encoding.GSM7:
            found.append(ContentWarning(
                "needless_ucs2",
                _("Only look-alike characters ({chars}) force UCS-2: smart replacement makes the message "
                  "GSM-7, with more than twice the room per segment.").format(chars=" ".join(static.ucs2_chars)),
            ))  # fmt: skip
    longest = max((encoding.analyze(t).segments for t in sample_texts), default=0)
    if longest > LONG_MESSAGE_SEGMENTS:
        found.append(ContentWarning(
            "long_message",
            ngettext(
                "Up to {n} segment per message: each one is billed as a separate SMS.",
                "Up to {n} segments per message: each one is billed as a separate SMS.",
                longest,
            ).format(n=i18n.number(longest)),
        ))  # fmt: skip
    return found


def ucs2_reason(analysis: encoding.Analysis) -> str:
    """Why a text is UCS-2, in words: Cyrillic (which always is) and the other characters."""
    chars = analysis.ucs2_chars
    cyrillic = [ch for ch in chars if "\u0400" <= ch <= "\u04ff"]
    others = [ch for ch in chars if ch not in cyrillic]
    parts = [_("Cyrillic letters (always UCS-2: 70 characters per SMS, 67 per part)")] if cyrillic else []
    if others:
        parts.append(_("these characters: {chars}").format(chars=" ".join(f"«{ch}»" for ch in others[:20])))
    return "; ".join(parts)


@dataclass(frozen=True, slots=True)
class Rewrites:
    """A message (its opt-out footer included, no personalisation) as written, and after each
    one-click rewrite of its text."""

    written: encoding.Analysis
    smart: encoding.Analysis
    """After :func:`smsops.encoding.smart_replace` of the text."""
    transliterated: encoding.Analysis
    """After :func:`smsops.encoding.transliterate` of the text (the footer stays as it is)."""

    @staticmethod
    def saves(before: encoding.Analysis, after: encoding.Analysis) -> bool:
        """Whether a rewrite is worth offering: fewer segments, or GSM-7 where it was not."""
        return after.segments < before.segments or (after.encoding == "GSM-7" != before.encoding)


def rewrites(
    body: str, kind: Kind, opt_out: str | None, fields: Iterable[str] | Mapping[str, str]
) -> Rewrites:
    """What each rewrite of ``body`` would make of the message a recipient gets: analysed as
    sent (fields and links rendered, the footer added), as the Segments figure beside it is, not
    as the template's source. A rewrite that breaks the template counts as no change."""

    def analysis(text: str) -> encoding.Analysis:
        try:
            return encoding.analyze(templates.compile(message_source(text, kind, opt_out), fields).render({}))
        except templates.TemplateError:
            return analysis(body) if text != body else encoding.analyze(message_source(body, kind, opt_out))

    return Rewrites(
        written=analysis(body),
        smart=analysis(encoding.smart_replace(body)[0]),
        transliterated=analysis(encoding.transliterate(body)),
    )


def country_label(code: str | None) -> str:
    """A destination country's name in the current language (``ZZ``, the prices' row for any
    other country, and an unknown one read as such)."""
    from babel import Locale

    key = (code or "").upper()
    if not key or key == pricing.DEFAULT_COUNTRY:
        return _("other countries")
    return Locale.parse(i18n.current()).territories.get(key, key)


def _static_text(source: str) -> str:
    """The template without its ``{{ … }}`` and ``{% … %}`` parts (what every recipient reads)."""
    return re.sub(r"\{\{.*?\}\}|\{%.*?%\}|\{#.*?#\}", "", source, flags=re.S)


PREVIEW_LABELS: dict[str, str] = {"sample": N_("a recipient at random"), "longest": N_("the longest message")}
"""Why a recipient is among the previews (``missing <field>`` aside: see :attr:`PreviewRow.why_label`)."""


@dataclass(frozen=True, slots=True)
class PreviewRow:
    """One recipient's exact message."""

    why: str  # "sample", "longest", "missing first_name" …
    contact_id: Any
    country: str | None
    text: str
    encoding: str
    chars: int
    segments: int
    price: float
    currency: str

    @property
    def why_label(self) -> str:
        """Why this recipient is shown, in the current language."""
        if self.why.startswith("missing "):
            return _("without {field}").format(field=f"{{{{ {self.why.removeprefix('missing ')} }}}}")
        return i18n.label(PREVIEW_LABELS, self.why)


def preview(
    template: templates.Template,
    recipients: Sequence[Mapping[str, Any]],
    *,
    sample: int = 5,
    seed: int = 0,
) -> list[PreviewRow]:
    """Sampled recipients plus the worst cases: the longest message, and for each used field
    a recipient who lacks it (so the default shows)."""
    if not recipients:
        return []
    rng = random.Random(seed)
    chosen: list[tuple[str, int]] = [
        ("sample", i) for i in rng.sample(range(len(recipients)), min(sample, len(recipients)))
    ]
    rendered = [template.render(r) for r in recipients]
    longest = max(range(len(rendered)), key=lambda i: (len(rendered[i]), -i))
    chosen.append(("longest", longest))
    for name in template.fields:
        for i, r in enumerate(recipients):
            value = r.get(name)
            if value is None or (isinstance(value, str) and not value.strip()):
                chosen.append((f"missing {name}", i))
                break
    rows: list[PreviewRow] = []
    seen: set[int] = set()
    for why, i in chosen:
        if i in seen and why == "sample":
            continue
        seen.add(i)
        text = rendered[i]
        analysis = encoding.analyze(text)
        country = recipients[i].get("country")
        price = pricing.price(country)
        rows.append(PreviewRow(
            why=why,
            contact_id=recipients[i].get("contact_id"),
            country=country,
            text=text,
            encoding=analysis.encoding,
            chars=analysis.chars,
            segments=analysis.segments,
            price=round(analysis.segments * price.per_segment, 2),
            currency=price.currency,
        ))  # fmt: skip
    return rows


@dataclass(frozen=True, slots=True)
class AudienceEstimate:
    """The bill for sending a template to every recipient, computed per recipient."""

    messages: int
    segments: int
    encodings: dict[str, int]
    segments_histogram: dict[int, int]  # segments per message -> messages
    bill: pricing.Estimate
    empty_fields: dict[str, int]

    @property
    def total(self) -> float:
        return self.bill.total


COUNT = "_recipients"
"""A recipient mapping may stand for several recipients with identical fields: the audience
grouped in SQL by the template's fields and the country, so a million rows become a few
thousand groups and the estimate is still exact."""


def estimate(template: templates.Template, recipients: Iterable[Mapping[str, Any]]) -> AudienceEstimate:
    """Render for every recipient (or group of identical ones, see :data:`COUNT`) and add up
    segments and cost by country: exact, not extrapolated. Identical texts are analysed once."""
    analysed: dict[str, tuple[str, int]] = {}
    encodings: Counter[str] = Counter()
    histogram: Counter[int] = Counter()
    empty: Counter[str] = Counter()
    by_country: dict[str | None, list[int]] = {}
    fields = template.fields
    render = template.render
    for recipient in recipients:
        n = int(recipient.get(COUNT, 1))
        text = render(recipient)
        hit = analysed.get(text)
        if hit is None:
            a = encoding.analyze(text)
            hit = analysed[text] = (a.encoding, a.segments)
        encodings[hit[0]] += n
        histogram[hit[1]] += n
        tally = by_country.setdefault(recipient.get("country"), [0, 0])
        tally[0] += n
        tally[1] += n * hit[1]
        for name in fields:
            value = recipient.get(name)
            if value is None or (isinstance(value, str) and not value.strip()):
                empty[name] += n
    bill = pricing.estimate_totals(
        (country, messages, segments) for country, (messages, segments) in by_country.items()
    )
    return AudienceEstimate(
        messages=bill.messages,
        segments=bill.segments,
        encodings=dict(encodings),
        segments_histogram=dict(sorted(histogram.items())),
        bill=bill,
        empty_fields={name: empty.get(name, 0) for name in fields},
    )


# ---------------------------------------------------------------------------------------
# Guards: what stops a send, or needs a person's explicit yes

Severity = Literal["refuse", "confirm", "warn"]


class GuardText(NamedTuple):
    reason: str
    way_out: str
    confirmation: str = ""
    """For a ``confirm`` guard: what the person says yes to (it names the figures)."""


@dataclass(frozen=True, slots=True)
class Guard:
    """Why a message should not go as it is, and the way out.

    ``refuse``: it cannot go (a launch is refused); ``confirm``: it goes only after a person says
    yes to what :attr:`confirmation` shows; ``warn``: it goes, and the person should know. The
    texts are written when read, in the current language; ``str()`` is English (logs, the CLI)."""

    code: str
    severity: Severity
    texts: Callable[[], GuardText] = field(repr=False, compare=False)

    @property
    def reason(self) -> str:
        return self.texts().reason

    @property
    def way_out(self) -> str:
        return self.texts().way_out

    @property
    def confirmation(self) -> str:
        return self.texts().confirmation

    @property
    def message(self) -> str:
        """The reason and the way out, in the current language."""
        said = self.texts()
        return f"{said.reason} {said.way_out}"

    def __str__(self) -> str:
        with i18n.language("en"):
            return self.message


def empty_text(body: str, kind: Kind = "promo") -> Guard | None:
    """Refuses a message with no text of its own (empty, or only spaces): a promotion would go
    out as the opt-out footer alone, billed for every recipient."""
    if body.strip():
        return None

    def texts() -> GuardText:
        if kind == "promo":
            reason = _(
                "The message is empty: every recipient would get the opt-out footer alone, and it would be billed."
            )
        else:
            reason = _("The message is empty: there is nothing to send.")
        return GuardText(reason, _("Write the text of the message."))

    return Guard("empty_text", "refuse", texts)


def large_send(
    longest: int,
    cost: Mapping[str, float] | float,
    *,
    max_parts: int | None = None,
    max_cost: float | None = None,
) -> Guard | None:
    """Asks for a person's yes when a message runs to more than ``max_parts`` segments
    (``SMSOPS_MAX_PARTS``) or the bill (``{currency: amount}``, or an amount in roubles) is above
    ``max_cost`` (``SMSOPS_MAX_COST``); the texts name both figures."""
    limit = config.max_parts() if max_parts is None else max_parts
    ceiling = config.max_cost() if max_cost is None else max_cost
    bill = {"RUB": float(cost)} if isinstance(cost, int | float) else {c: float(a) for c, a in cost.items()}
    total = sum(bill.values())
    over_parts = longest > limit
    over_cost = ceiling is not None and total > ceiling
    if not (over_parts or over_cost):
        return None

    def texts() -> GuardText:
        parts = ngettext("up to {n} segment", "up to {n} segments", longest).format(n=i18n.number(longest))
        money = ", ".join(i18n.money(amount, currency) for currency, amount in bill.items()) or i18n.money(0)
        values = {
            "parts": parts,
            "bill": money,
            "limit": i18n.number(limit),
            "ceiling": i18n.money(ceiling) if ceiling is not None else i18n.MISSING,
        }
        if over_parts and over_cost:
            reason = _(
                "Each message has {parts} (the limit is {limit}), and the bill is {bill}, above {ceiling}."
            )
        elif over_parts:
            reason = _("Each message has {parts}, over the limit of {limit}; the bill is {bill}.")
        else:
            reason = _("The bill is {bill}, above {ceiling}; each message has {parts}.")
        return GuardText(
            reason.format(**values),
            (
                _("Shorten the text, or confirm that you mean to send it.")
                if over_parts
                else _("Check the audience and the text, or confirm that you mean to send it.")
            )
            + " "
            + _("The limits are SMSOPS_MAX_PARTS and SMSOPS_MAX_COST."),
            _("Yes, send messages of {parts} for {bill}").format(**values),
        )

    return Guard("large_send", "confirm", texts)


def footer_fit(
    body_text: str,
    footer: str | None,
    kind: Kind = "promo",
    *,
    messages: int = 0,
    per_segment: float = 0.0,
    currency: str = "RUB",
    max_parts: int | None = None,
) -> Guard | None:
    """Flags an opt-out footer that does not fit: it adds a segment to every message, switches
    it to UCS-2, or takes it over ``max_parts``. ``body_text`` is the message as written, without
    personalisation (what every recipient reads); the cost is ``messages`` × the segments the
    footer adds × ``per_segment``."""
    footer = (footer or "").strip()
    body = body_text.rstrip()
    if kind != "promo" or not footer or not body.strip():
        return None
    body = body.removesuffix(footer).rstrip()
    without = encoding.analyze(body)
    with_ = encoding.analyze(message_source(body, kind, footer))
    limit = config.max_parts() if max_parts is None else max_parts
    switched = without.encoding != with_.encoding
    extra = with_.segments - without.segments
    over = with_.segments > limit >= without.segments
    if not (switched or extra > 0 or over):
        return None
    single, multi = (
        (encoding.GSM_SINGLE, encoding.GSM_MULTI) if with_.encoding == encoding.GSM7
        else (encoding.UCS2_SINGLE, encoding.UCS2_MULTI)
    )  # fmt: skip
    room = single if without.segments <= 1 else multi * without.segments
    cut = max(0, with_.units - room)

    def texts() -> GuardText:
        values = {
            "footer": footer,
            "before": i18n.number(without.segments),
            "after": ngettext("{n} segment", "{n} segments", with_.segments).format(
                n=i18n.number(with_.segments)
            ),
            "cost": i18n.money(extra * messages * per_segment, currency),
            "recipients": ngettext("for {n} recipient", "for {n} recipients", messages).format(
                n=i18n.number(messages)
            ),
            "limit": i18n.number(limit),
            "cut": ngettext("{n} character", "{n} characters", cut).format(n=i18n.number(cut)),
        }
        if switched:
            reason = _(
                "The opt-out footer «{footer}» switches the message to UCS-2 (70 characters per segment "
                "instead of 160): {before} → {after} per message, {cost} more {recipients}."
            )
            way_out = _(
                "Write the footer without Cyrillic or special characters (SMSOPS_OPT_OUT_TEXT), or "
                "write the whole message in Cyrillic."
            )
        else:
            reason = _(
                "The opt-out footer «{footer}» does not fit: {before} → {after} per message, {cost} more "
                "{recipients}."
            )
            way_out = _(
                "Shorten the text by {cut} so that the footer fits, or use a shorter footer "
                "(SMSOPS_OPT_OUT_TEXT)."
            )
        if over:
            reason += " " + _("With it the message runs over the limit of {limit} segments.")
        return GuardText(reason.format(**values), way_out.format(**values))

    return Guard("footer_does_not_fit", "warn", texts)


def no_recipients(
    to_send: int, audience: int, kind: Kind = "promo", removed_most: str | None = None
) -> Guard | None:
    """Refuses a launch that would send nothing: the segment is empty, or the checks leave
    nobody (``removed_most``: the skip reason that removed the most)."""
    if to_send > 0:
        return None

    def texts() -> GuardText:
        if audience == 0:
            return GuardText(
                _("Nobody is in this campaign's audience now: the launch would send nothing."),
                _("Choose another audience, or widen the segment's conditions on the Segments page."),
            )
        reason = ngettext(
            "The audience holds {n} contact, and the checks leave out every one (most for: {why}).",
            "The audience holds {n} contacts, and the checks leave out every one (most for: {why}).",
            audience,
        ).format(n=i18n.number(audience), why=policy.explain(removed_most) if removed_most else i18n.MISSING)
        if kind == "promo" and removed_most in ("no_consent", "opted_out"):
            way_out = _(
                "Promotions go only to contacts with a marketing opt-in: choose an audience that has "
                "one (import their consent on the Contacts page)."
            )
        else:
            way_out = _(
                "See the steps above for why; choose another audience or change the campaign's settings."
            )
        return GuardText(reason, way_out)

    return Guard("no_recipients", "refuse", texts)


def no_seed_numbers(numbers: Sequence[str] | str) -> Guard | None:
    """Refuses a test send with no numbers to go to, and says how to add them."""
    given = numbers.split(",") if isinstance(numbers, str) else list(numbers)
    if any(isinstance(n, str) and n.strip() for n in given):
        return None
    return Guard(
        "no_seed_numbers",
        "refuse",
        lambda: GuardText(
            _("No seed numbers: a test send needs at least one seed number, a phone of the team's own."),
            _(
                "Give them comma-separated (+79990000001, +79990000002), or set SMSOPS_SEED_NUMBERS so that "
                "they are filled in for everyone."
            ),
        ),
    )


def placeholder_links(sources: Iterable[str], *, placeholder: bool | None = None) -> Guard | None:
    """Warns when messages hold tracked links (``link()``) while the link base is the
    placeholder (``SMSOPS_LINK_BASE`` unset): the links would lead nowhere."""
    if placeholder is None:
        placeholder = config.link_base_is_placeholder()
    if not placeholder:
        return None
    linked = False
    for source in sources:
        try:
            linked = bool(templates.compile(source).links)
        except templates.TemplateError:
            continue
        if linked:
            break
    if not linked:
        return None
    return Guard(
        "placeholder_link_base",
        "warn",
        lambda: GuardText(
            _(
                "Tracked links would point to {base}…, a placeholder address that leads nowhere: recipients "
                "could not open them."
            ).format(base=config.PLACEHOLDER_LINK_BASE),
            _(
                "Set SMSOPS_LINK_BASE to a short address of your own whose /l/ path reaches smsops serve "
                "(e.g. https://go.your-shop.ru/l/), and restart smsops."
            ),
        ),
    )


# ---------------------------------------------------------------------------------------
# Audience counts: each says what it counts, the same words on every screen


@dataclass(frozen=True, slots=True)
class Reach:
    """Who in an audience may get a kind of message now (by the warehouse's build), and why the
    others cannot: the same figures the Segments page shows, from :func:`smsops.segments.breakdown`."""

    kind: Kind
    matching: int
    """Contacts that match the segment."""
    reachable: int
    """Those who may get ``kind`` messages now: a valid mobile number of their own and the consent it needs."""
    left_out: tuple[tuple[str, int], ...]
    """Why the others cannot, as (reason in the current language, contacts), largest first."""


def reach(breakdown: segments.Breakdown, kind: Kind) -> Reach:
    """:class:`Reach` of a segment's :func:`~smsops.segments.breakdown` for ``kind``."""
    if kind == "promo":
        reachable = breakdown.reachable_marketing
        groups = (
            ("unreachable", breakdown.unreachable_reasons),
            ("service_only", breakdown.service_only_reasons),
        )
    else:
        reachable = breakdown.reachable_marketing + breakdown.service_only
        groups = (("unreachable", breakdown.unreachable_reasons),)
    left_out = [
        (segments.reach_label(f"{group}: {reason}"), n)
        for group, counts in groups
        for reason, n in counts.items()
    ]
    return Reach(kind, breakdown.total, reachable, tuple(sorted(left_out, key=lambda item: -item[1])))


def matching_said(n: int) -> str:
    """``3,677 match the segment``."""
    return ngettext("{n} matches the segment", "{n} match the segment", n).format(n=i18n.number(n))


def reachable_said(n: int, kind: Kind) -> str:
    """``2,386 reachable for promotions now`` (or for service messages)."""
    if kind == "promo":
        said = ngettext("{n} reachable for promotions now", "{n} reachable for promotions now", n)
    else:
        said = ngettext("{n} reachable for service messages now", "{n} reachable for service messages now", n)
    return said.format(n=i18n.number(n))


def planned_said(n: int) -> str:
    """``2,429 planned after consent, duplicates and frequency caps``."""
    return ngettext(
        "{n} planned after consent, duplicates and frequency caps",
        "{n} planned after consent, duplicates and frequency caps",
        n,
    ).format(n=i18n.number(n))


# ---------------------------------------------------------------------------------------
# The palette: fields and tracked links put into the text without writing template syntax

FIELD_FILTERS: dict[str, str] = {
    "revenue": "money",
    "average_order_value": "money",
    "birth_date": "date",
    "first_order_at": "date",
    "last_order_at": "date",
}
"""How the palette writes a field that is not plain text: money as money, dates as dates."""

_FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_HOST = re.compile(r"(?:[^\W_](?:[\w-]*[^\W_])?\.)+(?:[^\W\d_]{2,}|xn--[a-z0-9-]+)", re.IGNORECASE)
_NOT_IN_ADDRESS = re.compile(r"[\s'\"\\<>{}]")


class PaletteError(ValueError):
    """What the palette cannot insert; the message (in the current language) says what to write."""


def field_snippet(name: str, if_empty: str = "") -> str:
    """The template text that puts a contact's field into the message: ``{{ first_name }}``,
    or ``{{ first_name | default('Здравствуйте') }}`` when ``if_empty`` says what a contact
    without it reads. Money and dates go through their filters (:data:`FIELD_FILTERS`)."""
    if not isinstance(name, str) or not _FIELD_NAME.fullmatch(name):
        raise PaletteError(_("«{name}» is not a field of your contacts.").format(name=name))
    parts = [name]
    if name in FIELD_FILTERS:
        parts.append(FIELD_FILTERS[name])
    if if_empty and if_empty.strip():
        parts.append(f"default({_literal(if_empty.strip())})")
    return "{{ " + " | ".join(parts) + " }}"


def tracked_address(text: str) -> str:
    """The address a tracked link leads to, checked and written out in full (``shop.ru/sale``
    becomes ``https://shop.ru/sale``). Raises :class:`PaletteError` saying what to fix."""
    from urllib.parse import urlsplit

    address = (text or "").strip()
    example = "https://shop.example.ru/sale"
    if not address:
        raise PaletteError(_("Give the address the link leads to, e.g. {example}.").format(example=example))
    if _NOT_IN_ADDRESS.search(address):
        raise PaletteError(
            _("An address has no spaces, quotes, braces or angle brackets: check «{address}».").format(
                address=address
            )
        )
    if "://" not in address:
        address = "https://" + address
    parts = urlsplit(address)
    if parts.scheme.lower() not in ("http", "https"):
        raise PaletteError(
            _("A tracked link leads to a web page: start the address with https://, e.g. {example}.").format(
                example=example
            )
        )
    host = (parts.hostname or "").lower()
    if not _HOST.fullmatch(host):
        raise PaletteError(
            _("«{address}» has no site name a phone can open: write it in full, e.g. {example}.").format(
                address=text.strip(), example=example
            )
        )
    if host in SHORTENERS or any(host.endswith("." + s) for s in SHORTENERS):
        raise PaletteError(
            _(
                "{host} is a public link shortener: give the page's own address, smsops shortens and tracks it."
            ).format(host=host)
        )
    return address


def link_snippet(address: str) -> str:
    """``{{ link('https://…') }}``: a tracked link to the checked :func:`tracked_address`."""
    return "{{ link(" + _literal(tracked_address(address)) + ") }}"


def insert(text: str, snippet: str) -> str:
    """``text`` with ``snippet`` added at its end, a space between them where one is needed."""
    text = text or ""
    if not text or text[-1].isspace() or text[-1] in "«(\"'":
        return text + snippet
    return f"{text} {snippet}"


def _literal(text: str) -> str:
    """``text`` as a template string literal (quotes, backslashes and line breaks escaped)."""
    escaped = text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n").replace("\r", "")
    return f"'{escaped}'"
