"""Webhook ingest: signed status callbacks against the receiver, then the rows are counted.

Run with `pytest -m bench -s bench/test_webhooks_bench.py -p no:cacheprovider`.

The receiver runs as `smsops serve` runs it (``webhooks.create_app`` served by uvicorn in a
thread of this process) over a store whose outbox already holds ``MESSAGES`` submitted messages
(written with SQL). A load generator in another process (raw asyncio streams, keep-alive, one
request in flight per connection, ``CONNECTIONS`` connections, bodies signed before the clock
starts: httpx itself manages fewer than 2,000 requests/s per process here) posts a ``sent`` and
a ``delivered`` callback for every message in shuffled order, plus a repeat of some of them.
Afterwards ``message_status_events`` must hold exactly one row per message and status: none
lost, none doubled. Target (issue 7): ≥ 3,000 callbacks/s, p99 ≤ 50 ms.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.bench

MESSAGES = int(os.environ.get("SMSOPS_BENCH_MESSAGES", "15000"))
CONNECTIONS = int(os.environ.get("SMSOPS_BENCH_CONNECTIONS", "32"))
REPEATS = 0.05
TARGET_PER_S = 3_000
TARGET_P99_MS = 50.0
PATH = "/webhooks/sandbox/status"


def sid(i: int) -> str:
    return f"SM{i:032x}"


def requests_for(host: str, port: int, messages: int, seed: int = 0) -> list[bytes]:
    """Every callback as the bytes of one HTTP/1.1 request, signed, in shuffled order."""
    from urllib.parse import urlencode

    from smsops.providers import SANDBOX_AUTH_TOKEN
    from smsops.providers.twilio import SIGNATURE_HEADER, request_signature

    rng = random.Random(seed)
    url = f"http://{host}:{port}{PATH}"
    calls = [(i, status) for i in range(messages) for status in ("sent", "delivered")]
    calls += rng.sample(calls, int(len(calls) * REPEATS))
    rng.shuffle(calls)
    out = []
    for i, status in calls:
        form = {"MessageSid": sid(i), "MessageStatus": status, "AccountSid": "AC" + "0" * 32}
        body = urlencode(form).encode()
        signature = request_signature(SANDBOX_AUTH_TOKEN, url, form)
        head = (
            f"POST {PATH} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            "Content-Type: application/x-www-form-urlencoded\r\n"
            f"{SIGNATURE_HEADER}: {signature}\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        out.append(head.encode() + body)
    return out


async def _load(host: str, port: int, requests: list[bytes], connections: int) -> dict:
    todo = iter(requests)
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    errors: list[str] = []

    async def connection() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            for request in todo:
                started = time.perf_counter()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                if length:
                    await reader.readexactly(length)
                latencies.append(time.perf_counter() - started)
                code = head[9:12].decode()
                statuses[code] = statuses.get(code, 0) + 1
        except (OSError, asyncio.IncompleteReadError) as exc:
            errors.append(repr(exc))
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(connection() for _ in range(connections)))
    seconds = time.perf_counter() - started
    latencies.sort()

    def pct(p: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000, 2)

    return {
        "sent": len(requests),
        "answered": len(latencies),
        "seconds": round(seconds, 3),
        "per_s": round(len(latencies) / seconds),
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "max_ms": round(latencies[-1] * 1000, 2),
        "statuses": statuses,
        "errors": errors[:5],
    }


def load_main(host: str, port: int, messages: int, connections: int) -> None:
    """The load generator (run in its own process): prints its figures as JSON."""
    requests = requests_for(host, port, messages)
    print(json.dumps(asyncio.run(_load(host, port, requests, connections))), flush=True)


def outbox(home: Path, messages: int) -> None:
    from smsops import store

    conn = store.open_store(home)
    try:
        with store.transaction(conn):
            conn.execute(
                "insert into campaigns (campaign_id, name, kind, status, created_at)"
                " values (1, 'bench', 'promo', 'running', '2026-01-01 00:00:00')"
            )
            conn.executemany(
                "insert into messages (message_id, idempotency_key, campaign_id, variant, contact_id,"
                " phone_e164, state, provider, provider_message_id, planned_at, submitted_at)"
                " values (?, ?, 1, 'A', ?, ?, 'submitted', 'sandbox', ?, '2026-01-01 00:00:00',"
                " '2026-01-01 00:00:01')",
                [(i + 1, f"1:{i + 1}", i + 1, f"+7912{i:07d}", sid(i)) for i in range(messages)],
            )
    finally:
        conn.close()


def test_webhook_ingest_throughput_with_none_lost(tmp_path):
    from smsops import store, webhooks
    from smsops.providers import from_config
    from smsops.providers.sandbox import serve_in_thread

    outbox(tmp_path, MESSAGES)
    app = webhooks.create_app({"sandbox": from_config("sandbox", {})}, home=tmp_path)
    with serve_in_thread(app) as server:
        cpu = time.process_time()
        run = subprocess.run(
            [sys.executable, __file__, server.host, str(server.port), str(MESSAGES), str(CONNECTIONS)],
            capture_output=True,
            text=True,
            check=True,
            timeout=600,
        )
        cpu = time.process_time() - cpu
    figures = json.loads(run.stdout.strip().splitlines()[-1])
    conn = store.connect(store.store_path(tmp_path))
    try:
        found = conn.execute("select count(*) from message_status_events").fetchone()[0]
        orphans = conn.execute("select count(*) from orphan_status_events").fetchone()[0]
        pairs = conn.execute(
            "select count(*) from (select distinct message_id, status from message_status_events)"
        ).fetchone()[0]
    finally:
        conn.close()
    figures.update(
        server_cpu_us_per_callback=round(cpu / figures["answered"] * 1e6),
        messages=MESSAGES,
        connections=CONNECTIONS,
        rows_expected=2 * MESSAGES,
        rows_found=found,
        orphans=orphans,
        cpu_cores=os.cpu_count(),
        load_average=[round(x, 2) for x in os.getloadavg()],
    )
    print("\n" + json.dumps(figures, indent=2))
    assert figures["statuses"] == {"200": figures["sent"]}
    assert figures["answered"] == figures["sent"] and not figures["errors"]
    assert found == pairs == 2 * MESSAGES and orphans == 0
    if figures["per_s"] < TARGET_PER_S or figures["p99_ms"] > TARGET_P99_MS:
        print(
            f"BELOW TARGET: {figures['per_s']:,}/s p99 {figures['p99_ms']} ms"
            f" (target {TARGET_PER_S:,}/s, p99 ≤ {TARGET_P99_MS:g} ms)"
        )


if __name__ == "__main__":
    load_main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
