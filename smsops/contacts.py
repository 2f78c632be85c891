"""Contacts as the Contacts page shows them, read fresh from the operational store.

Search by name, number or CRM id; a contact card with attributes, current consent, the
consent history with its proof, and the messages the contact got; a manual opt-out; an
export of a search. Numbers are masked unless the caller asks to reveal them.

A missing value is ``None`` in every frame here, never NaN (pandas 3 reads a NULL in a text
column as NaN, which is truthy and has no string methods), and a coded value (a consent state,
a message's state, a reply's keyword) is its code. :func:`shown` is the page's edge: it turns a
frame into text in the current language (codes as labels, times in the team's zone, money and
numbers by the locale, a gap as "—"); :data:`HEADERS` names the columns.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pandas as pd

from smsops import consent, i18n, phones, policy, segments, store
from smsops.config import time_zone
from smsops.i18n import N_, _
from smsops.importer import neutralise

Home = str | os.PathLike[str] | None
_DIGITS = re.compile(r"\d")
MISSING = i18n.MISSING
"""How a missing value reads on a page (a table would draw ``None``)."""

CONSENT_LABELS: dict[str, str] = {
    "opted_in": N_("opted in"),
    "opted_out": N_("opted out"),
    "no_consent": N_("no consent recorded"),
}
"""A number's consent for one purpose (:func:`consent_code`)."""

PURPOSE_LABELS: dict[str, str] = {"marketing": N_("promotions"), "service": N_("service messages")}
ACTION_LABELS: dict[str, str] = {"opt_in": N_("agreed"), "opt_out": N_("opted out")}
KIND_LABELS: dict[str, str] = {"promo": N_("promotion"), "service": N_("service message")}
STATE_LABELS: dict[str, str] = {
    "planned": N_("planned"),
    "holdout": N_("control group"),
    "suppressed": N_("not sent"),
    "sending": N_("sending"),
    "submitted": N_("handed to the provider"),
    "unknown": N_("outcome unknown"),
    "rejected": N_("rejected"),
    "cancelled": N_("cancelled"),
}
"""A message's state in the outbox."""
STATUS_LABELS: dict[str, str] = {
    "accepted": N_("accepted"),
    "queued": N_("queued"),
    "sending": N_("sending"),
    "sent": N_("sent"),
    "delivered": N_("delivered"),
    "undelivered": N_("not delivered"),
    "failed": N_("failed"),
}
"""The provider's last status of a message."""
KEYWORD_LABELS: dict[str, str] = {
    "stop": N_("opt-out (STOP)"),
    "start": N_("opt-in (START)"),
    "help": N_("help"),
}
PROOF_LABELS: dict[str, str] = {
    "import_batch": N_("import batch"),
    "file": N_("file"),
    "file_sha256": N_("file SHA-256"),
    "line": N_("line"),
    "proof": N_("proof"),
    "requested_by": N_("recorded by"),
    "reason": N_("reason"),
    "contact_id": N_("contact"),
}
"""Keys of a consent event's proof (others, from an API caller, read as given)."""

HEADERS: dict[str, str] = {
    "name": N_("Name"),
    "phone": N_("Phone number"),
    "phone_valid": N_("Can get SMS"),
    "marketing": N_("Marketing"),
    "city": N_("City"),
    "external_id": N_("CRM id"),
    "created_at": N_("Added"),
    "purpose": N_("Applies to"),
    "action": N_("Action"),
    "source": N_("Source"),
    "consent_text": N_("What they agreed to / why"),
    "proof": N_("Proof"),
    "occurred_at": N_("When"),
    "recorded_at": N_("Recorded"),
    "campaign": N_("Campaign"),
    "kind": N_("Kind"),
    "variant": N_("Variant"),
    "state": N_("State"),
    "skip_reason": N_("Why not sent"),
    "provider_status": N_("Provider status"),
    "error_code": N_("Error code"),
    "segments": N_("SMS parts"),
    "price": N_("Cost"),
    "planned_at": N_("Planned"),
    "submitted_at": N_("Sent"),
    "clicks": N_("Clicks"),
    "body": N_("Text"),
    "received_at": N_("Received"),
    "keyword": N_("Keyword"),
    "field": N_("Field"),
    "value": N_("Value"),
}
"""Column headers of the frames here (English; shown with ``_()``)."""

_CODED: dict[str, dict[str, str]] = {
    "marketing": CONSENT_LABELS,
    "purpose": PURPOSE_LABELS,
    "action": ACTION_LABELS,
    "source": segments.VALUE_LABELS["marketing_consent_source"],
    "kind": KIND_LABELS,
    "state": STATE_LABELS,
    "skip_reason": policy.SKIP_REASONS,
    "provider_status": STATUS_LABELS,
    "keyword": KEYWORD_LABELS,
}
_TIMES = frozenset(
    {"created_at", "updated_at", "occurred_at", "recorded_at", "planned_at", "submitted_at", "received_at"}
)
_COUNTS = frozenset({"segments", "clicks"})


