"""What providers and recipients send back: status callbacks, replies and link clicks.

An ASGI application (``create_app``) whose routes check a request, write it to the ingress
journal (:mod:`smsops.ingress`) and answer: answering never waits on the operational store's
write lock, and the journal's applier moves what was answered into the store in batches,
exactly once (DESIGN.md invariant 8).

- ``POST /webhooks/{provider}/status``: a delivery receipt. Refused before its body is read
  when it declares more than :data:`MAX_BODY_BYTES` (413) or is not a form (415); the
  provider's signature is checked (forged or unsigned → 403 and a log line, nothing kept;
  malformed → 400). Stored once per message and status (a repeat is a no-op); the marts take
  the furthest status, so a late ``sent`` never undoes ``delivered``. A receipt that arrives
  before the dispatcher has recorded the provider's message id is kept as an orphan and
  attached when the id is recorded. A 200 means journaled.
- ``POST /webhooks/{provider}/inbound``: a reply, checked the same way, journaled with its
  keyword (the dispatcher's opt-out gate reads a journaled STOP before it is applied, so it
  stops every send that starts after the 200), applied with ``smsops.consent.handle_inbound``,
  and answered with the provider's auto-reply when there is one.
- ``GET``/``HEAD /l/{token}``: a tracked link. The click is journaled (time, user agent, and
  ``HEAD`` marked as such: link previews and scanners probe with it) and the browser redirected
  (302) to the address stored for that token, never one taken from the request: no open
  redirect. Unknown tokens get 404. The address is read on a worker thread (and cached), so a
  redirect never waits for the store's writer.
- ``POST /segment/v1/{batch,identify,track}``: contacts, events and orders in the Segment spec,
  when ``SMSOPS_SEGMENT_WRITE_KEY`` is set (:mod:`smsops.collect`; 404 otherwise).
- ``GET /healthz``.

No route does SQLite work on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import sqlite3
import threading
from collections.abc import AsyncIterator, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote_plus
from xml.sax.saxutils import escape

from starlette.applications import Starlette
from starlette.datastructures import URL
from starlette.types import Receive, Scope, Send

from smsops import collect, consent, ingress, phones, store
from smsops.providers import (
    CallbackError,
    InboundMessage,
    InvalidSignature,
    MalformedCallback,
    Provider,
    StatusUpdate,
)

log = logging.getLogger("smsops.webhooks")

# Provider statuses outside the store's vocabulary, mapped onto it.
_STORED_STATUS = {"scheduled": "accepted", "read": "delivered", "canceled": "failed"}
_TOKEN = re.compile(r"[A-Za-z0-9_-]{6,64}")
MAX_BODY_BYTES = 64 * 1024


def _stamp(when: datetime) -> str:
    return when.astimezone(UTC).replace(tzinfo=None).isoformat(sep=" ", timespec="seconds")


_STATUS_SQL = """
    insert into message_status_events (message_id, provider, provider_message_id, status, error_code,
                                       occurred_at, received_at)
    select m.message_id, m.provider, m.provider_message_id, json_extract(j.value, '$[2]'),
           json_extract(j.value, '$[3]'), json_extract(j.value, '$[4]'), ?
    from json_each(?) as j
    join messages as m on m.provider = json_extract(j.value, '$[0]')
                      and m.provider_message_id = json_extract(j.value, '$[1]')
    where true
    on conflict (message_id, status) do nothing
"""
_ORPHAN_SQL = """
    insert into orphan_status_events (provider, provider_message_id, status, error_code, occurred_at,
                                      received_at)
    select json_extract(j.value, '$[0]'), json_extract(j.value, '$[1]'), json_extract(j.value, '$[2]'),
           json_extract(j.value, '$[3]'), json_extract(j.value, '$[4]'), ?
    from json_each(?) as j
    where not exists (
        select 1 from messages as m
        where m.provider = json_extract(j.value, '$[0]') and m.provider_message_id = json_extract(j.value, '$[1]')
    )
    on conflict (provider, provider_message_id, status) do nothing
