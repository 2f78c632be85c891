"""Provider adapters: Twilio's signatures and answers, SMS.ru's protocol, configuration and secrets.

The Twilio adapter is exercised over real HTTP against the sandbox on loopback; SMS.ru against a
small fake of its protocol served the same way.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qsl

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from smsops.providers import (
    AuthenticationError,
    ConfigError,
    InvalidSignature,
    MalformedCallback,
    Provider,
    SendRequest,
    advances,
    from_config,
    retry_after_seconds,
)
from smsops.providers.sandbox import SandboxServer, SandboxSettings, run_in_thread, serve_in_thread
from smsops.providers.smsru import SmsRuProvider, classify_code
from smsops.providers.transport import LeanClient
from smsops.providers.twilio import TwilioProvider, classify_response, request_signature, verify_signature

QUIET = SandboxSettings(latency=(0.0, 0.0), transient_error_rate=0.0, receipt_delay=(0.0, 0.0))
TWILIO_TOKEN = "twilio-secret-token-do-not-leak-4f1c"
SMSRU_API_ID = "SMSRU-API-ID-SECRET-9d2e-do-not-leak"
SMSRU_CALLBACK_TOKEN = "cb-token-7a1f0c55e2b94d1e"


def run(coro):
    return asyncio.run(coro)


async def send(http, provider: Provider, to: str, body: str = "Скидка 20% до воскресенья", **client_options):
    async with http(**client_options) as client:
        return await provider.send(client, SendRequest(1, to, "SHOPMARKET", body))


@pytest.fixture(params=["httpx", "lean"])
def http(request):
    """The clients the adapters are called with: plain httpx, and the dispatcher's LeanClient."""
    return httpx.AsyncClient if request.param == "httpx" else LeanClient


@pytest.fixture(scope="module")
def sandbox() -> Iterator[SandboxServer]:
    with run_in_thread(QUIET) as server:
        yield server


@pytest.fixture(scope="module")
def provider(sandbox: SandboxServer) -> Provider:
    return from_config("sandbox", {"SANDBOX_URL": sandbox.url})


# ---------------------------------------------------------------------------------------
# X-Twilio-Signature


DOC_URL = "https://mycompany.com/myapp.php?foo=1&bar=2"


def doc_params(number: str) -> dict[str, str]:
    return {
        "CallSid": "CA1234567890ABCDE",
        "Caller": number,
        "Digits": "1234",
        "From": number,
        "To": "+18005551212",
    }


@pytest.mark.parametrize(
    ("number", "signature"),
    [
        # twilio.com/docs/usage/security, the worked example as published today
        ("+14158675310", "GvWf1cFY/Q7PnoempGyD5oXAezc="),
        # the same example in Twilio's own libraries' tests (twilio-python, -php, -csharp)
        ("+14158675309", "RSOYDt4T1cUTdK1PDd93/VVr8B8="),
    ],
)
def test_signature_matches_twilios_documented_examples(number, signature):
    assert request_signature("12345", DOC_URL, doc_params(number)) == signature
    assert verify_signature("12345", DOC_URL, doc_params(number), signature)


def test_signature_counts_each_distinct_value_of_a_repeated_parameter_once_sorted():
    # twilio-python's test vector for repeated parameters
    params = [
        ("Sid", "CA123"),
        ("SidAccount", "AC123"),
        ("Digits", "5678"),
        ("Digits", "1234"),
        ("Digits", "1234"),
    ]
    assert request_signature("12345", DOC_URL, params) == "IK+Dwps556ElfBT0I3Rgjkr1wJU="


