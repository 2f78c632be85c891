"""The ingress journal (issue 14, item 1): answered while another process holds the store's write
lock, nothing lost, everything applied exactly once after it is released.

The scenario (:class:`Load`, :func:`run_under_lock`) is shared with
``bench/test_ingress_bench.py``, which runs it at full scale; this module is also the load
generator it starts in a process of its own (``python tests/test_ingress.py HOST PORT LOAD``):
raw asyncio streams, keep-alive, one request in flight per connection, bodies signed before the
clock starts, so that the latencies measured are the receiver's and not a client's sharing its
interpreter.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlencode

import httpx
from starlette.types import Receive, Scope, Send

from smsops import ingress, store, webhooks
from smsops.providers import SANDBOX_AUTH_TOKEN, StatusUpdate, from_config
from smsops.providers.sandbox import serve_in_thread
from smsops.providers.twilio import SIGNATURE_HEADER, request_signature

LOCAL_HOST = "127.0.0.1"


def sid(i: int) -> str:
    return f"SM{i:032x}"


def phone(i: int) -> str:
    return f"+7912{i:07d}"


def token(i: int) -> str:
    return f"tok{i:06d}"


# ---------------------------------------------------------------------------------------
# The scenario, at any scale


@dataclass(frozen=True, slots=True)
class Load:
    """What arrives: a ``sent`` and a ``delivered`` receipt for each of ``messages`` messages,
    ``clicks`` clicks on ``links`` tracked links (``heads`` of them ``HEAD`` probes), ``replies``
    replies from as many numbers (``stops`` of them STOP), and a ``repeats`` share of the
    receipts and replies posted a second time (a provider retrying), all interleaved, over
    ``connections`` keep-alive connections, as fast as they go or spread over ``spread`` s."""

    messages: int
    clicks: int
    heads: int
    links: int
    replies: int
    stops: int
    repeats: float = 0.05
    connections: int = 16
    spread: float = 0.0
    seed: int = 0

    def plan(self) -> list[tuple[str, str, dict[str, str] | None, str | None]]:
        """Every request as ``(method, path, form, user_agent)``, in arrival order."""
        rng = random.Random(self.seed)
        receipts = [
            ("POST", "/webhooks/sandbox/status", {"MessageSid": sid(i), "MessageStatus": status}, None)
            for i in range(self.messages)
            for status in ("sent", "delivered")
        ]
        replies = [
            (
                "POST",
                "/webhooks/sandbox/inbound",
                {
                    "MessageSid": f"SMin{r:030x}",
                    "From": phone(r),
                    "To": "SHOPMARKET",
                    "Body": "СТОП" if r < self.stops else "Спасибо! А когда распродажа?",
                },
                None,
            )
            for r in range(self.replies)
        ]
        repeated = rng.sample(receipts, int(len(receipts) * self.repeats))
        repeated += rng.sample(replies, int(len(replies) * self.repeats))
        clicks = [
            ("HEAD", f"/l/{token(c % self.links)}", None, "Slackbot-LinkExpanding 1.0")
            if c < self.heads
            else ("GET", f"/l/{token(c % self.links)}", None, "Mozilla/5.0 (iPhone; CPU iPhone OS 18_0)")
            for c in range(self.clicks)
        ]
        requests = receipts + replies + repeated + clicks
        rng.shuffle(requests)
        return requests

    def expected(self) -> dict[str, int]:
        """What the store holds once everything is applied: one row per fact, none twice."""
        return {
            "status_events": 2 * self.messages,
            "status_pairs": 2 * self.messages,
            "clicks": self.clicks,
            "head_clicks": self.heads,
            "inbound": self.replies,
            "opted_out": self.stops,
            "opt_out_events": self.stops,
            "rejects": 0,
            "orphans": 0,
        }


def outbox(home: Path, messages: int, links: int = 0) -> None:
    """A store whose outbox holds ``messages`` messages submitted to the sandbox (distinct
    provider ids), the first ``links`` of them with a tracked link."""
    conn = store.open_store(home)
    try:
        with store.transaction(conn):
            conn.execute(
                "insert into campaigns (campaign_id, name, kind, status, created_at)"
                " values (1, 'ingress', 'promo', 'running', '2026-01-01 00:00:00')"
            )
            conn.executemany(
                "insert into messages (message_id, idempotency_key, campaign_id, variant, contact_id,"
                " phone_e164, state, provider, provider_message_id, planned_at, submitted_at)"
                " values (?, ?, 1, 'A', ?, ?, 'submitted', 'sandbox', ?, '2026-01-01 00:00:00',"
                " '2026-01-01 00:00:01')",
                [(i + 1, f"1:{i + 1}", i + 1, phone(i), sid(i)) for i in range(messages)],
            )
            conn.executemany(
                "insert into links (token, message_id, url, created_at) values (?, ?, ?, '2026-01-01')",
                [(token(i), i + 1, f"https://shop.example.ru/sale?m={i}") for i in range(links)],
            )
    finally:
        conn.close()


def counts(home: Path) -> dict[str, int]:
    """What the store and the journal hold now (read without any lock: WAL readers never wait)."""
    conn = sqlite3.connect(store.store_path(home), timeout=30)
    journal = sqlite3.connect(ingress.journal_path(home), timeout=30)
    try:

        def one(sql: str) -> int:
            return conn.execute(sql).fetchone()[0]

        return {
            "status_events": one("select count(*) from message_status_events"),
            "status_pairs": one("select count(*) from (select distinct message_id, status from message_status_events)"),
            "clicks": one("select count(*) from clicks"),
            "head_clicks": one("select count(*) from clicks where method = 'HEAD'"),
            "inbound": one("select count(*) from inbound_messages"),
            "opted_out": one(
                "select count(distinct phone_e164) from consent_events"
                " where action = 'opt_out' and source = 'keyword_reply'"
            ),
            "opt_out_events": one("select count(*) from consent_events where action = 'opt_out'"),
            "rejects": one("select count(*) from ingress_rejects"),
            "orphans": one("select count(*) from orphan_status_events"),
            "journal_entries": journal.execute("select count(*) from entries").fetchone()[0],
        }  # fmt: skip
    finally:
        conn.close()
        journal.close()


_HOLDER = """
import select, sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("begin immediate")
print("locked", flush=True)
select.select([sys.stdin], [], [], 600)  # until told
conn.execute("rollback")
print("released", flush=True)
"""


@contextmanager
def write_lock_held(home: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process holding the store's write lock (``begin immediate``) until
    :func:`release`. Entered once the lock is taken."""
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(store.store_path(home))],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        yield holder
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.wait()


