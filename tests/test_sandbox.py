"""The sandbox provider: receipts, inbound replies, throttling, determinism and throughput,
over real HTTP on loopback, with a webhook receiver like the app's."""

from __future__ import annotations

import asyncio
import logging
import math
import re
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from urllib.parse import parse_qsl

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from smsops.providers import (
    InvalidSignature,
    MalformedCallback,
    Provider,
    SendRequest,
    SendResult,
    StatusUpdate,
    advances,
    from_config,
)
from smsops.providers.sandbox import SandboxSettings, ServerThread, run_in_thread, serve_in_thread
from smsops.providers.twilio import SIGNATURE_HEADER, request_signature

FAST = SandboxSettings(
    latency=(0.0, 0.0),
    transient_error_rate=0.0,
    duplicate_rate=0.0,
    out_of_order_rate=0.0,
    receipt_delay=(0.01, 0.05),
)
AUTH = (FAST.account_sid, FAST.auth_token)  # what the sandbox's own routes ask for, as its API does


def retrying(**changes) -> SandboxSettings:
    """FAST, retrying posts within tenths of a second (for 30 s unless ``changes`` say otherwise)."""
    return replace(FAST, **{"callback_retry": (0.05, 0.2), "callback_retry_for": 30.0, **changes})


def run(coro):
    return asyncio.run(coro)


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.01)


class Receiver:
    """The webhook side, as the app will run it: verify, parse, answer, keep."""

    def __init__(self, provider: Provider) -> None:
        self.provider = provider
        self.updates: list[StatusUpdate] = []
        self.inbound = []
        self.answers: list[int] = []
        self.clicks: list[tuple[str, str]] = []
        self.app = Starlette(
            routes=[
                Route("/status", self.status, methods=["POST"]),
                Route("/inbound", self.reply, methods=["POST"]),
                Route("/l/{token}", self.click, methods=["GET"]),
            ]
        )

    async def click(self, request: Request) -> Response:
        self.clicks.append((request.path_params["token"], request.headers.get("user-agent", "")))
        return Response(status_code=302, headers={"location": "https://shop.example.ru/"})

    async def handle(self, request: Request, parse: Callable, store: list) -> Response:
        form = parse_qsl((await request.body()).decode(), keep_blank_values=True)
        try:
            result = parse(str(request.url), form, request.headers)
        except InvalidSignature:
            self.answers.append(403)
            return Response(status_code=403)
        except MalformedCallback:
            self.answers.append(400)
            return Response(status_code=400)
        store.extend(result if isinstance(result, list) else [result])
        status, media_type, body = self.provider.callback_reply()
        self.answers.append(status)
        return Response(body, status_code=status, media_type=media_type)

    async def status(self, request: Request) -> Response:
        return await self.handle(request, self.provider.parse_callback, self.updates)

    async def reply(self, request: Request) -> Response:
        return await self.handle(request, self.provider.parse_inbound, self.inbound)


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, ServerThread]]:
    receiver = Receiver(from_config("sandbox", {}))
    with serve_in_thread(receiver.app) as server:
        yield receiver, server


async def send_all(provider: Provider, requests: list[SendRequest], concurrency: int = 1) -> list[SendResult]:
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=concurrency)) as client:

        async def one(request: SendRequest) -> SendResult:
            async with limit:
                return await provider.send(client, request)

        return list(await asyncio.gather(*(one(r) for r in requests)))


def statuses(updates: list[StatusUpdate], sid: str) -> list[tuple[str, str | None]]:
    return [(u.status, u.error_code) for u in updates if u.provider_message_id == sid]


def sandbox_health(sandbox: ServerThread) -> dict:
    return httpx.get(f"{sandbox.url}/sandbox/health").json()