@pytest.mark.parametrize(
    ("url", "signature"),
    [
        # Twilio's libraries' vectors: the URL Twilio signed had a port the request URL lacks, or
        # the reverse, and the signature is still valid.
        ("https://mycompany.com:1234/myapp.php?foo=1&bar=2", "RSOYDt4T1cUTdK1PDd93/VVr8B8="),
        ("http://mycompany.com:1234/myapp.php?foo=1&bar=2", "Zmvh+3yNM1Phv2jhDCwEM3q5ebU="),
        (DOC_URL, "kvajT1Ptam85bY51eRf/AJRuM3w="),  # signed with :443
        ("http://mycompany.com/myapp.php?foo=1&bar=2", "0ZXoZLH/DfblKGATFgpif+LLRf4="),  # signed with :80
    ],
)
def test_signature_is_accepted_with_or_without_the_port(url, signature):
    assert verify_signature("12345", url, doc_params("+14158675309"), signature)


@pytest.mark.parametrize(
    ("token", "url", "change", "signature"),
    [
        ("12345", DOC_URL, {"Digits": "9999"}, "GvWf1cFY/Q7PnoempGyD5oXAezc="),
        ("12345", DOC_URL, {"Extra": "x"}, "GvWf1cFY/Q7PnoempGyD5oXAezc="),
        ("12345", DOC_URL + "&baz=3", {}, "GvWf1cFY/Q7PnoempGyD5oXAezc="),
        ("54321", DOC_URL, {}, "GvWf1cFY/Q7PnoempGyD5oXAezc="),
        ("12345", DOC_URL, {}, "GvWf1cFY/Q7PnoempGyD5oXAezc"),
        ("12345", DOC_URL, {}, ""),
        ("12345", DOC_URL, {}, None),
        ("12345", DOC_URL, {}, "не подпись"),
    ],
)
def test_a_forged_or_tampered_signature_is_refused(token, url, change, signature):
    assert not verify_signature(token, url, {**doc_params("+14158675310"), **change}, signature)


# ---------------------------------------------------------------------------------------
# Classifying answers (pure)


@pytest.mark.parametrize(
    ("http_status", "payload", "outcome", "code", "opted_out"),
    [
        (
            201,
            {"sid": "SM" + "a" * 32, "status": "queued", "num_segments": "2", "price": None},
            "accepted",
            None,
            False,
        ),
        (201, {"status": "queued"}, "unknown", None, False),
        (201, None, "unknown", None, False),
        (400, {"code": 21211, "message": "invalid To", "status": 400}, "permanent", "21211", False),
        (400, {"code": 21610, "message": "unsubscribed", "status": 400}, "permanent", "21610", True),
        (400, {"code": 21614, "message": "not mobile", "status": 400}, "permanent", "21614", False),
        (400, {"code": 14107, "message": "rate limit", "status": 400}, "transient", "14107", False),
        (429, {"code": 20429, "message": "Too Many Requests", "status": 429}, "transient", "20429", False),
        (429, None, "transient", "20429", False),
        (404, None, "permanent", None, False),
        (500, {"code": 20500, "message": "Internal Server Error", "status": 500}, "unknown", "20500", False),
        (503, None, "unknown", None, False),
    ],
)
def test_twilio_answers_are_classified(http_status, payload, outcome, code, opted_out):
    result = classify_response(http_status, payload)
    assert (result.outcome, result.error_code, result.opted_out, result.http_status) == (
        outcome,
        code,
        opted_out,
        http_status,
    )


def test_an_accepted_answer_keeps_sid_segments_and_the_charged_price():
    result = classify_response(
        201,
        {
            "sid": "SM" + "b" * 32,
            "status": "queued",
            "num_segments": "3",
            "price": "-0.02250",
            "price_unit": "USD",
        },
    )
    assert (result.provider_message_id, result.segments, result.price, result.price_unit) == (
        "SM" + "b" * 32,
        3,
        0.0225,
        "USD",
    )


def test_401_is_a_credentials_problem_not_a_message_problem():
    with pytest.raises(AuthenticationError, match="credentials"):
        classify_response(401, {"code": 20003, "message": "Authenticate", "status": 401})


