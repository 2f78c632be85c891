"""A lean HTTP/1.1 transport for httpx: the dispatcher's many small requests, at a quarter the CPU.

httpx's own transport (httpcore over anyio, with h11) spends most of a send's CPU on layers a
provider request does not need: a request of a few hundred bytes and a JSON answer of about one
kilobyte, one at a time on a keep-alive connection. :class:`LeanTransport` is an
:class:`httpx.AsyncBaseTransport` that writes the request straight to an asyncio transport and
parses the answer with ``httptools`` (llhttp, the parser uvicorn uses). The adapters keep
httpx's API (``client.post``, ``httpx.Response``, its exceptions); only the transport changes.

What it keeps from httpcore, because the dispatcher's guarantees depend on it:

- **Never re-sends.** A request is written once. A connection that dies after the write raises
  :class:`httpx.RemoteProtocolError`, :class:`httpx.ReadError` or :class:`httpx.ReadTimeout`:
  the adapters record the fate as unknown and the dispatcher reconciles it (DESIGN.md
  invariant 1). Only a failure to *connect* (:class:`httpx.ConnectError`,
  :class:`httpx.ConnectTimeout`) means nothing left.
- **Keep-alive done right.** An idle connection is reused only while the server has not closed
  it (nor its socket become readable) and for at most ``keepalive_expiry`` seconds; an answer
  with ``Connection: close`` (or an HTTP/1.0 one) closes it; a connection whose answer timed
  out is closed, never reused (a late answer would be taken for the next request's).
- **Timeouts** from the request, as httpx sets them: ``connect``, ``pool``, and ``read`` for the
  whole answer. A request is handed to the socket in one write without waiting (provider
  requests are a few hundred bytes), so ``write`` has nothing to bound.
- **Answers as they are.** Informational ``1xx`` answers are skipped; bytes after the answer
  (a second answer to one request) make the connection unusable, never a different answer.
- **TLS** with the given :class:`ssl.SSLContext` and the host's name for SNI and verification.

:class:`LeanClient` is the :class:`httpx.AsyncClient` the dispatcher sends with: over a
:class:`LeanTransport`, and its ``send`` skips the client layers a provider call never uses
(cookie extraction, redirects, auth flows, event hooks), which cost more than the transport.

It holds at most ``max_connections`` connections per origin (a request beyond that waits for
one, up to the ``pool`` timeout). Requests it was not built for (``HEAD``, ``CONNECT``, a
streamed upload, an ``Upgrade``) go to httpx's own transport, made on first use.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import select
import ssl
import time
from collections import deque
from typing import Any

import httptools
import httpx

__all__ = ["LeanClient", "LeanTransport", "parsed_url"]

_DEFAULT_PORTS = {"http": 80, "https": 443}
_FALLBACK_METHODS = frozenset({"HEAD", "CONNECT"})


@functools.lru_cache(maxsize=256)
def parsed_url(text: str) -> httpx.URL:
    """``httpx.URL(text)``, parsed once: httpx re-parses a URL given as text on every request,
    a tenth of a send's client CPU. For the fixed endpoints adapters call again and again."""
    return httpx.URL(text)


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection: at most one request in flight, its answer parsed as it arrives.

    The answer is frozen (:attr:`answer`) the moment its last byte is parsed: informational
    ``1xx`` answers before it are skipped, and anything the server sends after it (a second
    answer in the same read, say) makes the connection unusable instead of changing it."""

    __slots__ = (
        "answer",
        "body",
        "closed",
        "headers",
        "headers_done",
        "idle_since",
        "keep_alive",
        "parser",
        "status",
        "timer",
        "transport",
        "until_close",
        "waiter",
    )

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[None] | None = None
        self.answer: tuple[int, list[tuple[bytes, bytes]], bytes] | None = None
        self.closed = False
        self.idle_since = 0.0
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.headers_done = False
        self.until_close = False  # no Content-Length, not chunked: the body ends with the connection
        self.keep_alive = False
        self.timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport subclass

    def data_received(self, data: bytes) -> None:
        if self.waiter is None or self.answer is not None:  # bytes nobody asked for: unusable
            self.abort()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.fail(httpx.RemoteProtocolError("the server switched protocols unasked"))
        except httptools.HttpParserError as exc:
            self.fail(httpx.RemoteProtocolError(f"malformed answer from the server: {exc}"))

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is None or self.waiter.done():
            return
        if self.headers_done and self.until_close and exc is None:
            self.complete()  # the body ran until the server closed, as announced
        elif isinstance(exc, OSError):
            self.fail(httpx.ReadError(f"the connection broke before the whole answer: {exc}"))
        else:
            self.fail(httpx.RemoteProtocolError("the server closed the connection without a full answer"))

    # -- httptools callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.answer is not None:  # a second answer to one request: never trust the connection
            self.abort()

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.headers_done = True
        self.status = self.parser.get_status_code()
        names = {name.lower() for name, _ in self.headers}
        self.until_close = (
            b"content-length" not in names
            and b"transfer-encoding" not in names
            and not (100 <= self.status < 200 or self.status in (204, 304))
        )

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        if self.answer is not None:
            return
        if 100 <= self.status < 200:  # informational (100 Continue, 103 Early Hints): the answer follows
            self.status, self.headers, self.body, self.headers_done = 0, [], [], False
            return
        self.keep_alive = self.parser.should_keep_alive()  # reset once the callback returns
        self.complete()

    # -- one exchange ----------------------------------------------------------------------

    def complete(self) -> None:
        self.answer = (self.status, self.headers, b"".join(self.body))
        self.headers, self.body = [], []
        self.cancel_timer()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def fail(self, exc: Exception) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)
        self.abort()

    def abort(self) -> None:
        self.closed = True
        self.cancel_timer()
        if self.transport is not None:
            self.transport.abort()

    def cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def timed_out(self) -> None:
        self.timer = None
        self.fail(httpx.ReadTimeout("no answer from the server in time"))

    def start(self, loop: asyncio.AbstractEventLoop, read_timeout: float | None) -> asyncio.Future[None]:
        self.status, self.headers, self.body, self.answer = 0, [], [], None
        self.headers_done = self.until_close = self.keep_alive = False
        self.waiter = loop.create_future()
        if read_timeout is not None:
            self.timer = loop.call_later(read_timeout, self.timed_out)
        return self.waiter

    def reusable(self) -> bool:
        """Whether this answer left the connection open for the next request."""
        return self.keep_alive and not self.closed and not self.until_close

    def stale(self) -> bool:
        """Whether the server closed (or wrote to) this idle connection in a way the event loop
        has not processed yet: its socket is readable (what httpcore checks too)."""
        if self.closed or self.transport is None or self.transport.is_closing():
            return True
        sock = self.transport.get_extra_info("socket")
        if sock is None:
            return False
        try:
            readable, _, _ = select.select([sock], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable)


class LeanTransport(httpx.AsyncBaseTransport):
    """HTTP/1.1 over asyncio with ``httptools``; see the module docstring."""

    def __init__(
        self,
        *,
        verify: ssl.SSLContext | None = None,
        max_connections: int = 1,
        keepalive_expiry: float = 4.0,
    ) -> None:
        if max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, got {max_connections}")
        self.ssl_context = verify
        self.max_connections = max_connections
        self.keepalive_expiry = keepalive_expiry
        self.idle: dict[tuple[str, str, int], deque[_Connection]] = {}
        self.slots: dict[tuple[str, str, int], asyncio.Semaphore] = {}
        self.fallback: httpx.AsyncHTTPTransport | None = None
        self.closing = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.closing:
            raise RuntimeError("the transport is closed")
        headers = request.headers
        if (
            request.method in _FALLBACK_METHODS
            or "upgrade" in headers
            or not isinstance(request.stream, httpx.ByteStream)
        ):
            return await self._fallback(request)
        url = request.url
        host = url.raw_host.decode("ascii")  # IDNA-encoded as in the Host header httpx wrote
        origin = (url.scheme, host, url.port or _DEFAULT_PORTS.get(url.scheme, 0))
        if origin[0] not in _DEFAULT_PORTS:
            raise httpx.UnsupportedProtocol(
                f"the URL {url} has no http:// or https:// scheme", request=request
            )
        timeouts = request.extensions.get("timeout", {})
        slots = self.slots.get(origin)
        if slots is None:
            slots = self.slots[origin] = asyncio.Semaphore(self.max_connections)
        if slots.locked():
            try:
                async with asyncio.timeout(timeouts.get("pool")):
                    await slots.acquire()
            except TimeoutError:
                raise httpx.PoolTimeout("no connection came free in time", request=request) from None
        else:
            await slots.acquire()
        try:
            return await self._exchange(request, origin, timeouts)
        finally:
            slots.release()

    async def _exchange(
        self, request: httpx.Request, origin: tuple[str, str, int], timeouts: dict[str, float | None]
    ) -> httpx.Response:
        connection = self._idle_connection(origin)
        if connection is None:
            connection = await self._connect(request, origin, timeouts.get("connect"))
        loop = asyncio.get_running_loop()
        done = connection.start(loop, timeouts.get("read"))
        try:
            self._write(connection, request, await request.aread())
            try:
                await done
            except httpx.TransportError as exc:
                exc.request = request
                raise
            assert connection.answer is not None
            status, headers, body = connection.answer
            response = httpx.Response(
                status,
                headers=headers,
                stream=httpx.ByteStream(body),
                extensions={"http_version": b"HTTP/1.1"},
                request=request,
            )
        except BaseException:  # cancelled too: a late answer must never reach the next request
            connection.abort()
            raise
        if connection.reusable() and not self.closing:
            connection.idle_since = time.monotonic()
            connection.waiter = None
            self.idle.setdefault(origin, deque()).append(connection)
        elif connection.transport is not None:
            connection.closed = True
            connection.transport.close()
        return response

    def _idle_connection(self, origin: tuple[str, str, int]) -> _Connection | None:
        idle = self.idle.get(origin)
        if not idle:
            return None
        expiry = time.monotonic() - self.keepalive_expiry
        while idle:
            connection = idle.pop()
            if connection.idle_since >= expiry and not connection.stale():
                return connection
            connection.abort()  # closed by the server, or idle too long to trust
        return None

    async def _connect(
        self, request: httpx.Request, origin: tuple[str, str, int], timeout: float | None
    ) -> _Connection:
        scheme, host, port = origin
        context: ssl.SSLContext | None = None
        if scheme == "https":
            context = self.ssl_context or httpx.create_ssl_context()
            self.ssl_context = context
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                _, connection = await loop.create_connection(
                    _Connection, host, port, ssl=context, server_hostname=host if context else None
                )
        except TimeoutError:
            raise httpx.ConnectTimeout(f"connecting to {host}:{port} timed out", request=request) from None
        except (OSError, ssl.SSLError) as exc:
            raise httpx.ConnectError(f"cannot connect to {host}:{port}: {exc}", request=request) from None
        return connection

    @staticmethod
    def _write(connection: _Connection, request: httpx.Request, body: bytes) -> None:
        url = request.url
        target = url.raw_path or b"/"
        lines = [request.method.encode("ascii"), b" ", target, b" HTTP/1.1\r\n"]
        for name, value in request.headers.raw:
            lines += (name, b": ", value, b"\r\n")
        lines += (b"\r\n", body)
        transport = connection.transport
        if transport is None or transport.is_closing():
            # nothing was written, so this is as safe to retry as a refused connection
            raise httpx.ConnectError("the connection closed before the request was written", request=request)
        transport.write(b"".join(lines))

    async def _fallback(self, request: httpx.Request) -> httpx.Response:
        if self.fallback is None:
            self.fallback = httpx.AsyncHTTPTransport(verify=self.ssl_context or True)
        return await self.fallback.handle_async_request(request)

    async def aclose(self) -> None:
        self.closing = True
        for idle in self.idle.values():
            for connection in idle:
                connection.abort()
        self.idle.clear()
        if self.fallback is not None:
            with contextlib.suppress(Exception):
                await self.fallback.aclose()


class LeanClient(httpx.AsyncClient):
    """An :class:`httpx.AsyncClient` over a :class:`LeanTransport` with a short ``send``.

    Built without auth, event hooks, proxies from the environment or redirects, so a request
    needs none of those layers: ``send`` hands it straight to the transport and reads the body
    (cookies a server sets are not kept: provider APIs authenticate every request; nor is
    ``response.elapsed``). A request that asks for streaming, an auth (its own, the client's or
    in its URL), redirects, or meets an event hook gets httpx's full ``send``."""

    def __init__(
        self,
        *,
        verify: ssl.SSLContext | None = None,
        timeout: httpx.Timeout | float = 15.0,
        max_connections: int = 1,
        keepalive_expiry: float = 4.0,
    ) -> None:
        self.lean = LeanTransport(
            verify=verify, max_connections=max_connections, keepalive_expiry=keepalive_expiry
        )
        super().__init__(transport=self.lean, timeout=timeout, trust_env=False, follow_redirects=False)

    async def send(
        self,
        request: httpx.Request,
        *,
        stream: bool = False,
        auth: Any = httpx.USE_CLIENT_DEFAULT,
        follow_redirects: Any = httpx.USE_CLIENT_DEFAULT,
    ) -> httpx.Response:
        if (
            stream
            or auth is not httpx.USE_CLIENT_DEFAULT
            or follow_redirects is True
            or (follow_redirects is httpx.USE_CLIENT_DEFAULT and self.follow_redirects)
            or self.auth is not None
            or request.url.userinfo
            or any(self.event_hooks.values())
        ):
            return await super().send(request, stream=stream, auth=auth, follow_redirects=follow_redirects)
        if self.is_closed:
            raise RuntimeError("Cannot send a request, as the client has been closed.")
        request.extensions.setdefault("timeout", self.timeout.as_dict())  # as httpx's send does
        response = await self.lean.handle_async_request(request)
        await response.aread()
        return response