"""


def record_status(conn: sqlite3.Connection, updates: list[StatusUpdate]) -> tuple[int, int]:
    """Store receipts in one transaction: ``(stored, orphaned)``, each a count of rows written
    (a receipt already stored is a no-op). A receipt for a provider id the outbox does not know
    yet is kept in ``orphan_status_events`` until :func:`adopt_orphans`. Two statements for the
    lot, the batch as one JSON text."""
    if not updates:
        return 0, 0
    received = _stamp(datetime.now(UTC))
    rows = []
    for update in updates:
        status = _STORED_STATUS.get(update.status, update.status)
        error = update.error_code if status != "failed" or update.status != "canceled" else "canceled"
        rows.append((update.provider, update.provider_message_id, status, error, _stamp(update.occurred_at)))
    batch = json.dumps(rows)
    with store.transaction(conn):
        before = conn.total_changes
        conn.execute(_STATUS_SQL, (received, batch))
        stored = conn.total_changes - before
        conn.execute(_ORPHAN_SQL, (received, batch))
        orphaned = conn.total_changes - before - stored
    return stored, orphaned


def adopt_orphans(conn: sqlite3.Connection) -> int:
    """Attach receipts that arrived before their message's provider id was recorded."""
    with store.transaction(conn):
        cur = conn.execute(
            """
            insert into message_status_events (message_id, provider, provider_message_id, status,
                                               error_code, occurred_at, received_at)
            select m.message_id, o.provider, o.provider_message_id, o.status, o.error_code,
                   o.occurred_at, o.received_at
            from orphan_status_events o
            join messages m on m.provider = o.provider and m.provider_message_id = o.provider_message_id
            where true
            on conflict (message_id, status) do nothing
            """
        )
        conn.execute(
            """
            delete from orphan_status_events where exists (
                select 1 from messages m
                where m.provider = orphan_status_events.provider
                  and m.provider_message_id = orphan_status_events.provider_message_id
            )
            """
        )
    return cur.rowcount


def _twiml(text: str | None) -> str:
    if not text:
        return '<?xml version="1.0" encoding="UTF-8"?><Response></Response>'
    return f'<?xml version="1.0" encoding="UTF-8"?><Response><Message>{escape(text)}</Message></Response>'


_FORM_TYPE = "application/x-www-form-urlencoded"
_WEBHOOK_PATH = re.compile(r"/webhooks/([^/]+)/(status|inbound)")
_CLICK_PATH = re.compile(r"/l/([^/]*)")
_TEXT = "text/plain; charset=utf-8"