def test_retry_after_reads_seconds_and_http_dates():
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert retry_after_seconds("3") == 3.0
    assert retry_after_seconds("Thu, 01 Jan 2026 12:00:05 GMT", now) == 5.0
    assert retry_after_seconds("soon") is None
    assert retry_after_seconds(None) is None


@pytest.mark.parametrize(
    ("code", "outcome", "opted_out"),
    [
        (202, "permanent", False),
        (207, "permanent", False),
        (204, "permanent", False),
        (209, "permanent", True),
        (215, "permanent", True),
        (201, "transient", False),
        (220, "transient", False),
        (230, "transient", False),
        (231, "transient", False),
        (500, "unknown", False),
        (299, "permanent", False),
    ],
)
def test_smsru_codes_are_classified(code, outcome, opted_out):
    result = classify_code(code)
    assert (result.outcome, result.error_code, result.opted_out) == (outcome, str(code), opted_out)


def test_statuses_only_move_forward():
    assert advances(None, "queued")
    assert advances("queued", "sent")
    assert advances("sent", "delivered")
    assert not advances("delivered", "sent")
    assert not advances("delivered", "undelivered")
    assert not advances("delivered", "delivered")
    assert advances("delivered", "read")
    assert not advances("sent", "bogus")


# ---------------------------------------------------------------------------------------
# Configuration and secrets


def test_from_config_builds_each_provider_from_the_given_mapping():
    twilio = from_config("twilio", {"TWILIO_ACCOUNT_SID": "AC" + "1" * 32, "TWILIO_AUTH_TOKEN": TWILIO_TOKEN})
    assert isinstance(twilio, TwilioProvider)
    assert (twilio.name, twilio.is_sandbox, twilio.base_url) == ("twilio", False, "https://api.twilio.com")
    sandbox = from_config("sandbox", {})
    assert (sandbox.name, sandbox.is_sandbox) == ("sandbox", True)
    smsru = from_config("SMSRU", {"SMSRU_API_ID": SMSRU_API_ID, "SMSRU_TEST": "1"})
    assert isinstance(smsru, SmsRuProvider)
    assert (smsru.name, smsru.is_sandbox, smsru.test) == ("smsru", False, True)
    for p in (twilio, sandbox, smsru):
        assert isinstance(p, Provider)


def test_from_config_reads_the_environment_by_default(monkeypatch):
    monkeypatch.setenv("TWILIO_ACCOUNT_SID", "AC" + "2" * 32)
    monkeypatch.setenv("TWILIO_AUTH_TOKEN", TWILIO_TOKEN)
    monkeypatch.setenv("TWILIO_BASE_URL", "http://127.0.0.1:9")
    provider = from_config("twilio")
    assert (provider.account_sid, provider.base_url) == ("AC" + "2" * 32, "http://127.0.0.1:9")


def test_missing_credentials_name_the_variables_not_the_values():
    with pytest.raises(ConfigError, match="missing: TWILIO_AUTH_TOKEN") as info:
        from_config("twilio", {"TWILIO_ACCOUNT_SID": "AC" + "1" * 32, "TWILIO_AUTH_TOKEN": "  "})
    assert "secrets.toml" in str(info.value)
    with pytest.raises(ConfigError, match="SMSRU_API_ID"):
        from_config("smsru", {})
    with pytest.raises(ConfigError, match="choose one of sandbox, twilio, smsru"):
        from_config("nexmo", {})


def test_secrets_never_appear_in_reprs():
    twilio = from_config("twilio", {"TWILIO_ACCOUNT_SID": "AC" + "1" * 32, "TWILIO_AUTH_TOKEN": TWILIO_TOKEN})
    smsru = SmsRuProvider(api_id=SMSRU_API_ID, callback_token=SMSRU_CALLBACK_TOKEN)
    settings = SandboxSettings(auth_token=TWILIO_TOKEN)
    text = " ".join(map(repr, (twilio, smsru, settings))) + " ".join(map(str, (twilio, smsru, settings)))
    for secret in (TWILIO_TOKEN, SMSRU_API_ID, SMSRU_CALLBACK_TOKEN):
        assert secret not in text


