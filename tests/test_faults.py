"""Everything that goes wrong at once, judged at the provider's side (issue 14, item 6).

A campaign of a few hundred messages is sent by two dispatcher processes that are killed with
SIGKILL twice, through a provider that sometimes answers after the client has given up (and
accepts the message anyway), fails transiently, and posts its receipts late, twice and out of
order, to a receiver that is killed and stays down for 10 s; meanwhile some recipients reply
STOP. At the end, at the provider: no number got the message twice, no number got it after its
STOP was answered, every receipt the provider has is in the store, and every outbox row is
final with a reason or counted as of unknown outcome.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections import Counter
from dataclasses import replace
from urllib.parse import parse_qsl

import httpx
import pytest

from smsops import ingress, receipts, unsettled
from smsops.providers import from_config
from smsops.providers.sandbox import create_app, serve_in_thread
from smsops.providers.twilio import request_signature
from tests.test_dispatch import FAST, make_campaign, numbers, outbox, rows

pytestmark = pytest.mark.timeout(180)

FAULTY = replace(
    FAST,
    latency=(0.0, 1.3),  # the client gives up after 1 s: about a quarter answer too late
    transient_error_rate=0.04,
    ambiguous_error_rate=0.5,
    duplicate_rate=0.3,
    out_of_order_rate=0.3,
    receipt_delay=(0.1, 1.5),
    callback_retry=(0.5, 2.0),
    callback_retry_for=120.0,
    callback_timeout=2.0,
)

RECEIVER = textwrap.dedent(
    """
    import sys, uvicorn
    from smsops import webhooks
    from smsops.providers import from_config
    home, sandbox_url, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    provider = from_config("sandbox", {"SANDBOX_URL": sandbox_url})
    app = webhooks.create_app({"sandbox": provider}, home=home)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    """
)

DISPATCHER = textwrap.dedent(
    """
    import sys
    from smsops import dispatch
    from smsops.providers import from_config
    home, url, campaign, callback = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    settings = dispatch.DispatchSettings(
        rate_per_second=80, concurrency=8, clients=4, processes=2, timeout=1.0, settle_window=2.5,
        unknown_grace=0.2, backoff_base=0.2, linger=30, status_callback_url=callback,
    )
    provider = from_config("sandbox", {"SANDBOX_URL": url})
    report = dispatch.run_sync(home, provider, settings, campaign_id=campaign)
    print(report.stopped, report.requests)
    """
)


class Arrivals:
    """ASGI middleware in front of the sandbox: the time each send request arrived, and its To."""

    def __init__(self, app) -> None:
        self.app = app
        self.sends: list[tuple[float, str]] = []

    async def __call__(self, scope, receive, send) -> None:
        if not (
            scope["type"] == "http" and scope["method"] == "POST" and scope["path"].endswith("/Messages.json")
        ):
            await self.app(scope, receive, send)
            return
        arrived = time.monotonic()
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        self.sends.append((arrived, dict(parse_qsl(body.decode())).get("To", "")))
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(script: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", script, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def submitted(home, cid) -> int:
    return rows(
        home, "select count(*) as n from messages where campaign_id = ? and state = 'submitted'", cid
    )[0]["n"]


def receiver_up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=0.5).status_code == 200
    except httpx.HTTPError:
        return False


def test_nothing_is_sent_twice_or_after_stop_and_no_receipt_is_lost_when_everything_fails(home):
    app = Arrivals(create_app(FAULTY))
    phones = numbers(240)
    cid = make_campaign(home, phones)
    port = free_port()
    hooks = f"http://127.0.0.1:{port}"
    callback = f"{hooks}/webhooks/sandbox/status"
    stops: dict[str, float] = {}  # number → when its STOP was answered 200
    with serve_in_thread(app) as sandbox:
        provider = from_config("sandbox", {"SANDBOX_URL": sandbox.url})
        auth = (FAULTY.account_sid, FAULTY.auth_token)
        receiver = start(RECEIVER, str(home), sandbox.url, str(port))
        wait_for(lambda: receiver_up(hooks), 20, "the receiver")
        args = (str(home), sandbox.url, str(cid), callback)
        try:
            # two dispatcher processes, killed with SIGKILL twice mid-campaign
            for killed_at in (40, 90):
                runner = start(DISPATCHER, *args)
                wait_for(lambda n=killed_at: submitted(home, cid) >= n, 40, f"{killed_at} submitted")
                if killed_at == 90:
                    # recipients not sent yet reply STOP while the campaign is sending
                    planned = [r["phone_e164"] for r in outbox(home, cid) if r["state"] == "planned"][-20:]
                    for n, phone in enumerate(planned):
                        form = {
                            "MessageSid": f"SM{n:032x}",
                            "From": phone,
                            "To": "SHOPMARKET",
                            "Body": "STOP",
                        }
                        url = f"{hooks}/webhooks/sandbox/inbound"
                        signature = request_signature(FAULTY.auth_token, url, form)
                        answer = httpx.post(url, data=form, headers={"X-Twilio-Signature": signature})
                        assert answer.status_code == 200
                        stops[phone] = time.monotonic()
                os.kill(runner.pid, signal.SIGKILL)
                runner.wait()
            # the receiver dies and stays down for 10 s while the rest is sent
            os.kill(receiver.pid, signal.SIGKILL)
            receiver.wait()
            down_until = time.monotonic() + 10
            last = start(DISPATCHER, *args)
            time.sleep(max(0.0, down_until - time.monotonic()))
            receiver = start(RECEIVER, str(home), sandbox.url, str(port))
            wait_for(lambda: receiver_up(hooks), 20, "the receiver to come back")
            _, err = last.communicate(timeout=90)
            assert last.returncode == 0, err
            # the provider's late and retried receipts arrive, and the receiver applies them
            # (a message accepted late, after its client gave up, has its receipts scheduled only
            # once it moves on from "queued": wait for that too, not only for the posts queued)
            wait_for(
                lambda: (
                    httpx.get(f"{sandbox.url}/sandbox/health").json()["receipts"]["pending"] == 0
                    and not any(
                        m["status"] in ("accepted", "queued", "sending")
                        for m in httpx.get(f"{sandbox.url}/sandbox/messages", auth=auth).json()
                    )
                ),
                60,
                "the sandbox to deliver every receipt",
            )
            wait_for(lambda: ingress.pending(home) == 0, 20, "the journal to be applied")
            accepted = httpx.get(f"{sandbox.url}/sandbox/messages", auth=auth).json()
            health = httpx.get(f"{sandbox.url}/sandbox/health").json()
            # a last look at the provider for any receipt that still did not come (none should)
            looked = asyncio.run(_lookups(home, provider))
        finally:
            for process in (receiver,):
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
                    process.wait(timeout=20)

    rows_now = {r["phone_e164"]: r for r in outbox(home, cid)}
    # 1. no duplicates at the provider
    per_number = Counter(m["to"] for m in accepted)
    twice = [p for p, n in per_number.items() if n > 1]
    assert not twice, (
        [(m["to"], m["sid"], m["date_created"]) for m in accepted if m["to"] in twice],
        [
            tuple(a)
            for a in rows(
                home, "select m.phone_e164, a.* from send_attempts a join messages m using (message_id)"
            )
            if a[0] in twice
        ],
    )
    # 2. nothing reached the provider after the recipient's STOP was answered
    late = [(to, at - stops[to]) for at, to in app.sends if to in stops and at > stops[to]]
    assert late == []
    assert {rows_now[p]["state"] for p in stops} <= {"suppressed", "submitted"}
    assert sum(rows_now[p]["skip_reason"] == "opted_out" for p in stops) >= len(stops) - 4
    # 3. every message the provider accepted is known to the outbox, with its id
    by_sid = {r["provider_message_id"]: r for r in rows_now.values() if r["provider_message_id"]}
    assert {m["sid"] for m in accepted} == set(by_sid)
    # 4. every receipt the provider has is recorded (the provider posted them all, none given up)
    assert health["receipts"]["given_up"] == 0 and health["receipts"]["refused"] == 0
    recorded = {
        (r["provider_message_id"], r["status"])
        for r in rows(home, "select provider_message_id, status from message_status_events")
    }
    expected = {(m["sid"], m["status"]) for m in accepted}
    assert expected <= recorded, sorted(expected - recorded)[:5]
    assert looked.recovered == 0  # nothing was left for the lookup: the receipts all came
    # 5. every row is final with a reason, or counted as of unknown outcome
    states = Counter(r["state"] for r in rows_now.values())
    assert states["planned"] == 0 and states["sending"] == 0, states
    assert all(
        r["skip_reason"] for r in rows_now.values() if r["state"] in ("suppressed", "rejected", "unknown")
    )
    open_rows = unsettled.count(cid, home)
    finished = rows(home, "select status from campaigns where campaign_id = ?", cid)[0]["status"]
    assert (finished == "finished") == (open_rows.total == 0)
    # and the faults really happened
    attempts = rows(home, "select outcome, reconciled from send_attempts")
    assert any(a["outcome"] == "interrupted" for a in attempts)  # the kills
    assert any(a["reconciled"] == "found" for a in attempts)  # late answers found at the provider
    assert health["receipts"]["retried"] > 0  # the receiver was down


async def _lookups(home, provider) -> receipts.ReceiptReport:
    from datetime import timedelta

    async with httpx.AsyncClient() as client:
        return await receipts.reconcile_receipts(home, provider, client, wait=timedelta(0))
