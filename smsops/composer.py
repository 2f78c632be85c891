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
  segments and the bill by country.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from smsops import encoding, pricing, senders, templates

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
                f"{host} is a public link shortener: operators often block such messages. "
                "Use link(\"https://your-site/…\") and smsops shortens and tracks it on your own domain.",
            ))  # fmt: skip
    letters = [ch for ch in _static_text(text) if ch.isalpha()]
    if len(letters) >= 12 and sum(ch.isupper() for ch in letters) / len(letters) > 0.6:
        found.append(
            ContentWarning(
                "all_caps", "Most of the text is in capitals: it reads as shouting and looks like spam."
            )
        )
    if _BANGS.search(text):
        found.append(
            ContentWarning("exclamations", "Runs like «!!!» look like spam to filters and to people.")
        )
    if not sender:
        found.append(
            ContentWarning(
                "no_sender", "Choose a sender ID: without one the provider picks a number.", "error"
            )
        )
    else:
        try:
            senders.validate(sender)
        except senders.SenderError as exc:
            found.append(ContentWarning("bad_sender", str(exc), "error"))
    for name in template.unknown_fields:
        found.append(ContentWarning(
            "unknown_field", f"{{{{ {name} }}}} is not a field of your contacts: it will always be empty.", "error"
        ))  # fmt: skip
    for name in template.missing_default:
        if name in template.unknown_fields:
            continue
        missing = (empty_fields or {}).get(name)
        share = f" ({missing:,} of {recipients:,} recipients have none)" if missing and recipients else ""
        found.append(ContentWarning(
            "empty_personalisation",
            f"{{{{ {name} }}}} has no default{share}: write {{{{ {name} | default(\"…\") }}}}.",
            "warning" if missing or empty_fields is None else "info",
        ))  # fmt: skip
    if kind == "promo" and opt_out and opt_out.strip() and opt_out.strip() not in text:
        found.append(
            ContentWarning(
                "opt_out_added", f"«{opt_out.strip()}» is added at the end of every promotion.", "info"
            )
        )
    static = encoding.analyze(_static_text(text))
    if static.encoding == encoding.UCS2:
        smart = encoding.analyze(_static_text(text), smart=True)
        if smart.encoding == encoding.GSM7:
            found.append(ContentWarning(
                "needless_ucs2",
                "Only look-alike characters (" + " ".join(static.ucs2_chars) + ") force UCS-2: "
                "smart replacement makes the message GSM-7, with more than twice the room per segment.",
            ))  # fmt: skip
    longest = max((encoding.analyze(t).segments for t in sample_texts), default=0)
    if longest > LONG_MESSAGE_SEGMENTS:
        found.append(ContentWarning(
            "long_message", f"Up to {longest} segments per message: each one is billed as a separate SMS."
        ))  # fmt: skip
    return found


def ucs2_reason(analysis: encoding.Analysis) -> str:
    """Why a text is UCS-2, in words: Cyrillic (which always is) and the other characters."""
    chars = analysis.ucs2_chars
    cyrillic = [ch for ch in chars if "\u0400" <= ch <= "\u04ff"]
    others = [ch for ch in chars if ch not in cyrillic]
    parts = ["Cyrillic letters (always UCS-2: 70 characters per SMS, 67 per part)"] if cyrillic else []
    if others:
        parts.append("these characters: " + " ".join(f"«{ch}»" for ch in others[:20]))
    return "; ".join(parts)


def _static_text(source: str) -> str:
    """The template without its ``{{ … }}`` and ``{% … %}`` parts (what every recipient reads)."""
    return re.sub(r"\{\{.*?\}\}|\{%.*?%\}|\{#.*?#\}", "", source, flags=re.S)


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