def test_secrets_never_appear_in_errors_or_logs(http, sandbox, caplog):
    caplog.set_level(logging.DEBUG)
    wrong = TwilioProvider(account_sid=QUIET.account_sid, auth_token=TWILIO_TOKEN, base_url=sandbox.url)
    with pytest.raises(AuthenticationError) as refused:
        run(send(http, wrong, "+79123456701"))
    unreachable = TwilioProvider(
        account_sid=QUIET.account_sid, auth_token=TWILIO_TOKEN, base_url=closed_port_url()
    )
    result = run(send(http, unreachable, "+79123456701"))
    with pytest.raises(InvalidSignature) as forged:
        wrong.parse_callback("http://x/status", {"MessageSid": "SM1", "MessageStatus": "sent"}, {})
    smsru = SmsRuProvider(
        api_id=SMSRU_API_ID, base_url=closed_port_url(), callback_token=SMSRU_CALLBACK_TOKEN
    )
    smsru_result = run(send(http, smsru, "+79123456701"))
    with pytest.raises(InvalidSignature) as smsru_forged:
        smsru.parse_callback("http://x/smsru?token=guess", {"data[0]": "sms_status\n1-1\n103"}, {})
    texts = [str(refused.value), str(forged.value), str(smsru_forged.value), repr(result), repr(smsru_result)]
    texts.append(caplog.text)
    for secret in (TWILIO_TOKEN, SMSRU_API_ID, SMSRU_CALLBACK_TOKEN):
        assert all(secret not in text for text in texts)
    assert "refused" in caplog.text  # the rejections were logged, without the secrets


# ---------------------------------------------------------------------------------------
# The Twilio adapter against the sandbox, over HTTP


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_an_accepted_message_has_its_sid_segments_and_price(http, provider):
    result = run(send(http, provider, "+79123456701", "Привет! " * 10))  # 80 UCS-2 characters: 2 segments
    assert result.outcome == "accepted"
    assert result.provider_message_id.startswith("SM") and len(result.provider_message_id) == 34
    assert (result.status, result.segments, result.http_status) == ("queued", 2, 201)
    assert (result.price, result.price_unit) == (7.9, "RUB")  # 2 x 3.95 RUB, the RU seed price


@pytest.mark.parametrize(
    ("to", "code", "opted_out"),
    [
        ("+79123456700", "21211", False),
        ("79123456701", "21211", False),
        ("+79123456713", "21610", True),
        ("+79123456714", "21614", False),
    ],
)
def test_permanent_refusals_carry_the_code_and_never_say_retry(http, provider, to, code, opted_out):
    result = run(send(http, provider, to))
    assert (result.outcome, result.error_code, result.opted_out, result.http_status) == (
        "permanent",
        code,
        opted_out,
        400,
    )
    assert result.provider_message_id is None and result.error_message


def test_throttling_is_transient_and_says_when_to_retry(http):
    settings = SandboxSettings(latency=(0.0, 0.0), transient_error_rate=0.0, rate_per_second=2)
    with run_in_thread(settings) as server:
        provider = from_config("sandbox", {"SANDBOX_URL": server.url})

        async def burst():
            async with http() as client:
                return [
                    await provider.send(client, SendRequest(i, "+79123456701", "S", "hi")) for i in range(3)
                ]

        first, second, third = run(burst())
    assert first.outcome == second.outcome == "accepted"
    assert (third.outcome, third.error_code, third.http_status) == ("transient", "20429", 429)
    assert third.retry_after is not None and 0 < third.retry_after <= 1


def test_a_server_error_is_unknown_never_transient(http):
    settings = SandboxSettings(latency=(0.0, 0.0), transient_error_rate=1.0, ambiguous_error_rate=0.0)
    with run_in_thread(settings) as server:
        result = run(send(http, from_config("sandbox", {"SANDBOX_URL": server.url}), "+79123456701"))
    assert result.outcome == "unknown"
    assert result.http_status in (500, 503) and result.error_code in ("20500", "20503")


