"""Receipts that never came: asked of the provider.

A provider posts each delivery receipt once, or retries it briefly: a receipt posted while the
webhook receiver was down or too slow to answer is lost, and its message would stay "sent"
forever. :func:`reconcile_receipts` finds the messages that have had time to settle yet have no
final status, asks the provider for each one (:meth:`~smsops.providers.Provider.lookup`: Twilio's
message resource, SMS.ru's ``/sms/status``, the sandbox's copy of Twilio's) and records what it
answers as if the receipt had arrived (:func:`smsops.webhooks.record_status`, idempotent).

Which messages are asked about, oldest first and at most ``limit`` per pass:

- ``submitted`` to this provider with no final status (``delivered``, ``undelivered``,
  ``failed``), neither recorded nor waiting as an orphan receipt;
- submitted longer ago than the provider's :func:`receipt_wait` (a receipt that is merely slow
  is not asked for) and less than ``horizon`` ago (:data:`HORIZON`): past it the provider may
  have forgotten the message, so it is left "awaiting receipt" for good and only counted;
- not asked about recently: a lookup that finds no final status (still ``sent``, or unknown to
  the provider) puts the next one off by :func:`next_lookup_in`, doubling each time. A lookup
  that fails (the provider unreachable, 429, 5xx) puts nothing off: it is tried on the next pass,
  after the messages that did not fail, so that a few that always fail never hold up the rest.

When each message was last asked about is kept in ``receipt_lookups`` (:data:`LOOKUPS_DDL`, a table
of the store).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

import httpx

from smsops import store
from smsops.providers import (
    STATUS_RANK,
    TERMINAL_STATUSES,
    AuthenticationError,
    ConfigError,
    Provider,
    ProviderError,
    StatusUpdate,
)
from smsops.webhooks import record_status

__all__ = [
    "DEFAULT_WAIT",
    "HORIZON",
    "LOOKUPS_DDL",
    "Overdue",
    "ReceiptReport",
    "due_for_lookup",
    "ensure_table",
    "next_lookup_in",
    "receipt_wait",
    "reconcile_receipts",
    "reconcile_receipts_sync",
]

log = logging.getLogger(__name__)

DEFAULT_WAIT: Mapping[str, timedelta] = {
    "sandbox": timedelta(minutes=2),
    "twilio": timedelta(minutes=15),
    "smsru": timedelta(minutes=15),
}
"""How long after it was submitted a message may lack a final status before it is looked up.