def release(holder: subprocess.Popen[str]) -> float:
    """Tell the holder to release the lock; the monotonic time it did."""
    assert holder.stdin is not None and holder.stdout is not None
    holder.stdin.write("release\n")
    holder.stdin.flush()
    assert holder.stdout.readline().strip() == "released"
    return time.monotonic()


_WITNESS = """
import select, sys, time
worst = 0.0
while not select.select([sys.stdin], [], [], 0)[0]:
    started = time.perf_counter()
    time.sleep(0.002)
    worst = max(worst, time.perf_counter() - started - 0.002)
print(round(worst * 1000, 1), flush=True)
"""


@contextmanager
def machine_stalls() -> Iterator[dict[str, float]]:
    """Meanwhile, the longest a process that only sleeps 2 ms at a time overslept: time this
    machine gave to no one (2 cores shared with other people's jobs). ``["max_ms"]`` on exit."""
    witness = subprocess.Popen(
        [sys.executable, "-c", _WITNESS], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    found: dict[str, float] = {}
    try:
        yield found
    finally:
        out, _ = witness.communicate("stop\n", timeout=30)
        found["max_ms"] = float(out)


class Generator:
    """The load generator, in a process of its own: it prepares and signs every request, then
    sends them when :meth:`go` says so and returns its figures."""

    def __init__(self, url: str, load: Load) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.process = subprocess.Popen(
            [sys.executable, __file__, host, port, json.dumps(asdict(load))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        assert self.process.stdout.readline().strip() == "ready"

    def go(self, timeout: float = 600) -> dict:
        assert self.process.stdin is not None and self.process.stdout is not None
        with machine_stalls() as stalls:
            self.process.stdin.write("go\n")
            self.process.stdin.flush()
            out, _ = self.process.communicate(timeout=timeout)
        assert self.process.returncode == 0, out
        return json.loads(out.strip().splitlines()[-1]) | {"machine_stall_ms": stalls["max_ms"]}


def wait_until_applied(home: Path, expected: dict[str, int], timeout: float) -> tuple[float, dict[str, int]]:
    """Seconds until the store holds ``expected`` (or ``timeout``), and the last counts."""
    started = time.monotonic()
    while True:
        now = counts(home)
        if {k: now[k] for k in expected} == expected or time.monotonic() - started > timeout:
            return time.monotonic() - started, now
        time.sleep(0.05)


def run_under_lock(home: Path, url: str, load: Load, *, hold: float) -> dict:
    """Send ``load`` to the receiver at ``url`` while another process holds the store's write
    lock for ``hold`` seconds (the load must have ended by then), then wait for the store to
    hold everything. The figures of the load, the store's counts just before the release, how
    long the lock was held and how long after its release the store held everything."""
    generator = Generator(url, load)
    with write_lock_held(home) as holder:
        locked = time.monotonic()
        figures = generator.go()
        figures["load_ended_s_after_lock"] = round(time.monotonic() - locked, 3)
        time.sleep(max(0.0, locked + hold - 0.2 - time.monotonic()))
        figures["while_locked"] = counts(home)
        time.sleep(max(0.0, locked + hold - time.monotonic()))
        released = release(holder)
        figures["held_s"] = round(released - locked, 3)
    applied, figures["after"] = wait_until_applied(home, load.expected(), 30)
    figures["applied_s_after_release"] = round(applied, 3)
    return figures


def run_unlocked(home: Path, url: str, load: Load) -> dict:
    """The same load with no lock held (the baseline): the applier applies as it arrives."""
    generator = Generator(url, load)
    started = time.monotonic()
    figures = generator.go()
    ended = time.monotonic()
    applied, figures["after"] = wait_until_applied(home, load.expected(), 30)
    figures["applied_s_after_load"] = round(applied, 3)
    figures["load_s"] = round(ended - started, 3)
    return figures


async def _no_op(scope: Scope, receive: Receive, send: Send) -> None:
    """Reads each request and answers 200 "ok" at once: what this machine can do at best."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


def run_no_op(load: Load) -> dict:
    """The same load against an app that does nothing (uvicorn in a thread, as the receiver):
    the floor under the receiver's figures on this machine at this moment."""
    with serve_in_thread(_no_op) as server:
        return Generator(server.url, load).go()


def lost(load: Load, after: dict[str, int]) -> int:
    """Facts answered 2xx that the store does not hold."""
    expected = load.expected()
    return sum(
        max(0, expected[k] - after[k]) for k in ("status_pairs", "clicks", "inbound", "opt_out_events")
    )


# ---------------------------------------------------------------------------------------
# The load generator (run in a process of its own)


def _request_bytes(
    host: str, port: int, method: str, path: str, form: dict | None, agent: str | None
) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
    if agent:
        head += f"User-Agent: {agent}\r\n"
    if form is None:
        return (head + "\r\n").encode()
    body = urlencode(form).encode()
    signature = request_signature(SANDBOX_AUTH_TOKEN, f"http://{host}:{port}{path}", form)
    head += (
        f"Content-Type: application/x-www-form-urlencoded\r\n{SIGNATURE_HEADER}: {signature}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def _send_all(host: str, port: int, requests: list[tuple[bytes, bool]], load: Load) -> dict:
    todo = iter(enumerate(requests))
    interval = load.spread / len(requests) if load.spread else 0.0
    latencies: list[float] = []
    late: list[float] = []
    statuses: dict[str, int] = {}
    errors: list[str] = []
    started = time.perf_counter()

    async def connection() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            for k, (request, head_only) in todo:
                due = started + k * interval
                if (wait := due - time.perf_counter()) > 0:
                    await asyncio.sleep(wait)
                sent = time.perf_counter()
                if interval:
                    late.append(max(0.0, sent - due))
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                if length and not head_only:
                    await reader.readexactly(length)
                latencies.append(time.perf_counter() - sent)
                code = head[9:12].decode()
                statuses[code] = statuses.get(code, 0) + 1
        except (OSError, asyncio.IncompleteReadError) as exc:
            errors.append(repr(exc))
        finally:
            writer.close()

    await asyncio.gather(*(connection() for _ in range(load.connections)))
    seconds = time.perf_counter() - started
    latencies.sort()

    def ms(p: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000, 2)

    return {
        "requests": len(requests),
        "answered": len(latencies),
        "statuses": dict(sorted(statuses.items())),
        "seconds": round(seconds, 3),
        "per_s": round(len(latencies) / seconds),
        "p50_ms": ms(0.50),
        "p99_ms": ms(0.99),
        "max_ms": round(latencies[-1] * 1000, 2) if latencies else None,
        "max_late_ms": round(max(late, default=0.0) * 1000, 2),
        "errors": errors[:5],
    }


def generator_main(host: str, port: int, load: Load) -> None:
    requests = [
        (_request_bytes(host, port, method, path, form, agent), method == "HEAD")
        for method, path, form, agent in load.plan()
    ]
    print("ready", flush=True)
    sys.stdin.readline()
    print(json.dumps(asyncio.run(_send_all(host, port, requests, load))), flush=True)


# ---------------------------------------------------------------------------------------
# The tests

SMALL = Load(messages=300, clicks=50, heads=8, links=25, replies=25, stops=8, connections=16, spread=2.0)
HOLD_S = 4.0
P99_MS = 50.0
APPLIED_WITHIN_S = 10.0


def test_while_another_process_holds_the_write_lock_everything_is_answered_at_once_and_applied_after(home):
    outbox(home, SMALL.messages, SMALL.links)
    app = webhooks.create_app({"sandbox": from_config("sandbox", {})}, home=home)
    with serve_in_thread(app) as server:
        figures = run_under_lock(home, server.url, SMALL, hold=HOLD_S)
        pending = ingress.pending(home)
    answered = sum(figures["statuses"].values())
    report = json.dumps({k: v for k, v in figures.items() if k not in ("after", "while_locked")})
    assert figures["answered"] == figures["requests"] and not figures["errors"], report
    assert set(figures["statuses"]) <= {"200", "302"}, report  # none refused, none ≥ 500
    assert figures["statuses"]["302"] == SMALL.clicks
    assert figures["max_ms"] < 2000, report  # none waited for the lock (held 4 s, load ends at 2)
    # p99 ≤ 50 ms, plus the longest stall this machine imposed meanwhile on a process that only
    # sleeps (a witness): that time was nobody's, and the 2 cores are shared with other people's
    # jobs (CPU pressure 30-75% while this was written). Measured then, the load paced as here:
    # p99 4.5-7 ms when the witness saw < 20 ms, 35-111 ms when it saw stalls of 44-102 ms.
    # (As a burst the client and the receiver want both cores and lose them to the others' jobs
    # in a way the sleeping witness does not see: the bench measures that, beside a no-op app.)
    if figures["p99_ms"] > P99_MS:  # say whether the machine could have done better at all
        floor = run_no_op(SMALL)
        report += f"; an app that does nothing, same load, now: p99 {floor['p99_ms']} ms"
        report += f"; load average {os.getloadavg()}"
    assert figures["p99_ms"] <= P99_MS + figures["machine_stall_ms"], report
    # while the lock was held: everything answered was journaled, nothing applied
    assert figures["while_locked"] == {k: 0 for k in SMALL.expected()} | {"journal_entries": answered}
    # after the release: all of it in the store within the bar, once each, and the journal empty
    assert figures["after"] == SMALL.expected() | {"journal_entries": 0}, report
    assert figures["applied_s_after_release"] <= APPLIED_WITHIN_S, report
    assert pending == 0 and lost(SMALL, figures["after"]) == 0


def test_a_click_redirects_at_once_while_the_store_is_locked_and_is_applied_after(home):
    outbox(home, 3, links=3)
    app = webhooks.create_app({"sandbox": from_config("sandbox", {})}, home=home)
    with serve_in_thread(app) as server, write_lock_held(home) as holder:
        started = time.monotonic()
        answer = httpx.get(server.url + f"/l/{token(2)}", follow_redirects=False)
        probe = httpx.head(server.url + f"/l/{token(2)}")
        took = time.monotonic() - started
        assert (answer.status_code, probe.status_code) == (302, 302)
        assert answer.headers["location"] == "https://shop.example.ru/sale?m=2"
        assert took < 1.0  # had it waited on the writer, it would have waited as long as the lock
        release(holder)
        assert app.state.applier.drain(timeout=20)
    assert counts(home)["clicks"] == 2 and counts(home)["head_clicks"] == 1


Call = tuple[float, float, ingress.ApplyReport]


def _racing_appliers(home: Path, n: int, appliers: int) -> tuple[list[list[Call]], int]:
    """``n`` receipts journaled one per entry while ``appliers`` threads, each with its own
    connections, call :func:`ingress.apply_pending` in small batches over and over at the same
    time: each one's calls (start, end, report), and the entries journaled."""
    journal = ingress.Journal(ingress.journal_path(home))
    now = datetime.now(UTC)
    appending = threading.Event()
    appending.set()
    start = threading.Barrier(appliers + 1, timeout=30)

    def append() -> None:
        start.wait()
        for i in range(0, n, 10):
            journal.append_sync(
                [ingress.status_entry("sandbox", [StatusUpdate("sandbox", sid(j), "delivered", None, now)])
                 for j in range(i, min(n, i + 10))]
            )  # fmt: skip
        journal.close()
        appending.clear()

    def apply() -> list[Call]:
        start.wait()
        conn = store.open_store(home)
        jconn = ingress.connect(ingress.journal_path(home))
        calls = []
        try:
            while True:
                still_appending = appending.is_set()
                began = time.monotonic()
                report = ingress.apply_pending(home, limit=10, conn=conn, jconn=jconn)
                calls.append((began, time.monotonic(), report))
                if not still_appending and not report.applied and not report.rejected:
                    return calls
        finally:
            conn.close()
            jconn.close()

    with ThreadPoolExecutor(appliers + 1) as pool:
        appended = pool.submit(append)
        runs = [pool.submit(apply) for _ in range(appliers)]
        appended.result(timeout=60)
        return [r.result(timeout=60) for r in runs], journal.appended


def test_two_appliers_racing_on_the_same_journal_apply_every_entry_exactly_once(home):
    outbox(home, 1500)
    (first, second), journaled = _racing_appliers(home, 1500, appliers=2)
    reports = [report for _, _, report in first + second]
    assert journaled == 1500
    assert any(  # they did race: a batch applied by one while the other was in apply_pending too
        a_start < b_end and b_start < a_end
        for one, other in ((first, second), (second, first))
        for a_start, a_end, a in one
        if a.applied
        for b_start, b_end, _ in other
    )
    assert sum(r.applied for r in reports) == 1500  # each entry counted by exactly one of them
    assert sum(r.rejected for r in reports) == 0
    conn = store.connect(store.store_path(home))
    rows = conn.execute("select count(*), count(distinct message_id) from message_status_events")
    assert rows.fetchone() == (1500, 1500)
    assert conn.execute("select applied_through from ingress_cursor").fetchall() == [(1500,)]
    assert ingress.pending(home) == 0


def _click(n: int) -> ingress.Entry:
    return ingress.Entry(
        "click",
        {
            "token": token(n),
            "message_id": n + 1,
            "clicked_at": f"2026-12-07 10:00:00.{n:06d}",
            "method": "GET",
        },
    )


def test_a_journal_deleted_and_made_again_starts_a_cursor_of_its_own_and_none_of_its_entries_is_skipped(home):
    store.open_store(home).close()
    path = ingress.journal_path(home)
    journal = ingress.Journal(path)
    journal.append_sync([_click(n) for n in range(3)])
    journal.close()
    first = ingress.journal_id(ingress.connect(path))
    assert ingress.apply_pending(home).applied == 3
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    journal = ingress.Journal(path)  # entry ids start at 1 again: all ≤ the old cursor
    journal.append_sync([_click(n) for n in range(3, 5)])
    journal.close()
    assert ingress.journal_id(ingress.connect(path)) != first
    report = ingress.apply_pending(home)
    assert (report.applied, report.through) == (2, 2)
    assert counts(home)["clicks"] == 5


def test_entries_the_store_refuses_are_kept_in_rejects_and_the_ones_behind_them_are_applied(home):
    outbox(home, 2)
    now = datetime.now(UTC)
    journal = ingress.Journal(ingress.journal_path(home))
    journal.append_sync(
        [
            ingress.status_entry("sandbox", [StatusUpdate("sandbox", sid(0), "not-a-status", None, now)]),
            ingress.Entry("click", {"token": token(0)}),  # no message_id: a payload from a bug
            ingress.Entry("inbound", {"provider": "sandbox", "provider_message_id": "SMx", "from": "nobody",
                                      "to": None, "body": "STOP", "received_at": now.isoformat()}),
            ingress.status_entry("sandbox", [StatusUpdate("sandbox", sid(1), "delivered", None, now)]),
            _click(0),
        ]
    )  # fmt: skip
    journal.close()
    report = ingress.apply_pending(home)
    assert (report.applied, report.rejected, report.through) == (2, 3, 5)
    conn = store.connect(store.store_path(home))
    rejects = conn.execute("select entry_id, kind, error from ingress_rejects order by entry_id").fetchall()
    assert [(e, k) for e, k, _ in rejects] == [(1, "status"), (2, "click"), (3, "inbound")]
    assert "IntegrityError" in rejects[0][2] and "KeyError" in rejects[1][2]
    assert conn.execute("select provider_message_id, status from message_status_events").fetchall() == [
        (sid(1), "delivered")
    ]
    assert counts(home)["clicks"] == 1 and ingress.pending(home) == 0
    assert ingress.apply_pending(home).applied == 0  # the rejects are not tried again and again


def test_receipts_applied_together_still_refuse_a_bad_one_alone_and_keep_orphans(home):
    outbox(home, 4)
    now = datetime.now(UTC)
    journal = ingress.Journal(ingress.journal_path(home))
    receipts = [StatusUpdate("sandbox", sid(i), "delivered", None, now) for i in range(4)]
    journal.append_sync(
        [
            ingress.status_entry("sandbox", [receipts[0], receipts[0]]),  # a repeat in one post
            ingress.status_entry("sandbox", [receipts[1]]),
            ingress.status_entry("sandbox", [StatusUpdate("sandbox", sid(2), "not-a-status", None, now)]),
            ingress.status_entry("sandbox", [receipts[2], StatusUpdate("sandbox", "SMunknown", "sent", None, now)]),
            _click(0),
            ingress.status_entry("sandbox", [receipts[3]]),
            ingress.status_entry("sandbox", [receipts[3]]),  # a provider's retry
        ]
    )  # fmt: skip
    journal.close()
    report = ingress.apply_pending(home)
    assert (report.applied, report.rejected, report.through) == (6, 1, 7)
    conn = store.connect(store.store_path(home))
    try:
        stored = conn.execute("select provider_message_id, status from message_status_events").fetchall()
        orphans = conn.execute("select provider_message_id, status from orphan_status_events").fetchall()
        (rejected,) = conn.execute("select entry_id from ingress_rejects").fetchone()
    finally:
        conn.close()
    assert sorted(stored) == [(sid(i), "delivered") for i in range(4)]
    assert orphans == [("SMunknown", "sent")] and rejected == 3


def test_once_applied_the_journal_holds_no_entry_and_its_log_is_truncated(home):
    outbox(home, 200)
    journal = ingress.Journal(ingress.journal_path(home))
    for i in range(200):
        journal.append_sync([ingress.Entry("click", {"token": token(i), "message_id": i + 1,
                                                     "clicked_at": f"2026-12-07 10:00:{i // 100:02d}.{i:06d}",
                                                     "user_agent": "Mozilla/5.0 SecretAgent", "method": "GET"})])  # fmt: skip
    wal = Path(f"{ingress.journal_path(home)}-wal")
    assert wal.stat().st_size > 0
    report = ingress.apply_pending(home)
    assert report.applied == 200
    assert counts(home)["journal_entries"] == 0
    assert ingress.apply_pending(home).applied == 0  # the applier's next, idle pass truncates the log
    assert wal.stat().st_size == 0  # while the receiver's writer still has the journal open
    assert b"SecretAgent" not in ingress.journal_path(home).read_bytes()  # zeroed, not only unlinked
    journal.append_sync([_click(999)])  # and the journal goes on after the truncation
    journal.close()
    assert ingress.apply_pending(home).applied == 1


_RECEIVER = """
import sys, time
from smsops import webhooks
from smsops.providers import from_config
from smsops.providers.sandbox import serve_in_thread
app = webhooks.create_app({"sandbox": from_config("sandbox", {})}, home=sys.argv[1], apply=False)
with serve_in_thread(app) as server:
    print(server.port, flush=True)
    time.sleep(600)
"""


def test_a_receiver_killed_with_sigkill_right_after_answering_loses_nothing_it_answered(home):
    outbox(home, 600)
    receiver = subprocess.Popen(
        [sys.executable, "-c", _RECEIVER, str(home)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert receiver.stdout is not None
        url = f"http://{LOCAL_HOST}:{int(receiver.stdout.readline())}/webhooks/sandbox/status"
        answered: list[int] = []
        refused: list[int] = []
        killed = threading.Event()

        def post(i: int, client: httpx.Client) -> None:
            if killed.is_set():
                return
            form = {"MessageSid": sid(i), "MessageStatus": "delivered"}
            signature = request_signature(SANDBOX_AUTH_TOKEN, url, form)
            try:
                answer = client.post(url, data=form, headers={"X-Twilio-Signature": signature})
            except httpx.TransportError:
                return  # in flight when it died: not answered, the provider retries
            (answered if answer.status_code == 200 else refused).append(i)

        with httpx.Client(timeout=10) as client, ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(post, i, client) for i in range(600)]
            deadline = time.monotonic() + 30
            while len(answered) < 150 and time.monotonic() < deadline:
                time.sleep(0.001)
            os.kill(receiver.pid, signal.SIGKILL)  # no shutdown, no flush, no last pass
            killed.set()
            for f in futures:
                f.result()
        assert receiver.wait(timeout=10) == -signal.SIGKILL
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.wait()
    assert not refused and len(answered) >= 150
    while ingress.apply_pending(home).applied:
        pass
    conn = store.connect(store.store_path(home))
    stored = {
        int(pmid[2:], 16)
        for (pmid,) in conn.execute(
            "select provider_message_id from message_status_events where status = 'delivered'"
        )
    }
    assert set(answered) <= stored  # every 200 is in the store
    assert ingress.pending(home) == 0


def test_an_applier_stopped_while_the_store_is_locked_leaves_the_entries_for_the_next_one(home):
    outbox(home, 10)
    journal = ingress.Journal(ingress.journal_path(home))
    now = datetime.now(UTC)
    journal.append_sync([ingress.status_entry("sandbox", [StatusUpdate("sandbox", sid(i), "sent", None, now)])
                         for i in range(10)])  # fmt: skip
    with write_lock_held(home) as holder:
        applier = ingress.Applier(home, journal, busy_timeout=0.2).start()
        time.sleep(0.5)
        applier.close()
        assert applier.applied == 0 and ingress.pending(home) == 10
        release(holder)
    applier = ingress.Applier(home, journal).start()
    try:
        assert applier.drain(timeout=20)
    finally:
        applier.close()
        journal.close()
    assert counts(home)["status_events"] == 10


if __name__ == "__main__":
    generator_main(sys.argv[1], int(sys.argv[2]), Load(**json.loads(sys.argv[3])))


def test_a_journal_another_connection_is_making_right_now_is_waited_for_not_refused(tmp_path):
    # Two processes opening a new journal at once (a receiver and a dispatcher starting together)
    # both switch it to WAL; SQLite refuses the second switch at once, busy timeout or not, while
    # the first holds the file's lock. Measured before the fix: 3 of 15 starts of three processes
    # at once failed with "database is locked".
    path = tmp_path / "ingress.sqlite"
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("create table being_made (x)")  # a new file, not in WAL mode yet
    other.execute("begin immediate")
    threading.Timer(0.3, other.execute, ["commit"]).start()
    conn = ingress.connect(path, timeout=5)
    try:
        assert conn.execute("pragma journal_mode").fetchone() == ("wal",)
        assert len(ingress.journal_id(conn)) == 32
    finally:
        conn.close()
        other.close()


def test_a_reader_of_the_journal_never_holds_up_an_answer_and_the_log_is_truncated_after_it(home):
    # Truncating the journal's log once it is empty waits for every reader to leave the log and,
    # while it waits, holds off every writer: every receipt's answer. Measured before the fix:
    # with one reader's snapshot open (an operator's `sqlite3` shell, a backup tool), each
    # receipt after the first waited 30 s (the journal's busy timeout) for its 200.
    outbox(home, 10)
    app = webhooks.create_app({"sandbox": from_config("sandbox", {})}, home=home)
    with serve_in_thread(app) as server, httpx.Client(timeout=10) as client:
        url = server.url + "/webhooks/sandbox/status"

        def post(i: int) -> float:
            form = {"MessageSid": sid(i), "MessageStatus": "sent"}
            headers = {"X-Twilio-Signature": request_signature(SANDBOX_AUTH_TOKEN, url, form)}
            started = time.monotonic()
            assert client.post(url, data=form, headers=headers).status_code == 200
            return time.monotonic() - started

        post(0)
        assert app.state.applier.drain(timeout=20)
        reader = sqlite3.connect(ingress.journal_path(home), isolation_level=None)
        reader.execute("begin")
        reader.execute("select count(*) from entries").fetchone()  # its snapshot stays open
        took = []
        for i in range(1, 4):
            took.append(post(i))
            assert app.state.applier.drain(timeout=20)  # applied and pruned: the journal is empty
        reader.execute("commit")
        reader.close()
        assert max(took) < 1.0, took
        deadline = time.monotonic() + 10
        wal = Path(f"{ingress.journal_path(home)}-wal")
        while wal.stat().st_size and time.monotonic() < deadline:
            time.sleep(0.05)
        assert wal.stat().st_size == 0  # truncated once nobody reads an old snapshot, unasked
    assert counts(home)["status_events"] == 4