def test_a_refused_connection_is_transient_because_nothing_was_sent(http):
    provider = from_config("sandbox", {"SANDBOX_URL": closed_port_url()})
    result = run(send(http, provider, "+79123456701"))
    assert (result.outcome, result.http_status) == ("transient", None)
    assert "ConnectError" in result.error_message


def test_a_read_timeout_after_sending_is_unknown(http):
    settings = SandboxSettings(latency=(0.5, 0.5), transient_error_rate=0.0)
    with run_in_thread(settings) as server:
        provider = from_config("sandbox", {"SANDBOX_URL": server.url})
        result = run(send(http, provider, "+79123456701", timeout=httpx.Timeout(5.0, read=0.1)))
    assert result.outcome == "unknown"
    assert "ReadTimeout" in result.error_message


def test_lookup_returns_the_current_status_or_none(http, provider):
    accepted = run(send(http, provider, "+79123456799"))

    async def look():
        async with http() as client:
            found = await provider.lookup(client, accepted.provider_message_id)
            missing = await provider.lookup(client, "SM" + "0" * 32)
            bogus = await provider.lookup(client, "../../etc")
            return found, missing, bogus

    found, missing, bogus = run(look())
    assert found.provider_message_id == accepted.provider_message_id
    assert (found.status, found.error_code, found.provider) == ("undelivered", "30003", "sandbox")
    assert missing is None and bogus is None


def test_find_reconciles_a_send_whose_fate_was_unknown(http):
    # Every answer is a 5xx, yet the sandbox (like Twilio) created each message anyway.
    settings = SandboxSettings(latency=(0.0, 0.0), transient_error_rate=1.0, ambiguous_error_rate=1.0)
    with run_in_thread(settings) as server:
        provider = from_config("sandbox", {"SANDBOX_URL": server.url})
        request = SendRequest(7, "+79123456701", "SHOPMARKET", "Ваш заказ 1042 собран")
        since = datetime.now(UTC)

        async def reconcile():
            async with http() as client:
                result = await provider.send(client, request)
                other = await provider.find(
                    client, SendRequest(8, "+79123456702", "SHOPMARKET", request.body), since
                )
                return result, await provider.find(client, request, since), other

        result, found, other = run(reconcile())
    assert result.outcome == "unknown"
    assert len(found) == 1 and found[0].provider_message_id.startswith("SM")
    assert other == []


# ---------------------------------------------------------------------------------------
# SMS.ru against a fake of its protocol, over HTTP


def fake_smsru() -> Starlette:
    """SMS.ru's answers, chosen by the recipient number's last three digits: 2xx codes and 500 are
    answered for that number, 999 is a top-level 220, 503 an HTTP 503, 777 a non-JSON body."""
    sent: dict[str, int] = {}

    async def form(request: Request) -> dict[str, str]:
        return dict(parse_qsl((await request.body()).decode(), keep_blank_values=True))

    async def send(request: Request) -> Response:
        data = await form(request)
        if data.get("api_id") != SMSRU_API_ID:
            return JSONResponse({"status": "ERROR", "status_code": 200, "status_text": "Неправильный api_id"})
        if data.get("json") != "1" or not data.get("msg"):
            return JSONResponse(
                {"status": "ERROR", "status_code": 203, "status_text": "Нет текста сообщения"}
            )
        number, suffix = data["to"], data["to"][-3:]
        if suffix == "999":
            return JSONResponse(
                {"status": "ERROR", "status_code": 220, "status_text": "Сервис временно недоступен"}
            )
        if suffix == "503":
            return Response("busy", status_code=503)
        if suffix == "777":
            return Response("<html>oops</html>", media_type="text/html")
        if suffix.startswith(("2", "5")):
            entry = {"status": "ERROR", "status_code": int(suffix), "status_text": f"code {suffix}"}
        else:
            sms_id = f"000000-{len(sent) + 1:08d}"
            sent[sms_id] = 103 if suffix != "104" else 104
            entry = {"status": "OK", "status_code": 100, "sms_id": sms_id, "cost": "3.95", "sms": 1}
        return JSONResponse({"status": "OK", "status_code": 100, "sms": {number: entry}, "balance": 100.0})

    async def status(request: Request) -> Response:
        data = await form(request)
        if data.get("api_id") != SMSRU_API_ID:
            return JSONResponse({"status": "ERROR", "status_code": 200})
        sms_id = data["sms_id"]
        entry = (
            {"status": "OK", "status_code": sent[sms_id], "status_text": "..."}
            if sms_id in sent
            else {"status": "ERROR", "status_code": -1, "status_text": "Сообщение не найдено"}
        )
        return JSONResponse({"status": "OK", "status_code": 100, "sms": {sms_id: entry}})

    return Starlette(
        routes=[Route("/sms/send", send, methods=["POST"]), Route("/sms/status", status, methods=["POST"])]
    )


