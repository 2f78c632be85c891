"""`smsops serve` as deployed: dispatcher, webhook receiver and sandbox together, receipts included.

Run with `pytest -m bench -s bench/test_serve_bench.py -p no:cacheprovider`.

For each configured rate (``SMSOPS_BENCH_SERVE_RATES``, default 150, 500, 1,000 and 2,000 msg/s)
one run, in this order:

1. **The isolated baseline**: the dispatcher alone (:func:`smsops.dispatch.run_sync` in this
   process) against a sandbox in a process of its own that behaves as `smsops serve`'s calm
   sandbox does (latency 20–80 ms, no errors) and posts no receipts, at the same rate and
   concurrency, as ``bench/test_dispatch_bench.py`` measures the parts.
2. **The system**: ``smsops serve --rate R --concurrency C --port P`` started as its console
   script starts it, in a process of its own, with ``SMSOPS_HOME`` a fresh folder, the sandbox
   provider (``SANDBOX_URL`` a free port) and ``SMSOPS_SANDBOX_FAULTS=off`` (or the default
   faults, ``SMSOPS_BENCH_SERVE_FAULTS=on``). The store holds a paused service campaign of
   ``R × SMSOPS_BENCH_SERVE_SECONDS`` messages (written with SQL as ``campaigns.plan`` writes
   them; recipients in a zone where it is early afternoon, so quiet hours never bind); once
   serve answers, the campaign is set running and the clock starts. ``C`` is serve's default
   for the rate (15% of it, at least 32: the sandbox answers in 20–80 ms, and 32 requests in
   flight cannot pass ~640/s), given on the command line only to earlier code and when
   ``SMSOPS_BENCH_SERVE_CONCURRENCY`` overrides it.
   With ``SMSOPS_BENCH_SERVE_BEFORE``, the same again with an earlier version of the code first.

What is measured, all from the store except the arrivals:

- ``sent_per_s``: messages submitted / (last ``submitted_at`` − when the campaign was set
  running); ``steady_per_s``: the median whole second of arrivals at the sandbox, the first and
  last left out;
- ``busiest_second``: the most sends the sandbox received in any one-second window (a probe in
  the serve process, loaded through ``sitecustomize`` on ``PYTHONPATH``, logs the wall-clock
  time each ``POST …/Messages.json`` reaches the sandbox's app);
- ``receipts_at_end`` and ``receipts_after_30s``: submitted messages with a final status
  (delivered, undelivered, failed) in ``message_status_events`` when the campaign became
  ``finished``, and 30 s later (the receipt lookups of `smsops serve` ask only about messages
  two minutes old, so none of these came from a lookup);
- ``receipt_latency_p50/p99``: for each final status recorded, from the moment the sandbox's
  courier made its post (``at`` of the receipt in ``/sandbox/messages``: the status fell due
  and the post started) to the moment this process first saw the row in
  ``message_status_events`` (polled every 0.1 s, so the figure is rounded up by up to ~0.1 s).
  The store's ``received_at`` is the applier's clock at whole seconds, too coarse for this;
- the CPU time per message sent of the serve process and of its children (the sandbox, when it
  runs in a process of its own; in the serve process's figure when it runs in a thread), and the
  sandbox's own tally of receipt posts (posted, retried, given up, pending).

DESIGN.md asks for the configured rate up to 2,000 msg/s sustained with every receipt recorded.
"""

from __future__ import annotations

import base64
import json
import math
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from smsops import dispatch, store
from smsops.providers import SANDBOX_ACCOUNT_SID, SANDBOX_AUTH_TOKEN, from_config

pytestmark = pytest.mark.bench

RATES = [int(r) for r in os.environ.get("SMSOPS_BENCH_SERVE_RATES", "150,500,1000,2000").split(",")]
SECONDS = float(os.environ.get("SMSOPS_BENCH_SERVE_SECONDS", "20"))
"""Seconds of sending at the configured rate: the campaign has rate × this messages."""
AFTER = 30.0
"""Seconds after the campaign's end at which receipts are counted again."""
BEFORE = os.environ.get("SMSOPS_BENCH_SERVE_BEFORE")
"""A folder holding an earlier ``smsops`` package and its ``dbt_project`` (the sandbox reads the
price seed there), e.g. from ``git archive <commit> smsops dbt_project | tar -x -C /tmp/before``:
serve is then measured with that code too, in the same run, just before the current code."""
FAULTS = os.environ.get("SMSOPS_BENCH_SERVE_FAULTS", "off")
POLL = 0.1
GIVE_UP = 6
"""A campaign not finished after this many times its planned sending time (+30 s) is measured
as it stands (``"finished": false``; "at end" then means at that moment)."""
SENDER = "SHOPMARKET"
FINAL = ("delivered", "undelivered", "failed")


