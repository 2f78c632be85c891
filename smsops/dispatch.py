"""The dispatcher: hands due outbox rows to a provider and records what came back.

One pass over the outbox, in this order, so that no recipient gets a message twice and none
is lost (DESIGN.md invariants 1, 2, 3 and 5):

1. **Claim** (invariant 1). One short ``begin immediate`` transaction moves a batch of due rows
   (``planned``, ``not_before`` null or past, campaign ``running``) to ``sending``, adds one to
   ``attempts`` and writes a ``send_attempts`` row stamped with the claim time and this
   dispatcher's id. Only rows this transaction moved are sent, so two dispatchers never send
   the same row. A row whose recipient is in quiet hours *now* (a retry or a resume can land
   there) goes back to ``planned`` with ``not_before`` at the next allowed minute.
2. **Re-check** (invariant 2). Just before a chunk of claimed rows is sent,
   :func:`smsops.campaigns.check_before_send` reads the consent ledger and erasures again; a
   row that fails becomes ``suppressed`` with the reason. Chunks cover a fraction of a second
   of sending, so an opt-out stops every send that starts more than that after it is recorded.
3. **Send** at a bounded rate: per provider and sender, a sliding window that never lets the
   provider count more than ``rate_per_second`` sends in any one-second interval (a send holds
   its place from admission until a second after its answer, so no delay on the way can bunch
   sends up at the provider: :class:`SlidingWindow`), and at most ``concurrency`` requests in
   flight, spread over ``clients`` small clients with one keep-alive connection each
   (:class:`~smsops.providers.transport.LeanClient`: httpx's API over a transport of our own,
   about a quarter of httpx's CPU per send; httpx's own clients behind a proxy). One event loop
   does ~2,000 sends/s on a slow core, ~4,700 on a fast one; ``processes`` > 1 starts helper
   processes that claim their own batches, each with an equal share of the rate, and that the
   kernel kills if the process that started them dies.
4. **Record** each answer (in batches, one transaction per ~100 ms):

   ======================  ================================================================
   answer                  outbox row
   ======================  ================================================================
   ``accepted``            ``submitted`` with the provider's id and ``submitted_at``;
                           receipts that arrived first are attached (``adopt_orphans``)
   ``transient``           ``planned`` again, ``not_before`` = now + exponential backoff with
                           jitter, never sooner than ``Retry-After``; after ``max_attempts``:
                           ``rejected``, ``gave_up_after_retries``
   ``permanent``           ``rejected``, ``provider_rejected`` with the error code;
                           ``provider_opted_out`` for a STOP (21610), which is also written to
                           the consent ledger as a marketing opt-out from the provider
   ``unknown``             reconciled, see below
   credentials refused     the row goes back to ``planned``, the campaign is paused and the
                           dispatcher stops sending for it (the secret is never quoted)
   ======================  ================================================================

**Unknown fates.** A send that got no clear answer (timeout after the request left, 5xx), and a
row left in ``sending`` by a process that died, may or may not have reached the recipient. They
are reconciled by asking the provider (:meth:`~smsops.providers.Provider.find`: same To, From
and body since the claim): found → ``submitted`` with that id; the provider has none → back to
``planned`` (safe to send); the provider cannot search → ``unknown`` with ``skip_reason``
``fate_unknown``, shown to the user and never re-sent automatically. On start-up, while holding
the provider's dispatch lock (one dispatcher per provider and home by default), every row left
in ``sending`` for that provider belongs to a dead process and is reconciled at once; later,
rows older than ``reconcile_after`` are.

**Campaigns.** Pause, resume and cancel are status changes (:mod:`smsops.campaigns`) that the
dispatcher reads twice a second: rows claimed for a campaign that is no longer running are put
back (or cancelled). A campaign becomes ``finished`` only when none of its rows is ``planned``
or ``sending`` any more.

:func:`run` runs until no due rows remain for one campaign (waiting for retries due within
``linger`` seconds), or, without a campaign, as a service until ``stop`` is set. A dispatcher
that starts within a second of another one's last send (a restart after a crash) waits out that
second first: the other's window is unknown to it.

Throughput (``bench/test_dispatch_bench.py``, sandbox in another process, 2 cores, one
process): 1,900–2,200 messages/s on the slow machine of 2026-12-03, 4,600–4,850/s on a faster
one, where the bench's 5,000/s limit binds; 2–3× plain httpx POSTs with the same clients
(docs/performance.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import heapq
import importlib.util
import json
import logging
import math
import multiprocessing
import os
import random
import secrets
import signal
import socket
import sqlite3
import sys
import time
import urllib.request
from collections.abc import Callable, Coroutine, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, TypeVar

import httpx

from smsops import campaigns, consent, ingress, links, store, webhooks
from smsops.config import paths
from smsops.policy import QuietHours
from smsops.providers import (
    AuthenticationError,
    ConfigError,
    Provider,
    ProviderUnavailable,
    SendRequest,
    SendResult,
    StatusUpdate,
)
from smsops.providers.transport import LeanClient
from smsops.revocations import Revocations

__all__ = [
    "TERMINAL_STATES",
    "DispatchError",
    "DispatchReport",
    "DispatchSettings",
    "Progress",
    "SlidingWindow",
    "backoff_delay",
    "progress",
    "run",
    "run_sync",
]

log = logging.getLogger(__name__)

TERMINAL_STATES = frozenset({"submitted", "rejected", "suppressed", "holdout", "cancelled", "unknown"})
"""Outbox states a row never leaves on its own: a campaign is finished when all its rows have one."""

UNSETTLED = ("awaiting_lookup", "fate_unknown", "record_failed")
"""Reasons of ``unknown`` rows that keep a campaign from being finished: it is not known whether
they were sent, until a lookup or a person settles them (``smsops.unsettled.decide``)."""

_FIND_MARGIN = timedelta(seconds=30)  # clocks differ: search a little before the claim
_LOOKUP_TRIES = 5
_WATCH_EVERY = 0.5
_FLUSH_EVERY = 0.1
_FLUSH_AT = 512
_CHECK_AT_MOST = 256
_T = TypeVar("_T")
_ANSWERS = frozenset({"accepted", "retry", "rejected", "unknown_answer", "auth"})


class DispatchError(RuntimeError):
    """The dispatcher cannot start as asked (bad settings, a campaign that is not running)."""


# ---------------------------------------------------------------------------------------
# Settings, results


@dataclass(frozen=True, slots=True)
class DispatchSettings:
    """How fast and how carefully to send. Times are in seconds."""

    rate_per_second: float = 100.0
    """Sends admitted per provider and sender in any one-second window."""
    concurrency: int = 32
    """Requests in flight at most."""
    clients: int = 32
    """Clients the requests are spread over, ``concurrency / clients`` connections each (with
    httpx's own clients one connection each is fastest: httpcore's pool costs grow with them)."""
    batch_size: int = 500
    """Rows claimed per transaction at most (fewer at low rates: about two seconds' worth)."""
    max_attempts: int = 5
    """Requests per message before a transient failure becomes ``gave_up_after_retries``."""
    backoff_base: float = 2.0
    """The first retry waits about this long; each next one twice as long (with jitter)."""
    reconcile_after: float = 120.0
    """A row in ``sending`` this old whose claimer is not known to be alive is reconciled."""
    status_callback_url: str | None = None
    """Where the provider posts delivery receipts (the webhook app's status route)."""
    backoff_cap: float = 600.0
    """Longest backoff (a longer ``Retry-After`` is still honoured)."""
    timeout: float = 15.0
    """Per-request timeout."""
    linger: float = 120.0
    """One campaign: keep running while a retry falls due within this long."""
    poll_interval: float = 1.0
    """Service mode: how often to look for due rows when there were none."""
    exclusive: bool = True
    """Hold the provider's dispatch lock (one dispatcher per provider and home), so the rate limit
    holds across processes and rows left in ``sending`` at start-up are known to be orphans."""
    quiet_hours: QuietHours | None = QuietHours()  # noqa: RUF009 — frozen, immutable
    """Judged again at the claim, in the recipient's zone (None: not re-checked)."""
    default_zone: str = campaigns.DEFAULT_ZONE
    """Quiet hours' zone for a contact whose zone nothing tells."""
    unknown_grace: float = 1.0
    """Wait this long after an ambiguous answer before asking the provider what happened."""
    settle_window: float | None = None
    """After an ambiguous send (a timeout, a reset mid-request), a lookup that finds nothing is
    trusted only this long after the request started: until then the provider may still accept
    it, and the row stays ``unknown`` (``awaiting_lookup``) and is looked up again. None: 5 s
    for the sandbox, :data:`SETTLE_WINDOW` for a real provider."""
    window_margin: float = 0.1
    """A dispatcher that starts after another one for the same provider (a restart) waits until
    one second plus this has passed since the other's last send: requests of a process that
    died may still be on their way."""
    http: str = "lean"
    """The HTTP clients: ``lean`` (:class:`~smsops.providers.transport.LeanClient`, a fraction
    of httpx's CPU per send; not when the environment names a proxy, which it does not speak)
    or ``httpx`` (plain ``httpx.AsyncClient``s)."""
    processes: int = 1
    """Dispatcher processes sharing the work: each claims its own batches and gets an equal share
    of the rate, concurrency and clients. One event loop saturates one core (most of it in httpx),
    so more than one pays off only with spare cores."""

    def __post_init__(self) -> None:
        positive = ("rate_per_second", "backoff_base", "backoff_cap", "timeout", "poll_interval")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or not value > 0:
                raise DispatchError(f"DispatchSettings.{name} must be a number above 0, got {value!r}")
        for name in ("concurrency", "clients", "batch_size", "max_attempts", "processes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise DispatchError(f"DispatchSettings.{name} must be a whole number ≥ 1, got {value!r}")
        if self.settle_window is not None and (
            not isinstance(self.settle_window, int | float) or self.settle_window < 0
        ):
            raise DispatchError(
                f"DispatchSettings.settle_window must be a number ≥ 0, got {self.settle_window!r}"
            )
        for name in ("reconcile_after", "linger", "unknown_grace", "window_margin"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or value < 0:
                raise DispatchError(f"DispatchSettings.{name} must be a number ≥ 0, got {value!r}")
        if self.http not in ("lean", "httpx"):
            raise DispatchError(f"DispatchSettings.http must be 'lean' or 'httpx', got {self.http!r}")
        if self.processes > min(self.concurrency, self.rate_per_second):
            raise DispatchError(
                f"DispatchSettings.processes ({self.processes}) cannot exceed concurrency or the rate:"
                " each process needs at least one request in flight and one message per second"
            )
        if self.clients > self.concurrency:
            raise DispatchError(
                f"DispatchSettings.clients ({self.clients}) cannot exceed concurrency ({self.concurrency})"
            )
        if self.status_callback_url is not None and not self.status_callback_url.startswith(
            ("http://", "https://")
        ):
            raise DispatchError(
                f"DispatchSettings.status_callback_url must be an http(s) URL, got {self.status_callback_url!r}"
            )


SETTLE_WINDOW = 300.0
"""Seconds after an ambiguous request's start before a real provider's "no such message" is
believed: Twilio and SMS.ru have no idempotency key, and a request stuck in their queues or in
a proxy can still be accepted well after our client's timeout."""
SANDBOX_SETTLE_WINDOW = 5.0
"""The sandbox accepts a request within its latency (80 ms by default, 1.5 s at most in the
fault tests) or not at all."""


def settle_window(settings: DispatchSettings, provider: Provider) -> float:
    """The settle window for ``provider`` (see :attr:`DispatchSettings.settle_window`)."""
    if settings.settle_window is not None:
        return float(settings.settle_window)
    return SANDBOX_SETTLE_WINDOW if provider.is_sandbox else SETTLE_WINDOW


ONE_PROCESS_RATE = 2_500
"""Messages per second one dispatcher process is given at most when the count is chosen for a
rate: one measured ~2,000/s against the sandbox on loopback on a slow day, the sandbox sharing
its two cores (about 500 µs of the dispatcher's CPU per message)."""


def processes_for(rate_per_second: float, cpus: int | None = None) -> int:
    """How many dispatcher processes a rate needs: one per :data:`ONE_PROCESS_RATE` messages
    per second, never more than the machine's cores (a process saturates one)."""
    cores = (
        cpus
        if cpus is not None
        else len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count()
    )
    return max(1, min(cores or 1, math.ceil(rate_per_second / ONE_PROCESS_RATE)))


EXPECTED_LATENCY = 0.1
"""Seconds a provider takes to answer a send, for :func:`concurrency_for`: the sandbox answers in
20–80 ms; a real provider's answers vary more, and more requests in flight than the rate needs
cost little (the rate window still bounds the sends)."""


def concurrency_for(rate_per_second: float) -> int:
    """Requests in flight a rate needs when answers take :data:`EXPECTED_LATENCY`, with half again
    for headroom, and at least 32: the rate × latency requests are always waiting for an answer, so
    32 in flight cap ~640 msg/s at 20–80 ms answers whatever the rate asked."""
    return max(32, math.ceil(rate_per_second * EXPECTED_LATENCY * 1.5))


@dataclass(frozen=True, slots=True)
class DispatchReport:
    """What one :func:`run` did (this run only; :func:`progress` tells the campaign's state)."""

    campaign_id: int | None
    requests: int
    """Send requests made to the provider."""
    submitted: int
    rejected: dict[str, int]
    """Rows rejected, by reason (``provider_rejected``, ``provider_opted_out``, ``gave_up_after_retries``)."""
    error_codes: dict[str, int]
    """Provider error codes of the rejected rows."""
    suppressed: dict[str, int]
    """Rows the consent re-check stopped, by reason."""
    retried: int
    """Transient answers rescheduled."""
    deferred: int
    """Claimed rows put back because the recipient is in quiet hours now."""
    reconciled: dict[str, int]
    """Unknown fates settled: ``found``, ``absent``, ``unsearchable``."""
    unknown: int
    """Rows left ``unknown`` (``fate_unknown``)."""
    finished: tuple[int, ...]
    """Campaigns this run marked finished."""
    seconds: float
    stopped: str
    """Why the run ended: ``done``, ``stopped``, ``paused``, ``cancelled``, ``credentials`` …"""
    error: str | None = None
    send_times: tuple[float, ...] = ()
    """``time.monotonic()`` of every admitted send (only with ``record_send_times``)."""

    @property
    def rate(self) -> float:
        """Requests per second over the run."""
        return self.requests / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True, slots=True)
class Progress:
    """A campaign's outbox now, for the page and the CLI."""

    campaign_id: int
    status: str
    total: int
    states: dict[str, int]
    reasons: dict[str, int]
    """Skip reasons of rows not sent (and held reasons of waiting rows), with counts."""
    error_codes: dict[str, int]
    """Provider error codes of the rejected rows."""
    due: int
    """Planned rows that may be sent now."""
    waiting: int
    """Planned rows not due yet (quiet hours, retries, an A/B remainder awaiting its winner)."""

    @property
    def done(self) -> int:
        """Rows in a terminal state."""
        return sum(n for state, n in self.states.items() if state in TERMINAL_STATES)

    @property
    def submitted(self) -> int:
        return self.states.get("submitted", 0)

    @property
    def fraction(self) -> float:
        """Share of rows in a terminal state (1.0 for an empty outbox)."""
        return self.done / self.total if self.total else 1.0


def progress(campaign_id: int, home: str | os.PathLike[str] | None = None) -> Progress:
    """Counts by outbox state (and reason) for ``campaign_id``, read now."""
    conn = store.open_store(home)
    try:
        row = conn.execute("select status from campaigns where campaign_id = ?", (campaign_id,)).fetchone()
        if row is None:
            raise campaigns.CampaignNotFound(f"no campaign has id {campaign_id}")
        return _progress(conn, campaign_id, row[0], _stamp(_utcnow()))
    finally:
        conn.close()


def _progress(conn: sqlite3.Connection, campaign_id: int, status: str, now: str) -> Progress:
    states: dict[str, int] = {}
    reasons: dict[str, int] = {}
    codes: dict[str, int] = {}
    due = waiting = 0
    for state, reason, code, n, n_due in conn.execute(
        """
        select state, skip_reason, case when state = 'rejected' then error_code end, count(*),
               sum(state = 'planned' and (not_before is null or not_before <= ?))
        from messages where campaign_id = ? group by 1, 2, 3
        """,
        (now, campaign_id),
    ):
        states[state] = states.get(state, 0) + n
        if reason is not None and state != "submitted":
            _bump(reasons, reason, n)
        _bump(codes, code, n)
        if state == "planned":
            due += n_due
            waiting += n - n_due
    return Progress(
        campaign_id=campaign_id,
        status=status,
        total=sum(states.values()),
        states=dict(sorted(states.items(), key=lambda kv: -kv[1])),
        reasons=dict(sorted(reasons.items(), key=lambda kv: -kv[1])),
        error_codes=dict(sorted(codes.items(), key=lambda kv: -kv[1])),
        due=due,
        waiting=waiting,
    )


# ---------------------------------------------------------------------------------------
# Pure parts


def backoff_delay(
    attempt: int, settings: DispatchSettings, retry_after: float | None, rng: random.Random
) -> float:
    """Seconds to wait before retrying after ``attempt`` transient failures: ``backoff_base``
    doubled per attempt up to ``backoff_cap``, drawn from its upper half (jitter spreads a
    burst of throttled messages), and never less than the provider's ``Retry-After``."""
    ceiling = min(settings.backoff_cap, settings.backoff_base * 2 ** max(0, attempt - 1))
    delay = rng.uniform(ceiling / 2, ceiling)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return delay


class SlidingWindow:
    """Admits at most ``limit`` sends in any interval of ``period`` seconds *as the provider
    counts them*, in arrival order.

    A send takes a place in the window when :meth:`acquire` admits it and keeps it until
    ``period`` seconds after :meth:`done` (its answer). Where in between the provider counts it
    is unknown (a stall on either side can hold a request back for longer than any fixed
    margin: seen here, 155 ms), but it is never after the answer; so any ``period`` at the
    provider holds at most ``limit`` of them. (The last send admitted among those the provider
    counted in one interval found every other one still in the window: each was admitted
    before it and answered no earlier than the interval's start.) A send that got no answer
    (a timeout, a dropped connection, a cancel) may still be counted after the client gave up:
    it keeps its place ``hold`` seconds longer. A send admitted but never made gives its place
    back at once (:meth:`unused`)."""

    def __init__(self, limit: int, period: float = 1.0, *, not_before: float = 0.0) -> None:
        if limit < 1:
            raise DispatchError(f"a rate limit must admit at least 1 message per second, got {limit}")
        self.limit = limit
        self.period = period
        self.not_before = not_before
        self._open = 0  # admitted, not yet answered
        self._ends: list[float] = []  # heap: when each answered send leaves the window
        self._lock = asyncio.Lock()
        self._answered = asyncio.Event()

    async def acquire(self) -> float:
        """Wait for room in the window; the admission time (``time.monotonic()``). Every
        admission must be followed by :meth:`done` or :meth:`unused`."""
        async with self._lock:
            while True:
                now = time.monotonic()
                if now < self.not_before:
                    await asyncio.sleep(self.not_before - now)
                    continue
                ends = self._ends
                while ends and ends[0] < now:
                    heapq.heappop(ends)
                if self._open + len(ends) < self.limit:
                    self._open += 1
                    return now
                if ends:
                    await asyncio.sleep(ends[0] - now + 1e-4)
                else:  # every place is held by a send in flight: its answer starts its period
                    self._answered.clear()
                    await self._answered.wait()

    def done(self, hold: float = 0.0) -> None:
        """An admitted send was answered (or given up on, with ``hold``): its place frees
        ``period`` (+ ``hold``) seconds from now."""
        self._open -= 1
        heapq.heappush(self._ends, time.monotonic() + self.period + hold)
        self._answered.set()

    def unused(self) -> None:
        """An admitted send was not made after all: its place frees now."""
        self._open -= 1
        self._answered.set()


# ---------------------------------------------------------------------------------------
# The engine's data


@dataclass(slots=True)
class _Row:
    message_id: int
    campaign_id: int
    contact_id: int
    phone: str | None
    body: str | None
    sender: str | None
    attempt: int
    claimed_at: datetime
    checked: int = 0
    """The opt-out gate's mark when the row's consent was last checked (:mod:`smsops.revocations`)."""
    sent_at: datetime | None = None
    """When this process started the row's request (None: not by this process)."""


_Kind = Literal[
    "accepted", "retry", "rejected", "unknown_answer", "suppress", "release", "auth", "reconciled"
]


@dataclass(slots=True)
class _Outcome:
    kind: _Kind
    row: _Row
    result: SendResult | None = None
    finished: str | None = None
    reason: str | None = None
    not_before: str | None = None
    verdict: str | None = None  # reconciled: found / absent / unsearchable
    candidates: list[StatusUpdate] = field(default_factory=list)
    interrupted: bool = False  # reconciled: the attempt had no recorded answer
    state: str = "sending"  # the row's state while this outcome is its to write
    not_after: str | None = None  # reconciled as 'unsettled': when to look again


@dataclass(slots=True)
class _Tally:
    requests: int = 0
    submitted: int = 0
    retried: int = 0
    deferred: int = 0
    unknown: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    error_codes: dict[str, int] = field(default_factory=dict)
    suppressed: dict[str, int] = field(default_factory=dict)
    reconciled: dict[str, int] = field(default_factory=dict)
    finished: list[int] = field(default_factory=list)


def _merge(into: _Tally, other: _Tally | DispatchReport) -> None:
    """Add ``other``'s counts (a batch's, or a helper process's report) to ``into``."""
    into.requests += other.requests
    into.submitted += other.submitted
    into.retried += other.retried
    into.deferred += other.deferred
    into.unknown += other.unknown
    for mine, theirs in (
        (into.rejected, other.rejected), (into.error_codes, other.error_codes),
        (into.suppressed, other.suppressed), (into.reconciled, other.reconciled),
    ):  # fmt: skip
        for key, n in theirs.items():
            _bump(mine, key, n)
    into.finished.extend(c for c in other.finished if c not in into.finished)


def _bump(counts: dict[str, int], key: str | None, n: int = 1) -> None:
    if key is not None:
        counts[key] = counts.get(key, 0) + n


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _stamp(value: datetime) -> str:
    """The store's UTC text with microseconds (sorts correctly against second-precision stamps)."""
    return value.astimezone(UTC).replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds")


def _parse(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def _skip_sniffio_probe() -> None:
    """httpcore imports ``sniffio`` each time it makes a lock; since anyio stopped depending on
    it, that import fails every time, and Python does not cache a failed import
    (encode/httpcore#1103): a fifth of a send's CPU here. Marking the module absent makes the
    failure instant; nothing changes where sniffio is installed."""
    if "sniffio" not in sys.modules and importlib.util.find_spec("sniffio") is None:
        sys.modules["sniffio"] = None  # type: ignore[assignment]


def _behind_a_proxy() -> bool:
    """Whether the environment names an HTTP proxy (``HTTPS_PROXY`` and friends). The lean
    clients connect directly, so behind a proxy the dispatcher uses httpx's own clients, which
    honour it (and ``NO_PROXY``)."""
    proxies = {k: v for k, v in urllib.request.getproxies().items() if k in ("http", "https", "all")}
    if proxies:
        log.info("an HTTP proxy is configured: sending through httpx's own clients")
    return bool(proxies)


def _name_the_loop() -> None:
    """Tell sniffio this task (and the tasks it starts) runs on asyncio. anyio asks sniffio on
    every socket read and write of every send, and without a name sniffio finds out by calling
    ``asyncio.current_task()`` each time: ~4% of a send's CPU. Setting the context variable is
    how sniffio expects a loop to be named; uvloop's is an asyncio loop too."""
    with contextlib.suppress(ImportError):
        import sniffio

        sniffio.current_async_library_cvar.set("asyncio")


# ---------------------------------------------------------------------------------------
# The store side: every call runs in the dispatcher's one database thread


# Bulk statements take and return a whole batch as one JSON text: one step of the SQLite
# engine per batch rather than one per row, and so one hand-over of Python's GIL between the
# database thread and the event loop instead of hundreds (which cost more than the SQL here).
# The unary ``+`` on ``state`` keeps SQLite from driving these by an index on state (the
# partial ``ix_messages_planned`` and ``ix_messages_sending`` now): it would visit every row in that state (the whole campaign while it is 'planned',
# every claimed row while 'sending') and scan the batch's JSON for each, O(rows x batch) per
# statement, most of the dispatcher's CPU on a 20,000-message campaign. By message_id it is
# one primary-key lookup per row of the batch.
_DUE_SQL = """
    select json_group_array(json_array(
        message_id, campaign_id, variant, contact_id, phone_e164, body, attempts + 1
    ))
    from (
        select m.* from messages as m
        where m.state = 'planned'
          and (m.not_before is null or m.not_before <= :now)
          and m.message_id > :after
          and m.campaign_id in (
              select campaign_id from campaigns where status = 'running' {only_campaign}
          )
        limit :limit
    )
"""
_CLAIM_SQL = """
    update messages set state = 'sending', attempts = attempts + 1, provider = ?
    where message_id in (select value from json_each(?)) and +state = 'planned'
"""
_ATTEMPTS_SQL = """
    insert into send_attempts (message_id, attempt, provider, dispatcher, started_at)
    select json_extract(value, '$[0]'), json_extract(value, '$[1]'), ?, ?, ? from json_each(?)
"""
_ANSWERS_SQL = """
    update send_attempts set
        finished_at = json_extract(j.value, '$[0]'),
        outcome = json_extract(j.value, '$[1]'),
        http_status = json_extract(j.value, '$[2]'),
        error_code = json_extract(j.value, '$[3]'),
        retry_after = json_extract(j.value, '$[4]'),
        provider_message_id = json_extract(j.value, '$[5]')
    from json_each(?) as j
    where send_attempts.message_id = json_extract(j.value, '$[6]')
      and send_attempts.attempt = json_extract(j.value, '$[7]')
"""
_SUBMITTED_SQL = """
    update messages set
        state = 'submitted',
        provider_message_id = json_extract(j.value, '$[0]'),
        submitted_at = json_extract(j.value, '$[1]'),
        error_code = null, skip_reason = null, not_before = null
    from json_each(?) as j
    where messages.message_id = json_extract(j.value, '$[2]')
      and +messages.state = 'sending' and messages.attempts = json_extract(j.value, '$[3]')
"""

# A row put back to 'planned' stays with its campaign's fate: a campaign cancelled meanwhile
# gets it cancelled (campaigns.cancel only cancels rows that were 'planned' at the time).
_BACK_TO_PLANNED = """
    state = case when (select status from campaigns as c where c.campaign_id = messages.campaign_id)
                      = 'cancelled' then 'cancelled' else 'planned' end,
    skip_reason = case when (select status from campaigns as c where c.campaign_id = messages.campaign_id)
                      = 'cancelled' then 'cancelled' else {reason} end
"""


def _check(conn: sqlite3.Connection, rows: Sequence[_Row]) -> list[tuple[bool, str | None]]:
    """The consent re-check (campaigns.check_before_send), plus what no provider can send."""
    verdicts = campaigns.check_before_send(
        conn,
        [{"message_id": r.message_id, "phone_e164": r.phone, "campaign_id": r.campaign_id} for r in rows],
    )
    out = []
    for row, (_, ok, reason) in zip(rows, verdicts, strict=True):
        if ok and not row.body:
            ok, reason = False, "render_failed"
        elif ok and not row.sender:
            ok, reason = False, "no_sender"
        out.append((ok, reason))
    return out


class _Db:
    """The dispatcher's store connection, used from one thread only."""

    def __init__(
        self, home: str | os.PathLike[str] | None, provider: str, dispatcher: str, max_attempts: int
    ) -> None:
        self.home = home
        self.max_attempts = max_attempts
        self.provider = provider
        self.dispatcher = dispatcher
        self.conn = store.open_store(home)
        self.senders: dict[tuple[int, str], str | None] = {}
        self.campaign_senders: dict[int, str | None] = {}
        self.deferred_count = 0
        self.links = links.Tracker()

    def close(self) -> None:
        self.conn.close()

    # -- claiming ----------------------------------------------------------------------

    def claim(
        self, campaign_id: int | None, limit: int, after: int, settings: DispatchSettings
    ) -> tuple[list[_Row], int, int]:
        """Claim up to ``limit`` due rows with ``message_id > after``: (rows to send, rows claimed,
        the highest id claimed); rows whose recipient is in quiet hours are put back at once."""
        now = _utcnow()
        stamp = _stamp(now)
        self.deferred_count = 0
        only = "and campaign_id = :campaign_id" if campaign_id is not None else ""
        conn = self.conn
        with store.transaction(conn):
            (found,) = conn.execute(
                _DUE_SQL.format(only_campaign=only),
                {"now": stamp, "after": after, "limit": limit, "campaign_id": campaign_id},
            ).fetchone()
            claimed = [tuple(r) for r in json.loads(found)]
            if not claimed:
                return [], 0, after
            claimed.sort()
            # quiet hours judged now, in the recipient's zone (a retry or a late resume can land
            # in them): such rows stay planned, moved to the next allowed minute, never claimed
            deferred: Iterable[int] = ()
            if settings.quiet_hours is not None:
                deferred = campaigns.defer(
                    conn, [r[0] for r in claimed], now=now, quiet=settings.quiet_hours,
                    default_zone=settings.default_zone,
                )  # fmt: skip
            # the same transaction holds the write lock: the rows just read are still 'planned'
            taken = [r for r in claimed if r[0] not in deferred]
            conn.execute(_CLAIM_SQL, (self.provider, json.dumps([r[0] for r in taken])))
            # each recipient's tracked links, stored with the claim: the text sent is the text kept
            tracked = self.links.track(conn, [links.Pending(r[0], r[1], r[2], r[5]) for r in taken], now)
            rows: list[_Row] = []
            self._load_senders({r[1] for r in taken})
            for message_id, cid, variant, contact_id, phone, body, attempts in taken:
                body = tracked.get(message_id, body)
                sender = self.senders.get((cid, variant), self.campaign_senders.get(cid))
                rows.append(_Row(message_id, cid, contact_id, phone, body, sender, attempts, now))
            conn.execute(
                _ATTEMPTS_SQL,
                (
                    self.provider,
                    self.dispatcher,
                    stamp,
                    json.dumps([(r.message_id, r.attempt) for r in rows]),
                ),
            )
            self.deferred_count = len(claimed) - len(taken)
            return rows, len(claimed), claimed[-1][0]

    def _load_senders(self, campaign_ids: Iterable[int]) -> None:
        missing = [c for c in campaign_ids if c not in self.campaign_senders]
        if not missing:
            return
        marks = ", ".join("?" * len(missing))
        for cid, sender in self.conn.execute(
            f"select campaign_id, sender_id from campaigns where campaign_id in ({marks})", missing
        ):
            self.campaign_senders[cid] = sender
        for cid, variant, sender in self.conn.execute(
            f"select campaign_id, variant, sender_id from campaign_variants where campaign_id in ({marks})",
            missing,
        ):
            self.senders[(cid, variant)] = sender or self.campaign_senders.get(cid)

    # -- state -------------------------------------------------------------------------

    def statuses(self, campaign_ids: Iterable[int]) -> dict[int, str]:
        ids = list(campaign_ids)
        if not ids:
            return {}
        return dict(
            self.conn.execute(
                f"select campaign_id, status from campaigns where campaign_id in ({', '.join('?' * len(ids))})",
                ids,
            ).fetchall()
        )

    def next_due(self, campaign_id: int) -> str | None:
        """When the campaign's earliest planned row falls due, or its earliest ambiguous send is
        looked up again (None: neither)."""
        row = self.conn.execute(
            "select min(coalesce(not_before, '')) from messages where campaign_id = ?"
            " and (state = 'planned' or (state = 'unknown' and skip_reason = 'awaiting_lookup'))",
            (campaign_id,),
        ).fetchone()
        return row[0]

    def awaiting(self, campaign_id: int | None, now: str) -> list[_Row]:
        """Ambiguous sends of this provider whose settle window has passed: to look up again."""
        sql = """
            select m.message_id, m.campaign_id, m.variant, m.contact_id, m.phone_e164, m.body, m.attempts,
                   coalesce(a.started_at, m.planned_at)
            from messages as m
            left join send_attempts as a on a.message_id = m.message_id and a.attempt = m.attempts
            where m.state = 'unknown' and m.skip_reason = 'awaiting_lookup' and m.not_before <= ?
              and m.provider = ?
        """
        params: list[Any] = [now, self.provider]
        if campaign_id is not None:
            sql += " and m.campaign_id = ?"
            params.append(campaign_id)
        found = self.conn.execute(sql + " limit 1000", params).fetchall()
        self._load_senders({r[1] for r in found})
        return [
            _Row(mid, cid, contact, phone, body, self.senders.get((cid, variant), self.campaign_senders.get(cid)),
                 attempts, _parse(started))
            for mid, cid, variant, contact, phone, body, attempts, started in found
        ]  # fmt: skip

    def finish(self, campaign_ids: Iterable[int]) -> list[int]:
        """Mark finished every running campaign of ``campaign_ids`` none of whose rows is
        ``planned``, ``sending`` or of an unsettled unknown fate (:data:`UNSETTLED`)."""
        done = []
        stamp = _stamp(_utcnow()).split(".")[0]
        with store.transaction(self.conn):
            for cid in campaign_ids:
                cur = self.conn.execute(
                    """
                    update campaigns set status = 'finished', finished_at = ?
                    where campaign_id = ? and status = 'running'
                      and not exists (
                          select 1 from messages
                          where campaign_id = ? and (
                              state in ('planned', 'sending')
                              or (state = 'unknown' and skip_reason in ({unsettled}))
                          )
                      )
                    """.format(unsettled=", ".join(f"'{r}'" for r in UNSETTLED)),
                    (stamp, cid, cid),
                )
                if cur.rowcount:
                    done.append(cid)
        return done

    def orphans(
        self, campaign_id: int | None, older_than: str | None, dispatcher: str | None = None
    ) -> list[_Row]:
        """Rows in 'sending' claimed for this provider (before ``older_than``, by ``dispatcher``,
        when given)."""
        sql = """
            select m.message_id, m.campaign_id, m.variant, m.contact_id, m.phone_e164, m.body, m.attempts,
                   coalesce(a.started_at, m.planned_at)
            from messages as m
            left join send_attempts as a on a.message_id = m.message_id and a.attempt = m.attempts
            where m.state = 'sending' and (m.provider = ? or m.provider is null)
        """
        params: list[Any] = [self.provider]
        if campaign_id is not None:
            sql += " and m.campaign_id = ?"
            params.append(campaign_id)
        if older_than is not None:
            sql += " and coalesce(a.started_at, m.planned_at) < ?"
            params.append(older_than)
        if dispatcher is not None:
            sql += " and a.dispatcher = ?"
            params.append(dispatcher)
        found = self.conn.execute(sql, params).fetchall()
        self._load_senders({r[1] for r in found})
        return [
            _Row(mid, cid, contact, phone, body, self.senders.get((cid, variant), self.campaign_senders.get(cid)),
                 attempts, _parse(started))
            for mid, cid, variant, contact, phone, body, attempts, started in found
        ]  # fmt: skip

    def last_activity(self) -> str | None:
        row = self.conn.execute(
            "select max(coalesce(finished_at, started_at)) from send_attempts where provider = ?",
            (self.provider,),
        ).fetchone()
        return row[0]

    # -- recording ---------------------------------------------------------------------

    def flush(self, outcomes: Sequence[_Outcome], tally: _Tally) -> tuple[set[int], bool, list[StatusUpdate]]:
        """Write outcomes in one transaction: (campaigns touched, any accepted, statuses found by
        reconciliation to record as receipts)."""
        conn = self.conn
        touched: set[int] = set()
        statuses: list[StatusUpdate] = []
        accepted = False
        answers = [
            (o.finished, "auth_refused" if o.kind == "auth" else o.result.outcome, o.result.http_status,
             o.result.error_code, o.result.retry_after, o.result.provider_message_id, o.row.message_id,
             o.row.attempt)
            for o in outcomes
            if o.result is not None and o.kind in _ANSWERS
        ]  # fmt: skip
        with store.transaction(conn):
            # answers first: a reconciliation in the same batch completes its attempt's row
            conn.execute(_ANSWERS_SQL, (json.dumps(answers),))
            for o in outcomes:
                row, result = o.row, o.result
                guard = (row.message_id, row.attempt)
                touched.add(row.campaign_id)
                if o.kind == "accepted":
                    continue  # below, all at once
                if o.kind == "retry":
                    assert result is not None
                    self._update(
                        _BACK_TO_PLANNED.format(reason="null") + ", not_before = ?, error_code = ?",
                        (o.not_before, result.error_code),
                        guard,
                    )
                    tally.retried += 1
                elif o.kind == "rejected":
                    assert result is not None
                    self._update(
                        "state = 'rejected', skip_reason = ?, error_code = ?, not_before = null",
                        (o.reason, result.error_code),
                        guard,
                    )
                    _bump(tally.rejected, o.reason)
                    _bump(tally.error_codes, result.error_code)
                    if result.opted_out and row.phone:
                        self._record_opt_out(row, result, o.finished or _stamp(_utcnow()))
                elif o.kind in ("suppress", "release"):
                    if o.kind == "suppress":
                        changes = "state = 'suppressed', skip_reason = ?, not_before = null"
                        params: tuple[Any, ...] = (o.reason,)
                        _bump(tally.suppressed, o.reason)
                    else:
                        changes, params = _BACK_TO_PLANNED.format(reason="skip_reason"), ()
                    if self._update(changes + ", attempts = attempts - 1", params, guard):
                        conn.execute("delete from send_attempts where message_id = ? and attempt = ?", guard)
                elif o.kind == "auth":
                    self._update(_BACK_TO_PLANNED.format(reason="skip_reason"), (), guard)
                elif o.kind == "reconciled":
                    statuses.extend(self._settle(o, tally))
            # the common case in bulk: one statement for the batch's accepted messages
            submitted = [
                (o.result.provider_message_id, o.finished, o.row.message_id, o.row.attempt)
                for o in outcomes
                if o.kind == "accepted" and o.result is not None
            ]
            before = conn.total_changes
            conn.execute(_SUBMITTED_SQL, (json.dumps(submitted),))
            if conn.total_changes - before < len(submitted):  # some claim was no longer ours: say which
                for _, _, message_id, attempt in submitted:
                    if not conn.execute(
                        "select 1 from messages where message_id = ? and attempts = ? and state = 'submitted'",
                        (message_id, attempt),
                    ).fetchone():
                        log.warning(
                            "message %s attempt %s was no longer this dispatcher's claim", message_id, attempt
                        )
            tally.submitted += conn.total_changes - before
            accepted = bool(submitted)
        return touched, accepted, statuses

    def unrecordable(self, outcome: _Outcome) -> None:
        """A row whose outcome the store refused: ``unknown`` (``record_failed``), never re-sent."""
        with store.transaction(self.conn):
            self._update(
                "state = 'unknown', skip_reason = 'record_failed', not_before = null",
                (),
                (outcome.row.message_id, outcome.row.attempt),
                outcome.state,
            )

    def _update(
        self, changes: str, params: tuple[Any, ...], guard: tuple[int, int], state: str = "sending"
    ) -> bool:
        """Change a row only while it is still this claim's (``state``, same attempt)."""
        cur = self.conn.execute(
            f"update messages set {changes} where message_id = ? and state = ? and attempts = ?",
            (*params, guard[0], state, guard[1]),
        )
        if not cur.rowcount:
            log.warning(
                "message %s attempt %s was no longer this dispatcher's claim; its outcome was not written",
                *guard,
            )
        return bool(cur.rowcount)

    def _record_opt_out(self, row: _Row, result: SendResult, when: str) -> None:
        assert row.phone is not None
        consent.record(
            self.conn,
            phone_e164=row.phone,
            purpose="marketing",
            action="opt_out",
            source="provider",
            occurred_at=when,
            proof={"message_id": row.message_id, "error_code": result.error_code, "provider": self.provider},
            contact_id=row.contact_id,
            event_key=f"provider-opt-out:{self.provider}:{row.message_id}",
        )

    def _settle(self, o: _Outcome, tally: _Tally) -> list[StatusUpdate]:
        row = o.row
        guard = (row.message_id, row.attempt)
        verdict = o.verdict
        state = o.state
        found: StatusUpdate | None = None
        if verdict == "found":
            for candidate in o.candidates:
                taken = self.conn.execute(
                    "select 1 from messages where provider = ? and provider_message_id = ?",
                    (self.provider, candidate.provider_message_id),
                ).fetchone()
                if taken is None:
                    found = candidate
                    break
            if found is None:
                verdict = "absent"  # every match belongs to another outbox row
        now = _stamp(_utcnow())
        if verdict == "absent" and o.not_after is not None:
            verdict = "unsettled"  # the provider may still accept it: not believed yet
        if verdict == "found":
            assert found is not None
            done = self._update(
                "state = 'submitted', provider_message_id = ?, submitted_at = ?, error_code = null,"
                " skip_reason = null, not_before = null",
                (found.provider_message_id, now),
                guard,
                state,
            )
            tally.submitted += done
        elif verdict == "unsettled":
            done = self._update(
                "state = 'unknown', skip_reason = 'awaiting_lookup', not_before = ?",
                (o.not_after,),
                guard,
                state,
            )
        elif verdict == "absent" and row.attempt >= self.max_attempts:
            done = self._update(
                "state = 'rejected', skip_reason = 'gave_up_after_retries', not_before = null",
                (),
                guard,
                state,
            )
            _bump(tally.rejected, "gave_up_after_retries", done)
        elif verdict == "absent":
            done = self._update(
                _BACK_TO_PLANNED.format(reason="null") + ", not_before = null", (), guard, state
            )
        else:
            done = self._update(
                "state = 'unknown', skip_reason = 'fate_unknown', not_before = null", (), guard, state
            )
            tally.unknown += done
        if done and verdict != "unsettled":
            _bump(tally.reconciled, verdict)
        self.conn.execute(
            """
            update send_attempts set
                finished_at = coalesce(finished_at, ?),
                outcome = coalesce(outcome, 'interrupted'),
                provider_message_id = coalesce(provider_message_id, ?),
                reconciled = ?
            where message_id = ? and attempt = ?
            """,
            (now, found.provider_message_id if found else None, None if verdict == "unsettled" else verdict,
             *guard),
        )  # fmt: skip
        return [found] if found is not None and done else []

    def after_flush(self, accepted: bool, statuses: list[StatusUpdate]) -> None:
        """Receipts that came before the provider's id was recorded, and statuses found by
        reconciliation, into the receipts tables."""
        if statuses:
            webhooks.record_status(self.conn, statuses)
        if (accepted or statuses) and self.conn.execute(
            "select exists (select 1 from orphan_status_events)"
        ).fetchone()[0]:
            webhooks.adopt_orphans(self.conn)


# ---------------------------------------------------------------------------------------
# The engine


class _Lock:
    """One dispatcher per provider and home: an advisory lock the kernel drops when the holder
    dies, so a crash never leaves it held."""

    def __init__(self, home: str | os.PathLike[str] | None, provider: str) -> None:
        self.path = lock_path(home, provider)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd: int | None = None

    def try_acquire(self) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return True

    def holder(self) -> str:
        try:
            return self.path.read_text().strip() or "?"
        except OSError:
            return "?"

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def _share(settings: DispatchSettings) -> DispatchSettings:
    """One process's part of ``settings`` when ``processes`` share the work: rates rounded down,
    so that together they never exceed the whole."""
    n = settings.processes
    concurrency = max(1, settings.concurrency // n)
    return replace(
        settings,
        rate_per_second=float(max(1, math.floor(settings.rate_per_second / n))),
        concurrency=concurrency,
        clients=max(1, min(concurrency, math.ceil(settings.clients / n))),
        processes=1,
        exclusive=False,
    )


def _die_with_parent(parent: int) -> None:
    """Have the kernel kill this helper when the process that started it dies, SIGKILL included
    (Linux): a helper that outlived it would send rows that a restarted dispatcher, finding them
    in 'sending', is reconciling. Elsewhere the helper's watcher notices within half a second."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(1)


@dataclass(frozen=True, slots=True)
class _HelperLink:
    """What a helper process gets from the process that started it."""

    dispatcher: str
    parent: int  # the starting process's pid
    gate: float  # wall-clock time before which it sends nothing
    stop: Any  # a multiprocessing Event: stop now
    report: Any  # the sending end of a pipe for its DispatchReport


def _helper_main(
    home: str,
    provider: Provider,
    settings: DispatchSettings,
    campaign_id: int | None,
    link: _HelperLink,
    record_send_times: bool,
) -> None:
    """A helper process: one more event loop sending the same outbox."""
    _die_with_parent(link.parent)

    async def main() -> DispatchReport:
        engine = _Engine(
            home, provider, settings, campaign_id, asyncio.Event(), None, record_send_times, link
        )
        return await engine.run()

    link.report.send(run_loop(main()))
    link.report.close()


class _Engine:
    def __init__(
        self,
        home: str | os.PathLike[str] | None,
        provider: Provider,
        settings: DispatchSettings,
        campaign_id: int | None,
        stop: asyncio.Event,
        on_progress: Callable[[Progress], None] | None,
        record_send_times: bool,
        link: _HelperLink | None = None,
    ) -> None:
        self.home = home
        self.link = link
        self.record_send_times = record_send_times
        self.helpers: list[tuple[str, Any, Any]] = []  # (dispatcher id, process, report pipe)
        self.helper_reports: list[DispatchReport] = []
        self.helper_stop: Any = None
        self.provider = provider
        self.settings = settings
        self.campaign_id = campaign_id
        self.stop = stop
        self.on_progress = on_progress
        self.dispatcher = (
            link.dispatcher if link else f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        )
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="smsops-dispatch-db")
        self.db: _Db | None = None
        self.reader: sqlite3.Connection | None = None
        self.revocations: Revocations | None = None
        self.tally = _Tally()
        self.rng = random.Random()
        self.queue: asyncio.Queue[_Row | None] = asyncio.Queue(maxsize=settings.concurrency)
        self.pending: list[_Outcome] = []
        self.wake_writer = asyncio.Event()
        self.limiters: dict[str | None, SlidingWindow] = {}
        self.gate = 0.0  # no send before this monotonic time (see _start_gate)
        self.blocked: dict[int, str] = {}  # campaigns seen not running
        self.active: set[int] = set() if campaign_id is None else {campaign_id}
        self.held = 0  # claimed rows not yet answered or released
        self.reconciling: set[asyncio.Task[None]] = set()
        self.reconcile_slots = asyncio.Semaphore(max(1, settings.concurrency // 2))
        self.looking: set[int] = set()  # message ids being reconciled
        self.settle = settle_window(settings, provider)
        self.clients: list[httpx.AsyncClient] = []
        self.closing = False
        self.halt: str | None = None
        self.error: str | None = None
        self.send_times: list[float] | None = [] if record_send_times else None

    # -- plumbing ----------------------------------------------------------------------

    async def call(self, fn: Callable[..., _T], *args: Any) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def record(self, outcome: _Outcome) -> None:
        self.pending.append(outcome)
        if len(self.pending) >= _FLUSH_AT:
            self.wake_writer.set()

    def limiter(self, sender: str | None) -> SlidingWindow:
        window = self.limiters.get(sender)
        if window is None:
            limit = max(1, int(self.settings.rate_per_second))
            window = self.limiters[sender] = SlidingWindow(limit, 1.0, not_before=self.gate)
        return window

    def stopping(self) -> bool:
        return self.stop.is_set() or self.halt is not None

    # -- life cycle --------------------------------------------------------------------

    async def run(self) -> DispatchReport:
        started = time.monotonic()
        lock = _Lock(self.home, self.provider.name) if self.settings.exclusive else None
        try:
            if lock is not None and not await self.wait_for_lock(lock):
                return self.report(started, self.halt or "stopped")
            self.db = await self.call(
                _Db, self.home, self.provider.name, self.dispatcher, self.settings.max_attempts
            )
            self.reader = store.connect(store.store_path(self.home))
            self.revocations = Revocations(self.reader, ingress.journal_path(self.home))
            if self.campaign_id is not None:
                await self.check_campaign()
            _skip_sniffio_probe()
            _name_the_loop()
            per_client = math.ceil(self.settings.concurrency / self.settings.clients)
            limits = httpx.Limits(max_connections=per_client, max_keepalive_connections=per_client)
            ssl_context = httpx.create_ssl_context()  # once: each client would load the CA file
            timeout = httpx.Timeout(self.settings.timeout, connect=min(5.0, self.settings.timeout))
            lean = self.settings.http == "lean" and not _behind_a_proxy()
            self.clients = [
                LeanClient(verify=ssl_context, timeout=timeout, max_connections=per_client)
                if lean
                else httpx.AsyncClient(limits=limits, timeout=timeout, verify=ssl_context)
                for _ in range(self.settings.clients)
            ]
            if self.link is not None:  # a helper: the starting process reconciled and gated
                self.gate = time.monotonic() + max(0.0, self.link.gate - time.time())
            else:
                cutoff = (
                    None if lock else _stamp(_utcnow() - timedelta(seconds=self.settings.reconcile_after))
                )
                orphans = await self.call(self.db.orphans, None, cutoff)
                await self.start_gate(bool(orphans))
                for row in orphans:
                    self.spawn_reconcile(row, interrupted=True, grace=0.0)
                if self.settings.processes > 1 and self.halt is None:
                    self.start_helpers()
            await self.dispatch()
        finally:
            await self.shutdown()
            if lock is not None:
                lock.release()
        return self.report(started, self.halt or ("stopped" if self.stop.is_set() else "done"))

    def start_helpers(self) -> None:
        """Start ``processes - 1`` helper processes; this process keeps one share of the work."""
        share = _share(self.settings)
        context = multiprocessing.get_context("spawn")  # never fork a process with threads and a loop
        self.helper_stop = context.Event()
        gate = time.time() + max(0.0, self.gate - time.monotonic())
        home = str(paths(self.home).home)
        for number in range(1, self.settings.processes):
            receive, send = context.Pipe(duplex=False)
            link = _HelperLink(f"{self.dispatcher}/{number}", os.getpid(), gate, self.helper_stop, send)
            process = context.Process(
                target=_helper_main,
                args=(home, self.provider, share, self.campaign_id, link, self.record_send_times),
                name=f"smsops-dispatch-{number}",
                daemon=True,
            )
            process.start()
            send.close()  # this process's copy: the pipe reports EOF if the helper dies
            self.helpers.append((link.dispatcher, process, receive))
        self.settings = share
        self.queue = asyncio.Queue(maxsize=share.concurrency)

    async def join_helpers(self) -> None:
        """Wait for the helpers; a helper that died leaves claimed rows, reconciled here."""
        if self.helper_stop is not None and (self.stop.is_set() or self.halt is not None):
            self.helper_stop.set()
        for dispatcher_id, process, receive in self.helpers:
            try:
                self.helper_reports.append(await asyncio.to_thread(receive.recv))
            except EOFError:
                log.error("dispatcher process %s died; reconciling the rows it had claimed", dispatcher_id)
            await asyncio.to_thread(process.join)
            receive.close()
            if process.exitcode != 0:
                assert self.db is not None
                for row in await self.call(self.db.orphans, None, None, dispatcher_id):
                    self.spawn_reconcile(row, interrupted=True, grace=0.0)
        self.helpers = []

    async def wait_for_lock(self, lock: _Lock) -> bool:
        said = False
        while not lock.try_acquire():
            if not said:
                log.warning(
                    "another dispatcher (pid %s) is sending through %s from this home; waiting for it",
                    lock.holder(),
                    self.provider.name,
                )
                said = True
            if self.campaign_id is not None:
                now = await asyncio.to_thread(progress, self.campaign_id, self.home)
                if self.on_progress:
                    self.on_progress(now)
                if now.status != "running" or (now.due == 0 and now.states.get("sending", 0) == 0):
                    self.halt = "done" if now.status in ("running", "finished") else now.status
                    return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), 0.5)
            if self.stop.is_set():
                return False
        return True

    async def check_campaign(self) -> None:
        assert self.db is not None and self.campaign_id is not None
        status = (await self.call(self.db.statuses, [self.campaign_id])).get(self.campaign_id)
        if status is None:
            raise campaigns.CampaignNotFound(f"no campaign has id {self.campaign_id}")
        if status == "running":
            return
        hint = {
            "draft": "launch it first",
            "scheduled": "it starts at its scheduled time",
            "paused": "resume it first",
        }.get(status, "there is nothing left to send")
        self.halt = status
        self.error = f"campaign {self.campaign_id} is {status}: {hint}"

    async def start_gate(self, crashed: bool) -> None:
        """No send in the first second after another dispatcher for this provider may have sent:
        its last second of sends is unknown to this process's rate window."""
        assert self.db is not None
        last = await self.call(self.db.last_activity)
        window = 1.0 + self.settings.window_margin
        wait = 0.0
        if crashed:
            wait = window
        elif last is not None:
            wait = max(0.0, window - (_utcnow() - _parse(last)).total_seconds())
        self.gate = time.monotonic() + wait

    async def shutdown(self) -> None:
        if self.reconciling:
            await asyncio.gather(*self.reconciling, return_exceptions=True)
        if self.db is not None:
            for attempt in range(3):
                try:
                    await self.flush()
                    break
                except sqlite3.Error as exc:
                    if attempt == 2:  # rows stay 'sending': the next start reconciles them
                        self.error = (
                            f"{len(self.pending)} outcomes could not be recorded ({exc}); their rows stay"
                            " 'sending' and the next dispatcher run reconciles them with the provider"
                        )
                        log.error("%s", self.error)
                    else:
                        await asyncio.sleep(1.0)
            if self.campaign_id is not None and not self.pending:  # e.g. after a crash that sent the last row
                await self.finish([self.campaign_id])
            await self.call(self.db.close)
        if self.revocations is not None:
            self.revocations.close()
        if self.reader is not None:
            self.reader.close()
        for client in self.clients:
            await client.aclose()
        self.executor.shutdown(wait=True)

    def report(self, started: float, stopped: str) -> DispatchReport:
        t = self.tally
        for other in self.helper_reports:
            _merge(t, other)
            if self.send_times is not None:
                self.send_times.extend(other.send_times)
            self.error = self.error or other.error
        self.helper_reports = []
        return DispatchReport(
            campaign_id=self.campaign_id,
            requests=t.requests,
            submitted=t.submitted,
            rejected=dict(t.rejected),
            error_codes=dict(t.error_codes),
            suppressed=dict(t.suppressed),
            retried=t.retried,
            deferred=t.deferred,
            reconciled=dict(t.reconciled),
            unknown=t.unknown,
            finished=tuple(t.finished),
            seconds=round(time.monotonic() - started, 3),
            stopped=stopped,
            error=self.error,
            send_times=tuple(self.send_times or ()),
        )

    # -- the pipeline ------------------------------------------------------------------

    async def dispatch(self) -> None:
        if self.halt is not None:
            return
        workers = [
            asyncio.create_task(self.worker(self.clients[i % len(self.clients)]))
            for i in range(self.settings.concurrency)
        ]
        writer = asyncio.create_task(self.writer())
        watcher = asyncio.create_task(self.watcher())
        try:
            await self.feed()
        finally:
            for _ in workers:
                await self.queue.put(None)
            await asyncio.gather(*workers, return_exceptions=True)
            await self.join_helpers()
            if self.reconciling:
                await asyncio.gather(*self.reconciling, return_exceptions=True)
            watcher.cancel()
            self.closing = True
            self.wake_writer.set()
            await asyncio.gather(watcher, writer, return_exceptions=True)

    def claim_size(self) -> int:
        s = self.settings
        return max(1, min(s.batch_size, max(s.concurrency * 2, math.ceil(s.rate_per_second * 2))))

    def check_size(self) -> int:
        """Rows re-checked at once: at most a fifth of a second of sending at the full rate, and
        at most 256 (a fifth of a second or less at the throughput measured here)."""
        s = self.settings
        return max(1, min(s.batch_size, _CHECK_AT_MOST, math.ceil(s.rate_per_second / 5)))

    async def feed(self) -> None:
        assert self.db is not None
        after = 0
        size = self.claim_size()
        while not self.stopping():
            rows, claimed, last = await self.call(self.db.claim, self.campaign_id, size, after, self.settings)
            self.tally.deferred += self.db.deferred_count
            # a full batch: go on after it; a short one: the next pass starts over (retries that
            # fell due behind the cursor)
            after = last if claimed == size else 0
            if claimed and not rows:
                continue  # the whole batch went back to quiet hours: look further
            if not rows:
                if await self.idle():
                    return
                continue
            self.held += len(rows)
            self.active.update(r.campaign_id for r in rows)
            step = self.check_size()
            for start in range(0, len(rows), step):
                chunk = rows[start : start + step]
                if self.stopping():
                    for row in chunk:
                        self.release(row)
                    continue
                # on the event loop, not the database thread: a few milliseconds of reads (WAL
                # readers never wait for writers), where a hop to the busy thread costs tens
                assert self.reader is not None and self.revocations is not None
                self.revocations.refresh()
                mark = self.revocations.mark  # every opt-out up to it is seen by the check below
                verdicts = _check(self.reader, chunk)
                for row, (ok, reason) in zip(chunk, verdicts, strict=True):
                    if ok:
                        row.checked = mark
                        await self.queue.put(row)
                    else:
                        self.held -= 1
                        self.record(_Outcome("suppress", row, reason=reason))

    async def idle(self) -> bool:
        """Nothing was due. One campaign: True when the run is over; service: wait a little."""
        assert self.db is not None
        if self.campaign_id is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), self.settings.poll_interval)
            return False
        if self.held or self.reconciling or self.pending:
            await asyncio.sleep(0.05)
            return False
        due = await self.call(self.db.next_due, self.campaign_id)
        if due is None:
            return True
        wait = 0.0 if due == "" else (_parse(due) - _utcnow()).total_seconds()
        if wait > self.settings.linger:
            return True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), min(max(wait, 0.05), self.settings.poll_interval))
        return False

    def release(self, row: _Row) -> None:
        self.held -= 1
        self.record(_Outcome("release", row))

    async def worker(self, client: httpx.AsyncClient) -> None:
        provider, callback = self.provider, self.settings.status_callback_url
        while True:
            row = await self.queue.get()
            if row is None:
                return
            if self.stopping() or row.campaign_id in self.blocked:
                self.release(row)
                continue
            assert row.phone is not None and row.sender is not None and row.body is not None
            request = SendRequest(row.message_id, row.phone, row.sender, row.body, callback)
            window = self.limiter(row.sender)
            admitted = await window.acquire()  # from here on, every path gives its place back
            if self.stopping() or row.campaign_id in self.blocked:
                window.unused()
                self.release(row)
                continue
            # the opt-out gate, with no await between it and the request (invariant 2)
            revoked = self.revoked(row)
            if revoked is not None:
                window.unused()
                self.held -= 1
                self.record(_Outcome("suppress", row, reason=revoked))
                continue
            if self.send_times is not None:
                self.send_times.append(admitted)
            self.tally.requests += 1
            row.sent_at = _utcnow()
            try:
                result = await provider.send(client, request)
            except AuthenticationError as exc:
                window.done()
                await self.refused(row, exc)
                continue
            except ConfigError as exc:  # raised before anything was sent
                window.unused()
                self.halt, self.error = "config", str(exc)
                self.tally.requests -= 1
                self.release(row)
                continue
            except Exception as exc:  # a bug or an odd answer: the request may have gone out
                log.exception("sending message %s failed unexpectedly", row.message_id)
                result = SendResult("unknown", error_message=f"{type(exc).__name__}: {exc}")
            except BaseException:  # cancelled mid-send: it may still reach the provider
                window.done(hold=self.settings.timeout)
                raise
            unanswered = result.outcome == "unknown" and result.http_status is None
            window.done(hold=self.settings.timeout if unanswered else 0.0)
            self.answered(row, result)

    def revoked(self, row: _Row) -> str | None:
        """Why ``row`` must not be sent after all (an opt-out since its consent check), or None."""
        assert self.revocations is not None and self.reader is not None
        verdict = self.revocations.verdict(row.phone, row.checked)
        if verdict == "recheck":
            mark = self.revocations.mark
            ((ok, reason),) = _check(self.reader, [row])
            if ok:
                row.checked = mark
                return None
            return reason
        return verdict

    def answered(self, row: _Row, result: SendResult) -> None:
        finished = _stamp(_utcnow())
        s = self.settings
        if result.outcome == "accepted":
            self.held -= 1
            self.record(_Outcome("accepted", row, result, finished))
        elif result.outcome == "transient":
            self.held -= 1
            if row.attempt >= s.max_attempts:
                self.record(_Outcome("rejected", row, result, finished, reason="gave_up_after_retries"))
            else:
                delay = backoff_delay(row.attempt, s, result.retry_after, self.rng)
                due = _stamp(_utcnow() + timedelta(seconds=delay))
                self.record(_Outcome("retry", row, result, finished, not_before=due))
        elif result.outcome == "permanent":
            self.held -= 1
            reason = "provider_opted_out" if result.opted_out else "provider_rejected"
            self.record(_Outcome("rejected", row, result, finished, reason=reason))
        else:
            self.record(_Outcome("unknown_answer", row, result, finished))
            self.held -= 1
            self.spawn_reconcile(row, interrupted=False, grace=s.unknown_grace)

    async def refused(self, row: _Row, exc: AuthenticationError) -> None:
        """The provider refused our credentials: pause the campaign, stop sending for it."""
        self.held -= 1
        self.record(_Outcome("auth", row, SendResult("unknown", http_status=401), _stamp(_utcnow())))
        if row.campaign_id in self.blocked:
            return
        self.blocked[row.campaign_id] = "paused"
        message = (
            f"{self.provider.name} refused the credentials; campaign {row.campaign_id} is paused."
            f" Fix them, then resume it. ({exc})"
        )
        log.error("%s", message)
        self.error = message
        with contextlib.suppress(campaigns.CampaignStateError):
            await asyncio.to_thread(campaigns.pause, row.campaign_id, self.home)
        if self.campaign_id is not None:
            self.halt = "credentials"

    # -- reconciliation ----------------------------------------------------------------

    def spawn_reconcile(self, row: _Row, *, interrupted: bool, grace: float, state: str = "sending") -> None:
        """Reconcile ``row``. The settle window counts from when its request started, if this
        process made it; from now for a row another process left (its request may have left at
        any moment until that process died); not at all for a row whose window has passed."""
        if row.message_id in self.looking:
            return
        self.looking.add(row.message_id)
        settle_from = None if state == "unknown" else row.sent_at or _utcnow()
        task = asyncio.create_task(self.reconcile(row, interrupted, grace, state, settle_from))
        self.reconciling.add(task)
        task.add_done_callback(self.reconciling.discard)
        task.add_done_callback(lambda done: self.looked_up(row.message_id, done))

    def looked_up(self, message_id: int, task: asyncio.Task[bool]) -> None:
        """A reconciliation ended. One that recorded an outcome keeps its row in :attr:`looking`
        until :meth:`flush` has written it: until then the store still shows the row as it was
        (``unknown``, its lookup due), and the watcher would ask the provider about the same
        attempt again, its second outcome refused as no longer this dispatcher's claim."""
        if task.cancelled() or task.exception() is not None or not task.result():
            self.looking.discard(message_id)

    async def reconcile(
        self,
        row: _Row,
        interrupted: bool,
        grace: float,
        state: str = "sending",
        settle_from: datetime | None = None,
    ) -> bool:
        """Ask the provider what became of a request with no clear answer. "Nothing" is believed
        only once the settle window since the request's start has passed; until then the row is
        ``unknown`` (``awaiting_lookup``) and the watcher asks again when it has. True when an
        outcome was recorded."""
        if grace:
            await asyncio.sleep(grace)
        if not (row.phone and row.sender and row.body):
            self.record(_Outcome("reconciled", row, verdict="absent", interrupted=interrupted, state=state))
            return True
        request = SendRequest(row.message_id, row.phone, row.sender, row.body)
        client = self.clients[row.message_id % len(self.clients)]
        found: list[StatusUpdate] | None = []
        async with self.reconcile_slots:
            for attempt in range(_LOOKUP_TRIES):
                try:
                    found = await self.provider.find(client, request, row.claimed_at - _FIND_MARGIN)
                    break
                except AuthenticationError as exc:
                    log.error("reconciling message %s: %s", row.message_id, exc)
                    self.error = str(exc)
                    return False  # stays 'sending': reconciled by the next run
                except (ProviderUnavailable, httpx.HTTPError) as exc:
                    log.warning("reconciling message %s: %s", row.message_id, exc)
                    if attempt + 1 == _LOOKUP_TRIES:
                        found = None
                        break
                    await asyncio.sleep(min(30.0, 0.5 * 2**attempt))
        verdict = "unsearchable" if found is None else "found" if found else "absent"
        not_after = None
        if verdict == "absent" and settle_from is not None:
            settles = max(settle_from, row.claimed_at) + timedelta(seconds=self.settle)
            if _utcnow() < settles:
                not_after = _stamp(settles)
        self.record(
            _Outcome(
                "reconciled", row, verdict=verdict, candidates=list(found or ()), interrupted=interrupted,
                state=state, not_after=not_after,
            )
        )  # fmt: skip
        return True

    # -- background tasks --------------------------------------------------------------

    async def flush(self) -> None:
        """Record the pending outcomes. A batch the store refuses is never dropped: a busy or
        failing store puts it back for the next flush (and raises); a row the store refuses
        alone (an integrity error) is split out and marked ``unknown`` (``record_failed``): it
        was sent, so it is never sent again, and a person sees it."""
        if not self.pending or self.db is None:
            return
        batch, self.pending = self.pending, []
        scratch = _Tally()
        try:
            touched, accepted, statuses = await self.call(self.db.flush, batch, scratch)
        except sqlite3.IntegrityError:
            touched, accepted, statuses = await self.flush_one_by_one(batch, scratch)
        except BaseException:
            self.pending[:0] = batch  # nothing of it was written: the next flush tries again
            raise
        self.looking.difference_update(o.row.message_id for o in batch if o.kind == "reconciled")
        _merge(self.tally, scratch)
        await self.call(self.db.after_flush, accepted, statuses)
        await self.finish(touched)

    async def flush_one_by_one(
        self, batch: list[_Outcome], tally: _Tally
    ) -> tuple[set[int], bool, list[StatusUpdate]]:
        assert self.db is not None
        touched: set[int] = set()
        accepted = False
        statuses: list[StatusUpdate] = []
        for outcome in batch:
            try:
                t, a, found = await self.call(self.db.flush, [outcome], tally)
            except sqlite3.IntegrityError as exc:
                log.error("message %s: its outcome could not be recorded (%s)", outcome.row.message_id, exc)
                await self.call(self.db.unrecordable, outcome)
                touched.add(outcome.row.campaign_id)
                continue
            touched |= t
            accepted = accepted or a
            statuses += found
        return touched, accepted, statuses

    async def finish(self, campaign_ids: Iterable[int]) -> None:
        assert self.db is not None
        done = await self.call(self.db.finish, campaign_ids)
        self.tally.finished.extend(c for c in done if c not in self.tally.finished)

    async def writer(self) -> None:
        """Flush every ~100 ms; never cancelled mid-write (a cancelled await would drop the
        batch's bookkeeping while its thread still writes it)."""
        while not self.closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake_writer.wait(), _FLUSH_EVERY)
            self.wake_writer.clear()
            try:
                await self.flush()
            except sqlite3.Error as exc:
                log.error("recording %d outcomes failed (%s); retrying", len(self.pending), exc)
                await asyncio.sleep(0.5)

    async def watcher(self) -> None:
        assert self.db is not None
        last_sweep = next_progress = time.monotonic()
        while True:
            await asyncio.sleep(_WATCH_EVERY)
            statuses = await self.call(self.db.statuses, self.active)
            for cid, status in statuses.items():
                if status == "running":
                    self.blocked.pop(cid, None)
                    continue
                self.blocked.setdefault(cid, status)
                if cid == self.campaign_id and status != "finished" and self.halt is None:
                    self.halt = status
            if self.on_progress is not None and time.monotonic() >= next_progress:
                counted = time.monotonic()
                for cid in sorted(self.active):
                    self.on_progress(await self.call(_progress_of, self.db, cid))
                # once a second, or less often when counting a big outbox takes a while
                next_progress = time.monotonic() + max(1.0, 10 * (time.monotonic() - counted))
            if self.campaign_id is None:  # service: forget campaigns that are over
                self.active -= {c for c, s in statuses.items() if s in ("finished", "cancelled")}
            if self.link is not None:
                if os.getppid() != self.link.parent:
                    os._exit(1)  # as if killed with it: what it had claimed is reconciled on restart
                if self.link.stop.is_set():
                    self.stop.set()
                continue  # helpers leave sweeps to the process that started them
            if self.helper_stop is not None and (self.stop.is_set() or self.halt is not None):
                self.helper_stop.set()
            for row in await self.call(self.db.awaiting, self.campaign_id, _stamp(_utcnow())):
                self.spawn_reconcile(row, interrupted=False, grace=0.0, state="unknown")
            if time.monotonic() - last_sweep >= max(5.0, self.settings.reconcile_after / 2):
                last_sweep = time.monotonic()
                cutoff = _stamp(_utcnow() - timedelta(seconds=self.settings.reconcile_after))
                for row in await self.call(self.db.orphans, self.campaign_id, cutoff):
                    self.spawn_reconcile(row, interrupted=True, grace=0.0)