class ContactNotFound(LookupError):
    """No contact with that id."""


def _fold(text: str | None) -> str | None:
    """Case- and ё-insensitive form of a name (SQLite's lower() knows only ASCII)."""
    return text.casefold().replace("ё", "е") if text else text


def _initials(text: str) -> set[str]:
    """The letters a name that :func:`_name_matcher` finds for ``text`` can start with."""
    first = (_fold(text) or " ")[0]
    found = {first, first.upper()}
    if first == "е":
        found |= {"ё", "Ё"}
    return found


def _name_matcher(text: str) -> Callable[[str | None, str | None], bool]:
    """Whether a contact's first name, last name, "first last" or "last first" starts with
    ``text``, case- and ё-insensitively."""
    needle = _fold(text) or ""

    def matches(first: str | None, last: str | None) -> bool:
        first, last = _fold(first) or "", _fold(last) or ""
        return (
            first.startswith(needle)
            or last.startswith(needle)
            or f"{first} {last}".startswith(needle)
            or f"{last} {first}".startswith(needle)
        )

    return matches


@contextmanager
def _conn(home: Home) -> Iterator[sqlite3.Connection]:
    conn = store.connect(store.store_path(home))
    try:
        store.create_schema(conn)
        conn.create_function("fold", 1, _fold, deterministic=True)
        yield conn
    finally:
        conn.close()


def _frame(data: Sequence[Any], columns: Sequence[str] | None = None) -> pd.DataFrame:
    """Rows (tuples or dicts) as a frame that keeps a missing value as ``None``: the one place
    the store's rows become a frame, so nothing downstream meets NaN."""
    return pd.DataFrame(list(data), columns=None if columns is None else list(columns), dtype=object)


def _query(conn: sqlite3.Connection, sql: str, params: Sequence[Any] = ()) -> pd.DataFrame:
    cursor = conn.execute(sql, tuple(params))
    return _frame(cursor.fetchall(), [d[0] for d in cursor.description])


def _is_missing(value: Any) -> bool:
    return value is None or (pd.api.types.is_scalar(value) and bool(pd.isna(value)))


def _text(value: Any) -> str:
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False, default=str)
    return str(value)