def concurrency_for(rate: int) -> int:
    """Requests in flight: ``SMSOPS_BENCH_SERVE_CONCURRENCY``, else serve's default for the rate
    (:func:`smsops.dispatch.concurrency_for`: rate × 0.1 s × 1.5, at least 32)."""
    given = os.environ.get("SMSOPS_BENCH_SERVE_CONCURRENCY")
    if given:
        return int(given)
    return dispatch.concurrency_for(rate)


# What runs in the serve process: logs when each send reaches the sandbox's app (wall clock, so
# this process can compare), written out every quarter second. Loaded by `sitecustomize`.
PROBE = textwrap.dedent(
    """
    import os, threading, time

    _target = os.environ.get("SMSOPS_BENCH_ARRIVALS")
    if _target:
        from smsops.providers import sandbox as _sandbox

        _arrivals = []
        _made = _sandbox.create_app

        def create_app(settings=None):
            app = _made(settings)

            async def probed(scope, receive, send):
                if scope["type"] == "http" and scope["method"] == "POST" and scope["path"].endswith(
                    "/Messages.json"
                ):
                    _arrivals.append(time.time())
                await app(scope, receive, send)

            probed.state = app.state
            return probed

        _sandbox.create_app = create_app

        def _write():
            path = f"{_target}.{os.getpid()}"
            with open(path, "a") as fh:
                while True:
                    time.sleep(0.25)
                    taken = len(_arrivals)
                    if taken:
                        fh.write("".join(f"{t:.6f}\\n" for t in _arrivals[:taken]))
                        del _arrivals[:taken]
                        fh.flush()

        threading.Thread(target=_write, daemon=True).start()
    """
)