The sandbox reaches every final status within seconds (its ``receipt_delay``), so after 2
minutes a message without one has lost its receipt (or the receipt is still being retried, and
then both record the same status, once), and the demo's Results page catches up soon after the
receiver comes back. A real provider's
receipt waits for the operator's delivery report, which takes seconds for most messages and
minutes for some (a handset briefly out of coverage); after 15 minutes a missing one is far more
likely lost than late, so few lookups are wasted on receipts still on their way (each costs an
API request), and a receiver outage is repaired within a quarter of an hour of its end. A
provider not listed here gets :data:`FALLBACK_WAIT`."""

FALLBACK_WAIT = timedelta(minutes=15)

HORIZON = timedelta(hours=72)
"""Messages submitted longer ago than this are not looked up: an operator stops trying to deliver
a message within its validity period (hours to a few days), and a provider's records of it may
be gone; its status stays "awaiting receipt"."""

_HORIZON_MINUTES = HORIZON.total_seconds() / 60
FIRST_BACKOFF_MIN = timedelta(minutes=1)
BACKOFF_MAX = timedelta(hours=12)
_WRITE_CHUNK = 200

LOOKUPS_DDL = store.TABLES["receipt_lookups"]
"""One row per message looked up: ``lookups`` answers so far (found or not), the status the last
one found (``not_found`` when the provider had none), when to ask again; ``errors`` lookups that
failed since the last answer, and the last failure (the adapter's text, without secrets)."""


# ---------------------------------------------------------------------------------------
# Settings


def _env_name(provider_name: str) -> str:
    return f"SMSOPS_{re.sub(r'[^A-Z0-9]+', '_', provider_name.upper())}_RECEIPT_LOOKUP_MINUTES"


def receipt_wait(provider_name: str, env: Mapping[str, str] = os.environ) -> timedelta:
    """How long after ``submitted_at`` a message of ``provider_name`` may lack a final status
    before it is looked up: :data:`DEFAULT_WAIT`, or minutes (a number, 0 or more) from
    ``SMSOPS_<PROVIDER>_RECEIPT_LOOKUP_MINUTES``, else from ``SMSOPS_RECEIPT_LOOKUP_MINUTES``.

    Raises :class:`~smsops.providers.ConfigError` naming the variable when its value is not a
    number of minutes."""
    for name in (_env_name(provider_name), "SMSOPS_RECEIPT_LOOKUP_MINUTES"):
        text = str(env.get(name) or "").strip()
        if not text:
            continue
        try:
            minutes = float(text)
        except ValueError:
            minutes = float("nan")
        if not 0 <= minutes < _HORIZON_MINUTES:  # also refuses nan and inf
            raise ConfigError(
                f"{name}={text!r} is not a number of minutes from 0 to less than {_HORIZON_MINUTES:.0f}"
                " (the 72 h after which a message is no longer looked up): "
                "set it to how long a message may lack a delivery receipt before it is looked up"
            )
        return timedelta(minutes=minutes)
    return DEFAULT_WAIT.get(provider_name.strip().lower(), FALLBACK_WAIT)


def next_lookup_in(wait: timedelta, lookups: int) -> timedelta:
    """How long after its ``lookups``-th lookup found no final status a message is asked about
    again: the wait (at least :data:`FIRST_BACKOFF_MIN`), doubled after each lookup, at most
    :data:`BACKOFF_MAX`."""
    first = max(wait, FIRST_BACKOFF_MIN)
    return min(first * 2 ** min(max(lookups, 1) - 1, 16), BACKOFF_MAX)


# ---------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True, slots=True)
class ReceiptReport:
    """One pass. ``looked_up`` = ``recovered`` + ``still_pending`` + ``not_found`` + ``errors``.

    - ``recovered``: a final status found and recorded;
    - ``still_pending``: the provider has no final status yet (what it has is recorded);
    - ``not_found``: the provider does not know the message;
    - ``errors``: the provider could not answer (or the store could not take the answer): tried
      again on the next pass;
    - ``past_horizon``: messages given up on: without a final status, they passed the horizon
      in the last ``horizon`` (submitted 72 to 144 hours ago by default) and are never looked up
      again ("awaiting receipt");
    - ``stopped``: why the pass stopped early, else None: ``credentials`` (the provider refused
      them: nothing is asked until they are fixed) or ``store`` (the store could not take the
      answers: those not recorded count as errors); ``error`` says it in words, without secrets.
    """

    looked_up: int = 0
    recovered: int = 0
    still_pending: int = 0
    not_found: int = 0
    errors: int = 0
    past_horizon: int = 0
    stopped: Literal["credentials", "store"] | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Overdue:
    """A message whose receipt is overdue: ours, the provider's id, lookups answered so far."""

    message_id: int
    provider_message_id: str
    lookups: int


@dataclass(frozen=True, slots=True)
class _Answer:
    due: Overdue
    update: StatusUpdate | None = None
    failure: str | None = None  # the lookup failed: why

    @property
    def kind(self) -> str:
        if self.failure is not None:
            return "error"
        if self.update is None:
            return "not_found"
        return "recovered" if self.update.status in TERMINAL_STATUSES else "still_pending"


# ---------------------------------------------------------------------------------------
# The store side


def _stamp(when: datetime) -> str:
    """The store's UTC text with microseconds (as the dispatcher writes ``submitted_at``)."""
    return when.astimezone(UTC).replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds")


def ensure_table(conn: sqlite3.Connection) -> None:
    """Create ``receipt_lookups`` if the store does not have it yet (no write lock otherwise)."""
    exists = conn.execute(
        "select 1 from sqlite_master where type = 'table' and name = 'receipt_lookups'"
    ).fetchone()
    if exists is None:
        conn.execute(LOOKUPS_DDL)


_UNSETTLED = """
    m.state = 'submitted'
    and m.provider = :provider
    and m.provider_message_id is not null
    and not exists (
        select 1 from message_status_events e
        where e.message_id = m.message_id and e.status in ('delivered', 'undelivered', 'failed')
    )
    and not exists (
        select 1 from orphan_status_events o
        where o.provider = m.provider and o.provider_message_id = m.provider_message_id
            and o.status in ('delivered', 'undelivered', 'failed')
    )"""

_DUE_SQL = f"""
    select m.message_id, m.provider_message_id, coalesce(r.lookups, 0)
    from messages m
    left join receipt_lookups r on r.message_id = m.message_id
    where {_UNSETTLED}
        and m.submitted_at <= :due_before
        and m.submitted_at > :horizon
        and (r.next_lookup_at is null or r.next_lookup_at <= :now)
    order by coalesce(r.errors, 0) > 0, m.submitted_at, m.message_id
    limit :limit"""

_PAST_HORIZON_SQL = f"""
    select count(*) from messages m
    where {_UNSETTLED} and m.submitted_at <= :horizon and m.submitted_at > :horizon_before"""


def due_for_lookup(
    conn: sqlite3.Connection,
    provider: str,
    now: datetime,
    wait: timedelta,
    *,
    horizon: timedelta = HORIZON,
    limit: int = 500,
) -> tuple[list[Overdue], int]:
    """The messages of ``provider`` to look up now (those that failed last time after the
    others, then oldest first; at most ``limit``), and how many without a final status passed
    the horizon in the last ``horizon`` (counted over that band only, so that a pass's cost does
    not grow with the outbox's history)."""
    ensure_table(conn)
    params = {
        "provider": provider,
        "now": _stamp(now),
        "due_before": _stamp(now - wait),
        "horizon": _stamp(now - horizon),
        "horizon_before": _stamp(now - 2 * horizon),
        "limit": limit,
    }
    due = [Overdue(*row) for row in conn.execute(_DUE_SQL, params)]
    (past,) = conn.execute(_PAST_HORIZON_SQL, params).fetchone()
    return due, past


def _record(conn: sqlite3.Connection, answers: Sequence[_Answer], now: datetime, wait: timedelta) -> None:
    """The statuses found and the bookkeeping of ``answers``, in one transaction."""
    updates = [a.update for a in answers if a.update is not None and a.update.status in STATUS_RANK]
    answered = [
        (
            a.due.message_id,
            a.due.lookups + 1,
            _stamp(now),
            a.update.status if a.update is not None else "not_found",
            _stamp(now + next_lookup_in(wait, a.due.lookups + 1)),
        )
        for a in answers
        if a.failure is None
    ]
    failed = [
        (a.due.message_id, _stamp(now), _stamp(now), (a.failure or "")[:300])
        for a in answers
        if a.failure is not None
    ]
    with store.transaction(conn):
        if updates:
            record_status(conn, updates)
        conn.executemany(
            "insert into receipt_lookups (message_id, lookups, looked_up_at, last_status, next_lookup_at)"
            " values (?, ?, ?, ?, ?)"
            " on conflict (message_id) do update set lookups = excluded.lookups,"
            " looked_up_at = excluded.looked_up_at, last_status = excluded.last_status,"
            " next_lookup_at = excluded.next_lookup_at, errors = 0, last_error = null",
            answered,
        )
        conn.executemany(
            "insert into receipt_lookups (message_id, lookups, looked_up_at, next_lookup_at, errors, last_error)"
            " values (?, 0, ?, ?, 1, ?)"
            " on conflict (message_id) do update set looked_up_at = excluded.looked_up_at,"
            " errors = errors + 1, last_error = excluded.last_error",
            failed,
        )


def _read(
    home: str | os.PathLike[str] | None,
    provider: str,
    now: datetime,
    wait: timedelta,
    horizon: timedelta,
    limit: int,
) -> tuple[list[Overdue], int]:
    conn = store.open_store(home)
    try:
        return due_for_lookup(conn, provider, now, wait, horizon=horizon, limit=limit)
    finally:
        conn.close()


def _write(path: Path, answers: Sequence[_Answer], now: datetime, wait: timedelta) -> tuple[int, str | None]:
    """Record ``answers`` in short transactions: how many were recorded, and why not the rest."""
    conn = store.connect(path)
    try:
        for start in range(0, len(answers), _WRITE_CHUNK):
            try:
                _record(conn, answers[start : start + _WRITE_CHUNK], now, wait)
            except sqlite3.OperationalError as exc:  # locked past the busy timeout, disk full…
                return start, f"the store could not take the answers ({exc}); they are asked again next pass"
        return len(answers), None
    finally:
        conn.close()


# ---------------------------------------------------------------------------------------
# A pass


async def reconcile_receipts(
    home: str | os.PathLike[str] | None,
    provider: Provider,
    client: httpx.AsyncClient,
    *,
    now: datetime | None = None,
    limit: int = 500,
    concurrency: int = 8,
    wait: timedelta | None = None,
    horizon: timedelta = HORIZON,
) -> ReceiptReport:
    """Look up, at ``provider``, the messages of the store under ``home`` whose receipt is
    overdue (see the module docstring), ``concurrency`` at a time, and record what it answers.

    ``wait`` defaults to :func:`receipt_wait` for the provider, ``now`` to the current time. The
    store is read and written in a thread, in short transactions. A lookup that fails counts as
    an error and the pass goes on; refused credentials stop it (``stopped="credentials"``).
    """
    if limit < 1 or concurrency < 1:
        raise ValueError(f"limit and concurrency must be at least 1, got {limit} and {concurrency}")
    now = datetime.now(UTC) if now is None else now if now.tzinfo else now.replace(tzinfo=UTC)
    wait = receipt_wait(provider.name) if wait is None else wait
    due, past_horizon = await asyncio.to_thread(_read, home, provider.name, now, wait, horizon, limit)
    answers: list[_Answer] = []
    refused: list[str] = []
    pending = iter(due)

    async def worker() -> None:
        for item in pending:  # shared: each message is taken by one worker
            if refused:
                return
            try:
                update = await provider.lookup(client, item.provider_message_id)
            except AuthenticationError as exc:
                refused.append(str(exc))
                return
            except ProviderError as exc:
                answers.append(_Answer(item, failure=str(exc) or type(exc).__name__))
                continue
            except Exception as exc:  # an adapter's bug must not end the pass for every message
                log.exception("looking up %s message %s failed", provider.name, item.provider_message_id)
                answers.append(_Answer(item, failure=type(exc).__name__))
                continue
            if update is not None and update.status not in STATUS_RANK:
                log.warning(
                    "%s reported status %r for message %s: not one smsops knows, not recorded",
                    provider.name,
                    update.status,
                    item.provider_message_id,
                )
            answers.append(_Answer(item, update))

    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(due)))))
    written, store_error = await asyncio.to_thread(_write, store.store_path(home), answers, now, wait)
    counts = dict.fromkeys(("recovered", "still_pending", "not_found", "error"), 0)
    for answer in answers[:written]:
        counts[answer.kind] += 1
    counts["error"] += len(answers) - written
    stopped = "credentials" if refused else "store" if store_error else None
    report = ReceiptReport(
        looked_up=len(answers),
        recovered=counts["recovered"],
        still_pending=counts["still_pending"],
        not_found=counts["not_found"],
        errors=counts["error"],
        past_horizon=past_horizon,
        stopped=stopped,
        error=refused[0] if refused else store_error,
    )
    if refused:
        log.error("receipt lookups at %s stopped: %s", provider.name, refused[0])
    elif answers:
        log.info("receipt lookups at %s: %s", provider.name, report)
    return report


def reconcile_receipts_sync(
    provider: Provider,
    home: str | os.PathLike[str] | None = None,
    *,
    limit: int = 500,
    concurrency: int = 8,
    env: Mapping[str, str] = os.environ,
) -> ReceiptReport:
    """One pass of :func:`reconcile_receipts` with a client of its own, for the command line."""
    wait = receipt_wait(provider.name, env)

    async def once() -> ReceiptReport:
        timeout = httpx.Timeout(10.0, connect=5.0)
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
            return await reconcile_receipts(
                home, provider, client, limit=limit, concurrency=concurrency, wait=wait
            )

    return asyncio.run(once())