def answering(status: int, app: ASGIApp, when: Callable[[], bool], hits: list[int]) -> ASGIApp:
    """``app``, but answering ``status`` (and nothing more) to every request while ``when()``;
    ``hits`` gets the status of every answer."""

    async def gated(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and when():
            hits.append(status)
            await Response(status_code=status)(scope, receive, send)
            return
        if scope["type"] == "http":
            hits.append(0)  # passed on
        await app(scope, receive, send)

    return gated


def slowed(seconds: float, app: ASGIApp) -> ASGIApp:
    """``app``, answering each request ``seconds`` late."""

    async def slow(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await asyncio.sleep(seconds)
        await app(scope, receive, send)

    return slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------
# Receipts


def test_receipts_arrive_signed_and_in_order_by_default(receiver):
    receiver, hook = receiver
    with run_in_thread(FAST) as sandbox:
        provider = from_config("sandbox", {"SANDBOX_URL": sandbox.url})
        callback = f"{hook.url}/status"
        requests = [
            SendRequest(i, to, "SHOPMARKET", "Заказ готов", callback)
            for i, to in enumerate(["+79123456701", "+79123456799", "+79123456798", "+79123456797"])
        ]
        ok, unreachable, unknown, filtered = run(send_all(provider, requests))
        wait_for(lambda: len(receiver.updates) >= 7)
        journal = httpx.get(f"{sandbox.url}/sandbox/messages", auth=AUTH).json()
    assert set(receiver.answers) == {200}
    assert statuses(receiver.updates, ok.provider_message_id) == [("sent", None), ("delivered", None)]
    assert statuses(receiver.updates, unreachable.provider_message_id) == [
        ("sent", None),
        ("undelivered", "30003"),
    ]
    assert statuses(receiver.updates, unknown.provider_message_id) == [("failed", "30005")]
    assert statuses(receiver.updates, filtered.provider_message_id) == [
        ("sent", None),
        ("undelivered", "30007"),
    ]
    assert all(u.provider == "sandbox" for u in receiver.updates)
    assert [r["http_status"] for m in journal for r in m["receipts"]] == [200] * 7


def test_receipts_can_arrive_out_of_order_and_twice_and_still_end_delivered(receiver):
    receiver, hook = receiver
    settings = SandboxSettings(
        latency=(0.0, 0.0),
        transient_error_rate=0.0,
        duplicate_rate=1.0,
        out_of_order_rate=1.0,
        receipt_delay=(0.01, 0.05),
    )
    with run_in_thread(settings) as sandbox:
        provider = from_config("sandbox", {"SANDBOX_URL": sandbox.url})
        (result,) = run(send_all(provider, [SendRequest(1, "+79123456701", "S", "hi", f"{hook.url}/status")]))
        wait_for(lambda: len(receiver.updates) >= 3)
    received = [u.status for u in receiver.updates]
    assert received[0] == "delivered"  # the final status overtook "sent"
    assert len(received) == 3 and len(set(received)) == 2  # and one of them came twice
    final = None
    for update in receiver.updates:
        if advances(final, update.status):
            final = update.status
    assert final == "delivered"
    assert result.outcome == "accepted"


def test_a_forged_callback_gets_403_and_a_malformed_one_400_and_neither_is_kept(receiver):
    receiver, hook = receiver
    url = f"{hook.url}/status"
    good = {"MessageSid": "SM" + "c" * 32, "MessageStatus": "delivered"}
    malformed = {"MessageSid": "SM" + "c" * 32, "SmsSid": "SM" + "c" * 32}
    unknown_status = {"MessageSid": "SM" + "c" * 32, "MessageStatus": "teleported"}
    token = SandboxSettings().auth_token
    with httpx.Client() as client:
        forged = client.post(
            url, data=good, headers={SIGNATURE_HEADER: request_signature("guess", url, good)}
        )
        unsigned = client.post(url, data=good)
        replayed = client.post(
            url,
            data={**good, "ErrorCode": "30003"},
            headers={SIGNATURE_HEADER: request_signature(token, url, good)},
        )
        bad = client.post(
            url, data=malformed, headers={SIGNATURE_HEADER: request_signature(token, url, malformed)}
        )
        odd = client.post(
            url,
            data=unknown_status,
            headers={SIGNATURE_HEADER: request_signature(token, url, unknown_status)},
        )
        genuine = client.post(url, data=good, headers={SIGNATURE_HEADER: request_signature(token, url, good)})
    assert [r.status_code for r in (forged, unsigned, replayed, bad, odd, genuine)] == [
        403,
        403,
        403,
        400,
        400,
        200,
    ]
    assert [(u.status, u.error_code) for u in receiver.updates] == [("delivered", None)]
    assert genuine.headers["content-type"].startswith("text/xml")


# ---------------------------------------------------------------------------------------
# Receipts delivered like a provider's: retried until taken, never dropped by the sandbox's client


@pytest.mark.parametrize("status", [503, 500, 429, 408])
def test_a_receiver_that_fails_for_its_first_second_still_gets_every_receipt(status):
    receiver = Receiver(from_config("sandbox", {}))
    recovers, hits = time.monotonic() + 1.0, []
    flaky = answering(status, receiver.app, lambda: time.monotonic() < recovers, hits)
    with serve_in_thread(flaky) as hook, run_in_thread(retrying()) as sandbox:
        provider = from_config("sandbox", {"SANDBOX_URL": sandbox.url})
        requests = [SendRequest(i, f"+7912345{i:03d}1", "S", "hi", f"{hook.url}/status") for i in range(20)]
        results = run(send_all(provider, requests, concurrency=10))
        wait_for(lambda: sandbox_health(sandbox)["receipts"]["delivered"] == 40, timeout=15)
        tally = sandbox_health(sandbox)["receipts"]
        journal = httpx.get(f"{sandbox.url}/sandbox/messages", auth=AUTH).json()
    for result in results:
        assert statuses(receiver.updates, result.provider_message_id) == [("sent", None), ("delivered", None)]
    assert (tally["posted"], tally["given_up"], tally["refused"], tally["pending"]) == (40, 0, 0, 0)
    assert tally["retried"] > 0 and hits.count(status) > 0
    receipts = [r for m in journal for r in m["receipts"]]
    assert all(r["delivered"] and r["outcome"] == "delivered" and r["http_status"] == 200 for r in receipts)
    retried = [r for r in receipts if len(r["attempts"]) > 1]
    assert retried and all(a["http_status"] == status for r in retried for a in r["attempts"][:-1])
    assert sum(len(r["attempts"]) - 1 for r in receipts) == tally["retried"]


def test_receipts_and_a_reply_posted_while_the_receiver_is_down_arrive_once_it_is_up():
    receiver = Receiver(from_config("sandbox", {}))
    port = free_port()
    hook = f"http://127.0.0.1:{port}"
    with run_in_thread(retrying(inbound_url=f"{hook}/inbound")) as sandbox:
        provider = from_config("sandbox", {"SANDBOX_URL": sandbox.url})
        requests = [SendRequest(i, f"+7912345{i:03d}1", "S", "hi", f"{hook}/status") for i in range(10)]
        results = run(send_all(provider, requests, concurrency=10))
        reply = httpx.post(
            f"{sandbox.url}/sandbox/inbound", data={"From": "+79123456701", "Body": "СТОП"}, auth=AUTH
        )
        time.sleep(0.8)  # the receiver is down: every attempt so far was refused a connection
        down = sandbox_health(sandbox)
        with serve_in_thread(receiver.app, port=port):
            wait_for(lambda: sandbox_health(sandbox)["receipts"]["delivered"] == 20, timeout=15)
            wait_for(lambda: sandbox_health(sandbox)["replies"]["delivered"] == 1, timeout=5)
        journal = httpx.get(f"{sandbox.url}/sandbox/messages", auth=AUTH).json()
    receipts_down = down["receipts"]  # each message's "delivered" waits for its "sent"
    assert (receipts_down["posted"], receipts_down["delivered"], receipts_down["pending"]) == (10, 0, 10)
    assert receipts_down["retried"] > 0
    assert reply.status_code == 202 and reply.json()["error"] == "ConnectError"
    assert [m.provider_message_id for m in receiver.inbound] == [reply.json()["sid"]]
    for result in results:
        assert statuses(receiver.updates, result.provider_message_id) == [("sent", None), ("delivered", None)]
    first_attempts = [r["attempts"][0] for m in journal for r in m["receipts"] if r["status"] == "sent"]
    assert {a.get("error") for a in first_attempts} == {"ConnectError"}


def test_a_receiver_slower_than_a_pool_timeout_still_gets_every_receipt():
    """200 receipts at once to a receiver that takes 6 s each: the old client (100 connections,
    5 s for everything, the pool wait included) dropped every one of them."""
    receiver = Receiver(from_config("sandbox", {}))
    settings = replace(FAST, receipt_delay=(0.0, 0.0))  # the default retry policy and client
    with serve_in_thread(slowed(6.0, receiver.app)) as hook, run_in_thread(settings) as sandbox:
        provider = from_config("sandbox", {"SANDBOX_URL": sandbox.url})
        requests = [  # …98: unknown handset, a single receipt ("failed") each
            SendRequest(i, f"+7912{i:05d}98", "S", "hi", f"{hook.url}/status") for i in range(200)
        ]
        results = run(send_all(provider, requests, concurrency=50))
        wait_for(lambda: len(receiver.updates) >= 200, timeout=20)
        wait_for(lambda: sandbox_health(sandbox)["receipts"]["delivered"] == 200)
        tally = sandbox_health(sandbox)["receipts"]
    assert sorted(u.provider_message_id for u in receiver.updates) == sorted(
        r.provider_message_id for r in results
    )
    assert {(u.status, u.error_code) for u in receiver.updates} == {("failed", "30005")}
    assert (tally["retried"], tally["given_up"], tally["pending"]) == (0, 0, 0)


def test_waiting_for_a_connection_is_only_a_wait():
    receiver = Receiver(from_config("sandbox", {}))
    settings = retrying(receipt_delay=(0.0, 0.0), callback_connections=1, callback_timeout=1.0)
    with serve_in_thread(slowed(0.25, receiver.app)) as hook, run_in_thread(settings) as sandbox:
        provider = from_config("sandbox", {"SANDBOX_URL": sandbox.url})
        requests = [SendRequest(i, f"+7912{i:05d}98", "S", "hi", f"{hook.url}/status") for i in range(8)]
        run(send_all(provider, requests, concurrency=8))
        wait_for(lambda: sandbox_health(sandbox)["receipts"]["delivered"] == 8, timeout=10)
        tally = sandbox_health(sandbox)["receipts"]
    assert len(receiver.updates) == 8  # one connection, 2 s in all: the last waited past the timeout
    assert (tally["retried"], tally["given_up"]) == (0, 0)


def test_a_receipt_the_receiver_refuses_with_400_is_recorded_and_not_retried():
    receiver = Receiver(from_config("sandbox", {}))
    hits: list[int] = []
    with (
        serve_in_thread(answering(400, receiver.app, lambda: True, hits)) as hook,
        run_in_thread(retrying()) as sandbox,
    ):
        provider = from_config("sandbox", {"SANDBOX_URL": sandbox.url})
        run(send_all(provider, [SendRequest(1, "+79123456701", "S", "hi", f"{hook.url}/status")]))
        wait_for(lambda: sandbox_health(sandbox)["receipts"]["refused"] == 2)
        time.sleep(0.5)  # several retry waits: none comes
        tally = sandbox_health(sandbox)["receipts"]
        (message,) = httpx.get(f"{sandbox.url}/sandbox/messages", auth=AUTH).json()
    assert hits == [400, 400]
    assert tally == {"posted": 2, "delivered": 0, "retried": 0, "refused": 2, "given_up": 0, "pending": 0}
    assert [(r["status"], r["outcome"], r["delivered"], r["http_status"]) for r in message["receipts"]] == [
        ("sent", "refused", False, 400),
        ("delivered", "refused", False, 400),
    ]
    assert all(len(r["attempts"]) == 1 for r in message["receipts"])


def test_a_receipt_never_taken_is_given_up_with_a_warning_once_its_time_is_up(caplog):
    caplog.set_level(logging.WARNING, logger="smsops.providers.sandbox")
    receiver = Receiver(from_config("sandbox", {}))
    hits: list[int] = []
    settings = retrying(callback_retry_for=0.5)
    with (
        serve_in_thread(answering(503, receiver.app, lambda: True, hits)) as hook,
        run_in_thread(settings) as sandbox,
    ):
        provider = from_config("sandbox", {"SANDBOX_URL": sandbox.url})
        (result,) = run(send_all(provider, [SendRequest(1, "+79123456798", "S", "hi", f"{hook.url}/status")]))
        wait_for(lambda: sandbox_health(sandbox)["receipts"]["given_up"] == 1)
        tally = sandbox_health(sandbox)["receipts"]
        (message,) = httpx.get(f"{sandbox.url}/sandbox/messages", auth=AUTH).json()
    (receipt,) = message["receipts"]
    assert (receipt["outcome"], receipt["delivered"]) == ("given_up", False)
    assert [a["http_status"] for a in receipt["attempts"]] == hits and len(hits) >= 3
    assert tally["retried"] == len(hits) - 1 and tally["pending"] == 0
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "gave up" in warning.getMessage() and result.provider_message_id in warning.getMessage()


# ---------------------------------------------------------------------------------------
# Inbound replies


def test_an_inbound_stop_reaches_the_webhook_signed(receiver):
    receiver, hook = receiver
    settings = SandboxSettings(latency=(0.0, 0.0), inbound_url=f"{hook.url}/inbound")
    with run_in_thread(settings) as sandbox:
        answer = httpx.post(
            f"{sandbox.url}/sandbox/inbound", data={"From": "+79123456701", "Body": "СТОП"}, auth=AUTH
        )
    assert answer.status_code == 200 and answer.json()["webhook_status"] == 200
    (message,) = receiver.inbound
    assert (message.from_, message.to, message.body) == ("+79123456701", settings.inbound_number, "СТОП")
    assert message.provider_message_id == answer.json()["sid"]


def test_simulated_recipients_of_delivered_messages_follow_their_link_and_reply_stop(receiver):
    receiver, hook = receiver
    settings = replace(
        FAST, click_rate=1.0, reply_rate=1.0, engagement_delay=(0.0, 0.0),
        link_url=hook.url, inbound_url=f"{hook.url}/inbound",
    )  # fmt: skip
    with run_in_thread(settings) as sandbox:
        provider = from_config("sandbox", {"SANDBOX_URL": sandbox.url})
        callback = f"{hook.url}/status"
        run(
            send_all(
                provider,
                [
                    SendRequest(
                        1, "+79123456701", "SHOPMARKET", "Скидка: https://s.example/l/Ab3dEf9h", callback
                    ),
                    SendRequest(2, "+447700900123", "SHOPMARKET", "No link here", callback),
                    SendRequest(
                        3, "+79123456799", "SHOPMARKET", "Unreachable https://s.example/l/Zz9Yy8Xx", callback
                    ),
                ],
            )
        )
        wait_for(lambda: len(receiver.inbound) >= 2 and receiver.clicks)
        time.sleep(0.2)  # nothing more comes
    assert [token for token, _ in receiver.clicks] == ["Ab3dEf9h"]  # only a delivered message's link
    assert "Mobile" in receiver.clicks[0][1]
    replies = sorted((m.from_, m.to, m.body) for m in receiver.inbound)
    assert replies == [("+447700900123", "SHOPMARKET", "STOP"), ("+79123456701", "SHOPMARKET", "СТОП")]


def test_recipients_do_nothing_by_default(receiver):
    receiver, hook = receiver
    with run_in_thread(replace(FAST, link_url=hook.url, inbound_url=f"{hook.url}/inbound")) as sandbox:
        provider = from_config("sandbox", {"SANDBOX_URL": sandbox.url})
        run(
            send_all(
                provider,
                [SendRequest(1, "+79123456701", "S", "https://s.example/l/Ab3dEf9h", f"{hook.url}/status")],
            )
        )
        wait_for(lambda: len(receiver.updates) >= 2)
        time.sleep(0.2)
    assert receiver.clicks == [] and receiver.inbound == []


def test_inbound_without_a_configured_webhook_says_so():
    with run_in_thread(FAST) as sandbox:
        answer = httpx.post(
            f"{sandbox.url}/sandbox/inbound", data={"From": "+79123456701", "Body": "STOP"}, auth=AUTH
        )
    assert answer.status_code == 409 and "inbound_url" in answer.json()["message"]


# ---------------------------------------------------------------------------------------
# The API surface


def test_the_sandboxs_own_routes_need_its_credentials_and_its_health_tells_no_numbers(receiver):
    receiver, hook = receiver
    settings = replace(FAST, inbound_url=f"{hook.url}/inbound")
    with run_in_thread(settings) as sandbox:
        provider = from_config("sandbox", {"SANDBOX_URL": sandbox.url})
        run(send_all(provider, [SendRequest(1, "+79123456701", "SHOPMARKET", "Секретная скидка")]))
        inbound, listing = f"{sandbox.url}/sandbox/inbound", f"{sandbox.url}/sandbox/messages"
        stop = {"From": "+79123456702", "Body": "START"}
        guessed = (settings.account_sid, "guess")
        refused = [
            httpx.post(inbound, data=stop),
            httpx.post(inbound, data=stop, auth=guessed),
            httpx.get(listing),
            httpx.get(listing, auth=guessed),
        ]
        posted_meanwhile = list(receiver.inbound)
        reply = httpx.post(inbound, data=stop, auth=AUTH)
        listed = httpx.get(listing, auth=AUTH)
        health = httpx.get(f"{sandbox.url}/sandbox/health")
    assert [r.status_code for r in refused] == [401] * 4
    assert all(
        r.json()
        == {
            "code": 20003,
            "message": "Authenticate",
            "more_info": "https://www.twilio.com/docs/errors/20003",
            "status": 401,
        }
        and r.headers["www-authenticate"].startswith("Basic")
        for r in refused
    )
    assert posted_meanwhile == []  # nothing was signed and sent for the anonymous START
    assert reply.status_code == 200 and [m.body for m in receiver.inbound] == ["START"]
    assert [(m["to"], m["body"]) for m in listed.json()] == [("+79123456701", "Секретная скидка")]
    assert health.status_code == 200 and health.json()["messages"] == 1
    assert "+7912" not in health.text and "79123456701" not in health.text
    assert "Секретная".encode() not in health.content and "START" not in health.text


def test_wrong_credentials_get_a_twilio_style_401():
    settings = FAST
    with run_in_thread(settings) as sandbox:
        url = f"{sandbox.url}/2010-04-01/Accounts/{settings.account_sid}/Messages.json"
        form = {"To": "+79123456701", "From": "S", "Body": "hi"}
        wrong = httpx.post(url, data=form, auth=(settings.account_sid, "wrong"))
        other_account = httpx.post(
            url.replace(settings.account_sid, "AC" + "9" * 32),
            data=form,
            auth=(settings.account_sid, settings.auth_token),
        )
        missing = httpx.post(url, data=form)
        right = httpx.post(url, data=form, auth=(settings.account_sid, settings.auth_token))
    assert [r.status_code for r in (wrong, other_account, missing, right)] == [401, 401, 401, 201]
    assert wrong.json() == {
        "code": 20003,
        "message": "Authenticate",
        "more_info": "https://www.twilio.com/docs/errors/20003",
        "status": 401,
    }
    created = right.json()
    assert (created["status"], created["num_segments"], created["price"], created["direction"]) == (
        "queued",
        "1",
        "-3.95000",
        "outbound-api",
    )


def test_sends_are_answered_with_twilios_headers_however_the_body_arrives():
    settings = SandboxSettings(latency=(0.0, 0.0), transient_error_rate=0.0, rate_per_second=1)
    with run_in_thread(settings) as sandbox:
        url = f"{sandbox.url}/2010-04-01/Accounts/{settings.account_sid}/Messages.json"
        auth = (settings.account_sid, settings.auth_token)
        refused = httpx.post(url, data={"To": "+79123456701", "From": "S", "Body": "hi"})
        chunks = [b"To=%2B7912345", b"6701&From=S", b"&Body=%D0%BF%D1%80%D0%B8%D0%B2%D0%B5%D1%82"]
        chunked = httpx.post(url, content=iter(chunks), auth=auth)  # Transfer-Encoding: chunked
        throttled = httpx.post(url, data={"To": "+79123456702", "From": "S", "Body": "hi"}, auth=auth)
    assert refused.status_code == 401
    assert refused.headers["www-authenticate"] == 'Basic realm="Twilio API"'
    assert chunked.status_code == 201 and chunked.headers["content-type"] == "application/json"
    assert (chunked.json()["to"], chunked.json()["body"]) == ("+79123456701", "привет")
    assert (throttled.status_code, throttled.json()["code"], throttled.headers["retry-after"]) == (
        429,
        20429,
        "1",
    )


@pytest.mark.parametrize(
    ("form", "code"),
    [
        ({"From": "S", "Body": "hi"}, 21604),
        ({"To": "+79123456701", "Body": "hi"}, 21603),
        ({"To": "+79123456701", "From": "S"}, 21602),
    ],
)
def test_missing_parameters_get_twilios_codes(form, code):
    with run_in_thread(FAST) as sandbox:
        url = f"{sandbox.url}/2010-04-01/Accounts/{FAST.account_sid}/Messages.json"
        answer = httpx.post(url, data=form, auth=(FAST.account_sid, FAST.auth_token))
    assert (answer.status_code, answer.json()["code"]) == (400, code)


def test_accepted_messages_are_kept_and_listed():
    with run_in_thread(FAST) as sandbox:
        provider = from_config("sandbox", {"SANDBOX_URL": sandbox.url})
        results = run(
            send_all(provider, [SendRequest(i, f"+7912345670{i}", "S", f"msg {i}") for i in range(1, 4)])
        )
        kept = httpx.get(f"{sandbox.url}/sandbox/messages", auth=AUTH).json()
        health = sandbox_health(sandbox)
    assert [m["sid"] for m in kept] == [r.provider_message_id for r in results]
    assert [(m["to"], m["body"]) for m in kept] == [(f"+7912345670{i}", f"msg {i}") for i in range(1, 4)]
    assert (health["ok"], health["sandbox"], health["messages"]) == (True, True, 3)
    assert health["receipts"] == {
        "posted": 0, "delivered": 0, "retried": 0, "refused": 0, "given_up": 0, "pending": 0,
    }  # fmt: skip


def test_the_rate_limit_holds_over_a_burst():
    settings = SandboxSettings(latency=(0.0, 0.0), transient_error_rate=0.0, rate_per_second=20)
    with run_in_thread(settings) as sandbox:
        provider = from_config("sandbox", {"SANDBOX_URL": sandbox.url})
        requests = [SendRequest(i, "+79123456701", "S", "hi") for i in range(60)]
        started = time.monotonic()
        results = run(send_all(provider, requests, concurrency=20))
        elapsed = time.monotonic() - started
    outcomes = [r.outcome for r in results]
    if elapsed < 1.0:  # the whole burst fell in one second, so exactly the allowance got through
        assert outcomes.count("accepted") == 20
    else:  # a very slow machine: still never more than the allowance per second
        assert outcomes.count("accepted") <= 20 * math.ceil(elapsed)
    assert outcomes.count("accepted") + outcomes.count("transient") == 60
    assert all(r.retry_after and r.error_code == "20429" for r in results if r.outcome == "transient")


def test_the_same_seed_gives_the_same_answers():
    settings = SandboxSettings(
        seed=42, latency=(0.0, 0.0), transient_error_rate=0.3, receipt_delay=(0.0, 0.0)
    )
    requests = [SendRequest(i, f"+791234567{i:02d}", "S", "hi") for i in range(20)]

    def answers(settings: SandboxSettings) -> list[tuple[str, str | None]]:
        with run_in_thread(settings) as sandbox:
            provider = from_config("sandbox", {"SANDBOX_URL": sandbox.url})
            results = run(send_all(provider, requests))
        return [(r.outcome, r.error_code) for r in results]

    first, again = answers(settings), answers(settings)
    assert first == again  # the same answers (their sids differ: see the next test)
    assert {outcome for outcome, _ in first} == {"accepted", "permanent", "unknown"}
    other = answers(
        SandboxSettings(seed=43, latency=(0.0, 0.0), transient_error_rate=0.3, receipt_delay=(0.0, 0.0))
    )
    assert other != first


def test_sids_never_repeat_across_restarts_or_sandboxes_with_the_same_seed(receiver):
    receiver, hook = receiver
    settings = replace(FAST, inbound_url=f"{hook.url}/inbound")
    requests = [SendRequest(i, f"+7912345{i:03d}1", "S", "hi") for i in range(20)]  # all accepted

    def sids(sandbox: ServerThread) -> set[str]:
        provider = from_config("sandbox", {"SANDBOX_URL": sandbox.url})
        sent = {r.provider_message_id for r in run(send_all(provider, requests))}
        reply = httpx.post(
            f"{sandbox.url}/sandbox/inbound", data={"From": "+79123456701", "Body": "СТОП"}, auth=AUTH
        )
        return sent | {reply.json()["sid"]}

    with run_in_thread(settings) as sandbox:
        before = sids(sandbox)
    with run_in_thread(settings) as restarted, run_in_thread(settings) as beside:
        after, other = sids(restarted), sids(beside)
    assert len(before) == len(after) == len(other) == 21
    assert not before & after and not before & other and not after & other
    assert all(re.fullmatch(r"SM[0-9a-f]{32}", sid) for sid in before | after | other)


@pytest.mark.parametrize(
    "change",
    [
        {"duplicate_rate": 1.5},
        {"latency": (0.1, 0.0)},
        {"rate_per_second": 0},
        {"receipt_delay": (-1.0, 0.0)},
        {"callback_retry": (0.0, 1.0)},
        {"callback_timeout": 0.0},
        {"callback_connections": 0},
    ],
)
def test_impossible_settings_are_refused(change):
    with pytest.raises(ValueError, match="SandboxSettings"):
        SandboxSettings(**change)


def test_throughput_through_the_adapter():
    """2,000 sends at concurrency 50 (a sanity check; the benchmark measures the real figure).

    One client per connection: httpcore's pool costs O(connections) per request, so one
    AsyncClient with 50 connections manages ~250 requests/s where 50 single-connection clients
    manage several times that (measured here, httpx 0.28 / httpcore 1.0.9)."""
    settings = SandboxSettings(latency=(0.0, 0.0), transient_error_rate=0.0, rate_per_second=1_000_000)
    requests = [SendRequest(i, f"+7912{i:06d}1", "SHOPMARKET", "Скидка 20%") for i in range(2_000)]

    async def send_sharded(provider: Provider, concurrency: int) -> list[SendResult]:
        queue: asyncio.Queue[tuple[int, SendRequest]] = asyncio.Queue()
        for item in enumerate(requests):
            queue.put_nowait(item)
        results: list[SendResult | None] = [None] * len(requests)

        async def worker() -> None:
            async with httpx.AsyncClient(limits=httpx.Limits(max_connections=1)) as client:
                while not queue.empty():
                    index, request = queue.get_nowait()
                    results[index] = await provider.send(client, request)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return [r for r in results if r is not None]

    with run_in_thread(settings) as sandbox:
        provider = from_config("sandbox", {"SANDBOX_URL": sandbox.url})
        started = time.perf_counter()
        results = run(send_sharded(provider, concurrency=50))
        elapsed = time.perf_counter() - started
    print(
        f"\n2,000 sends through the Twilio adapter to the sandbox (same process): {elapsed:.2f} s, {2_000 / elapsed:,.0f}/s"
    )
    assert len(results) == 2_000 and all(r.outcome == "accepted" for r in results)
    assert len({r.provider_message_id for r in results}) == 2_000
    assert elapsed < 30
