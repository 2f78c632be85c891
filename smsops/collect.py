"""What shops and CRMs send in the Segment spec: ``identify``, ``track`` and batches of them.

The official Segment client libraries (and RudderStack's, Jitsu's) deliver to any host; pointed
at ``<serve URL>/segment`` with a write key they post to ``/segment/v1/batch`` (or
``/v1/identify``, ``/v1/track``), the key as the HTTP Basic user name.

- :func:`parse` turns a request body into :class:`Contact`, :class:`Event` and :class:`Order`
  rows (pure, no I/O). A bad message is refused with the batch (:class:`Invalid`, each problem
  with the message's index, field and reason; nothing of the batch is written: DESIGN.md
  invariant 6); Segment itself drops invalid events silently, which we do not.
- :func:`write` puts them in the store in one transaction; ``messageId`` is the idempotency key
  (a repeat changes nothing, kept in ``segment_messages``).
- :class:`Endpoint` is the ASGI route ``smsops serve`` mounts when ``SMSOPS_SEGMENT_WRITE_KEY``
  is set (otherwise ``/segment/…`` is 404): wrong or missing key → 401, over Segment's limits
  (32 KB a message, 500 KB a batch) → 413, bad message → 400 listing each, written → 200.

A checked request is journaled (:mod:`smsops.ingress`, a ``segment`` entry holding its body)
and answered; the journal's applier parses it again and writes it to the store. Answering never
waits on the store's write lock, and a 200 is never lost (DESIGN.md invariant 8).
"""

from __future__ import annotations

import base64
import binascii
import gzip
import hmac
import json
import logging
import os
import sqlite3
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

from starlette.types import Receive, Scope, Send

from smsops import ingress, phones, store

__all__ = [
    "MAX_BATCH_BYTES",
    "MAX_MESSAGE_BYTES",
    "Contact",
    "Endpoint",
    "Event",
    "Invalid",
    "Order",
    "Problem",
    "TooLarge",
    "parse",
    "write",
]

log = logging.getLogger("smsops.collect")

MAX_MESSAGE_BYTES = 32 * 1024
MAX_BATCH_BYTES = 500 * 1024
WRITE_KEY_ENV = "SMSOPS_SEGMENT_WRITE_KEY"

