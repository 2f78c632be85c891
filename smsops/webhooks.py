"""What providers and recipients send back: status callbacks, replies and link clicks.

A Starlette application (``create_app``) with three kinds of routes, each writing to the
operational store so that the next build turns it into metrics:

- ``POST /webhooks/{provider}/status``: a delivery receipt. The provider's signature is
  checked first (forged or unsigned → 403 and a log line, nothing stored; malformed → 400).
  Receipts are stored once per message and status (a repeat is a no-op); the marts take the
  furthest status, so a late ``sent`` never undoes ``delivered``. A receipt that arrives
  before the dispatcher has recorded the provider's message id is kept as an orphan and
  attached when the id is recorded: nothing is lost. Receipts are written by one
  :class:`StatusWriter` per app: a long-lived connection in its own thread that commits the
  receipts of requests arriving together in one transaction (each request in a savepoint of its
  own), and a request is answered only once its receipts are committed: a 200 means stored.
- ``POST /webhooks/{provider}/inbound``: a reply. Stored, read for STOP/START/HELP with
  ``smsops.consent.record_inbound`` (an opt-out takes effect for every send after it), and
  answered with the provider's auto-reply when there is one.
- ``GET /l/{token}``: a tracked link. The click is recorded (time, user agent) and the browser
  redirected (302) to the address stored for that token, never one taken from the request:
  no open redirect. Unknown tokens get 404.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import re
import sqlite3
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl
from xml.sax.saxutils import escape

from starlette.applications import Starlette
from starlette.datastructures import URL
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from smsops import consent, phones, store
from smsops.providers import CallbackError, InvalidSignature, Provider, StatusUpdate

log = logging.getLogger("smsops.webhooks")

# Provider statuses outside the store's vocabulary, mapped onto it.
_STORED_STATUS = {"scheduled": "accepted", "read": "delivered", "canceled": "failed"}
_TOKEN = re.compile(r"[A-Za-z0-9_-]{6,64}")
MAX_BODY_BYTES = 64 * 1024


def _stamp(when: datetime) -> str:
    return when.astimezone(UTC).replace(tzinfo=None).isoformat(sep=" ", timespec="seconds")


def record_status(conn: sqlite3.Connection, updates: list[StatusUpdate]) -> tuple[int, int]:
    """Store receipts in one transaction: ``(stored, orphaned)``. A receipt for a provider id the
    outbox does not know yet is kept in ``orphan_status_events`` until :func:`adopt_orphans`."""
    stored = orphaned = 0
    received = _stamp(datetime.now(UTC))
    with store.transaction(conn):
        for update in updates:
            status = _STORED_STATUS.get(update.status, update.status)
            error = update.error_code if status != "failed" or update.status != "canceled" else "canceled"
            row = conn.execute(
                "select message_id from messages where provider = ? and provider_message_id = ?",
                (update.provider, update.provider_message_id),
            ).fetchone()
            if row is None:
                conn.execute(
                    "insert into orphan_status_events (provider, provider_message_id, status, error_code,"
                    " occurred_at, received_at) values (?, ?, ?, ?, ?, ?)"
                    " on conflict (provider, provider_message_id, status) do nothing",
                    (update.provider, update.provider_message_id, status, error,
                     _stamp(update.occurred_at), received),
                )  # fmt: skip
                orphaned += 1
                continue
            cur = conn.execute(
                "insert into message_status_events (message_id, provider, provider_message_id, status,"
                " error_code, occurred_at, received_at) values (?, ?, ?, ?, ?, ?, ?)"
                " on conflict (message_id, status) do nothing",
                (row[0], update.provider, update.provider_message_id, status, error,
                 _stamp(update.occurred_at), received),
            )  # fmt: skip
            stored += cur.rowcount
    return stored, orphaned


class StatusWriter:
    """Receipts written by one connection in a dedicated thread, with group commit.

    :meth:`write` hands a request's updates to the thread and waits until they are committed.
    The thread takes everything queued at that moment (up to ``max_batch`` requests), writes each
    request's updates in a savepoint of its own (a request that fails rolls back alone and gets
    its error; the others are kept) and commits them all at once: under load one commit (the
    costly part of a small SQLite transaction) serves many requests, and no request is answered
    before its receipts are in the store.
    """

    def __init__(self, path: str | os.PathLike[str], *, max_batch: int = 512) -> None:
        self.path = path
        self.max_batch = max_batch
        self._queue: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.commits = 0
        self.received = 0  # requests handed over, committed or not yet

    def _ensure_started(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="smsops-status-writer", daemon=True)
                self._thread.start()

    async def write(self, updates: list[StatusUpdate]) -> tuple[int, int]:
        """Store ``updates`` (as :func:`record_status`) and return once they are committed."""
        self._ensure_started()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[int, int]] = loop.create_future()
        self.received += 1
        self._queue.put((updates, future, loop))
        return await future

    def close(self, timeout: float = 10.0) -> None:
        """Finish what is queued, then stop the thread and close its connection."""
        thread = self._thread
        if thread is not None and thread.is_alive():
            self._queue.put(None)
            thread.join(timeout)
        self._thread = None

    def _run(self) -> None:
        conn: sqlite3.Connection | None = None
        try:
            while True:
                first = self._queue.get()
                if first is None:
                    return
                if conn is None:
                    try:
                        conn = store.connect(self.path)
                    except Exception as exc:  # answer the request (503), try again with the next
                        log.exception("could not open the store at %s for status callbacks", self.path)
                        self._answer([first], [exc])
                        continue
                batch = [first]
                stop = False
                while len(batch) < self.max_batch:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is None:
                        stop = True
                        break
                    batch.append(item)
                self._write_batch(conn, batch)
                if stop:
                    return
        finally:
            if conn is not None:
                conn.close()

    def _write_batch(self, conn: sqlite3.Connection, batch: list[tuple[Any, ...]]) -> None:
        results: list[tuple[int, int] | BaseException] = []
        try:
            with store.transaction(conn):
                for updates, _, _ in batch:
                    try:
                        results.append(record_status(conn, updates))  # a savepoint of its own
                    except Exception as exc:
                        results.append(exc)
            self.commits += 1
        except Exception as exc:  # the commit itself failed: nothing of the batch is stored
            log.exception("could not store %d status callbacks", len(batch))
            results = [exc] * len(batch)
        self._answer(batch, results)

    @staticmethod
    def _answer(batch: list[tuple[Any, ...]], results: list[Any]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], object]]] = {}
        for (_, future, loop), result in zip(batch, results, strict=True):
            by_loop.setdefault(loop, []).append((future, result))
        for loop, settled in by_loop.items():  # one wake-up of each event loop per batch
            with contextlib.suppress(RuntimeError):  # that server has stopped: nobody is waiting
                loop.call_soon_threadsafe(_settle, settled)


def _settle(settled: list[tuple[asyncio.Future[Any], object]]) -> None:
    for future, result in settled:
        if future.done():  # the client went away and its request was cancelled
            continue
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)


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


def follow_link(conn: sqlite3.Connection, token: str, user_agent: str | None) -> str | None:
    """Record a click on ``token`` and return where it leads; None for an unknown token."""
    if not _TOKEN.fullmatch(token or ""):
        return None
    row = conn.execute("select message_id, url from links where token = ?", (token,)).fetchone()
    if row is None:
        return None
    now = datetime.now(UTC).replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds")
    conn.execute(
        "insert into clicks (token, message_id, clicked_at, user_agent) values (?, ?, ?, ?)"
        " on conflict (token, clicked_at) do nothing",
        (token, row[0], now, (user_agent or "")[:512] or None),
    )
    return row[1]


def _twiml(text: str | None) -> str:
    if not text:
        return '<?xml version="1.0" encoding="UTF-8"?><Response></Response>'
    return f'<?xml version="1.0" encoding="UTF-8"?><Response><Message>{escape(text)}</Message></Response>'


_STATUS_PATH = re.compile(r"/webhooks/([^/]+)/status")


def _form(body: bytes) -> list[tuple[str, str]]:
    if len(body) > MAX_BODY_BYTES:
        raise CallbackError(f"body of {len(body)} bytes is over the {MAX_BODY_BYTES} limit")
    try:
        return parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=bool(body))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CallbackError(f"the body is not a form: {exc}") from None


async def _body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise CallbackError("the client went away before the body was complete")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise CallbackError(f"body of more than {MAX_BODY_BYTES} bytes is over the limit")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _answer(send: Send, status: int, content_type: str, text: str) -> None:
    body = text.encode("utf-8")
    headers = [(b"content-type", content_type.encode("latin-1")), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _WebhookApp(Starlette):
    """Starlette, with status callbacks answered before routing (see ``create_app``)."""

    def __init__(self, status: Callable[[Scope, Receive, Send, str], Awaitable[None]], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._status = status

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            path = scope["path"]
            root = scope.get("root_path", "")
            if root and path.startswith(root):
                path = path[len(root) :]
            match = _STATUS_PATH.fullmatch(path)
            if match:
                await self._status(scope, receive, send, match.group(1))
                return
        await super().__call__(scope, receive, send)


def create_app(
    providers: Mapping[str, Provider],
    *,
    home: str | os.PathLike[str] | None = None,
    public_url: str | None = None,
) -> Starlette:
    """The webhook application for ``providers`` (by name), writing to the store under ``home``.

    ``public_url`` is the address providers call (e.g. ``https://sms.example.ru``): signatures
    are computed over it, so behind a proxy give the outside address, not the local one.
    """
    path = store.store_path(home)
    store.open_store(home).close()
    writer = StatusWriter(path)

    def connection() -> sqlite3.Connection:
        return store.connect(path)

    def request_url(request: Request) -> str:
        if public_url:
            query = f"?{request.url.query}" if request.url.query else ""
            return public_url.rstrip("/") + request.url.path + query
        return str(request.url)

    async def form_of(request: Request) -> list[tuple[str, str]]:
        return _form(await request.body())

    def provider_of(request: Request) -> Provider | None:
        return providers.get(request.path_params["provider"])

    def refuse(request: Request, exc: Exception) -> Response:
        forged = isinstance(exc, InvalidSignature)
        log.warning(
            "%s %s refused (%s): %s", request.method, request.url.path, "403" if forged else "400", exc
        )
        return PlainTextResponse("forbidden" if forged else "bad request", status_code=403 if forged else 400)

    async def parsed(request: Request, kind: str) -> tuple[Provider, Any] | Response:
        """The provider named in the path and its authenticated, parsed ``kind`` of webhook,
        or the response that refuses the request."""
        provider = provider_of(request)
        if provider is None:
            return PlainTextResponse("unknown provider", status_code=404)
        parse = provider.parse_callback if kind == "status" else provider.parse_inbound
        try:
            return provider, parse(request_url(request), await form_of(request), dict(request.headers))
        except CallbackError as exc:
            return refuse(request, exc)

    async def status(scope: Scope, receive: Receive, send: Send, name: str) -> None:
        """``POST /webhooks/{provider}/status`` as plain ASGI: the busiest route (thousands of
        receipts a second during a campaign) skips Starlette's request and response objects."""
        provider = providers.get(name)
        if provider is None:
            await _answer(send, 404, "text/plain; charset=utf-8", "unknown provider")
            return
        try:
            body = await _body(receive)
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
            url = URL(scope=scope)
            if public_url:
                url = URL(public_url.rstrip("/") + url.path + (f"?{url.query}" if url.query else ""))
            updates = provider.parse_callback(str(url), _form(body), headers)
        except CallbackError as exc:
            forged = isinstance(exc, InvalidSignature)
            log.warning("POST %s refused (%s): %s", scope["path"], "403" if forged else "400", exc)
            await _answer(
                send,
                403 if forged else 400,
                "text/plain; charset=utf-8",
                "forbidden" if forged else "bad request",
            )
            return
        try:
            await writer.write(updates)
        except Exception as exc:
            log.error("POST %s: the receipts could not be stored: %s", scope["path"], exc)
            await _answer(send, 503, "text/plain; charset=utf-8", "could not store the receipt")
            return
        code, content_type, text = provider.callback_reply()
        if content_type.startswith("text/") and "charset" not in content_type:
            content_type += "; charset=utf-8"
        await _answer(send, code, content_type, text)

    async def inbound(request: Request) -> Response:
        got = await parsed(request, "inbound")
        if isinstance(got, Response):
            return got
        _, message = got
        number = phones.normalize(message.from_)
        sender = number.e164 if number.e164 else message.from_
        conn = connection()
        try:
            result = consent.record_inbound(
                conn,
                provider=message.provider,
                provider_message_id=message.provider_message_id,
                from_e164=sender,
                body=message.body,
                received_at=message.received_at,
                to_number=message.to,
            )
        except consent.ConsentError as exc:
            return refuse(request, exc)
        finally:
            conn.close()
        return Response(_twiml(result.reply_text), media_type="text/xml")

    async def click(request: Request) -> Response:
        conn = connection()
        try:
            target = follow_link(conn, request.path_params["token"], request.headers.get("user-agent"))
        finally:
            conn.close()
        if target is None:
            return PlainTextResponse("this link does not exist", status_code=404)
        return RedirectResponse(target, status_code=302)

    async def health(request: Request) -> Response:
        return PlainTextResponse("ok")

    routes = [  # POST /webhooks/{provider}/status: _WebhookApp, before routing
        Route("/webhooks/{provider}/inbound", inbound, methods=["POST"]),
        Route("/l/{token}", click, methods=["GET"]),
        Route("/healthz", health, methods=["GET"]),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await asyncio.to_thread(writer.close)

    app = _WebhookApp(status, routes=routes, lifespan=lifespan)
    app.state.status_writer = writer
    return app


def describe(providers: Mapping[str, Any]) -> list[str]:
    """The URLs to configure at each provider (for the CLI and the docs)."""
    return [f"/webhooks/{name}/status and /webhooks/{name}/inbound" for name in providers]