def _progress_of(db: _Db, campaign_id: int) -> Progress:
    status = db.statuses([campaign_id]).get(campaign_id, "?")
    return _progress(db.conn, campaign_id, status, _stamp(_utcnow()))


# ---------------------------------------------------------------------------------------
# Entry points


async def run(
    home: str | os.PathLike[str] | None,
    provider: Provider,
    settings: DispatchSettings | None = None,
    *,
    campaign_id: int | None = None,
    stop: asyncio.Event | None = None,
    progress: Callable[[Progress], None] | None = None,
    record_send_times: bool = False,
) -> DispatchReport:
    """Send due outbox rows through ``provider``.

    With ``campaign_id``: that campaign's rows, until none is due (retries due within
    ``settings.linger`` are waited for), or until it is paused or cancelled. Without: every
    running campaign's rows, as a service, until ``stop`` is set. ``progress`` is called about
    twice a second with each active campaign's :class:`Progress`. Raises
    :class:`~smsops.campaigns.CampaignNotFound` for an unknown campaign; a campaign that is not
    running ends the run at once with the reason in :attr:`DispatchReport.error`.
    """
    engine = _Engine(
        home, provider, settings or DispatchSettings(), campaign_id, stop or asyncio.Event(), progress,
        record_send_times,
    )  # fmt: skip
    return await engine.run()


def run_sync(
    home: str | os.PathLike[str] | None,
    provider: Provider,
    settings: DispatchSettings | None = None,
    **kwargs: Any,
) -> DispatchReport:
    """:func:`run` from synchronous code (its own event loop, uvloop's when installed)."""
    return run_loop(run(home, provider, settings, **kwargs))


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's event loop when it is installed, else asyncio's. A send's socket and scheduling
    work is cheaper on it (see docs/performance.md, "Dispatch"); httpx runs on either."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run_loop(main: Coroutine[Any, Any, _T]) -> _T:
    """``asyncio.run(main)`` on :func:`new_event_loop`."""
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(main)


def lock_path(home: str | os.PathLike[str] | None, provider: str) -> Path:
    """The file whose lock one dispatcher per provider holds while sending."""
    return paths(home).home / f"dispatch-{provider}.lock"