_CONTACT_TRAITS = {
    "phone": "phone", "first_name": "first_name", "firstName": "first_name", "last_name": "last_name",
    "lastName": "last_name", "email": "email", "city": "city", "birthday": "birthday", "gender": "gender",
}  # fmt: skip
_GENDER = {
    "m": "m", "male": "m", "man": "m", "м": "m", "муж": "m", "мужской": "m",
    "f": "f", "female": "f", "woman": "f", "ж": "f", "жен": "f", "женский": "f",
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class Problem:
    """Why message ``index`` of a batch was refused: the field and a short reason."""

    index: int
    field: str
    reason: str


class Invalid(ValueError):
    """A batch refused for its messages' problems (answered 400, nothing written)."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        super().__init__("; ".join(f"message {p.index}: {p.field}: {p.reason}" for p in problems))
        self.problems = list(problems)


class TooLarge(ValueError):
    """A batch or one of its messages over Segment's limits (answered 413)."""


@dataclass(frozen=True, slots=True)
class Contact:
    """An ``identify``: the contact with CRM id ``external_id``, the fields it gave."""

    message_id: str
    external_id: str
    at: str
    phone: phones.PhoneNumber | None = None
    first_name: str | None = None
    last_name: str | None = None
    email: str | None = None
    city: str | None = None
    birth_date: str | None = None
    gender: str | None = None
    attributes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Event:
    """A ``track``: ``event_type`` done by the contact ``external_id`` at ``at``."""

    message_id: str
    external_id: str
    event_type: str
    at: str
    properties: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Order:
    """An ``Order Completed``: a paid order."""

    message_id: str
    order_id: str
    external_id: str
    at: str
    amount: float
    currency: str
    category: str | None = None


Row = Contact | Event | Order


def _stamp(when: datetime) -> str:
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.astimezone(UTC).replace(tzinfo=None).isoformat(sep=" ", timespec="seconds")


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise TypeError("not a string")
    text = str(value).strip()
    return text or None


def parse(body: bytes, *, kind: str = "batch", now: datetime | None = None) -> list[Row]:
    """The store rows of one request's JSON ``body`` (``kind``: batch, identify or track).
    Raises :class:`TooLarge` or :class:`Invalid`; messages of other types (page, screen, group,
    alias) are accepted and not kept."""
    if len(body) > MAX_BATCH_BYTES:
        raise TooLarge(f"a body of {len(body)} bytes is over the {MAX_BATCH_BYTES} limit")
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise Invalid([Problem(-1, "", f"the body is not JSON: {exc}")]) from None
    if not isinstance(document, dict):
        raise Invalid([Problem(-1, "", "the body is not a JSON object")])
    if kind == "batch":
        messages = document.get("batch")
        if not isinstance(messages, list):
            raise Invalid([Problem(-1, "batch", "missing or not a list")])
    else:
        messages = [{"type": kind, **document}]
    received = _stamp(now or datetime.now(UTC))
    rows: list[Row] = []
    problems: list[Problem] = []
    seen: set[str] = set()
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            problems.append(Problem(index, "", "not a JSON object"))
            continue
        size = len(json.dumps(message, ensure_ascii=False).encode("utf-8"))
        if size > MAX_MESSAGE_BYTES:
            raise TooLarge(f"message {index} is {size} bytes, over the {MAX_MESSAGE_BYTES} limit")
        message_id = message.get("messageId")
        if isinstance(message_id, str) and message_id in seen:
            continue  # a repeat inside the batch changes nothing, as a repeat across batches
        if isinstance(message_id, str):
            seen.add(message_id)
        found: list[Problem] = []
        rows.extend(_message(index, message, received, found))
        problems.extend(found)
    if problems:
        raise Invalid(problems)
    return rows


def _message(index: int, message: dict[str, Any], received: str, problems: list[Problem]) -> list[Row]:
    def problem(name: str, reason: str) -> None:
        problems.append(Problem(index, name, reason))

    kind = message.get("type")
    if kind not in ("identify", "track"):
        if kind not in ("page", "screen", "group", "alias"):
            problem("type", f"unknown message type {str(kind)[:40]!r}")
        return []
    message_id = message.get("messageId")
    if not isinstance(message_id, str) or not message_id.strip():
        problem("messageId", "missing: it is the idempotency key")
    user_id = message.get("userId")
    try:
        user = _text(user_id)
    except TypeError:
        user = None
    if user is None:
        problem("userId", "missing: smsops keeps only identified people (anonymousId is not enough)")
    at = received
    if message.get("timestamp") is not None:
        try:
            at = _stamp(datetime.fromisoformat(str(message["timestamp"]).replace("Z", "+00:00")))
        except ValueError:
            problem("timestamp", "not an ISO 8601 date and time")
    if problems:
        return []
    assert isinstance(message_id, str) and user is not None
    if kind == "identify":
        return _identify(message_id, user, at, message.get("traits") or {}, problem)
    return _track(message_id, user, at, message, problem)


def _identify(message_id: str, user: str, at: str, traits: Any, problem: Any) -> list[Row]:
    if not isinstance(traits, dict):
        problem("traits", "not a JSON object")
        return []
    fields: dict[str, Any] = {}
    attributes: dict[str, Any] = {}
    for name, value in traits.items():
        target = _CONTACT_TRAITS.get(name)
        if target is None:
            if value is not None:
                attributes[name] = value
            continue
        try:
            text = _text(value)
        except TypeError:
            problem(f"traits.{name}", "not a string")
            continue
        if text is None:
            continue
        if target == "phone":
            fields["phone"] = phones.normalize(text)
        elif target == "birthday":
            try:
                fields["birth_date"] = date.fromisoformat(text[:10]).isoformat()
            except ValueError:
                problem(f"traits.{name}", "not an ISO 8601 date")
        elif target == "gender":
            gender = _GENDER.get(text.lower())
            if gender is None:
                attributes[name] = text  # kept as given, not guessed
            fields["gender"] = gender
        elif target == "email":
            fields["email"] = text.lower()
        else:
            fields[target] = text
    return [Contact(message_id, user, at, attributes=attributes, **fields)]


def _track(message_id: str, user: str, at: str, message: dict[str, Any], problem: Any) -> list[Row]:
    try:
        name = _text(message.get("event"))
    except TypeError:
        name = None
    properties = message.get("properties") or {}
    if name is None:
        problem("event", "missing")
    if not isinstance(properties, dict):
        problem("properties", "not a JSON object")
        return []
    if name is None:
        return []
    rows: list[Row] = [Event(message_id, user, name, at, properties)]
    if name == "Order Completed":
        order_id = properties.get("order_id")
        amount = properties.get("total", properties.get("revenue"))
        currency = properties.get("currency") or "RUB"
        if not isinstance(order_id, str | int) or isinstance(order_id, bool) or not str(order_id).strip():
            problem("properties.order_id", "missing")
        if not isinstance(amount, int | float) or isinstance(amount, bool) or amount < 0:
            problem("properties.total", "missing or not a non-negative number (total or revenue)")
        if not isinstance(currency, str) or len(currency.strip()) != 3:
            problem("properties.currency", "not a three-letter currency code")
        products = properties.get("products")
        category = None
        if isinstance(products, list):
            categories = [p.get("category") for p in products if isinstance(p, dict) and p.get("category")]
            category = str(categories[0]) if categories else None
        if isinstance(order_id, str | int) and isinstance(amount, int | float) and isinstance(currency, str):
            rows.append(
                Order(message_id, str(order_id).strip(), user, at, float(amount), currency.upper(), category)
            )
    return rows


# ---------------------------------------------------------------------------------------
# The store

_SEEN_TABLE = """
    create table if not exists segment_messages (
        message_id   text primary key,
        received_at  text not null
    ) strict
"""


def _contact_id(conn: sqlite3.Connection, external_id: str, now: str) -> int:
    row = conn.execute("select contact_id from contacts where external_id = ?", (external_id,)).fetchone()
    if row is not None:
        return row[0]
    cur = conn.execute(
        "insert into contacts (external_id, phone_reason, created_at, updated_at) values (?, 'empty', ?, ?)",
        (external_id, now, now),
    )
    return int(cur.lastrowid)  # type: ignore[arg-type]


def _upsert_contact(conn: sqlite3.Connection, c: Contact, now: str) -> None:
    contact_id = _contact_id(conn, c.external_id, now)
    p = c.phone
    phone = (
        (p.raw, p.e164, int(p.valid), p.reason, p.number_type, p.country, ",".join(p.time_zones) or None)
        if p is not None
        else (None,) * 7
    )
    attributes = json.dumps(c.attributes, ensure_ascii=False, sort_keys=True) if c.attributes else None
    conn.execute(
        """
        update contacts set
            first_name = coalesce(?, first_name), last_name = coalesce(?, last_name),
            email = coalesce(?, email), city = coalesce(?, city), birth_date = coalesce(?, birth_date),
            gender = coalesce(?, gender),
            phone_raw = case when ? then ? else phone_raw end,
            phone_e164 = case when ? then ? else phone_e164 end,
            phone_valid = case when ? then ? else phone_valid end,
            phone_reason = case when ? then ? else phone_reason end,
            number_type = case when ? then ? else number_type end,
            phone_country = case when ? then ? else phone_country end,
            phone_time_zones = case when ? then ? else phone_time_zones end,
            attributes = case when ? is null then attributes
                              else json_patch(coalesce(attributes, '{}'), ?) end,
            updated_at = ?
        where contact_id = ?
        """,
        (
            c.first_name, c.last_name, c.email, c.city, c.birth_date, c.gender,
            *[v for value in phone for v in (p is not None, value)],
            attributes, attributes, now, contact_id,
        ),
    )  # fmt: skip


def write(conn: sqlite3.Connection, rows: Sequence[Row], *, now: datetime | None = None) -> int:
    """Write ``rows`` in one transaction; a message already written (by ``messageId``) is
    skipped. Returns the number of messages written."""
    stamp = _stamp(now or datetime.now(UTC))
    written: set[str] = set()
    skipped: set[str] = set()
    with store.transaction(conn):
        conn.execute(_SEEN_TABLE)
        for row in rows:
            if row.message_id in skipped:
                continue
            if row.message_id not in written:
                cur = conn.execute(
                    "insert into segment_messages (message_id, received_at) values (?, ?)"
                    " on conflict do nothing",
                    (row.message_id, stamp),
                )
                if cur.rowcount == 0:
                    skipped.add(row.message_id)
                    continue
                written.add(row.message_id)
            if isinstance(row, Contact):
                _upsert_contact(conn, row, stamp)
            elif isinstance(row, Event):
                conn.execute(
                    "insert into customer_events (event_key, contact_id, event_type, occurred_at, properties)"
                    " values (?, ?, ?, ?, ?) on conflict (event_key) do nothing",
                    (
                        f"segment:{row.message_id}",
                        _contact_id(conn, row.external_id, stamp),
                        row.event_type,
                        row.at,
                        json.dumps(row.properties, ensure_ascii=False, sort_keys=True)
                        if row.properties
                        else None,
                    ),
                )
            else:
                conn.execute(
                    "insert into orders (external_id, contact_id, ordered_at, amount, currency, category, status)"
                    " values (?, ?, ?, ?, ?, ?, 'paid') on conflict (external_id) do nothing",
                    (
                        row.order_id, _contact_id(conn, row.external_id, stamp), row.at, row.amount,
                        row.currency, row.category,
                    ),
                )  # fmt: skip
    return len(written)


# ---------------------------------------------------------------------------------------
# The route


def write_key_from_env() -> str | None:
    """The configured write key, or None: the endpoint is off."""
    return os.environ.get(WRITE_KEY_ENV) or None


def _key_of(headers: dict[str, str]) -> str | None:
    value = headers.get("authorization", "")
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, _, _ = base64.b64decode(token.strip(), validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return user


async def _json_answer(send: Send, status: int, document: dict[str, Any]) -> None:
    body = json.dumps(document, ensure_ascii=False).encode("utf-8")
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _read_body(receive: Receive, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ConnectionError("the client went away")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"a body of more than {limit} bytes is over the limit")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


class Endpoint:
    """``POST /segment/v1/{batch,identify,track}``, journaled into ``journal``."""

    KINDS = ("batch", "identify", "track")

    def __init__(self, write_key: str, journal: ingress.Journal) -> None:
        self.write_key = write_key
        self.journal = journal

    async def __call__(self, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        kind = path.removeprefix("/segment/v1/")
        if scope["method"] != "POST" or kind not in self.KINDS:
            await _json_answer(send, 404, {"code": "not_found", "message": "no such route"})
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        key = _key_of(headers)
        if key is None or not hmac.compare_digest(key.encode(), self.write_key.encode()):
            await _json_answer(send, 401, {"code": "unauthorized", "message": "wrong or missing write key"})
            return
        try:
            declared = headers.get("content-length", "")
            if declared.isdigit() and int(declared) > MAX_BATCH_BYTES:
                raise TooLarge(f"a body of {declared} bytes is over the {MAX_BATCH_BYTES} limit")
            body = await _read_body(receive, MAX_BATCH_BYTES)
            if headers.get("content-encoding", "").lower() == "gzip":
                try:
                    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
                    body = inflater.decompress(body, MAX_BATCH_BYTES + 1)
                except (zlib.error, gzip.BadGzipFile) as exc:
                    raise Invalid([Problem(-1, "", f"the body is not gzip: {exc}")]) from None
            received = datetime.now(UTC)
            parse(body, kind=kind, now=received)
            try:
                text = body.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise Invalid([Problem(-1, "", f"the body is not UTF-8: {exc}")]) from None
        except TooLarge as exc:
            await _json_answer(send, 413, {"code": "too_large", "message": str(exc)})
            return
        except Invalid as exc:
            errors = [{"index": p.index, "field": p.field, "reason": p.reason} for p in exc.problems]
            await _json_answer(send, 400, {"code": "invalid", "message": str(exc), "errors": errors})
            return
        except ConnectionError:
            return
        payload = {"kind": kind, "body": text, "received_at": received.isoformat()}
        try:
            await self.journal.append([ingress.Entry("segment", payload)])
        except Exception as exc:  # nothing answered 2xx: the client library sends it again
            log.error("POST %s could not be journaled: %s", path, exc)
            await _json_answer(send, 503, {"code": "unavailable", "message": "could not store it; try again"})
            return
        await _json_answer(send, 200, {"success": True})