class Refused(Exception):
    """A webhook request refused before anything was journaled: its status and a short reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def _form(body: bytes) -> list[tuple[str, str]]:
    if len(body) > MAX_BODY_BYTES:
        raise CallbackError(f"body of {len(body)} bytes is over the {MAX_BODY_BYTES} limit")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CallbackError(f"the body is not a form: {exc}") from None
    if not text:
        return []
    pairs = []
    for field in text.split("&"):  # parse_qsl's strict reading, without a call to unquote for
        name, equals, value = field.partition("=")  # every name and value (a receipt's have no
        if not equals:  # escapes but its URL: a tenth of the receiver's time went to unquote)
            raise CallbackError(f"the body is not a form: bad query field: {field[:40]!r}")
        if "%" in field or "+" in field:
            name, value = unquote_plus(name), unquote_plus(value)
        pairs.append((name, value))
    return pairs


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}


async def _read_form(scope: Scope, receive: Receive, headers: Mapping[str, str]) -> list[tuple[str, str]]:
    """The request's form, refused before its body is read when the declared size is over the
    limit (413) or it is not a form (415); a body that turns out longer is refused as it comes."""
    declared = headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise Refused(400, f"Content-Length {declared[:20]!r} is not a number")
        if int(declared) > MAX_BODY_BYTES:
            raise Refused(413, f"a body of {declared} bytes is over the {MAX_BODY_BYTES} limit")
    content_type = headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != _FORM_TYPE:
        raise Refused(415, f"content type {content_type[:60]!r} is not {_FORM_TYPE}")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise Refused(400, "the client went away before the body was complete")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise Refused(413, f"body of more than {MAX_BODY_BYTES} bytes is over the limit")
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    try:
        return _form(b"".join(chunks))
    except CallbackError as exc:
        raise Refused(400, str(exc)) from None


async def _answer(
    send: Send, status: int, content_type: str, text: str, extra: Iterable[tuple[bytes, bytes]] = ()
) -> None:
    body = text.encode("utf-8")
    headers = [(b"content-type", content_type.encode("latin-1")), (b"content-length", b"%d" % len(body))]
    headers += list(extra)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _Reader:
    """Short reads of the store on worker threads (WAL readers never wait for its writer): a
    tracked link's address, the ledger for a START's auto-reply. One connection per thread."""

    def __init__(self, path: os.PathLike[str] | str) -> None:
        self.path = path
        self._local = threading.local()
        self.links: dict[str, tuple[int, str]] = {}  # token → (message_id, url): links never change

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = store.connect(self.path)
            conn.execute("pragma query_only = on")
        return conn

    def link(self, token: str) -> tuple[int, str] | None:
        found = self.links.get(token)
        if found is None:
            row = (
                self._conn().execute("select message_id, url from links where token = ?", (token,)).fetchone()
            )
            if row is None:
                return None
            if len(self.links) > 100_000:
                self.links.clear()
            found = self.links[token] = (row[0], row[1])
        return found

    def auto_reply(self, sender: str, body: str, received: datetime) -> str | None:
        return consent.auto_reply(self._conn(), from_e164=sender, body=body, received_at=received)


class _WebhookApp:
    """The webhook ASGI app: the three hot routes answered directly (thousands of receipts a
    second during a campaign skip Starlette's request and response objects), the rest by
    Starlette."""

    def __init__(
        self,
        providers: Mapping[str, Provider],
        journal: ingress.Journal,
        reader: _Reader,
        public_url: str | None,
        fallback: Starlette,
        segment: collect.Endpoint | None = None,
    ) -> None:
        self.providers = providers
        self.segment = segment
        self.journal = journal
        self.reader = reader
        self.public_url = public_url.rstrip("/") if public_url else None
        self.fallback = fallback
        self.state = fallback.state

    def url_of(self, scope: Scope) -> str:
        url = URL(scope=scope)
        if self.public_url:
            return self.public_url + url.path + (f"?{url.query}" if url.query else "")
        return str(url)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            root = scope.get("root_path", "")
            if root and path.startswith(root):
                path = path[len(root) :]
            method = scope["method"]
            if method == "POST" and (match := _WEBHOOK_PATH.fullmatch(path)):
                await self.webhook(scope, receive, send, match.group(1), match.group(2))
                return
            if method in ("GET", "HEAD") and (match := _CLICK_PATH.fullmatch(path)):
                await self.click(scope, send, match.group(1), method)
                return
            if self.segment is not None and path.startswith("/segment/"):
                await self.segment(scope, receive, send, path)
                return
            if method in ("GET", "HEAD") and path == "/healthz":
                await _answer(send, 200, _TEXT, "ok")
                return
        await self.fallback(scope, receive, send)

    async def webhook(self, scope: Scope, receive: Receive, send: Send, name: str, kind: str) -> None:
        provider = self.providers.get(name)
        if provider is None:
            await _answer(send, 404, _TEXT, "unknown provider")
            return
        headers = _headers(scope)
        try:
            form = await _read_form(scope, receive, headers)
            if kind == "status":
                updates = provider.parse_callback(self.url_of(scope), form, headers)
                entry = ingress.status_entry(provider.name, updates)
                reply = provider.callback_reply()
            else:
                message = provider.parse_inbound(self.url_of(scope), form, headers)
                entry, text = await self.inbound(message)
                reply = (200, "text/xml", _twiml(text))
        except (Refused, CallbackError) as exc:
            status = (
                exc.status if isinstance(exc, Refused) else 403 if isinstance(exc, InvalidSignature) else 400
            )
            log.warning("POST %s refused (%s): %s", scope["path"], status, exc)
            text = {403: "forbidden", 413: "too large", 415: "unsupported media type"}.get(
                status, "bad request"
            )
            await _answer(send, status, _TEXT, text)
            return
        try:
            await self.journal.append([entry])
        except Exception as exc:
            log.error("POST %s: could not be journaled: %s", scope["path"], exc)
            await _answer(send, 503, _TEXT, "could not store it; try again")
            return
        code, content_type, text = reply
        if content_type.startswith("text/") and "charset" not in content_type:
            content_type += "; charset=utf-8"
        await _answer(send, code, content_type, text)

    async def inbound(self, message: InboundMessage) -> tuple[ingress.Entry, str | None]:
        """A reply's journal entry and its auto-reply (raises CallbackError when it is refused)."""
        number = phones.normalize(message.from_)
        sender = number.e164 if number.e164 else message.from_
        try:
            text = await asyncio.to_thread(self.reader.auto_reply, sender, message.body, message.received_at)
        except consent.ConsentError as exc:
            raise MalformedCallback(str(exc)) from None
        payload = {
            "provider": message.provider,
            "provider_message_id": message.provider_message_id,
            "from": sender,
            "to": message.to,
            "body": message.body,
            "received_at": message.received_at.isoformat(),
        }
        keyword = consent.classify_reply(message.body)
        return ingress.Entry("inbound", payload, message.provider, sender, keyword), text

    async def click(self, scope: Scope, send: Send, token: str, method: str) -> None:
        """A tracked link: journal the click (HEAD too, marked: link previews and scanners probe
        with it) and redirect to the stored address, never one taken from the request."""
        found = None
        if _TOKEN.fullmatch(token):
            found = self.reader.links.get(token) or await asyncio.to_thread(self.reader.link, token)
        if found is None:
            await _answer(send, 404, _TEXT, "this link does not exist")
            return
        message_id, url = found
        agent = _headers(scope).get("user-agent", "")[:512] or None
        clicked = datetime.now(UTC).replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds")
        payload = {
            "token": token, "message_id": message_id, "clicked_at": clicked, "user_agent": agent,
            "method": method,
        }  # fmt: skip
        try:
            await self.journal.append([ingress.Entry("click", payload)])
        except Exception as exc:  # the person still gets where they were going
            log.error("a click on %s could not be journaled: %s", token, exc)
        location = [(b"location", url.encode("utf-8")), (b"cache-control", b"no-store")]
        await _answer(send, 302, _TEXT, "", location)


def create_app(
    providers: Mapping[str, Provider],
    *,
    home: str | os.PathLike[str] | None = None,
    public_url: str | None = None,
    apply: bool = True,
) -> _WebhookApp:
    """The webhook application for ``providers`` (by name), journaling under ``home``.

    ``public_url`` is the address providers call (e.g. ``https://sms.example.ru``): signatures
    are computed over it, so behind a proxy give the outside address, not the local one.
    ``apply``: run the applier that moves the journal into the store in this process (while the
    app's lifespan runs); several receivers may each run one.
    """
    path = store.store_path(home)
    store.open_store(home).close()
    journal = ingress.Journal(ingress.journal_path(home))
    ingress.connect(journal.path).close()  # made now: a dispatcher may watch it before any request
    ingress.connect_keywords(journal.path).close()
    applier = ingress.Applier(home, journal) if apply else None

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if applier is not None:
            applier.start()
        try:
            yield
        finally:
            await asyncio.to_thread(journal.close)
            if applier is not None:
                await asyncio.to_thread(applier.close)

    fallback = Starlette(routes=[], lifespan=lifespan)
    fallback.state.journal = journal
    fallback.state.applier = applier
    key = collect.write_key_from_env()
    segment = collect.Endpoint(key, journal) if key else None
    return _WebhookApp(providers, journal, _Reader(path), public_url, fallback, segment)


def describe(providers: Mapping[str, Any]) -> list[str]:
    """The URLs to configure at each provider (for the CLI and the docs)."""
    return [f"/webhooks/{name}/status and /webhooks/{name}/inbound" for name in providers]
