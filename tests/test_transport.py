"""The dispatcher's HTTP transport (smsops.providers.transport) against real servers on loopback.

Each test starts a small asyncio server on 127.0.0.1 that behaves the way a provider or a network
can: keep-alive, ``Connection: close``, chunked and gzip bodies, an answer that never comes, a
connection cut after the request, an idle connection the server dropped, TLS. What matters most
is invariant 1: a request that may have left is never written a second time.
"""

from __future__ import annotations

import asyncio
import gzip
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable

import httpx
import pytest
import trustme
import uvloop

from smsops.providers import SANDBOX_ACCOUNT_SID, SendRequest, from_config
from smsops.providers.transport import LeanClient, LeanTransport

Handler = Callable[["Server", asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Server:
    """An HTTP/1.1 server on a free loopback port whose behaviour a test writes as a handler.

    ``connections`` counts accepted connections and ``requests`` keeps each request's first
    line and body, in order of arrival."""

    def __init__(self, handler: Handler, ssl_context: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        self.ssl_context = ssl_context
        self.connections = 0
        self.requests: list[tuple[str, bytes]] = []
        self.server: asyncio.Server | None = None
        self.handlers: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Server:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.ssl_context)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for task in self.handlers:
            task.cancel()
        await asyncio.gather(*self.handlers, return_exceptions=True)

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.sockets[0].getsockname()[1]

    def url(self, path: str = "/", host: str = "127.0.0.1", scheme: str = "http") -> str:
        return f"{scheme}://{host}:{self.port}{path}"

    async def read_request(self, reader: asyncio.StreamReader) -> tuple[str, dict[str, str], bytes] | None:
        head = await reader.readuntil(b"\r\n\r\n") if not reader.at_eof() else b""
        if not head:
            return None
        line, *fields = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (f.partition(":") for f in fields if f)}
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        self.requests.append((line, body))
        return line, headers, body

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        try:
            await self.handler(self, reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
            self.handlers.discard(task)


def answer(status: int = 200, body: bytes = b'{"ok": true}', *headers: str) -> bytes:
    head = [f"HTTP/1.1 {status} X", f"Content-Length: {len(body)}", "Content-Type: application/json"]
    return ("\r\n".join([*head, *headers]) + "\r\n\r\n").encode() + body


async def echo(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers every request on the connection with its own body, keeping the connection open."""
    while (request := await server.read_request(reader)) is not None:
        writer.write(answer(201, request[2]))
        await writer.drain()


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request):
    """Runs a coroutine on a fresh loop of each kind the dispatcher may run on (it prefers uvloop,
    whose transports are not asyncio's classes)."""
    factory = uvloop.new_event_loop if request.param == "uvloop" else asyncio.new_event_loop

    def run(coro):
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(coro)

    return run


async def slow_first(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echoes each request's body, the first one only after 0.3 s."""
    while (request := await server.read_request(reader)) is not None:
        if len(server.requests) == 1:
            await asyncio.sleep(0.3)
        writer.write(answer(200, request[2]))
        await writer.drain()


def client(**options) -> httpx.AsyncClient:
    """The dispatcher's client: a LeanClient, whose short send goes straight to the transport."""
    return LeanClient(**options)


def test_keep_alive_carries_many_requests_over_one_connection(run):
    async def main():
        async with Server(echo) as server, client() as http:
            answers = [
                await http.post(server.url("/m"), data={"n": str(i), "t": "Привет"}) for i in range(20)
            ]
            return server, answers

    server, answers = run(main())
    assert server.connections == 1
    assert [a.status_code for a in answers] == [201] * 20
    assert [a.text for a in answers] == [f"n={i}&t=%D0%9F%D1%80%D0%B8%D0%B2%D0%B5%D1%82" for i in range(20)]
    assert answers[0].headers["content-type"] == "application/json"
    assert [line for line, _ in server.requests] == ["POST /m HTTP/1.1"] * 20


def test_query_strings_and_gets_reach_the_server_unchanged(run):
    async def main():
        async with Server(echo) as server, client() as http:
            await http.get(server.url("/Messages.json"), params={"To": "+79123456701", "PageSize": "20"})
            return server

    server = run(main())
    assert server.requests == [("GET /Messages.json?To=%2B79123456701&PageSize=20 HTTP/1.1", b"")]


def test_an_answer_with_connection_close_is_not_reused(run):
    async def closing(server, reader, writer):
        await server.read_request(reader)
        writer.write(answer(200, b"{}", "Connection: close"))
        await writer.drain()

    async def main():
        async with Server(closing) as server, client() as http:
            codes = [(await http.get(server.url())).status_code for _ in range(3)]
            return server, codes

    server, codes = run(main())
    assert codes == [200, 200, 200] and server.connections == 3


def test_chunked_gzip_and_read_until_close_bodies_are_read_whole(run):
    payload = b'{"sid": "SM1", "status": "queued"}' * 50

    async def varied(server, reader, writer):
        await server.read_request(reader)
        kind = server.requests[-1][0].split()[1]
        if kind == "/chunked":
            chunks = [payload[:100], payload[100:]]
            body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
            for piece in (body[:7], body[7:150], body[150:]):  # split across reads
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(0.01)
        elif kind == "/gzip":
            writer.write(answer(200, gzip.compress(payload), "Content-Encoding: gzip", "Connection: close"))
        else:  # HTTP/1.0 style: no length, the body ends with the connection
            writer.write(b"HTTP/1.0 200 OK\r\n\r\n" + payload)
            await writer.drain()
            return
        await writer.drain()

    async def main():
        async with Server(varied) as server, client() as http:
            return [(await http.get(server.url(f"/{k}"))).content for k in ("chunked", "gzip", "eof")]

    assert run(main()) == [payload] * 3


def test_a_connection_cut_after_the_request_raises_and_the_request_is_never_written_again(run):
    async def cut(server, reader, writer):
        await server.read_request(reader)
        writer.transport.abort()  # the request arrived; no answer will

    async def main():
        async with Server(cut) as server, client() as http:
            with pytest.raises(httpx.RemoteProtocolError):
                await http.post(server.url(), data={"To": "+79123456701"})
            await asyncio.sleep(0.1)
            return server

    server = run(main())
    assert len(server.requests) == 1 and server.connections == 1


def test_the_twilio_adapter_calls_a_cut_connection_unknown_and_a_refused_one_transient(run):
    async def cut(server, reader, writer):
        await server.read_request(reader)
        writer.transport.abort()

    async def main():
        async with Server(cut) as server, client() as http:
            cut_result = await from_config("sandbox", {"SANDBOX_URL": server.url("")}).send(
                http, SendRequest(1, "+79123456701", "SHOPMARKET", "hi")
            )
            port = server.port
        async with client() as http:  # the server is gone: nothing listens on its port
            refused = await from_config("sandbox", {"SANDBOX_URL": f"http://127.0.0.1:{port}"}).send(
                http, SendRequest(2, "+79123456701", "SHOPMARKET", "hi")
            )
        return server, cut_result, refused

    server, cut_result, refused = run(main())
    assert cut_result.outcome == "unknown" and "RemoteProtocolError" in cut_result.error_message
    assert refused.outcome == "transient" and "ConnectError" in refused.error_message
    assert [line for line, _ in server.requests] == [
        f"POST /2010-04-01/Accounts/{SANDBOX_ACCOUNT_SID}/Messages.json HTTP/1.1"
    ]


def test_a_read_timeout_closes_the_connection_so_a_late_answer_never_reaches_the_next_request(run):
    async def main():
        async with Server(slow_first) as server, client(timeout=httpx.Timeout(5.0, read=0.1)) as http:
            with pytest.raises(httpx.ReadTimeout):
                await http.post(server.url(), content=b"first")
            second = await http.post(server.url(), content=b"second")
            return server, second

    server, second = run(main())
    assert second.content == b"second"
    assert server.connections == 2


def test_an_idle_connection_the_server_dropped_is_replaced_not_written_to(run):
    async def one_per_connection(server, reader, writer):
        await server.read_request(reader)
        writer.write(answer(200, b"{}"))  # keep-alive by the headers, then closed anyway
        await writer.drain()

    async def main():
        async with Server(one_per_connection) as server, client() as http:
            first = await http.get(server.url())
            await asyncio.sleep(0.1)  # the server's close reaches the client while idle
            second = await http.get(server.url())
            return server, first, second

    server, first, second = run(main())
    assert first.status_code == second.status_code == 200
    assert server.connections == 2 and len(server.requests) == 2


def test_a_connection_idle_past_the_keepalive_expiry_is_not_reused(run):
    async def main():
        async with Server(echo) as server:
            http = httpx.AsyncClient(transport=LeanTransport(keepalive_expiry=0.05))
            async with http:
                await http.get(server.url())
                await http.get(server.url())
                await asyncio.sleep(0.1)
                await http.get(server.url())
            return server

    assert run(main()).connections == 2


def test_requests_beyond_max_connections_wait_for_a_free_one_or_time_out(run):
    in_flight = 0
    most = 0

    async def slow(server, reader, writer):
        nonlocal in_flight, most
        while (request := await server.read_request(reader)) is not None:
            in_flight += 1
            most = max(most, in_flight)
            await asyncio.sleep(0.05)
            in_flight -= 1
            writer.write(answer(200, request[2]))
            await writer.drain()

    async def main():
        async with Server(slow) as server, client(max_connections=2) as http:
            bodies = await asyncio.gather(*(http.post(server.url(), content=b"%d" % i) for i in range(8)))
            with pytest.raises(httpx.PoolTimeout):
                await asyncio.gather(
                    *(http.get(server.url(), timeout=httpx.Timeout(5.0, pool=0.01)) for _ in range(3))
                )
            return server, [b.content for b in bodies]

    server, bodies = run(main())
    assert bodies == [b"%d" % i for i in range(8)]
    assert most == 2 and server.connections == 2


def test_a_refused_connection_is_a_connect_error(run):
    async def main():
        async with Server(echo) as server:
            port = server.port
        async with client() as http:
            await http.get(f"http://127.0.0.1:{port}/")

    with pytest.raises(httpx.ConnectError):
        run(main())


def test_a_malformed_answer_is_a_protocol_error(run):
    async def garbage(server, reader, writer):
        await server.read_request(reader)
        writer.write(b"SMTP ready\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.2)

    async def main():
        async with Server(garbage) as server, client() as http:
            await http.get(server.url())

    with pytest.raises(httpx.RemoteProtocolError):
        run(main())


@pytest.fixture(scope="module")
def authority() -> trustme.CA:
    return trustme.CA()


def _tls_server_context(authority: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("localhost", "127.0.0.1").configure_cert(context)
    return context


def test_tls_verifies_the_server_by_its_name(run, authority):
    trusted = ssl.create_default_context()
    authority.configure_trust(trusted)

    async def main():
        async with Server(echo, _tls_server_context(authority)) as server:
            transport = LeanTransport(verify=trusted)
            async with httpx.AsyncClient(transport=transport) as http:
                ok = await http.post(server.url("/tls", host="localhost", scheme="https"), content=b"secret")
                again = await http.post(server.url("/tls", host="localhost", scheme="https"), content=b"2")
            return server, ok, again

    server, ok, again = run(main())
    assert (ok.content, again.content) == (b"secret", b"2") and server.connections == 1


def test_tls_refuses_a_certificate_nobody_vouches_for(run, authority):
    async def main():
        async with (
            Server(echo, _tls_server_context(authority)) as server,
            LeanClient(verify=ssl.create_default_context()) as http,
        ):
            await http.get(server.url(host="localhost", scheme="https"))

    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        run(main())


def test_a_cancelled_request_leaves_no_connection_behind_to_be_reused(run):
    async def main():
        async with Server(slow_first) as server, client() as http:
            task = asyncio.create_task(http.post(server.url(), content=b"first"))
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            second = await http.post(server.url(), content=b"second")
            await asyncio.sleep(0.3)
            return server, second

    server, second = run(main())
    assert second.content == b"second" and server.connections == 2


def test_a_lean_client_with_an_auth_or_redirects_takes_httpxs_full_path_over_the_same_transport(run):
    async def redirecting(server, reader, writer):
        while (request := await server.read_request(reader)) is not None:
            line, headers, _ = request
            if line.startswith("GET /old"):
                writer.write(b"HTTP/1.1 307 Moved\r\nLocation: /new\r\nContent-Length: 0\r\n\r\n")
            else:
                writer.write(answer(200, headers.get("authorization", "-").encode()))
            await writer.drain()

    async def main():
        async with Server(redirecting) as server, client() as http:
            plain = await http.get(server.url("/old"))
            followed = await http.get(server.url("/old"), auth=("AC1", "token"), follow_redirects=True)
            return server, plain, followed

    server, plain, followed = run(main())
    assert plain.status_code == 307  # no redirects unless asked
    assert followed.status_code == 200 and followed.text == "Basic QUMxOnRva2Vu"
    assert server.connections == 1


def test_informational_answers_are_skipped_and_each_request_gets_its_own_answer(run):
    async def early_hints(server, reader, writer):
        while (request := await server.read_request(reader)) is not None:
            writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>\r\n\r\n")
            await writer.drain()
            await asyncio.sleep(0.02)
            writer.write(answer(201, request[2]))
            await writer.drain()

    async def main():
        async with Server(early_hints) as server, client() as http:
            first = await http.post(server.url(), content=b"message-1")
            second = await http.post(server.url(), content=b"message-2")
            return [(first.status_code, first.content), (second.status_code, second.content)]

    assert run(main()) == [(201, b"message-1"), (201, b"message-2")]


def test_a_second_answer_in_the_same_read_neither_changes_the_first_nor_reaches_the_next_request(run):
    async def doubled(server, reader, writer):
        while await server.read_request(reader) is not None:
            writer.write(answer(200, b"ok", "X-A: 1") + answer(500, b"late", "X-B: 2"))
            await writer.drain()

    async def main():
        async with Server(doubled) as server, client() as http:
            first = await http.get(server.url())
            await asyncio.sleep(0.05)
            second = await http.get(server.url())
            return server, first, second

    server, first, second = run(main())
    assert (first.status_code, first.content, "x-b" in first.headers) == (200, b"ok", False)
    assert (second.status_code, second.content) == (200, b"ok")
    assert server.connections == 2  # the connection that said too much was not reused


def test_a_body_that_ends_with_the_connection_is_an_error_when_the_connection_was_reset(run):
    async def reset(server, reader, writer):
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + b'{"sid": "SM1", "sta')
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.transport.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
        )
        writer.transport.abort()  # RST, not FIN: the body was cut

    async def main():
        async with Server(reset) as server, client() as http:
            await http.get(server.url())

    with pytest.raises(httpx.ReadError):
        run(main())


def test_sending_a_request_built_by_hand_still_honours_the_clients_timeout(run):
    async def silent(server, reader, writer):
        await server.read_request(reader)
        await asyncio.sleep(5)

    async def main():
        async with Server(silent) as server, client(timeout=0.2) as http:
            await asyncio.wait_for(http.send(httpx.Request("POST", server.url(), content=b"x")), 2.0)

    with pytest.raises(httpx.ReadTimeout):
        run(main())


def test_credentials_in_the_url_are_sent_as_basic_auth(run):
    async def main():
        async def echo_auth(server, reader, writer):
            _, headers, _ = await server.read_request(reader)
            writer.write(answer(200, headers.get("authorization", "-").encode()))
            await writer.drain()

        async with Server(echo_auth) as server, client() as http:
            return (await http.get(f"http://AC1:tok@127.0.0.1:{server.port}/")).text

    assert run(main()) == "Basic QUMxOnRvaw=="


def test_closing_the_client_mid_request_leaves_no_connection_open(run):
    async def slow(server, reader, writer):
        while (request := await server.read_request(reader)) is not None:
            await asyncio.sleep(0.1)
            writer.write(answer(200, request[2]))
            await writer.drain()

    async def main():
        async with Server(slow) as server:
            http = client()
            pending = asyncio.create_task(http.get(server.url()))
            await asyncio.sleep(0.02)
            await http.aclose()
            answered = await pending
            return answered.status_code, [len(idle) for idle in http.lean.idle.values()]

    assert run(main()) == (200, [])


def test_max_connections_must_be_positive():
    with pytest.raises(ValueError, match="max_connections"):
        LeanTransport(max_connections=0)