# The baseline's sandbox: serve's calm sandbox in a process of its own, logging arrivals as the
# probe does (``/bench/arrivals`` hands them over).
SANDBOX = textwrap.dedent(
    """
    import sys, time
    import uvicorn
    from starlette.responses import JSONResponse
    from smsops.providers.sandbox import SandboxSettings, create_app

    settings = SandboxSettings(
        transient_error_rate=0.0, duplicate_rate=0.0, out_of_order_rate=0.0,
        receipt_delay=(0.05, 0.2), rate_per_second=float(sys.argv[2]),
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
            arrivals.append(time.time())
        await sandbox(scope, receive, send)

    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False)
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, process: subprocess.Popen, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline and process.poll() is None, f"{url} did not answer"
        time.sleep(0.1)


def tree_cpu(pid: int) -> tuple[float, float]:
    """User + system CPU seconds of ``pid`` and of its live children (Linux /proc)."""
    own = children = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rpartition(")")[2].split()
        except OSError:
            continue
        if int(entry) == pid:
            own += (int(fields[11]) + int(fields[12])) / tick
        elif int(fields[1]) == pid:
            children += (int(fields[11]) + int(fields[12])) / tick
    return own, children


def max_in_any_window(times: list[float], period: float = 1.0) -> int:
    times = sorted(times)
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while times[lo] < t - period:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


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


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def campaign(home: Path, n: int, *, status: str) -> int:
    """A service campaign of ``n`` planned messages (written as ``campaigns.plan`` writes them),
    recipients in a zone where it is early afternoon; none of the sandbox's refusing endings."""
    now = datetime.now(UTC).replace(tzinfo=None).isoformat(sep=" ", timespec="seconds")
    shift = (13 - datetime.now(UTC).hour + 12) % 24 - 12
    zone = f"Etc/GMT{-shift:+d}" if shift else "Etc/GMT"
    numbers, i = [], 0
    while len(numbers) < n:
        if i % 100 not in (0, 13, 14, 97, 98, 99):
            numbers.append(f"+7912{i:07d}")
        i += 1
    conn = store.open_store(home)
    try:
        with store.transaction(conn):
            (cid,) = conn.execute(
                "insert into campaigns (name, kind, status, sender_id, created_at, launched_at) values"
                " ('bench', 'service', ?, ?, ?, ?) returning campaign_id",
                (status, SENDER, now, now),
            ).fetchone()
            conn.execute("insert into campaign_variants values (?, 'A', 'x', ?)", (cid, SENDER))
            first = conn.execute("select coalesce(max(contact_id), 0) + 1 from contacts").fetchone()[0]
            conn.executemany(
                "insert into contacts (contact_id, phone_e164, phone_valid, time_zone, created_at, updated_at)"
                " values (?, ?, 1, ?, ?, ?)",
                [(first + k, p, zone, now, now) for k, p in enumerate(numbers)],
            )
            conn.executemany(
                "insert into messages (idempotency_key, campaign_id, variant, contact_id, phone_e164, body,"
                " encoding, segments, state, planned_at) values (?, ?, 'A', ?, ?, ?, 'GSM-7', 1, 'planned', ?)",
                [
                    (f"{cid}:{first + k}", cid, first + k, p, f"Your order {k:06d} has shipped", now)
                    for k, p in enumerate(numbers)
                ],
            )
    finally:
        conn.close()
    return cid


# ---------------------------------------------------------------------------------------
# The isolated baseline


def baseline(home: Path, rate: int, concurrency: int) -> dict:
    """The dispatcher alone at ``rate`` against a calm sandbox in its own process (no receipts)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    sandbox = subprocess.Popen([sys.executable, "-c", SANDBOX, str(port), "100000"])
    try:
        wait_for(f"{url}/sandbox/health", sandbox)
        cid = campaign(home, int(rate * SECONDS), status="running")
        provider = from_config("sandbox", {"SANDBOX_URL": url})
        settings = dispatch.DispatchSettings(
            rate_per_second=rate, concurrency=concurrency, clients=concurrency,
            processes=dispatch.processes_for(rate),
        )  # fmt: skip
        httpx.get(f"{url}/bench/arrivals")
        report = dispatch.run_sync(home, provider, settings, campaign_id=cid)
        seen = httpx.get(f"{url}/bench/arrivals", timeout=30).json()
    finally:
        sandbox.terminate()
        sandbox.wait(timeout=10)
    return {
        "sent_per_s": round(report.requests / report.seconds),
        "steady_per_s": steady(seen),
        "busiest_second": max_in_any_window(seen),
        "submitted": report.submitted,
    }


# ---------------------------------------------------------------------------------------
# The system


class Watcher:
    """Reads the store as the run goes: when each final status first appears."""

    def __init__(self, home: Path, cid: int) -> None:
        self.conn = store.connect(store.store_path(home))
        self.cid = cid
        self.after = 0
        self.seen: dict[int, float] = {}  # message_id → when its final status was first seen

    def poll(self) -> str:
        now = time.time()
        found = self.conn.execute(
            "select event_id, message_id, status from message_status_events where event_id > ? order by event_id",
            (self.after,),
        ).fetchall()
        for event_id, message_id, status in found:
            self.after = event_id
            if status in FINAL:
                self.seen.setdefault(message_id, now)
        return self.conn.execute(
            "select status from campaigns where campaign_id = ?", (self.cid,)
        ).fetchone()[0]

    def close(self) -> None:
        self.conn.close()


def run_serve(tmp: Path, rate: int, concurrency: int, code: str | None = None) -> dict:
    """``smsops serve`` at ``rate``; ``code``: a folder holding another version of the ``smsops``
    package, put first on the serve process's path (to measure a change beside the code before it)."""
    home = tmp / "home"
    home.mkdir()
    n = int(rate * SECONDS)
    cid = campaign(home, n, status="paused")
    port, sandbox_port = free_port(), free_port()
    probe = tmp / "probe"
    probe.mkdir()
    (probe / "sitecustomize.py").write_text(PROBE)
    arrivals = tmp / "arrivals"
    env = {
        **os.environ,
        "SMSOPS_HOME": str(home),
        "SMSOPS_PROVIDER": "sandbox",
        "SANDBOX_URL": f"http://127.0.0.1:{sandbox_port}",
        "SMSOPS_SANDBOX_FAULTS": FAULTS,
        "SMSOPS_REFRESH_MINUTES": "0",
        "SMSOPS_BENCH_ARRIVALS": str(arrivals),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(probe), code, os.environ.get("PYTHONPATH")])),
    }
    command = [
        str(Path(sys.executable).with_name("smsops")), "serve", "--port", str(port), "--rate", str(rate),
    ]  # fmt: skip
    if code or os.environ.get("SMSOPS_BENCH_SERVE_CONCURRENCY"):  # else serve's own default, as deployed
        command += ["--concurrency", str(concurrency)]
    log = (tmp / "serve.log").open("w")
    serve = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    watcher = Watcher(home, cid)
    try:
        wait_for(f"http://127.0.0.1:{port}/healthz", serve)
        wait_for(f"http://127.0.0.1:{sandbox_port}/sandbox/health", serve)
        conn = store.open_store(home)
        with store.transaction(conn):
            conn.execute("update campaigns set status = 'running' where campaign_id = ?", (cid,))
        conn.close()
        started = time.time()
        cpu_before = tree_cpu(serve.pid)
        deadline = started + SECONDS * GIVE_UP + 30
        finished = True
        while watcher.poll() != "finished":
            assert serve.poll() is None, f"serve stopped: see {tmp / 'serve.log'}"
            if time.time() > deadline:  # measured as it stands: the figures say how far it got
                finished = False
                break
            time.sleep(POLL)
        ended = time.time()
        cpu = [after - before for after, before in zip(tree_cpu(serve.pid), cpu_before, strict=True)]
        while time.time() < ended + AFTER:
            watcher.poll()
            time.sleep(POLL)
        auth = base64.b64encode(f"{SANDBOX_ACCOUNT_SID}:{SANDBOX_AUTH_TOKEN}".encode()).decode()
        sandbox = f"http://127.0.0.1:{sandbox_port}"
        try:  # a sandbox that fell behind may not answer in time
            health = httpx.get(f"{sandbox}/sandbox/health", timeout=60).json()
            accepted = httpx.get(
                f"{sandbox}/sandbox/messages", headers={"Authorization": f"Basic {auth}"}, timeout=300
            ).json()
        except httpx.HTTPError:
            health, accepted = {}, []
    finally:
        watcher.close()
        serve.send_signal(signal.SIGINT)
        try:
            serve.wait(timeout=30)
        except subprocess.TimeoutExpired:
            serve.kill()
            serve.wait()
        log.close()
    seen = [float(line) for f in tmp.glob("arrivals.*") for line in f.read_text().split()]
    conn = store.open_store(home)
    try:
        sids = dict(
            conn.execute(
                "select provider_message_id, message_id from messages where campaign_id = ? and state = 'submitted'",
                (cid,),
            ).fetchall()
        )
        (last_submitted,) = conn.execute(
            "select max(submitted_at) from messages where campaign_id = ?", (cid,)
        ).fetchone()
    finally:
        conn.close()
    assert sids, f"serve sent nothing: see {tmp / 'serve.log'}"
    latencies = []
    for message in accepted:
        message_id = sids.get(message["sid"])
        if message_id is None or message_id not in watcher.seen:
            continue
        posts = [r for r in message["receipts"] if r["status"] in FINAL]
        if posts:
            fell_due = datetime.fromisoformat(posts[0]["at"]).timestamp()
            latencies.append(watcher.seen[message_id] - fell_due)
    sending = datetime.fromisoformat(last_submitted).replace(tzinfo=UTC).timestamp() - started
    logged = (tmp / "serve.log").read_text().splitlines()
    warnings = [line for line in logged if " WARNING " in line or " ERROR " in line]
    posts = health.get("receipts") or {}
    return {
        "messages": n,
        "finished": finished,
        "submitted": len(sids),
        "sent_per_s": round(len(sids) / sending),
        "steady_per_s": steady(seen),
        "busiest_second": max_in_any_window(seen),
        "receipts_at_end": f"{sum(1 for m in sids.values() if watcher.seen.get(m, math.inf) <= ended)}/{len(sids)}",
        "receipts_after_30s": f"{sum(1 for m in sids.values() if m in watcher.seen)}/{len(sids)}",
        "receipt_latency_p50_s": round(percentile(latencies, 0.5) or math.nan, 2),
        "receipt_latency_p99_s": round(percentile(latencies, 0.99) or math.nan, 2),
        "latencies_measured": len(latencies),
        "campaign_seconds": round(ended - started, 1),
        "serve_cpu_us_per_msg": round(cpu[0] / len(sids) * 1e6),
        "sandbox_process_cpu_us_per_msg": round(cpu[1] / len(sids) * 1e6),
        "sandbox_receipt_posts": {k: posts.get(k) for k in ("posted", "retried", "given_up", "pending")},
        "log_warnings": len(warnings),
        "first_warnings": [line[:200] for line in warnings[:3]],
    }