def shown(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` as a page shows it, in the current language: codes as labels, times in the team's
    zone, money and counts by the locale, a proof as "key: value" text, a missing value as "—"
    (a column with one becomes text). ``phone_valid`` stays a flag; a ``currency`` column is
    read into ``price`` and left out."""
    out = frame.drop(columns=["currency"], errors="ignore")
    zone = time_zone()
    currencies = list(frame["currency"]) if "currency" in frame.columns else [None] * len(frame)
    for column in out.columns:
        values = list(out[column])
        if column in _CODED:
            text = [i18n.label(_CODED[column], v) if not _is_missing(v) else MISSING for v in values]
        elif column in _TIMES:
            text = [MISSING if _is_missing(v) else i18n.datetime_(v, tz=zone) for v in values]
        elif column == "price":
            text = [
                MISSING if _is_missing(v) else i18n.money(v, c if isinstance(c, str) and c else "RUB")
                for v, c in zip(values, currencies, strict=True)
            ]
        elif column in _COUNTS:
            text = [MISSING if _is_missing(v) else i18n.number(v) for v in values]
        elif column == "proof":
            text = [MISSING if _is_missing(v) else _proof_text(v) for v in values]
        elif any(_is_missing(v) for v in values) or any(isinstance(v, dict | list) for v in values):
            text = [MISSING if _is_missing(v) else _text(v) for v in values]
        else:
            continue
        out[column] = pd.Series(text, index=out.index, dtype=object)
    return out


def _proof_text(proof: Any) -> str:
    if not isinstance(proof, dict):
        return _text(proof)
    parts = [
        f"{i18n.label(PROOF_LABELS, key)}: {_text(value)}"
        for key, value in proof.items()
        if not _is_missing(value) and value != ""
    ]
    return "; ".join(parts) or MISSING


@dataclass(frozen=True, slots=True)
class Query:
    """What a person typed into the search box, read as a number, an id or a name."""

    text: str
    digits: str

    @classmethod
    def parse(cls, text: str) -> Query:
        text = (text or "").strip()
        return cls(text=text, digits="".join(_DIGITS.findall(text)))

    @property
    def is_number(self) -> bool:
        """Mostly digits and no letters: "+7 912", "8 (912) 345", not "CRM-0001234"."""
        if any(ch.isalpha() for ch in self.text):
            return False
        return len(self.digits) >= 4 and len(self.digits) >= len(self.text.replace(" ", "")) // 2


def search(text: str, *, limit: int = 100, reveal: bool = False, home: Home = None) -> pd.DataFrame:
    """Contacts matching ``text``: a number (any part of it, in any CRM form), a CRM id, or a
    first/last name (case-insensitive, start of either). Empty text lists the newest contacts."""
    query = Query.parse(text)
    limit = max(1, min(int(limit), 10_000))
    with _conn(home) as conn:
        if not query.text:
            where, params = "1 = 1", []
        elif query.is_number:
            digits = query.digits
            if digits[0] == "8" and len(digits) <= 11 and digits[1:2] == "9":
                digits = "7" + digits[1:]  # a Russian mobile written with the trunk prefix 8
            where, params = "external_id = ? or phone_e164 like ?", [query.text, f"%{digits}%"]
        else:
            # one call per contact, not four folds and two concatenations (1M contacts: seconds)
            conn.create_function("name_matches", 2, _name_matcher(query.text), deterministic=True)
            # only names that start with the first letter in either case go to Python (and ё for е)
            initials = sorted(_initials(query.text))
            marks = ", ".join("?" * len(initials))
            where = (
                f"external_id = ? or ((substr(first_name, 1, 1) in ({marks}) or substr(last_name, 1, 1) in ({marks}))"
                " and name_matches(first_name, last_name))"
            )
            params = [query.text, *initials, *initials]
        frame = _query(
            conn,
            f"""
            select contact_id, external_id, first_name, last_name, phone_e164, phone_valid, phone_reason,
                   city, created_at
            from contacts where {where}
            order by contact_id desc limit ?
            """,
            (*params, limit),
        )
        numbers = [p for p in frame["phone_e164"] if p and p.startswith("+")]
        marketing = consent.states(conn, numbers, "marketing") if numbers else {}
    frame["contact_id"] = frame["contact_id"].astype("int64")
    frame["marketing"] = [consent_code(marketing.get(p)) for p in frame["phone_e164"]]
    frame["phone_valid"] = frame["phone_valid"].astype(bool)
    frame["name"] = [_name(f, last) for f, last in zip(frame["first_name"], frame["last_name"], strict=True)]
    frame["phone"] = [MISSING if p is None else p if reveal else phones.mask(p) for p in frame["phone_e164"]]
    return frame[
        ["contact_id", "name", "phone", "phone_valid", "marketing", "city", "external_id", "created_at"]
    ]


def _name(first: str | None, last: str | None) -> str:
    return " ".join(part for part in (first, last) if part) or MISSING


def consent_code(state: consent.ConsentState | None) -> str:
    """A number's consent for one purpose: ``opted_in``, ``opted_out`` or ``no_consent``."""
    if state is None or state.last_action is None:
        return "no_consent"
    return "opted_in" if state.opted_in else "opted_out"


def consent_label(state: consent.ConsentState | None) -> str:
    """How a number's consent for one purpose reads on a page, in the current language."""
    return i18n.label(CONSENT_LABELS, consent_code(state))


@dataclass(frozen=True, slots=True)
class ContactCard:
    """Everything the page shows about one contact."""

    contact_id: int
    fields: dict[str, Any]
    attributes: dict[str, Any]
    phone_e164: str | None
    marketing: consent.ConsentState | None
    service: consent.ConsentState | None
    consent_history: pd.DataFrame
    messages: pd.DataFrame
    replies: pd.DataFrame

    @property
    def name(self) -> str:
        return _name(self.fields.get("first_name"), self.fields.get("last_name"))


CARD_FIELDS = (
    "external_id", "first_name", "last_name", "gender", "birth_date", "email", "city", "region",
    "time_zone", "phone_raw", "phone_e164", "phone_valid", "phone_reason", "number_type", "phone_country",
    "phone_time_zones", "attributes", "created_at", "updated_at",
)  # fmt: skip


DETAIL_LABELS: dict[str, str] = {
    "external_id": N_("CRM id"),
    "first_name": N_("First name"),
    "last_name": N_("Last name"),
    "gender": N_("Gender"),
    "birth_date": N_("Birth date"),
    "email": N_("Email"),
    "city": N_("City"),
    "region": N_("Region"),
    "time_zone": N_("Time zone"),
    "number_type": N_("Number type"),
    "created_at": N_("Added"),
    "updated_at": N_("Updated"),
}
"""The card's details, in the order shown (the number's own fields are shown apart)."""


def details(card: ContactCard) -> pd.DataFrame:
    """The card's details as ``field`` / ``value`` rows in the current language, then its custom
    attributes under their own names; empty fields left out."""
    zone = time_zone()
    rows = []
    for name, label in DETAIL_LABELS.items():
        value = card.fields.get(name)
        if _is_missing(value) or value == "":
            continue
        if name == "birth_date":
            text = i18n.date(value)
        elif name in _TIMES:
            text = i18n.datetime_(value, tz=zone)
        else:
            text = segments.value_label(name, value)
        rows.append((_(label), text))
    rows += [(str(key), _text(value)) for key, value in card.attributes.items() if not _is_missing(value)]
    return _frame(rows, ["field", "value"])


def unusable_reason(card: ContactCard) -> str:
    """Why the card's number cannot receive SMS, in the current language."""
    return i18n.label(segments.REASON_LABELS, card.fields.get("phone_reason") or "invalid")


def card(contact_id: int, *, home: Home = None) -> ContactCard:
    """The contact card: fields, attributes, current consent, its history, messages, replies."""
    with _conn(home) as conn:
        row = conn.execute(
            f"select {', '.join(CARD_FIELDS)} from contacts where contact_id = ?", (int(contact_id),)
        ).fetchone()
        if row is None:
            raise ContactNotFound(_("No contact with id {id}.").format(id=contact_id))
        fields = dict(zip(CARD_FIELDS, row, strict=True))
        phone = fields["phone_e164"] if (fields["phone_e164"] or "").startswith("+") else None
        history = _frame(consent.export_proof(conn, phone)) if phone else pd.DataFrame()
        marketing = consent.state(conn, phone, "marketing") if phone else None
        service = consent.state(conn, phone, "service") if phone else None
        messages = _query(
            conn,
            """
            select
                m.message_id, c.name as campaign, c.kind, m.variant, m.state, m.skip_reason,
                (select s.status from message_status_events s where s.message_id = m.message_id
                 order by case s.status when 'accepted' then 1 when 'queued' then 2 when 'sending' then 3
                          when 'sent' then 4 else 5 end desc, s.occurred_at desc limit 1) as provider_status,
                m.error_code, m.segments, m.price, m.currency, m.planned_at, m.submitted_at,
                (select count(*) from clicks k where k.message_id = m.message_id) as clicks,
                m.body
            from messages m join campaigns c on c.campaign_id = m.campaign_id
            where m.contact_id = ?
            order by m.planned_at desc
            """,
            (int(contact_id),),
        )
        replies = _query(
            conn,
            "select received_at, body, keyword from inbound_messages where contact_id = ? order by received_at desc",
            (int(contact_id),),
        )
    attributes = json.loads(fields.pop("attributes") or "{}")
    return ContactCard(
        contact_id=int(contact_id),
        fields=fields,
        attributes=attributes,
        phone_e164=phone,
        marketing=marketing,
        service=service,
        consent_history=history,
        messages=messages,
        replies=replies,
    )


def opt_out(
    contact_id: int,
    *,
    reason: str,
    requested_by: str,
    purposes: tuple[str, ...] = ("marketing",),
    home: Home = None,
) -> int:
    """Record an opt-out made by staff (source ``admin``) for the contact's number, with the
    reason and who recorded it as proof. Takes effect for every send that starts after it."""
    reason = (reason or "").strip()
    if not reason:
        raise ValueError(_("An opt-out recorded by staff needs a reason (for example: asked by phone)."))
    with _conn(home) as conn:
        row = conn.execute(
            "select phone_e164 from contacts where contact_id = ?", (int(contact_id),)
        ).fetchone()
        if row is None:
            raise ContactNotFound(_("No contact with id {id}.").format(id=contact_id))
        if not row[0] or not row[0].startswith("+"):
            raise ValueError(_("This contact has no valid number to opt out."))
        now = datetime.now(UTC)
        events = [
            consent.ConsentEvent(
                phone_e164=row[0],
                purpose=purpose,
                action="opt_out",
                source="admin",
                occurred_at=now,
                consent_text=reason,
                proof={"requested_by": requested_by, "reason": reason, "contact_id": int(contact_id)},
                contact_id=int(contact_id),
            )
            for purpose in purposes
        ]
        return consent.record_many(conn, events)


def export_csv(frame: pd.DataFrame) -> bytes:
    """A search result as CSV for a spreadsheet: UTF-8 with BOM, formula cells neutralised, a
    missing value an empty cell."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(list(frame.columns))
    for row in frame.itertuples(index=False):
        writer.writerow(["" if _is_missing(v) else neutralise(str(v)) for v in row])
    return ("\ufeff" + buffer.getvalue()).encode("utf-8")