@pytest.fixture(scope="module")
def smsru() -> Iterator[SmsRuProvider]:
    with serve_in_thread(fake_smsru()) as server:
        yield SmsRuProvider(api_id=SMSRU_API_ID, base_url=server.url, callback_token=SMSRU_CALLBACK_TOKEN)


@pytest.mark.parametrize(
    ("to", "outcome", "code", "opted_out"),
    [
        ("+79123456001", "accepted", None, False),
        ("+79123456202", "permanent", "202", False),
        ("+79123456207", "permanent", "207", False),
        ("+79123456215", "permanent", "215", True),
        ("+79123456231", "transient", "231", False),
        ("+79123456500", "unknown", "500", False),
        ("+79123456999", "transient", "220", False),
        ("+79123456503", "unknown", "http_503", False),
        ("+79123456777", "unknown", None, False),
    ],
)
def test_smsru_reads_each_numbers_status_code_from_an_http_200(http, smsru, to, outcome, code, opted_out):
    result = run(send(http, smsru, to))
    assert (result.outcome, result.error_code, result.opted_out) == (outcome, code, opted_out)
    if outcome == "accepted":
        assert result.provider_message_id.startswith("000000-")
        assert (result.status, result.price, result.price_unit, result.segments) == ("queued", 3.95, "RUB", 1)
    if code == "231":
        assert result.retry_after == 60.0


def test_smsru_refused_credentials_raise(http, smsru):
    wrong = SmsRuProvider(api_id="wrong-api-id", base_url=smsru.base_url)
    with pytest.raises(AuthenticationError, match="SMSRU_API_ID"):
        run(send(http, wrong, "+79123456001"))


def test_smsru_lookup_maps_its_codes_onto_the_common_statuses(http, smsru):
    async def scenario():
        async with http() as client:
            ok = await smsru.send(client, SendRequest(1, "+79123456002", "", "hi"))
            failed = await smsru.send(client, SendRequest(2, "+79123456104", "", "hi"))
            return (
                await smsru.lookup(client, ok.provider_message_id),
                await smsru.lookup(client, failed.provider_message_id),
                await smsru.lookup(client, "999999-99999999"),
                await smsru.find(client, SendRequest(3, "+79123456002", "", "hi"), datetime.now(UTC)),
            )

    delivered, undelivered, missing, found = run(scenario())
    assert (delivered.status, delivered.error_code) == ("delivered", None)
    assert (undelivered.status, undelivered.error_code) == ("undelivered", "104")
    assert missing is None
    assert found is None  # SMS.ru cannot search: an unknown send stays unknown