@pytest.mark.parametrize("rate", RATES)
def test_serve_as_deployed_at_the_configured_rate(rate, tmp_path):
    concurrency = concurrency_for(rate)
    load_before = os.getloadavg()
    (tmp_path / "baseline").mkdir()
    alone = baseline(tmp_path / "baseline", rate, concurrency)
    earlier = None
    if BEFORE:
        (tmp_path / "before").mkdir()
        earlier = run_serve(tmp_path / "before", rate, concurrency, code=BEFORE)
    (tmp_path / "serve").mkdir()
    system = run_serve(tmp_path / "serve", rate, concurrency)
    summary = {
        "rate": rate,
        "concurrency": concurrency,
        "faults": FAULTS,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "dispatcher_alone": alone,
        **({"serve_before": earlier} if earlier else {}),
        "serve": system,
    }
    print("\n" + json.dumps(summary, indent=2, ensure_ascii=False))
    assert system["busiest_second"] <= rate
    assert alone["busiest_second"] <= rate
    if system["sent_per_s"] < rate * 0.9:
        print(
            f"BELOW THE RATE: serve sent {system['sent_per_s']:,}/s of {rate:,}/s (alone {alone['sent_per_s']:,}/s)"
        )
    if system["receipts_after_30s"].split("/")[0] != system["receipts_after_30s"].split("/")[1]:
        print(f"RECEIPTS MISSING: {system['receipts_after_30s']} recorded 30 s after the campaign ended")


