"""Dispatch throughput: 20,000 messages through the dispatcher to the sandbox in another process.

Run with `pytest -m bench -s bench/test_dispatch_bench.py -p no:cacheprovider`.

The sandbox runs in its own process (uvicorn on loopback, no added latency, no errors), with a
rate limit (``SANDBOX_RATE``) above what any client here reaches, so the raw figures are never
throttled (on a fast day the lean client alone passed 5,000/s), and logs when each send reaches
it: the dispatcher's own limit is judged from those arrival times. Three figures in one
run, against the same sandbox and with the same client setup (``CONCURRENCY`` requests in
flight over ``CLIENTS`` httpx clients):

- raw httpx: plain form POSTs, nothing else, over httpx's own transport;
- the same with the dispatcher's :class:`~smsops.providers.transport.LeanClient`;
- the Twilio adapter alone (``provider.send``, lean transport): what the wire protocol costs;
- the dispatcher end to end (start-up included): claim, consent re-check, quiet hours, rate
  window, send, record, finish — the outbox in SQLite — with one process and with two
  (``processes=2``: a helper process takes half the work and half the rate); ``steady_per_s``
  is the median whole second at the sandbox.

Each comes with the CPU it cost per message on each side (``client_cpu_us_per_msg``: this
process, its threads and its helper processes; ``sandbox_cpu_us_per_msg``): on 2 cores shared
with the sandbox (and, here, with other people's jobs) that, more than the wall-clock rate, says
what a change bought.

Then a run at a binding rate (``BOUND_RATE``) checks, with the sandbox's own arrival times, that
no one-second window saw more than the limit. Target (DESIGN.md): ≥ 2,000 messages per second.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from smsops import consent, dispatch, store
from smsops.providers import SANDBOX_ACCOUNT_SID, SANDBOX_AUTH_TOKEN, SendRequest, from_config
from smsops.providers.transport import LeanClient

pytestmark = pytest.mark.bench

MESSAGES = int(os.environ.get("SMSOPS_BENCH_MESSAGES", "20000"))
RATE = 5_000
SANDBOX_RATE = 100_000
BOUND_RATE = 1_000
CONCURRENCY = int(os.environ.get("SMSOPS_BENCH_CONCURRENCY", "32"))
CLIENTS = int(os.environ.get("SMSOPS_BENCH_CLIENTS", "32"))
TARGET = 2_000
SENDER = "SHOPMARKET"

SANDBOX = textwrap.dedent(
    """
    import sys, time
    import uvicorn
    from starlette.responses import JSONResponse
    from smsops.providers.sandbox import SandboxSettings, create_app

    settings = SandboxSettings(
        latency=(0.0, 0.0), transient_error_rate=0.0, duplicate_rate=0.0, out_of_order_rate=0.0,
        rate_per_second=float(sys.argv[2]),
    )
    sandbox = create_app(settings)
    arrivals = []

    async def app(scope, receive, send):
        if scope["type"] == "http" and scope["path"] == "/bench/arrivals":
            taken = list(arrivals)
            arrivals.clear()
            await JSONResponse(taken)(scope, receive, send)
            return
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"].endswith("/Messages.json"):
            arrivals.append(time.monotonic())
        await sandbox(scope, receive, send)

    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False)
    """
)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SANDBOX_PIDS: dict[str, int] = {}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a running process (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Cpu:
    """CPU seconds spent by this process (all threads), its reaped children (helper dispatcher
    processes) and the sandbox, between ``start()`` and ``stop()``."""

    def __init__(self, url: str) -> None:
        self.pid = SANDBOX_PIDS[url]

    def _now(self) -> tuple[float, float]:
        own = time.process_time()
        children = os.times()
        return own + children.children_user + children.children_system, cpu_seconds(self.pid)

    def start(self) -> None:
        self.started = self._now()

    def per_message_us(self, n: int) -> dict[str, int]:
        here, sandbox = self._now()
        return {
            "client_cpu_us_per_msg": round((here - self.started[0]) / n * 1e6),
            "sandbox_cpu_us_per_msg": round((sandbox - self.started[1]) / n * 1e6),
        }


@pytest.fixture(scope="module")
def sandbox_url() -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-c", SANDBOX, str(port), str(SANDBOX_RATE)])
    url = f"http://127.0.0.1:{port}"
    SANDBOX_PIDS[url] = process.pid
    deadline = time.monotonic() + 20
    while True:
        try:
            if httpx.get(f"{url}/sandbox/health").status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline and process.poll() is None, "the sandbox did not start"
        time.sleep(0.1)
    yield url
    process.terminate()
    process.wait(timeout=10)


def arrivals(url: str) -> list[float]:
    return httpx.get(f"{url}/bench/arrivals").json()


def max_in_any_window(times: list[float], period: float = 1.0) -> int:
    times = sorted(times)
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while times[lo] < t - period:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def phone(i: int) -> str:
    return f"+7912{i:07d}"


def campaign(home: Path, n: int, offset: int = 0) -> int:
    """A running promo campaign of ``n`` planned messages to opted-in numbers (written directly,
    as ``campaigns.plan`` writes them), recipients in a zone where it is daytime."""
    now = datetime.now(UTC).replace(tzinfo=None).isoformat(sep=" ", timespec="seconds")
    hour = datetime.now(UTC).hour
    shift = (13 - hour + 12) % 24 - 12
    zone = f"Etc/GMT{-shift:+d}" if shift else "Etc/GMT"
    numbers, i = [], offset
    while len(numbers) < n:  # none of the sandbox's refusing endings (00, 13, 14, 97-99)
        if i % 100 not in (0, 13, 14, 97, 98, 99):
            numbers.append(phone(i))
        i += 1
    conn = store.open_store(home)
    try:
        with store.transaction(conn):
            (cid,) = conn.execute(
                "insert into campaigns (name, kind, status, sender_id, created_at) values"
                " ('bench', 'promo', 'running', ?, ?) returning campaign_id",
                (SENDER, now),
            ).fetchone()
            conn.execute(
                "insert into campaign_variants values (?, 'A', 'x', ?)",
                (cid, SENDER),
            )
            first = conn.execute("select coalesce(max(contact_id), 0) + 1 from contacts").fetchone()[0]
            conn.executemany(
                "insert into contacts (contact_id, phone_e164, phone_valid, time_zone, created_at, updated_at)"
                " values (?, ?, 1, ?, ?, ?)",
                [(first + i, p, zone, now, now) for i, p in enumerate(numbers)],
            )
            conn.executemany(
                "insert into messages (idempotency_key, campaign_id, variant, contact_id, phone_e164, body,"
                " encoding, segments, state, planned_at) values (?, ?, 'A', ?, ?, ?, 'GSM-7', 1, 'planned', ?)",
                [
                    (f"{cid}:{first + i}", cid, first + i, p, f"Sale -20% this week, code {i:05d}", now)
                    for i, p in enumerate(numbers)
                ],
            )
        consent.record_many(
            conn,
            [
                consent.ConsentEvent(p, "marketing", "opt_in", "web_form", "2024-01-01 00:00:00")
                for p in numbers
            ],
        )
    finally:
        conn.close()
    return cid


async def _sharded(n: int, send, *, lean: bool = False) -> float:
    """``n`` sends by CONCURRENCY workers over CLIENTS clients (httpx's own transport, or
    with ``lean`` the dispatcher's); seconds taken."""
    per_client = math.ceil(CONCURRENCY / CLIENTS)
    limits = httpx.Limits(max_connections=per_client, max_keepalive_connections=per_client)
    ssl_context = httpx.create_ssl_context()
    clients = [
        LeanClient(verify=ssl_context, max_connections=per_client)
        if lean
        else httpx.AsyncClient(limits=limits, verify=ssl_context)
        for _ in range(CLIENTS)
    ]
    todo = iter(range(n))

    async def worker(client: httpx.AsyncClient) -> None:
        for i in todo:
            await send(client, i)

    started = time.perf_counter()
    await asyncio.gather(*(worker(clients[w % CLIENTS]) for w in range(CONCURRENCY)))
    seconds = time.perf_counter() - started
    for client in clients:
        await client.aclose()
    return seconds


def steady(times: list[float]) -> int:
    """Median sends per whole second, first and last second left out (start-up, tail)."""
    if not times:
        return 0
    first = min(times)
    bins: dict[int, int] = {}
    for t in times:
        bins[int(t - first)] = bins.get(int(t - first), 0) + 1
    middle = sorted(n for second, n in bins.items() if 0 < second < max(bins))
    return middle[len(middle) // 2] if middle else len(times)


def run_dispatcher(home: Path, url: str, processes: int) -> dict:
    cid = campaign(home, MESSAGES, offset=processes * 10_000_000)
    provider = from_config("sandbox", {"SANDBOX_URL": url})
    settings = dispatch.DispatchSettings(
        rate_per_second=RATE, concurrency=CONCURRENCY, clients=CLIENTS, batch_size=2_000, processes=processes
    )
    arrivals(url)
    time.sleep(1.1)  # a fresh rate window at the sandbox
    cpu = Cpu(url)
    cpu.start()
    report = dispatch.run_sync(home, provider, settings, campaign_id=cid)
    used = cpu.per_message_us(MESSAGES)
    seen = arrivals(url)
    assert report.submitted == MESSAGES and dispatch.progress(cid, home).status == "finished"
    return {
        "per_s": round(report.requests / report.seconds),
        "steady_per_s": steady(seen),
        "seconds": report.seconds,
        "busiest_second_at_sandbox": max_in_any_window(seen),
        **used,
    }


def test_dispatch_throughput_against_a_sandbox_in_another_process(sandbox_url, tmp_path):
    dispatch._skip_sniffio_probe()  # the httpcore fix the dispatcher applies, for a fair raw figure
    url = f"{sandbox_url}/2010-04-01/Accounts/{SANDBOX_ACCOUNT_SID}/Messages.json"
    credentials = base64.b64encode(f"{SANDBOX_ACCOUNT_SID}:{SANDBOX_AUTH_TOKEN}".encode()).decode()
    auth = {"Authorization": f"Basic {credentials}"}  # a header: the same request for both clients

    async def raw_post(client: httpx.AsyncClient, i: int) -> None:
        r = await client.post(url, data={"To": f"+7913{i:07d}1", "From": SENDER, "Body": "raw"}, headers=auth)
        assert r.status_code == 201, r.text

    provider = from_config("sandbox", {"SANDBOX_URL": sandbox_url})

    async def adapter_send(client: httpx.AsyncClient, i: int) -> None:
        result = await provider.send(client, SendRequest(i, f"+7914{i:07d}1", SENDER, "adapter"))
        assert result.outcome == "accepted", result

    time.sleep(1.1)
    cpu = Cpu(sandbox_url)
    cpu.start()
    raw = MESSAGES / asyncio.run(_sharded(MESSAGES, raw_post))
    raw_cpu = cpu.per_message_us(MESSAGES)
    time.sleep(1.1)
    cpu.start()
    lean = MESSAGES / asyncio.run(_sharded(MESSAGES, raw_post, lean=True))
    lean_cpu = cpu.per_message_us(MESSAGES)
    time.sleep(1.1)
    cpu.start()
    adapter = MESSAGES / asyncio.run(_sharded(MESSAGES, adapter_send, lean=True))
    adapter_cpu = cpu.per_message_us(MESSAGES)
    one = run_dispatcher(tmp_path, sandbox_url, processes=1)
    two = run_dispatcher(tmp_path, sandbox_url, processes=2)
    summary = {
        "messages": MESSAGES,
        "rate_limit": RATE,
        "concurrency": CONCURRENCY,
        "clients": CLIENTS,
        "cpu_cores": os.cpu_count(),
        "raw_httpx_per_s": round(raw),
        "raw_httpx_cpu": raw_cpu,
        "raw_httpx_lean_client_per_s": round(lean),
        "raw_httpx_lean_client_cpu": lean_cpu,
        "twilio_adapter_per_s": round(adapter),
        "twilio_adapter_cpu": adapter_cpu,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "dispatcher_1_process": one,
        "dispatcher_2_processes": two,
    }
    print("\n" + json.dumps(summary, indent=2))
    for figures in (one, two):
        assert figures["busiest_second_at_sandbox"] <= RATE
    best = max(one["per_s"], two["per_s"])
    if best < TARGET:
        print(f"BELOW TARGET: {best:,} msg/s end to end, target {TARGET:,} (raw httpx {raw:,.0f}/s)")


def test_dispatch_never_exceeds_a_binding_rate_at_the_sandbox(sandbox_url, tmp_path):
    n = BOUND_RATE * 5
    cid = campaign(tmp_path, n, offset=30_000_000)
    provider = from_config("sandbox", {"SANDBOX_URL": sandbox_url})
    arrivals(sandbox_url)
    time.sleep(1.1)
    settings = dispatch.DispatchSettings(rate_per_second=BOUND_RATE, concurrency=CONCURRENCY, clients=CLIENTS)
    report = dispatch.run_sync(tmp_path, provider, settings, campaign_id=cid, record_send_times=True)
    seen = arrivals(sandbox_url)
    busiest = max_in_any_window(seen)
    print(
        f"\n{report.requests:,} sends at a limit of {BOUND_RATE:,}/s: {report.rate:,.0f}/s; busiest second at the"
        f" sandbox {busiest:,}, at admission {max_in_any_window(list(report.send_times)):,}"
    )
    assert busiest <= BOUND_RATE and max_in_any_window(list(report.send_times)) <= BOUND_RATE
    load = os.getloadavg()[0]
    if load > (os.cpu_count() or 1):  # others hold the cores: the pace says nothing about the limiter
        print(f"load average {load:.1f} on {os.cpu_count()} cores: not judging how close to the limit it ran")
    else:
        assert report.rate >= BOUND_RATE * 0.8  # the limit binds, and is not undershot badly