def test_smsru_callback_is_parsed_entry_by_entry():
    provider = SmsRuProvider(api_id=SMSRU_API_ID, callback_token=SMSRU_CALLBACK_TOKEN)
    url = f"https://shop.example/webhooks/smsru?token={SMSRU_CALLBACK_TOKEN}"
    form = [
        ("data[]", "sms_status\n000000-1\n103"),
        ("data[]", "sms_status\r\n000000-2\r\n104\r\n1767225600"),
        ("data[]", "callcheck_status\n201\n401"),
        ("data[]", "sms_status\n000000-3\n102"),
    ]
    updates = provider.parse_callback(url, form, {})
    assert [(u.provider_message_id, u.status, u.error_code) for u in updates] == [
        ("000000-1", "delivered", None),
        ("000000-2", "undelivered", "104"),
        ("000000-3", "sent", None),
    ]
    assert updates[1].occurred_at == datetime(2026, 1, 1, tzinfo=UTC)
    path_url = f"https://shop.example/webhooks/smsru/{SMSRU_CALLBACK_TOKEN}"
    assert (
        provider.parse_callback(path_url, {"data[0]": "sms_status\n000000-4\n150"}, {})[0].status == "failed"
    )
    assert provider.callback_url("https://shop.example/webhooks/smsru") == url


@pytest.mark.parametrize(
    "form",
    [
        {},
        {"data[0]": "sms_status\n000000-1"},
        {"data[0]": "sms_status\n000000-1\nOK"},
        {"data[0]": "sms_status\n000000-1\n999"},
        {"data[0]": "sms_status\n000000-1\n103", "data[1]": "sms_status\n\n103"},
    ],
)
def test_a_malformed_smsru_callback_is_refused_whole(form):
    provider = SmsRuProvider(api_id=SMSRU_API_ID, callback_token=SMSRU_CALLBACK_TOKEN)
    with pytest.raises(MalformedCallback):
        provider.parse_callback(f"http://x/cb?token={SMSRU_CALLBACK_TOKEN}", form, {})


def test_smsru_callbacks_without_a_configured_token_are_refused():
    provider = SmsRuProvider(api_id=SMSRU_API_ID)
    with pytest.raises(InvalidSignature, match="SMSRU_CALLBACK_TOKEN"):
        provider.parse_callback("http://x/cb?token=", {"data[0]": "sms_status\n1\n103"}, {})


def test_smsru_callback_over_http_gets_100_or_403_or_400():
    provider = SmsRuProvider(api_id=SMSRU_API_ID, callback_token=SMSRU_CALLBACK_TOKEN)
    stored = []

    async def callback(request: Request) -> Response:
        form = parse_qsl((await request.body()).decode(), keep_blank_values=True)
        try:
            stored.extend(provider.parse_callback(str(request.url), form, request.headers))
        except InvalidSignature:
            return Response(status_code=403)
        except MalformedCallback:
            return Response(status_code=400)
        status, media_type, body = provider.callback_reply()
        return Response(body, status_code=status, media_type=media_type)

    app = Starlette(routes=[Route("/webhooks/smsru/{token}", callback, methods=["POST"])])
    with serve_in_thread(app) as server:
        good = f"{server.url}/webhooks/smsru/{SMSRU_CALLBACK_TOKEN}"
        with httpx.Client() as client:
            ok = client.post(good, data={"data[0]": "sms_status\n000000-9\n103"})
            forged = client.post(
                f"{server.url}/webhooks/smsru/guess", data={"data[0]": "sms_status\n000000-9\n103"}
            )
            malformed = client.post(good, data={"data[0]": "sms_status\n000000-9"})
    assert (ok.status_code, ok.text) == (200, "100")
    assert (forged.status_code, malformed.status_code) == (403, 400)
    assert [(u.provider_message_id, u.status) for u in stored] == [("000000-9", "delivered")]


def test_find_window_excludes_older_messages(http, provider):
    request = SendRequest(1, "+79123456755", "SHOPMARKET", "старое сообщение")
    run(send(http, provider, request.to, request.body))

    async def look():
        async with http() as client:
            return await provider.find(client, request, datetime.now(UTC) + timedelta(seconds=2))

    assert run(look()) == []