def test_the_opt_out_gate_per_check_while_receipts_are_journaled(tmp_path):
    """The opt-out gate's check (``Revocations.verdict``) in a process like serve's: a thread
    journals a receipt every ~2 ms and another keeps Python busy (the receiver's and the applier's
    threads). Beside it, in the same run, the floor of the gate before 84c4fdf: two
    ``pragma data_version`` reads a check, each of which hands the GIL over and waits for it."""
    import threading

    from smsops import ingress
    from smsops.revocations import Revocations

    conn = store.open_store(tmp_path)
    path = ingress.journal_path(tmp_path)
    journal = ingress.Journal(path)
    gate = Revocations(conn, path)
    jconn = ingress.connect(path)
    stop = threading.Event()

    def receipts() -> None:
        n = 0
        while not stop.is_set():
            update = ["sandbox", f"SM{n:032x}", "delivered", None, "2026-12-07T10:00:00+00:00"]
            journal.append_sync([ingress.Entry("status", {"updates": [update]}, "sandbox")])
            n += 1
            time.sleep(0.002)

    def busy() -> None:
        while not stop.is_set():
            sum(range(2000))

    def timed(check, n: int) -> dict:
        wall, cpu = time.perf_counter(), time.thread_time()
        for _ in range(n):
            check()
        return {
            "wall_us": round((time.perf_counter() - wall) / n * 1e6, 2),
            "cpu_us": round((time.thread_time() - cpu) / n * 1e6, 2),
        }

    threads = [threading.Thread(target=receipts), threading.Thread(target=busy)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        journal_reads = gate.journal_reads
        verdict = timed(lambda: gate.verdict("+79120000001", gate.mark), 20_000)
        pragmas = timed(
            lambda: (
                conn.execute("pragma data_version").fetchone(),
                jconn.execute("pragma data_version").fetchone(),
            ),
            2_000,
        )
        commits = journal.commits
    finally:
        stop.set()
        for t in threads:
            t.join()
        journal.close()
        gate.close()
        jconn.close()
        conn.close()
    print(
        "\n"
        + json.dumps(
            {
                "load_average": [round(x, 2) for x in os.getloadavg()],
                "gate_verdict": verdict,
                "two_pragma_reads": pragmas,
                "journal_commits_meanwhile": commits,
                "journal_reads_by_the_gate": gate.journal_reads - journal_reads,
            },
            indent=2,
        )
    )
    assert gate.journal_reads == journal_reads  # receipts alone never send the gate to the journal
