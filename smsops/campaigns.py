"""Campaigns: create one, launch it (plan the outbox), pause, resume or cancel it.

:func:`plan` is the launch. It freezes the audience — the campaign's segment evaluated now
on the published warehouse snapshot — and writes one outbox row per recipient, in one
transaction, holdout and everyone the policy removed included, so the outbox *is* the
frozen audience and every row that will not be sent carries its ``skip_reason``
(``smsops.policy`` names and explains them). What it decides on is read fresh from the
operational store, never from a mart: the number, its validity and time zones
(``contacts``), consent and opt-outs (the ledger), erasures, and the promotions each
number already has for the frequency caps (the outbox, across all campaigns).

How it stays fast (1M recipients ≥ 100,000/s): the audience, the contacts, the ledger and
the cap history are read columnar in parallel (DuckDB for the snapshot; for the store,
SQLite copies each query's result into a private file that ADBC reads, see
:func:`_read_ops`); the policy runs as DuckDB statements; a message is rendered once per
distinct combination of the fields its template uses (a million recipients share a few
thousand combinations), with ``smsops.templates``' compiled renderer. A large audience is
then decided in parts by ranges of phone numbers (everything the policy judges together
shares a number), and the store writes one part (``insert … select … on conflict
(idempotency_key) do nothing`` from a private file, on a thread of its own) while DuckDB
decides the next, all in one transaction (:class:`_OutboxWriter`).

Guarantees:

- Idempotent (invariant 1): the key is ``"<campaign_id>:<contact_id>"``; the write takes
  the store's write lock, checks the campaign is still a draft (or scheduled), inserts and
  marks it running in the same transaction. A double click, a second process or a restart after a
  crash writes nothing twice; a repeated call returns the outcome from the outbox.
- Caps across processes (invariant 4): promotions planned by another process after the cap
  history was read are read again under the write lock, before any part is decided.
- Consent at send time (invariant 2): :func:`check_before_send` re-checks a batch of
  outbox rows against the ledger, erasures and quiet hours; the dispatcher calls it just
  before sending.

A/B tests and holdouts. Each recipient who passes the policy gets a split number fixed by
``(campaign_id, contact_id)`` (:func:`smsops.policy.split_unit`): below the holdout
fraction the row is ``holdout`` (state ``holdout``, never sendable); then the test share is
cut evenly across the variants. With a test fraction below 1 the rest of the audience is
the *remainder*: state ``planned``, variant ``remainder``, no body, ``skip_reason
'awaiting_winner'`` and ``not_before`` :data:`AWAITING_WINNER` (the year 9999), so no
dispatcher that honours ``not_before`` can send it. :func:`release_remainder` gives it the
winning variant: it renders the winner's text and sets ``not_before`` by quiet hours. The
schema is unchanged (no new state: the dbt models' accepted values stay true). Rows the
policy suppressed are spread over the real variants by contact id (as in the demo's
history), so the ``holdout`` variant holds the control group and nothing else.

Quiet hours: a row that would arrive in the recipient's quiet hours is ``planned`` with
``not_before`` set and a held reason (``quiet_hours``, or ``quiet_hours_candidate_zones``
when only the number's candidate zones are known); a contact with no known zone is judged
in ``default_zone``. A dispatcher sends a planned row of a running campaign when
``not_before`` is null or past, and clears a held reason when it does; as time passes
between planning and sending (a long queue, a pause), :func:`check_before_send` judges quiet
hours again when asked and :func:`defer` moves a row that would now arrive at night.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import re
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from datetime import time as dtime
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import duckdb
import pandas as pd
import pyarrow as pa

from smsops import (
    abtest,
    composer,
    consent,
    encoding,
    erasure,
    i18n,
    links,
    phones,
    policy,
    pricing,
    segments,
    senders,
    store,
    templates,
    warehouse,
)
from smsops import config as settings
from smsops.i18n import N_, _
from smsops.policy import HOLDOUT, NO_QUIET_HOURS, REMAINDER, FrequencyCaps, QuietHours

log = logging.getLogger(__name__)

__all__ = [
    "AWAITING_WINNER",
    "DEFAULT_ZONE",
    "KIND_LABELS",
    "MAX_VARIANTS",
    "STATE_LABELS",
    "STATUSES",
    "STATUS_LABELS",
    "TRANSIENT_FAILURES",
    "Campaign",
    "CampaignError",
    "CampaignNotFound",
    "CampaignStateError",
    "PlanResult",
    "Refused",
    "Step",
    "Tally",
    "TestSend",
    "Variant",
    "audience_label",
    "audiences",
    "cancel",
    "check_before_send",
    "create",
    "defer",
    "drafts",
    "get",
    "launch_guards",
    "launched",
    "list_all",
    "local_time",
    "next_start",
    "outcome",
    "pause",
    "plan",
    "release_due_winners",
    "release_remainder",
    "resume",
    "retry_failed",
    "schedule",
    "start_due",
    "still_moving",
    "tally",
    "test_results",
    "test_send",
    "unschedule",
    "variant_counts",
    "waterfall",
    "zone_info",
]

Kind = Literal["promo", "service"]

STATUSES = ("draft", "scheduled", "running", "paused", "finished", "cancelled")
STATUS_LABELS: dict[str, str] = {
    "draft": N_("draft"),
    "scheduled": N_("scheduled"),
    "running": N_("in progress"),
    "paused": N_("paused"),
    "finished": N_("finished"),
    "cancelled": N_("stopped"),
}
"""A campaign's status as a person reads it (``i18n.label(STATUS_LABELS, status)``). Its texts
differ from those of a message's states (:data:`STATE_LABELS`) where Russian needs another
word for a campaign ("sending", "cancelled"): the catalogue keeps one text per English msgid."""
KIND_LABELS: dict[str, str] = {"promo": N_("promotion"), "service": N_("service message")}
STATE_LABELS: dict[str, str] = {
    "planned": N_("planned"),
    "sending": N_("sending"),
    "submitted": N_("handed to the provider"),
    "suppressed": N_("not sent"),
    "holdout": N_("control group"),
    "rejected": N_("rejected"),
    "cancelled": N_("cancelled"),
    "unknown": N_("outcome unknown"),
}
"""A message's state in the outbox (a test send's table shows it)."""
DELIVERY_LABELS: dict[str, str] = {
    "accepted": N_("accepted"),
    "queued": N_("queued"),
    "sending": N_("sending"),
    "sent": N_("sent"),
    "delivered": N_("delivered"),
    "undelivered": N_("not delivered"),
    "failed": N_("failed"),
}
"""The provider's latest status of a message."""
MAX_VARIANTS = 5
MAX_NAME_LENGTH = 200
DEFAULT_ZONE = "Europe/Moscow"
"""Where quiet hours are judged for a contact whose time zone nothing tells."""
AWAITING_WINNER = "9999-12-31 00:00:00"
"""``not_before`` of remainder rows until a winner is chosen: never due."""
TRANSIENT_FAILURES = frozenset({"gave_up_after_retries"})
"""``skip_reason`` of rejected rows that :func:`retry_failed` re-queues (set by ``smsops.dispatch``)."""

_VARIANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _.-]{0,31}")
_RESERVED = frozenset({HOLDOUT, REMAINDER})
_SENT_STATES = ("planned", "sending", "submitted", "unknown")
"""Outbox states of messages that went or will go: what the caps count."""
_LAUNCHABLE = ("draft", "scheduled")
_QUIET_REASONS = ("quiet_hours", "quiet_hours_candidate_zones")
_UNIT_SCALE = 4503599627370496.0  # 16**13, see policy.split_unit


class CampaignError(ValueError):
    """A campaign that cannot be created or planned as asked; the message names the input.

    ``str()`` reads in English (logs, the CLI, an API's answer), :meth:`localized` in the current
    language (a page). Raise it with the English marked for the catalogue and the values apart:
    ``CampaignError(N_("seed number {value!r}: {reason}"), value=..., reason=...)``."""

    def __init__(self, message: str = "", /, **values: Any) -> None:
        super().__init__(message.format(**values) if values else message)
        self.template = message
        self.values = values

    def localized(self) -> str:
        """The message in the current language."""
        text = _(self.template)
        if not self.values:
            return text
        return text.format(
            **{k: v.localized() if hasattr(v, "localized") else v for k, v in self.values.items()}
        )


class Refused(CampaignError):
    """A launch, a schedule or a test send that a guard refuses (:mod:`smsops.composer`'s
    :class:`~smsops.composer.Guard`: an empty message, nobody to send to, no seed numbers);
    :attr:`guard` says why and the way out; a launch refused for having nobody to send to keeps
    in :attr:`result` what it would have planned (its waterfall says who was left out, and why)."""

    def __init__(
        self,
        guard: composer.Guard,
        campaign_id: int | None = None,
        variant: str | None = None,
        result: PlanResult | None = None,
    ) -> None:
        super().__init__(f"variant {variant!r}: {guard}" if variant else str(guard))
        self.guard = guard
        self.campaign_id = campaign_id
        self.variant = variant
        self.result = result

    def localized(self) -> str:
        if self.variant:
            return _("Variant {name}: {message}").format(name=self.variant, message=self.guard.message)
        return self.guard.message


class CampaignNotFound(LookupError):
    """No campaign has that id."""


class CampaignStateError(CampaignError):
    """The campaign's status does not allow the action (e.g. resuming a cancelled one)."""


@dataclass(frozen=True, slots=True)
class Variant:
    """One version of the message: its template (without the opt-out footer, which
    promotions get at planning) and its sender."""

    name: str
    template_source: str
    sender: str


@dataclass(frozen=True, slots=True)
class Campaign:
    campaign_id: int
    name: str
    kind: Kind
    status: str
    segment: segments.Segment | None
    variants: tuple[Variant, ...]
    test_fraction: float | None
    holdout_fraction: float | None
    created_at: datetime
    launched_at: datetime | None
    finished_at: datetime | None
    quiet: QuietHours | None = None
    """The campaign's own quiet hours (None: written before campaigns kept their own; the
    install's ``SMSOPS_QUIET_HOURS`` then apply)."""
    caps: FrequencyCaps | None = None
    """Its frequency caps (None: the install's ``SMSOPS_DAILY_CAP`` / ``SMSOPS_WEEKLY_CAP``)."""
    scheduled_at: datetime | None = None
    """When it starts by itself (UTC); a ``scheduled`` campaign is planned then."""
    test_of: int | None = None
    """For a test send: the campaign it tests (such rows are hidden from the lists)."""
    ab_window_hours: float | None = None
    """An A/B test is judged this long after launch."""
    auto_release: bool = False
    """Whether the remainder then gets the winner without a click (:func:`release_due_winners`)."""


@dataclass(frozen=True, slots=True)
class TestSend:
    """A test send to the team's own numbers: a hidden campaign of its own (``test_of``), so
    it never counts in the tested campaign's audience, results or anyone's caps."""

    test_campaign_id: int
    campaign_id: int
    sample_contact_id: int
    """The audience member whose data personalised the messages."""
    sample_phone: str
    """Their number, masked."""
    numbers: tuple[str, ...]
    """The seed numbers (E.164)."""
    messages: int


@dataclass(frozen=True, slots=True)
class Step:
    """One line of the audience waterfall: how many the step removed and how many remain."""

    reason: str
    """``audience`` for the first line, then a skip reason."""
    removed: int
    remaining: int

    @property
    def label(self) -> str:
        """What the step is, in the current language."""
        return _("in the segment now") if self.reason == "audience" else policy.explain(self.reason)


@dataclass(frozen=True, slots=True)
class PlanResult:
    """What a launch put in the outbox (or, with ``dry_run``, would put)."""

    campaign_id: int
    audience: int
    """Outbox rows: the frozen audience."""
    waterfall: tuple[Step, ...]
    """The audience after each policy step, in :data:`smsops.policy.POLICY_ORDER`."""
    states: dict[str, int]
    skip_reasons: dict[str, int]
    variants: dict[str, int]
    """Messages per variant that go or will go (``remainder`` included)."""
    to_send: int
    """Rows that go or will go: planned (deferred and remainder included) or already sent."""
    deferred: int
    """Planned rows held by quiet hours."""
    earliest_not_before: datetime | None
    awaiting_winner: int
    segments: int
    """SMS segments of the rendered messages (the remainder is not rendered yet)."""
    cost: dict[str, float]
    """Their price by currency."""
    longest: int = 0
    """Segments of the longest rendered message."""
    remainder_cost: dict[str, dict[str, float]] = field(default_factory=dict)
    """For each variant, what the remainder would cost if it won (by currency)."""
    written: int = 0
    """Rows this call inserted (0 when the campaign had been planned already)."""
    already_planned: bool = False
    dry_run: bool = False
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds per phase as the launching thread spent them (read, policy, render, assemble,
    export, write: waiting for the store after the last part, commit), summed over the parts;
    they add up to ``seconds``. ``writer`` is the store's thread copying parts into the outbox,
    overlapped with deciding the next part."""


# ---------------------------------------------------------------------------------------
# Creating and reading campaigns


def create(
    name: str,
    kind: Kind,
    segment: segments.Segment | segments.SavedSegment | tuple[str, int] | str,
    variants: Sequence[Variant],
    test_fraction: float | None = None,
    holdout_fraction: float | None = None,
    home: str | Path | None = None,
    *,
    quiet: QuietHours | str | None = None,
    caps: FrequencyCaps | None = None,
    scheduled_at: datetime | None = None,
    ab_window_hours: float | None = None,
    auto_release: bool = False,
) -> Campaign:
    """A new draft campaign, checked against the published snapshot.

    ``quiet`` (a :class:`QuietHours` or ``"21:00-09:00"``) and ``caps`` are kept with the
    campaign and used when it is planned and sent; None takes the install's defaults
    (``SMSOPS_QUIET_HOURS``, ``SMSOPS_DAILY_CAP``, ``SMSOPS_WEEKLY_CAP``) as they are now.
    ``scheduled_at``: when it should start (see :func:`schedule`). ``ab_window_hours``: how
    long after launch an A/B test is judged; with ``auto_release`` the remainder then gets
    the winner by itself.

    ``segment``: a :class:`~smsops.segments.Segment`, a saved one, ``(name, version)`` of a
    saved one, or its name (the latest version); its definition is stored, not contact ids.
    1–5 variants with distinct names; templates may use only :func:`segments.template_fields`;
    senders must pass :func:`smsops.senders.validate` and be configured (``SMSOPS_SENDERS``).
    ``holdout_fraction`` in (0, 0.5] (promotions only); ``test_fraction`` in (0, 1] needs two
    or more variants, and holdout + test ≤ 1."""
    name = _check_name(name)
    if kind not in ("promo", "service"):
        raise CampaignError(N_("kind: expected 'promo' or 'service', got {kind!r}"), kind=kind)
    resolved = _resolve_segment(segment, home)
    checked = _check_variants(variants, kind, home)
    test_fraction, holdout_fraction = _check_fractions(test_fraction, holdout_fraction, kind, len(checked))
    rules = _check_policy(quiet, caps)
    when = None if scheduled_at is None else _stamp(_check_time(scheduled_at, "scheduled_at"))
    window = _check_window(ab_window_hours, auto_release, test_fraction)
    try:
        segments.validate(resolved, segments.fields(home))
    except segments.SegmentError as exc:
        raise CampaignError(f"segment {resolved.name!r}: {exc}") from exc
    created = _stamp(_now(None))
    definition = json.dumps(segments.to_dict(resolved), ensure_ascii=False, sort_keys=True)
    with _store(home) as conn, store.transaction(conn):
        (campaign_id,) = conn.execute(
            """
            insert into campaigns (
                name, kind, status, sender_id, segment, test_fraction, holdout_fraction, created_at,
                policy, scheduled_at, ab_window_hours, auto_release
            )
            values (?, ?, 'draft', ?, ?, ?, ?, ?, ?, ?, ?, ?)
            returning campaign_id
            """,
            (
                name, kind, checked[0].sender, definition, test_fraction, holdout_fraction, created,
                rules, when, window, int(bool(auto_release)),
            ),
        ).fetchone()  # fmt: skip
        conn.executemany(
            "insert into campaign_variants (campaign_id, variant, template, sender_id) values (?, ?, ?, ?)",
            [(campaign_id, v.name, v.template_source, v.sender) for v in checked],
        )
    return get(campaign_id, home)


def get(campaign_id: int, home: str | Path | None = None) -> Campaign:
    """The campaign with its variants."""
    with _store(home) as conn:
        return _load(conn, campaign_id)


def _load(conn: sqlite3.Connection, campaign_id: int) -> Campaign:
    if isinstance(campaign_id, bool) or not isinstance(campaign_id, int):
        raise CampaignError(f"campaign_id: expected a whole number, got {campaign_id!r}")
    row = conn.execute(
        """
        select name, kind, status, segment, test_fraction, holdout_fraction,
               created_at, launched_at, finished_at,
               policy, scheduled_at, test_of, ab_window_hours, auto_release
        from campaigns where campaign_id = ?
        """,
        (campaign_id,),
    ).fetchone()
    if row is None:
        raise CampaignNotFound(f"no campaign has id {campaign_id}")
    name, kind, status, definition, test, holdout, created, launched, finished, *extra = row
    rules, scheduled, test_of, window, auto = extra
    quiet, caps = _read_policy(rules)
    variants = tuple(
        Variant(v, template, sender or "")
        for v, template, sender in conn.execute(
            "select variant, template, sender_id from campaign_variants where campaign_id = ? order by variant",
            (campaign_id,),
        )
    )
    segment = None
    if definition:
        try:
            segment = segments.from_dict(json.loads(definition))
        except (ValueError, segments.SegmentError):
            segment = None  # written by another tool (e.g. the demo): not a plannable segment
    return Campaign(
        campaign_id=campaign_id,
        name=name,
        kind=kind,
        status=status,
        segment=segment,
        variants=variants,
        test_fraction=test,
        holdout_fraction=holdout,
        created_at=_parse(created),
        launched_at=_parse(launched) if launched else None,
        finished_at=_parse(finished) if finished else None,
        quiet=quiet,
        caps=caps,
        scheduled_at=_parse(scheduled) if scheduled else None,
        test_of=test_of,
        ab_window_hours=window,
        auto_release=bool(auto),
    )


def _check_policy(quiet: Any, caps: Any) -> str:
    """The campaign's quiet hours and caps as stored (JSON), defaults filled in from settings."""
    if quiet is None:
        quiet = settings.quiet_hours()
    elif isinstance(quiet, str):
        try:
            quiet = policy.parse_quiet_hours(quiet)
        except policy.PolicyError as exc:
            raise CampaignError(N_("{error}"), error=exc) from exc
    elif not isinstance(quiet, QuietHours):
        raise CampaignError(f"quiet: expected QuietHours or text such as '21:00-09:00', got {quiet!r}")
    if caps is None:
        caps = settings.frequency_caps()
    elif not isinstance(caps, FrequencyCaps):
        raise CampaignError(f"caps: expected FrequencyCaps(per_day, per_week), got {caps!r}")
    return json.dumps({"quiet": str(quiet), "per_day": caps.per_day, "per_week": caps.per_week})


def _read_policy(text: str | None) -> tuple[QuietHours | None, FrequencyCaps | None]:
    if not text:
        return None, None
    rules = json.loads(text)
    return policy.parse_quiet_hours(rules["quiet"]), FrequencyCaps(
        rules.get("per_day"), rules.get("per_week")
    )


def _check_time(value: Any, label: str) -> datetime:
    if not isinstance(value, datetime):
        raise CampaignError(f"{label}: expected a datetime (aware, or naive meaning UTC), got {value!r}")
    return _now(value)


MAX_AB_WINDOW_HOURS = 24 * 14


def _check_window(hours: Any, auto_release: Any, test_fraction: float | None) -> float | None:
    if not isinstance(auto_release, bool):
        raise CampaignError(f"auto_release: expected True or False, got {auto_release!r}")
    if hours is None:
        if auto_release:
            raise CampaignError(
                "auto_release: needs ab_window_hours, how long after launch to judge the test"
            )
        return None
    if isinstance(hours, bool) or not isinstance(hours, int | float) or not 0 < hours <= MAX_AB_WINDOW_HOURS:
        raise CampaignError(
            f"ab_window_hours: expected hours above 0 and at most {MAX_AB_WINDOW_HOURS}, got {hours!r}"
        )
    if test_fraction is None:
        raise CampaignError(
            "ab_window_hours: only an A/B test with a test share below 1 has a remainder to judge for"
        )
    return float(hours)


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not name.strip():
        raise CampaignError(N_("name: a campaign needs a name"))
    name = name.strip()
    if len(name) > MAX_NAME_LENGTH or any(ch < " " for ch in name):
        raise CampaignError(
            N_("name: at most {limit} characters, no control characters"), limit=MAX_NAME_LENGTH
        )
    return name


def _resolve_segment(segment: Any, home: str | Path | None) -> segments.Segment:
    if isinstance(segment, segments.Segment):
        return segment
    if isinstance(segment, segments.SavedSegment):
        return segment.segment
    if isinstance(segment, str):
        return segments.load(segment, home=home).segment
    if isinstance(segment, tuple) and len(segment) == 2:
        return segments.load(segment[0], segment[1], home=home).segment
    raise CampaignError(
        "segment: expected a Segment, a SavedSegment, a saved segment's name or (name, version),"
        f" got {type(segment).__name__}"
    )


def _check_variants(variants: Sequence[Variant], kind: Kind, home: str | Path | None) -> list[Variant]:
    if isinstance(variants, Variant):
        variants = [variants]
    variants = list(variants)
    if not 1 <= len(variants) <= MAX_VARIANTS:
        raise CampaignError(f"variants: a campaign has 1 to {MAX_VARIANTS} variants, got {len(variants)}")
    known = segments.template_fields(home)
    allowed = settings.senders()
    checked: list[Variant] = []
    for variant in variants:
        if not isinstance(variant, Variant):
            raise CampaignError(
                f"variants: expected Variant(name, template_source, sender), got {variant!r:.60}"
            )
        name = variant.name
        if not isinstance(name, str) or not _VARIANT_NAME.fullmatch(name):
            raise CampaignError(
                N_("variant {name!r}: a name is 1-32 letters, digits, space, '_', '.' or '-'"), name=name
            )
        if name.lower() in _RESERVED:
            raise CampaignError(
                N_("variant {name!r}: {reserved} are reserved names"),
                name=name,
                reserved=", ".join(sorted(_RESERVED)),
            )
        if any(v.name == name for v in checked):
            raise CampaignError(N_("variant {name!r}: two variants have this name"), name=name)
        _check_text(variant, kind)
        try:
            template = templates.compile(composer.message_source(variant.template_source, kind), known)
        except templates.TemplateError as exc:
            raise CampaignError(N_("variant {name!r}: {error}"), name=name, error=exc) from exc
        if template.unknown_fields:
            raise CampaignError(
                N_(
                    "variant {name!r}: {fields} is not a field of your contacts (see segments.template_fields)"
                ),
                name=name,
                fields=", ".join(template.unknown_fields),
            )
        try:
            sender = senders.validate(variant.sender).value
        except senders.SenderError as exc:
            raise CampaignError(N_("variant {name!r}: {error}"), name=name, error=exc) from exc
        if sender not in allowed:
            raise CampaignError(
                N_(
                    "variant {name!r}: sender {sender!r} is not configured for this install (SMSOPS_SENDERS: {allowed})"
                ),
                name=name,
                sender=sender,
                allowed=", ".join(allowed) or "none",
            )
        checked.append(replace(variant, sender=sender))
    return checked


def _check_fractions(
    test: float | None, holdout: float | None, kind: Kind, n_variants: int
) -> tuple[float | None, float | None]:
    for label, value, upper in (("test_fraction", test, 1.0), ("holdout_fraction", holdout, 0.5)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= upper:
            raise CampaignError(
                N_("{setting}: expected a share above 0 and at most {upper}, got {value!r}"),
                setting=label,
                upper=f"{upper:g}",
                value=value,
            )
    if holdout is not None and kind == "service":
        raise CampaignError(N_("holdout_fraction: service messages are owed to every recipient; no holdout"))
    if test is not None and n_variants < 2:
        raise CampaignError(N_("test_fraction: a test needs 2 to 5 variants"))
    if test is not None and holdout is not None and test + holdout > 1:
        raise CampaignError(
            N_("test_fraction + holdout_fraction: {test} + {holdout} exceeds the whole audience"),
            test=test,
            holdout=holdout,
        )
    return (None if test is None else float(test)), (None if holdout is None else float(holdout))


# ---------------------------------------------------------------------------------------
# Planning


def plan(
    campaign_id: int,
    *,
    now: datetime | None = None,
    home: str | Path | None = None,
    caps: FrequencyCaps | None = None,
    quiet: QuietHours | None = None,
    opt_out_text: str | None = None,
    default_zone: str = DEFAULT_ZONE,
    dry_run: bool = False,
    progress: Callable[[float, str], None] | None = None,
) -> PlanResult:
    """Launch: freeze the audience, apply the policy, split, render, price and write the
    outbox in one transaction; the campaign becomes ``running`` (``finished`` when nobody
    is left to send to). With ``dry_run`` nothing is written: the result is what a launch
    now would do (for the confirmation dialog).

    ``caps`` and ``quiet`` default to the campaign's own (see :func:`create`); given, they
    override them for this plan.

    Calling it for a campaign that is already launched writes nothing and returns the
    outbox's outcome with ``already_planned=True``.

    ``progress(fraction, step)`` is told how far it has come (``step``: one of
    :data:`PLAN_STEPS`, untranslated), for a page that runs it in the background."""
    started = time.perf_counter()
    report = progress or _no_progress
    moment = _now(now)
    campaign = get(campaign_id, home)
    if campaign.status not in _LAUNCHABLE:
        if dry_run:
            raise CampaignStateError(
                N_("campaign {id} is {status}: there is nothing to preview"),
                id=campaign_id,
                status=campaign.status,
            )
        return replace(outcome(campaign_id, home), already_planned=True, seconds=_since(started))
    _check_launchable(campaign)
    caps = caps or campaign.caps or settings.frequency_caps()
    quiet = quiet or campaign.quiet or settings.quiet_hours()
    policy.deferral(moment, [default_zone], quiet)  # checks the zone and the quiet hours early
    footer = settings.opt_out_text() if opt_out_text is None else opt_out_text
    compiled = {
        v.name: templates.compile(composer.message_source(v.template_source, campaign.kind, footer))
        for v in campaign.variants
    }
    field_names = list(dict.fromkeys(name for t in compiled.values() for name in t.fields))
    db_path = store.store_path(home)

    clock = _Clock()
    report(0.02, PLAN_STEPS[0])
    with ThreadPoolExecutor(max_workers=4) as pool:
        audience = pool.submit(_audience, campaign.segment, field_names, moment, home)
        contacts = pool.submit(_read_ops, db_path, _CONTACTS_SQL)
        ledger = pool.submit(_read_ops, db_path, _LEDGER_SQL)
        history = pool.submit(_cap_history, db_path, campaign, moment, caps)
        audience_t, contacts_t, ledger_t = audience.result(), contacts.result(), ledger.result()
        history_t, watermark = history.result()
    clock.lap("read")
    report(0.3, PLAN_STEPS[1])

    with _duckdb() as con:
        con.register("aud_all", audience_t)
        con.register("ct_all", contacts_t)
        con.register("ledger_all", ledger_t)
        con.register("hist", history_t)
        con.register("erased_numbers", _erased(ledger_t, contacts_t, audience_t, home))
        _prepare(con, campaign, moment, quiet, default_zone)
        clock.lap("policy")
        report(0.45, PLAN_STEPS[2])
        if dry_run:
            for table in ("aud", "ct", "ledger"):
                con.execute(f"create temp view {table} as select * from {table}_all")
            summary, remainder_groups = _plan_part(con, campaign, moment, caps, compiled, field_names, clock)
            result = _result(campaign_id, summary, remainder_groups, dry_run=True, started=started)
            return replace(result, timings=clock.laps)
        with _OutboxWriter(db_path) as writer:
            if not writer.begin(campaign.campaign_id):  # another call launched it first
                return replace(outcome(campaign_id, home), already_planned=True, seconds=_since(started))
            if campaign.kind == "promo" and (caps.per_day is not None or caps.per_week is not None):
                # promotions planned since the history was read count too (caps across processes)
                late = writer.history(
                    _HISTORY_SQL.format(bound=">"), _history_params(campaign, moment, watermark)
                )
                if late.num_rows:
                    con.register("hist", _history(history_t, late))
            summary, remainder_groups = [], {}
            ranges = _phone_ranges(con, len(audience_t))
            for part, (low, high) in enumerate(ranges):
                _select_part(con, part, low, high)
                rows, costs = _plan_part(con, campaign, moment, caps, compiled, field_names, clock)
                summary += rows
                remainder_groups = _add_groups(remainder_groups, costs)
                # in number order, so the outbox's index on numbers grows in order
                writer.submit(
                    con.sql(
                        f"select {', '.join(_OUTBOX_COLUMNS)} from outbox order by phone_e164, contact_id"
                    ).to_arrow_table()
                )
                clock.lap("export")
                report(0.45 + 0.45 * (part + 1) / len(ranges), PLAN_STEPS[2])
            # nobody to send to: refused, and the transaction rolled back (the campaign stays a draft)
            _check_recipients(campaign, _summarise(campaign_id, summary))
            planned = any(state == "planned" for state, *_rest in summary)
            report(0.92, PLAN_STEPS[3])
            written = writer.finish(campaign.campaign_id, planned, moment, clock)
        result = _result(campaign_id, summary, remainder_groups, started=started)
        return replace(result, written=written, timings={**clock.laps, "writer": writer.busy})


PLAN_STEPS = (
    N_("Reading the audience, the consent ledger and the send history"),
    N_("Applying consent, opt-outs, quiet hours and frequency caps"),
    N_("Personalising and pricing each message"),
    N_("Writing the outbox"),
)
"""What :func:`plan` tells its ``progress`` it is doing, in order (translate with ``_``)."""


def _no_progress(fraction: float, step: str) -> None:
    pass


def _check_launchable(campaign: Campaign) -> None:
    """What a launch, a schedule or a test send needs before it reads anything: a segment,
    variants, and text in every variant (:func:`smsops.composer.empty_text`)."""
    if campaign.segment is None:
        raise CampaignError(
            N_("campaign {id} has no segment definition this version can read"), id=campaign.campaign_id
        )
    if not campaign.variants:
        raise CampaignError(N_("campaign {id} has no variants"), id=campaign.campaign_id)
    for variant in campaign.variants:
        _check_text(variant, campaign.kind, campaign.campaign_id)


def _check_text(variant: Variant, kind: Kind, campaign_id: int | None = None) -> None:
    if isinstance(variant.template_source, str):  # anything else: templates.compile says what is wrong
        guard = composer.empty_text(variant.template_source, kind)
        if guard is not None:
            raise Refused(guard, campaign_id, variant.name)


def _check_recipients(campaign: Campaign, result: PlanResult) -> None:
    """Refuses a launch that would send nothing (:func:`smsops.composer.no_recipients`)."""
    guard = composer.no_recipients(result.to_send, result.audience, campaign.kind, _removed_most(result))
    if guard is not None:
        raise Refused(guard, campaign.campaign_id, result=result)


def _removed_most(result: PlanResult) -> str | None:
    steps = [s for s in result.waterfall if s.reason != "audience" and s.removed]
    return max(steps, key=lambda s: s.removed).reason if steps else None


def launch_guards(
    campaign: Campaign, preview: PlanResult, *, opt_out_text: str | None = None
) -> list[composer.Guard]:
    """Everything a person must know before launching ``campaign`` as ``preview`` (its
    ``plan(dry_run=True)``) would: what refuses the launch (an empty message, nobody to send
    to), what needs their explicit yes (a long message or a large bill), and what they should
    know (tracked links to the placeholder address, an opt-out footer that does not fit)."""
    footer = settings.opt_out_text() if opt_out_text is None else opt_out_text
    sources = [v.template_source for v in campaign.variants]
    found = [composer.empty_text(source, campaign.kind) for source in sources]
    found.append(
        composer.no_recipients(preview.to_send, preview.audience, campaign.kind, _removed_most(preview))
    )
    found.append(composer.large_send(preview.longest, preview.cost))
    found.append(composer.placeholder_links(sources))
    per_segment = sum(preview.cost.values()) / preview.segments if preview.segments else 0.0
    currency = next(iter(preview.cost), "RUB")
    for variant in campaign.variants:
        try:
            static = templates.compile(variant.template_source).render({})
        except templates.TemplateError:
            continue
        fit = composer.footer_fit(
            static,
            footer,
            campaign.kind,
            messages=preview.to_send,
            per_segment=per_segment,
            currency=currency,
        )
        if fit is not None:
            found.append(fit)
            break  # one is enough: the footer is the same in every variant
    return [g for g in found if g is not None]


def _plan_part(
    con: duckdb.DuckDBPyConnection,
    campaign: Campaign,
    moment: datetime,
    caps: FrequencyCaps,
    compiled: Mapping[str, templates.Template],
    field_names: Sequence[str],
    clock: _Clock,
) -> tuple[list[tuple[Any, ...]], _Groups]:
    """Decide, render and assemble the recipients in table ``aud`` (table ``outbox``); its
    summary rows and its remainder's messages and segments under each variant, by country."""
    _decide(con, campaign, moment, caps, len(field_names))
    clock.lap("policy")
    remainder = _render(con, compiled, field_names)
    clock.lap("render")
    _assemble(con, campaign, moment)
    summary = con.execute(_SUMMARY_SQL.format(table="outbox"), [campaign.campaign_id]).fetchall()
    clock.lap("assemble")
    return summary, remainder


_PART_ROWS = 200_000
"""Recipients per part of a launch (at most :data:`_MAX_PARTS`): the store writes one part
while DuckDB decides the next."""
_MAX_PARTS = 5


def _phone_ranges(con: duckdb.DuckDBPyConnection, audience: int) -> list[tuple[str | None, str | None]]:
    """Cut the audience into parts by ranges of phone numbers: ``(low, high)`` per part (None:
    unbounded), and table ``part_of`` (each contact of ``aud_all`` and its part).

    Everything the policy judges together shares a number (duplicates, caps, consent), so each
    part is decided on its own exactly as the whole would be; ranges rather than a hash keep
    each part's rows, written in number order, in one stretch of the outbox's index on numbers,
    and let each part take its own slice of the contacts and the ledger. A contact with no
    number (or none in the store any more) belongs to the first part."""
    parts = max(1, min(_MAX_PARTS, -(-audience // _PART_ROWS)))
    # the first and the last part half the size of the others: the store starts writing
    # sooner, and has less left to write once DuckDB has decided the last part
    cuts = [(q - 0.5) / (parts - 1) for q in range(1, parts)]
    bounds: list[str] = []
    if cuts:
        (found,) = con.execute(
            "select quantile_disc(ct_all.phone_e164, $cuts) from aud_all join ct_all using (contact_id)",
            {"cuts": cuts},
        ).fetchone()
        bounds = sorted({b for b in found or () if b is not None})
    above = " + ".join(
        f"coalesce(ct_all.phone_e164 >= $bounds[{i + 1}], false)::int" for i in range(len(bounds))
    )
    con.execute(
        f"""
        create or replace temp table part_of as
        select aud_all.contact_id, {above or "0"} as part
        from aud_all left join ct_all using (contact_id)
        """,
        {"bounds": bounds} if bounds else None,
    )
    edges: list[str | None] = [None, *bounds, None]
    return list(itertools.pairwise(edges))


def _select_part(con: duckdb.DuckDBPyConnection, part: int, low: str | None, high: str | None) -> None:
    """Tables ``aud``, ``ct`` and ``ledger``: the part's recipients, and the contacts and
    ledger events of its numbers (``low`` ≤ number < ``high``; the first part also holds the
    contacts without one)."""
    con.execute(
        "create or replace temp table aud as"
        " select aud_all.* from aud_all join part_of using (contact_id) where part = $part",
        {"part": part},
    )
    # views (read once each, with the filter in the scan): their SQL is text, so the bounds
    # are literals; they are numbers from the store, quoted as SQL strings all the same
    limits = [f"phone_e164 >= {_literal(low)}"] if low is not None else []
    limits += [f"phone_e164 < {_literal(high)}"] if high is not None else []
    in_range = " and ".join(limits) or "true"
    no_number = " or phone_e164 is null" if part == 0 else ""
    con.execute(f"create or replace temp view ct as select * from ct_all where {in_range}{no_number}")
    con.execute(f"create or replace temp view ledger as select * from ledger_all where {in_range}")


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


_Groups = dict[str, dict[str | None, tuple[int, int]]]
"""Variant -> country -> (messages, segments)."""


def _add_groups(total: _Groups, more: _Groups) -> _Groups:
    out = {variant: dict(countries) for variant, countries in total.items()}
    for variant, countries in more.items():
        mine = out.setdefault(variant, {})
        for country, (messages, segs) in countries.items():
            had = mine.get(country, (0, 0))
            mine[country] = (had[0] + messages, had[1] + segs)
    return out


# Reads ----------------------------------------------------------------------------------

# The zone a contact is judged in: its own (from its city), else its number's candidates.
_CONTACTS_SQL = """
    select
        contact_id,
        phone_e164,
        phone_valid,
        phone_reason,
        phone_country as country,
        coalesce(nullif(trim(time_zone), ''), nullif(trim(phone_time_zones), ''), '') as zone_key,
        coalesce(nullif(trim(time_zone), ''), '') = '' and instr(coalesce(phone_time_zones, ''), ',') > 0
            as zone_candidates
    from contacts
"""
# smsops.consent's rule: the latest event wins, an opt-out wins a tie, a keyword STOP covers
# every purpose.
_LEDGER_SQL = """
    select
        event_id,
        phone_e164,
        occurred_at,
        action = 'opt_out' as opt_out,
        purpose = 'marketing' or (action = 'opt_out' and source = 'keyword_reply') as for_marketing,
        purpose = 'service' or (action = 'opt_out' and source = 'keyword_reply') as for_service
    from consent_events
"""
_HISTORY_SQL = """
    select message_id, phone_e164, coalesce(submitted_at, nullif(not_before, ?), planned_at) as sent_at
    from messages
    where campaign_id in (
            select campaign_id from campaigns
            where kind = 'promo' and campaign_id <> ? and (finished_at is null or finished_at >= ?)
        )
        and state in ('planned', 'sending', 'submitted', 'unknown')
        and phone_e164 is not null
        and coalesce(submitted_at, nullif(not_before, ?), planned_at) >= ?
        and message_id {bound} ?
"""


def _read_ops(db_path: Path, sql: str, params: Sequence[Any] = ()) -> pa.Table:
    """A query's result from the operational store as Arrow.

    SQLite copies the result into a private file, which ADBC then reads columnar. ADBC is
    never pointed at the store itself: its driver carries a SQLite of its own, and two SQLite
    libraries in one process cannot see each other's locks (POSIX locks are per process), so
    the second to open a WAL store believes it is alone, resets the shared WAL index under
    the first and, on close, checkpoints and deletes the WAL the first still writes to (seen
    here: "disk I/O error" for the other connection). The store is opened only through
    Python's ``sqlite3``, as everywhere else in smsops; ADBC only opens files no one else has."""
    with _private_dir(db_path) as folder:
        private = folder / "result.sqlite"
        conn = store.connect(db_path)
        try:
            _attach_private(conn, private, "result")
            conn.execute(f"create table result.rows as {sql}", list(params))
            conn.execute("detach database result")
        finally:
            conn.close()
        return _read_private(private, "select * from rows")


@contextmanager
def _private_dir(db_path: Path) -> Iterator[Path]:
    """A folder for private files beside the store (a launch's parts take about as much room as
    its outbox rows), removed afterwards whatever happens."""
    folder = _scratch_folder(db_path)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


_SCRATCH_KEPT = timedelta(hours=6)


def _scratch_folder(db_path: Path) -> Path:
    """A new folder under ``<home>/tmp``. Folders left there by a process that was killed
    (older than :data:`_SCRATCH_KEPT`: no launch takes that long) are removed first."""
    root = settings.paths(db_path.parent).scratch
    root.mkdir(exist_ok=True)
    stale = time.time() - _SCRATCH_KEPT.total_seconds()
    for old in root.glob("smsops-plan-*"):
        with contextlib.suppress(OSError):
            if old.stat().st_mtime < stale:
                shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix="smsops-plan-", dir=root))


def _attach_private(conn: sqlite3.Connection, path: Path, name: str) -> None:
    """Attach a new private file: no journal and no syncs (it is thrown away after use)."""
    conn.execute(f"attach database ? as {name}", (str(path),))
    conn.execute(f"pragma {name}.journal_mode = off")
    conn.execute(f"pragma {name}.synchronous = off")


def _read_private(path: Path, sql: str) -> pa.Table:
    import adbc_driver_sqlite.dbapi as adbc

    with adbc.connect(str(path)) as conn:
        return _fetch(conn, sql, ())


def _write_private(path: Path, table: pa.Table) -> None:
    """``table`` into a new private file as table ``rows`` (ADBC ingest, without the GIL)."""
    import adbc_driver_sqlite.dbapi as adbc

    with adbc.connect(str(path), autocommit=True) as conn, conn.cursor() as cur:
        for pragma in ("journal_mode = off", "synchronous = off"):
            cur.execute(f"pragma {pragma}")
            cur.fetchall()
        cur.adbc_ingest("rows", table, mode="create")


def _fetch(conn: Any, sql: str, params: Sequence[Any]) -> pa.Table:
    """A query's result as Arrow, in one batch: the ADBC driver infers a column's type from
    its first batch, so it must see every row (a column null at first would turn int64)."""
    with conn.cursor() as cur:
        cur.adbc_statement.set_options(**{"adbc.sqlite.query.batch_rows": str(1 << 30)})
        if params:
            cur.execute(sql, list(params))
        else:
            cur.execute(sql)
        return cur.fetch_arrow_table()


def _cap_history(
    db_path: Path, campaign: Campaign, moment: datetime, caps: FrequencyCaps
) -> tuple[pa.Table, int]:
    """Promotions of other campaigns that count toward this one's caps, and the highest
    outbox id read (rows above it are read again under the write lock)."""
    conn = store.connect(db_path)
    try:
        (watermark,) = conn.execute("select coalesce(max(message_id), 0) from messages").fetchone()
    finally:
        conn.close()
    if campaign.kind != "promo" or (caps.per_day is None and caps.per_week is None):
        return _empty_history(), watermark
    table = _read_ops(db_path, _HISTORY_SQL.format(bound="<="), _history_params(campaign, moment, watermark))
    schema = _empty_history().schema
    return table.select(schema.names).cast(schema), watermark


def _history_params(campaign: Campaign, moment: datetime, watermark: int) -> list[Any]:
    cutoff = _stamp(moment - policy.WEEK)
    return [AWAITING_WINNER, campaign.campaign_id, cutoff, AWAITING_WINNER, cutoff, watermark]


def _empty_history() -> pa.Table:
    return pa.table(
        {"message_id": pa.array([], pa.int64()), "phone_e164": pa.array([], pa.string()),
         "sent_at": pa.array([], pa.string())}
    )  # fmt: skip


def _audience(
    segment: segments.Segment, names: Sequence[str], moment: datetime, home: Any, limit: int | None = None
) -> pa.Table:
    """The segment's contacts now, with the template fields as ``f0``, ``f1`` … (with
    ``limit``: the first contacts by id)."""
    known = segments.fields(home)
    where, where_params = segments.compile(segment, known, now=moment)
    select, params = ["contact_id"], []
    for i, name in enumerate(names):
        sql, extra = _field_sql(known, name)
        select.append(f'{sql} as "f{i}"')
        params.extend(extra)
    with warehouse.connect(home) as conn:
        try:
            return conn.sql(
                f"select {', '.join(select)} from {segments.TABLE} where {where}"
                + ("" if limit is None else f" order by contact_id limit {int(limit)}"),
                params=[*params, *where_params],
            ).to_arrow_table()
        except duckdb.Error as exc:
            raise warehouse.WarehouseError(f"audience query failed: {exc}") from exc


def _field_sql(known: Mapping[str, segments.Field], name: str) -> tuple[str, tuple[Any, ...]]:
    """How a template field is read from the mart (as ``segments.template_fields`` offers it)."""
    if name in segments.TEMPLATE_COLUMNS and name in known:
        return known[name].sql, ()
    spec = known.get(f"custom.{name}")
    if spec is not None and name not in known:
        return spec.sql, spec.params
    return "null", ()  # not a field (any more): renders as its default


def _erased(ledger: pa.Table, contacts: pa.Table, audience: pa.Table, home: Any) -> pa.Table:
    """Numbers of the audience that were erased: the ledger holds an opt-out for their
    pseudonym (see ``smsops.erasure``). Hashing is skipped when the ledger holds none."""
    import pyarrow.compute as pc

    phones = ledger.column("phone_e164")
    opted_out = pc.equal(ledger.column("opt_out"), 1)
    pseudo = pc.filter(phones, pc.and_(pc.starts_with(phones, erasure.PSEUDONYM_PREFIX), opted_out))
    found: list[str] = []
    if len(pseudo):
        secret = erasure.load_secret(_home_dir(home), create=False)
        if secret is None:
            raise CampaignError(
                "the store holds erased numbers but the erasure key is missing"
                f" ({_home_dir(home) / erasure.KEY_FILE} or ${erasure.SECRET_ENV}): restore it from a backup"
            )
        pseudonyms = set(pseudo.to_pylist())
        wanted = pc.is_in(contacts.column("contact_id"), value_set=audience.column("contact_id"))
        numbers = pc.unique(pc.drop_null(pc.filter(contacts.column("phone_e164"), wanted))).to_pylist()
        found = [
            n for n in numbers if not erasure.is_pseudonym(n) and erasure.pseudonym(n, secret) in pseudonyms
        ]
    return pa.table({"phone_e164": pa.array(found, pa.string())})


def _home_dir(home: Any) -> Path:
    return settings.paths(home).home


# Decisions ------------------------------------------------------------------------------


def _prepare(
    con: duckdb.DuckDBPyConnection, campaign: Campaign, moment: datetime, quiet: QuietHours, default_zone: str
) -> None:
    """What every part of the audience is judged against: table ``deferrals``, when each zone
    may be sent to."""
    zones = con.execute("select distinct zone_key, zone_candidates from ct_all").fetchall()
    con.register("deferrals", _deferrals(zones, moment, quiet, default_zone))


def _consent_now(con: duckdb.DuckDBPyConnection) -> None:
    """Table ``consent_now``: the standing of each number in ``ledger``."""
    latest = "struct_pack(o := occurred_at, x := opt_out, e := event_id)"
    con.execute(
        f"""
        create or replace temp table consent_now as
        select
            phone_e164,
            max_by(opt_out, {latest}) filter (where for_marketing = 1) as marketing_out,
            max_by(opt_out, {latest}) filter (where for_service = 1) as service_out
        from ledger
        group by phone_e164
        """
    )


def _decide(
    con: duckdb.DuckDBPyConnection,
    campaign: Campaign,
    moment: datetime,
    caps: FrequencyCaps,
    field_count: int,
) -> None:
    """Table ``decided``: every recipient of ``aud`` with its exclusion reason (the first of
    the policy order), its quiet-hours deferral, its cap counts, its group (holdout, a
    variant, remainder) and ``combo``, which distinct combination of template fields it has
    (table ``combos``)."""
    _consent_now(con)
    if campaign.kind == "promo":
        verdict = "case when cn.marketing_out is null then 'no_consent' when cn.marketing_out = 1 then 'opted_out' end"
    else:
        verdict = "case when cn.service_out = 1 then 'opted_out' end"
    variants = [v.name for v in campaign.variants]
    n = len(variants)
    held = campaign.holdout_fraction or 0.0
    test = campaign.test_fraction
    share = (1.0 - held) if test is None else test
    remainder_when = "false" if test is None else f"unit >= {held!r}::double + {test!r}::double"
    per_day = "null" if caps.per_day is None else str(caps.per_day)
    per_week = "null" if caps.per_week is None else str(caps.per_week)
    capped = "null"
    if campaign.kind == "promo":
        capped = f"""case
            when {per_day} is not null and coalesce(c.last_day, 0) >= {per_day} then 'capped_daily'
            when {per_week} is not null and coalesce(c.last_week, 0) >= {per_week} then 'capped_weekly'
        end"""
    fields = ", ".join(f'"f{i}"' for i in range(field_count)) or "1"
    # narrow: who is excluded by the number and the ledger, and when the message would go
    con.execute(
        f"""
        create or replace temp table checks as
        select
            aud.contact_id,
            ct.phone_e164,
            cast(ct.country as varchar) as country,
            d.not_before as deferred_to,
            d.reason as quiet_reason,
            case
                -- cast: a column of the store read with no value in it comes as integers
                when coalesce(cast(ct.phone_reason as varchar) = 'erased', false)
                    or starts_with(ct.phone_e164, '{erasure.PSEUDONYM_PREFIX}')
                    or er.phone_e164 is not null then 'erased'
                when ct.phone_e164 is null or coalesce(ct.phone_valid, 0) <> 1 then 'invalid_number'
                else {verdict}
            end as reason,
            coalesce(d.not_before, $now) as send_at
        from aud
        left join ct on ct.contact_id = aud.contact_id
        left join erased_numbers as er on er.phone_e164 = ct.phone_e164
        left join consent_now as cn on cn.phone_e164 = ct.phone_e164
        left join deferrals as d
            on d.zone_key = coalesce(ct.zone_key, '') and d.zone_candidates = coalesce(ct.zone_candidates, 0)
        """,
        {"now": moment.replace(tzinfo=None)},
    )
    con.execute(
        """
        create or replace temp table owners as
        select phone_e164, min(contact_id) as owner from checks where reason is null group by phone_e164
        """
    )
    con.execute(
        """
        create or replace temp table counted as
        select
            x.contact_id,
            count(*) filter (where h.sent_at > x.send_at - interval 1 day) as last_day,
            count(*) as last_week
        from checks as x
        join owners as o on o.owner = x.contact_id
        join (select phone_e164, cast(sent_at as timestamp) as sent_at from hist) as h
            on h.phone_e164 = x.phone_e164 and h.sent_at > x.send_at - interval 7 day
        group by x.contact_id
        """
    )
    # each distinct combination of template fields once: messages are rendered per combination
    con.execute(
        f"""
        create or replace temp table combos as
        select row_number() over () as combo, *
        from (select distinct {fields} from aud)
        """
    )
    same = (
        " and ".join(f'aud."f{i}" is not distinct from combos."f{i}"' for i in range(field_count)) or "true"
    )
    con.execute(
        f"""
        create or replace temp table decided as
        with
        checked as (
            select
                aud.contact_id,
                combos.combo,
                x.phone_e164,
                x.country,
                x.deferred_to,
                x.quiet_reason,
                x.send_at,
                coalesce(c.last_day, 0) as last_day,
                coalesce(c.last_week, 0) as last_week,
                coalesce(
                    x.reason,
                    case when x.contact_id <> o.owner then 'duplicate' end,
                    {capped}
                ) as reason
            from aud
            join combos on {same}
            join checks as x on x.contact_id = aud.contact_id
            left join owners as o on o.phone_e164 = x.phone_e164
            left join counted as c on c.contact_id = aud.contact_id
        ),
        split as (
            select
                *,
                case when reason is null then
                    ('0x' || left(sha256('{campaign.campaign_id}:' || cast(contact_id as varchar)), 13))::bigint::double
                    / {_UNIT_SCALE}::double
                end as unit
            from checked
        )
        select
            * exclude (unit),
            $variants[contact_id % {n} + 1] as home_variant,
            case
                when reason is not null then null
                when unit < {held!r}::double then '{HOLDOUT}'
                when {remainder_when} then '{REMAINDER}'
                else $variants[least(cast(floor((unit - {held!r}::double) / {share!r}::double * {n}) as bigint),
                                     {n - 1}) + 1]
            end as grp
        from split
        """,
        {"variants": variants},
    )


def _deferrals(
    zones: Iterable[tuple[str | None, Any]], moment: datetime, quiet: QuietHours, default_zone: str
) -> pa.Table:
    """When each distinct zone (or candidate set) may be sent to: few distinct, so in Python.
    A contact without a usable zone is judged in ``default_zone``."""
    keys, flags, times, reasons = [], [], [], []
    for key, candidates in zones:
        names = [z.strip() for z in (key or "").split(",") if z.strip() and z.strip() != "Etc/Unknown"]
        found = None
        try:
            if names:
                found = policy.deferral(moment, names, quiet, candidates=bool(candidates))
        except policy.PolicyError:  # a zone name the system does not know
            names = []
        if not names:
            found = policy.deferral(moment, [default_zone], quiet, candidates=False)
        keys.append(key or "")
        flags.append(int(bool(candidates)))
        times.append(None if found is None else found.not_before.replace(tzinfo=None))
        reasons.append(None if found is None else found.reason)
    return pa.table({
        "zone_key": pa.array(keys, pa.string()),
        "zone_candidates": pa.array(flags, pa.int64()),
        "not_before": pa.array(times, pa.timestamp("us")),
        "reason": pa.array(reasons, pa.string()),
    })  # fmt: skip


# Rendering ------------------------------------------------------------------------------


def _render(
    con: duckdb.DuckDBPyConnection,
    compiled: Mapping[str, templates.Template],
    field_names: Sequence[str],
) -> _Groups:
    """Table ``rendered`` (grp, combo, body, encoding, segments): each variant's text for
    each distinct combination of template fields among its rows, analysed once per distinct
    text; and the remainder's messages and segments under each variant, by country. A combination that fails to
    render gets no row (its recipients are suppressed as ``render_failed``)."""
    picked = "".join(f', c."f{i}"' for i in range(len(field_names)))
    rows = con.execute(
        f"""
        select distinct d.grp, d.combo{picked}
        from decided as d
        join combos as c on c.combo = d.combo
        where d.reason is null and d.grp <> '{HOLDOUT}'
        """
    ).fetchall()
    analysed: dict[str, tuple[str, int]] = {}

    def render(template: templates.Template, values: Sequence[Any]) -> tuple[str, str, int] | None:
        try:
            text = template.render(dict(zip(field_names, values, strict=True)))
        except templates.TemplateError:
            return None
        hit = analysed.get(text)
        if hit is None:
            a = encoding.analyze(text)
            hit = analysed[text] = (a.encoding, a.segments)
        return text, hit[0], hit[1]

    out: dict[str, list[Any]] = {"grp": [], "combo": [], "body": [], "encoding": [], "segments": []}
    remainder: dict[int, Sequence[Any]] = {}
    for grp, combo, *values in rows:
        if grp == REMAINDER:
            remainder[combo] = values
            continue
        done = render(compiled[grp], values)
        if done is not None:
            for key, value in zip(out, (grp, combo, *done), strict=True):
                out[key].append(value)
    con.register(
        "rendered",
        pa.table({
            "grp": pa.array(out["grp"], pa.string()), "combo": pa.array(out["combo"], pa.int64()),
            "body": pa.array(out["body"], pa.string()), "encoding": pa.array(out["encoding"], pa.string()),
            "segments": pa.array(out["segments"], pa.int64()),
        }),
    )  # fmt: skip
    if not remainder:
        return {}
    counts = con.execute(
        f"select combo, country, count(*) from decided where grp = '{REMAINDER}' group by all"
    ).fetchall()
    groups: _Groups = {}
    for name, template in compiled.items():
        segs = {}
        for combo, values in remainder.items():
            done = render(template, values)
            segs[combo] = 0 if done is None else done[2]
        by_country = groups[name] = {}
        for combo, country, k in counts:
            had = by_country.get(country, (0, 0))
            by_country[country] = (had[0] + k, had[1] + k * segs[combo])
    return groups


def _assemble(con: duckdb.DuckDBPyConnection, campaign: Campaign, moment: datetime) -> None:
    """Table ``outbox``: the rows to write, in the outbox's columns, plus what the cap
    re-check under the write lock needs (``send_at``, cap counts, ``home_variant``)."""
    countries = [r[0] for r in con.execute("select distinct country from decided").fetchall()]
    prices = [pricing.price(c) for c in countries]
    con.register(
        "prices",
        pa.table({
            "country": pa.array(countries, pa.string()),
            "per_segment": pa.array([p.per_segment for p in prices], pa.float64()),
            "currency": pa.array([p.currency for p in prices], pa.string()),
        }),
    )  # fmt: skip
    cid = campaign.campaign_id
    con.execute(
        f"""
        create or replace temp table outbox as
        with rows as (
            select
                d.*,
                r.body,
                r.encoding,
                r.segments,
                case
                    when d.reason is not null then 'suppressed'
                    when d.grp = '{HOLDOUT}' then 'holdout'
                    when d.grp <> '{REMAINDER}' and r.body is null then 'suppressed'
                    else 'planned'
                end as state
            from decided as d
            left join rendered as r on r.grp = d.grp and r.combo = d.combo
        )
        select
            '{cid}:' || cast(rows.contact_id as varchar) as idempotency_key,
            cast({cid} as bigint) as campaign_id,
            case when state = 'suppressed' then home_variant else grp end as variant,
            rows.contact_id,
            case when reason = 'erased' then null else rows.phone_e164 end as phone_e164,
            case when state = 'planned' then body end as body,
            case when state = 'planned' then encoding end as encoding,
            case when state = 'planned' then segments end as segments,
            case when state = 'planned' and body is not null then round(segments * p.per_segment, 4) end as price,
            case when state = 'planned' and body is not null then p.currency end as currency,
            state,
            case
                when reason is not null then reason
                when state = 'suppressed' then 'render_failed'
                when grp = '{HOLDOUT}' then 'holdout'
                when grp = '{REMAINDER}' then 'awaiting_winner'
                else quiet_reason
            end as skip_reason,
            $planned_at as planned_at,
            case
                when state <> 'planned' then null
                when grp = '{REMAINDER}' then '{AWAITING_WINNER}'
                else strftime(deferred_to, '%Y-%m-%d %H:%M:%S')
            end as not_before,
            send_at,
            last_day,
            last_week,
            home_variant
        from rows
        left join prices as p on p.country is not distinct from rows.country
        """,
        {"planned_at": _stamp(moment)},
    )


# Writing --------------------------------------------------------------------------------

_OUTBOX_COLUMNS = (
    "idempotency_key", "campaign_id", "variant", "contact_id", "phone_e164", "body", "encoding",
    "segments", "price", "currency", "state", "skip_reason", "planned_at", "not_before",
)  # fmt: skip
_OUTBOX_SCHEMA = pa.schema(
    [
        (name, pa.int64() if name in ("campaign_id", "contact_id", "segments") else
         pa.float64() if name == "price" else pa.string())
        for name in _OUTBOX_COLUMNS
    ]
)  # fmt: skip


class _OutboxWriter:
    """A launch's one transaction on the store, on a thread of its own, so that the store
    writes one part of the outbox while DuckDB decides the next.

    Each part goes into a private file first (ADBC ingest, in the caller's thread); the
    writer attaches it and copies it into the outbox (``insert … select``, Python's
    ``sqlite3``, which releases the GIL while SQLite works). See :func:`_read_ops` for why
    ADBC never opens the store. :meth:`begin` takes the write lock and checks that the
    campaign is still launchable; :meth:`submit` queues a part; :meth:`finish` waits for
    every part, marks the campaign launched and commits. Leaving the ``with`` block any other
    way waits for the part being written and rolls everything back. The WAL is checkpointed
    after the commit on another thread, off the launch's path."""

    def __init__(self, db_path: Path) -> None:
        self.db_path = db_path
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="smsops-outbox")
        self.folder = _scratch_folder(db_path)
        self.parts: list[Any] = []
        self.attached = 0
        self.open = False
        self.busy = 0.0
        """Seconds the writer thread spent copying parts into the outbox."""
        try:
            self.conn: sqlite3.Connection = self._call(self._connect)
        except BaseException:
            self.pool.shutdown()
            shutil.rmtree(self.folder, ignore_errors=True)
            raise

    def _call(self, fn: Any, *args: Any) -> Any:
        return self.pool.submit(fn, *args).result()

    def _connect(self) -> sqlite3.Connection:
        conn = store.connect(self.db_path)
        for pragma in ("cache_size = -524288", "wal_autocheckpoint = 0"):
            conn.execute(f"pragma {pragma}")
        return conn

    def __enter__(self) -> _OutboxWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            for part in self.parts:  # never roll back under a running insert
                part.exception()
            self._call(self._close)
        finally:
            self.pool.shutdown()
            shutil.rmtree(self.folder, ignore_errors=True)

    def _close(self) -> None:
        try:
            if self.open:
                self.conn.execute("rollback")
            for n in range(self.attached):
                self.conn.execute(f"detach database part{n}")
        finally:
            self.conn.close()

    def begin(self, campaign_id: int) -> bool:
        """Take the write lock; False (and nothing held) when the campaign is no longer launchable."""
        return bool(self._call(self._begin, campaign_id))

    def _begin(self, campaign_id: int) -> bool:
        self.conn.execute("begin immediate")
        self.open = True
        (status,) = self.conn.execute(
            "select status from campaigns where campaign_id = ?", (campaign_id,)
        ).fetchone()
        if status not in _LAUNCHABLE:
            self.conn.execute("rollback")
            self.open = False
        return self.open

    def history(self, sql: str, params: Sequence[Any]) -> pa.Table:
        """Cap history rows (``_HISTORY_SQL``) read inside the transaction."""
        rows = self._call(lambda: self.conn.execute(sql, list(params)).fetchall())
        schema = _empty_history().schema
        columns = list(zip(*rows, strict=True)) if rows else [()] * len(schema)
        return pa.table(
            [pa.array(list(c), t) for c, t in zip(columns, schema.types, strict=True)], schema=schema
        )

    def submit(self, rows: pa.Table) -> None:
        path = self.folder / f"part{len(self.parts)}.sqlite"
        _write_private(path, rows.cast(_OUTBOX_SCHEMA))
        self.parts.append(self.pool.submit(self._insert, path))

    def _insert(self, path: Path) -> int:
        started = time.perf_counter()
        name = f"part{self.attached}"
        self.conn.execute(f"attach database ? as {name}", (str(path),))
        self.attached += 1
        columns = ", ".join(_OUTBOX_COLUMNS)
        written = self.conn.execute(
            f"""
            insert into messages ({columns})
            select {columns} from {name}.rows where true
            on conflict (idempotency_key) do nothing
            """
        ).rowcount
        self.busy += time.perf_counter() - started
        return int(written)

    def finish(self, campaign_id: int, planned: bool, moment: datetime, clock: _Clock) -> int:
        """Wait for every part, launch the campaign (``running``, or ``finished`` when nothing
        is planned) and commit; the rows written."""
        written = sum(part.result() for part in self.parts)
        self.parts = []
        clock.lap("write")
        self._call(self._commit, campaign_id, planned, _stamp(moment))
        clock.lap("commit")
        store.checkpoint_in_background(self.db_path)
        return written

    def _commit(self, campaign_id: int, planned: bool, stamp: str) -> None:
        self.conn.execute(
            "update campaigns set status = ?, launched_at = ?, finished_at = ? where campaign_id = ?",
            ("running" if planned else "finished", stamp, None if planned else stamp, campaign_id),
        )
        self.conn.execute("commit")
        self.open = False


def _history(read: pa.Table, late: pa.Table) -> pa.Table:
    """The cap history read before the write lock plus the promotions planned since."""
    schema = _empty_history().schema
    return pa.concat_tables([read.select(schema.names).cast(schema), late.select(schema.names).cast(schema)])


# ---------------------------------------------------------------------------------------
# Outcomes: from a plan, or from the outbox


_SUMMARY_SQL = """
    select state, skip_reason, variant, currency, count(*) as n,
           coalesce(sum(segments), 0) as segments, coalesce(sum(price), 0) as cost, min(not_before) as first_due,
           coalesce(max(segments), 0) as longest
    from {table}
    where campaign_id = ?
    group by state, skip_reason, variant, currency
"""


def _result(
    campaign_id: int,
    rows: Sequence[tuple[Any, ...]],
    remainder: _Groups,
    *,
    dry_run: bool = False,
    started: float,
) -> PlanResult:
    """The outcome from the summary rows of every part and the remainder's groups."""
    costs = {
        variant: dict(pricing.estimate_totals((c, n, segs) for c, (n, segs) in countries.items()).totals)
        for variant, countries in remainder.items()
    }
    return replace(
        _summarise(campaign_id, rows), remainder_cost=costs, dry_run=dry_run, seconds=_since(started)
    )


def outcome(campaign_id: int, home: str | Path | None = None) -> PlanResult:
    """The campaign's outcome as its outbox holds it now (``written`` is 0)."""
    with _store(home) as conn:
        _load(conn, campaign_id)  # raises CampaignNotFound
        rows = conn.execute(_SUMMARY_SQL.format(table="messages"), (campaign_id,)).fetchall()
    return _summarise(campaign_id, rows)


def waterfall(campaign_id: int, home: str | Path | None = None) -> tuple[Step, ...]:
    """The audience after each policy step, from the outbox: the frozen audience, then what
    each reason removed in :data:`~smsops.policy.POLICY_ORDER`, then later removals
    (cancelled, provider rejections) largest first."""
    return outcome(campaign_id, home).waterfall


def _summarise(campaign_id: int, rows: Sequence[tuple[Any, ...]]) -> PlanResult:
    states: dict[str, int] = {}
    reasons: dict[str, int] = {}
    variants: dict[str, int] = {}
    removed: dict[str, int] = {}
    cost: dict[str, float] = {}
    total = to_send = deferred = awaiting = segment_total = 0
    first_due: str | None = None
    longest = 0
    for state, reason, variant, currency, n, segs, price, due, most in rows:
        total += n
        states[state] = states.get(state, 0) + n
        if reason is not None:
            reasons[reason] = reasons.get(reason, 0) + n
        if state in _SENT_STATES:
            to_send += n
            variants[variant] = variants.get(variant, 0) + n
            segment_total += int(segs)
            longest = max(longest, int(most or 0))
            if currency is not None:
                cost[currency] = cost.get(currency, 0.0) + float(price)
            if state == "planned" and reason in _QUIET_REASONS:
                deferred += n
                if due is not None and (first_due is None or str(due) < first_due):
                    first_due = str(due)
            if state == "planned" and reason == "awaiting_winner":
                awaiting += n
        else:
            key = reason or state
            removed[key] = removed.get(key, 0) + n
    steps = [Step("audience", 0, total)]
    remaining = total
    order = [r for r in policy.POLICY_ORDER if r in removed]
    order += sorted((r for r in removed if r not in policy.POLICY_ORDER), key=lambda r: (-removed[r], r))
    for reason in order:
        remaining -= removed[reason]
        steps.append(Step(reason, removed[reason], remaining))
    return PlanResult(
        campaign_id=campaign_id,
        audience=total,
        waterfall=tuple(steps),
        states=dict(sorted(states.items(), key=lambda kv: -kv[1])),
        skip_reasons=dict(sorted(reasons.items(), key=lambda kv: -kv[1])),
        variants=dict(sorted(variants.items())),
        to_send=to_send,
        deferred=deferred,
        earliest_not_before=_parse(first_due) if first_due else None,
        awaiting_winner=awaiting,
        segments=segment_total,
        cost={c: round(v, 2) for c, v in sorted(cost.items())},
        longest=longest,
    )


# ---------------------------------------------------------------------------------------
# The remainder of an A/B test


def release_remainder(
    campaign_id: int,
    winner: str,
    *,
    now: datetime | None = None,
    home: str | Path | None = None,
    quiet: QuietHours | None = None,
    opt_out_text: str | None = None,
    default_zone: str = DEFAULT_ZONE,
) -> int:
    """Give the remainder of an A/B test the ``winner`` variant: render its text for each
    remainder row (fields read again from the published snapshot), price it, and make it
    due now or, in quiet hours, at the next allowed minute. The number of rows released;
    0 when there is nothing waiting (a second call changes nothing)."""
    moment = _now(now)
    campaign = get(campaign_id, home)
    variant = next((v for v in campaign.variants if v.name == winner), None)
    if variant is None:
        raise CampaignError(
            N_("winner: campaign {id} has no variant {winner!r}"), id=campaign_id, winner=winner
        )
    if campaign.status not in ("running", "paused"):
        raise CampaignStateError(
            f"campaign {campaign_id} is {campaign.status}: its remainder cannot be released"
        )
    quiet = quiet or campaign.quiet or settings.quiet_hours()
    footer = settings.opt_out_text() if opt_out_text is None else opt_out_text
    template = templates.compile(composer.message_source(variant.template_source, campaign.kind, footer))
    names = list(template.fields)
    db_path = store.store_path(home)
    waiting = _read_ops(
        db_path,
        "select message_id, contact_id from messages"
        " where campaign_id = ? and state = 'planned' and skip_reason = 'awaiting_winner'",
        [campaign_id],
    )
    if not waiting.num_rows:
        return 0
    known = segments.fields(home)
    select, params = ["contact_id"], []
    for i, name in enumerate(names):
        sql, extra = _field_sql(known, name)
        select.append(f'{sql} as "f{i}"')
        params.extend(extra)
    with warehouse.connect(home) as wh:
        wh.register("waiting", waiting)
        values = wh.sql(
            f"select {', '.join(select)} from {segments.TABLE} where contact_id in (select contact_id from waiting)",
            params=params,
        ).to_arrow_table()
    contacts = _read_ops(db_path, _CONTACTS_SQL)
    with _duckdb() as con:
        con.register("waiting", waiting)
        con.register("fields", values)
        con.register("ct", contacts)
        joined = con.execute(
            f"""
            select w.message_id, ct.country, ct.zone_candidates, ct.zone_key
                {"".join(f', f."f{i}"' for i in range(len(names)))}
            from waiting as w
            left join fields as f using (contact_id)
            left join ct on ct.contact_id = w.contact_id
            """
        ).fetchall()
    deferrals: dict[tuple[Any, Any], tuple[str | None, str | None]] = {}
    texts: dict[tuple[Any, ...], tuple[str, str, int] | None] = {}
    updates, failed = [], []
    for message_id, country, candidates, zone_key, *vals in joined:
        key = (zone_key or "", candidates or 0)
        if key not in deferrals:
            row = _deferrals([key], moment, quiet, default_zone).to_pylist()[0]
            due = row["not_before"]
            deferrals[key] = (None if due is None else _stamp(due), row["reason"])
        due, reason = deferrals[key]
        rendered = texts.get(tuple(vals), ())
        if rendered == ():
            rendered = texts[tuple(vals)] = _render_one(template, names, vals)
        if rendered is None:
            failed.append((message_id,))
            continue
        text, enc, segs = rendered
        price = pricing.price(country)
        updates.append(
            (
                winner,
                text,
                enc,
                segs,
                round(segs * price.per_segment, 4),
                price.currency,
                reason,
                due,
                message_id,
            )
        )
    with _store(home) as conn, store.transaction(conn):
        before = conn.total_changes
        conn.executemany(
            """
            update messages set
                variant = ?, body = ?, encoding = ?, segments = ?, price = ?, currency = ?,
                skip_reason = ?, not_before = ?
            where message_id = ? and state = 'planned' and skip_reason = 'awaiting_winner'
            """,
            updates,
        )
        released = conn.total_changes - before
        conn.executemany(
            "update messages set state = 'suppressed', skip_reason = 'render_failed', not_before = null"
            " where message_id = ? and state = 'planned' and skip_reason = 'awaiting_winner'",
            failed,
        )
        return released


def _render_one(
    template: templates.Template, names: Sequence[str], values: Sequence[Any]
) -> tuple[str, str, int] | None:
    """One message: its text, encoding and segments; None when it cannot be rendered."""
    try:
        text = template.render(dict(zip(names, values, strict=True)))
    except templates.TemplateError:
        return None
    analysis = encoding.analyze(text)
    return text, analysis.encoding, analysis.segments


# ---------------------------------------------------------------------------------------
# Status changes


def pause(campaign_id: int, home: str | Path | None = None) -> Campaign:
    """Stop sending: a running campaign becomes paused (its planned rows wait). Pausing a
    paused campaign changes nothing."""
    return _transition(campaign_id, "pause", {"running": "paused", "paused": "paused"}, home)


def resume(campaign_id: int, home: str | Path | None = None) -> Campaign:
    """Send again: a paused campaign becomes running; nothing is planned anew, so no
    recipient is sent to twice. Resuming a running campaign changes nothing."""
    return _transition(campaign_id, "resume", {"paused": "running", "running": "running"}, home)


def cancel(campaign_id: int, home: str | Path | None = None) -> Campaign:
    """Stop for good: the campaign becomes cancelled and every row still ``planned`` becomes
    ``cancelled`` with the reason ``cancelled``; rows already handed to a provider keep
    their fate. Cancelling a cancelled campaign changes nothing."""
    moves = {s: "cancelled" for s in ("draft", "scheduled", "running", "paused", "cancelled")}
    return _transition(campaign_id, "cancel", moves, home, cancel_rows=True)


def _transition(
    campaign_id: int,
    action: str,
    moves: Mapping[str, str],
    home: str | Path | None,
    *,
    cancel_rows: bool = False,
) -> Campaign:
    with _store(home) as conn:
        with store.transaction(conn):
            status = _load(conn, campaign_id).status
            if status not in moves:
                raise CampaignStateError(f"campaign {campaign_id} is {status}: cannot {action} it")
            target = moves[status]
            if target != status:
                finished = _stamp(_now(None)) if target == "cancelled" else None
                conn.execute(
                    "update campaigns set status = ?, finished_at = coalesce(?, finished_at) where campaign_id = ?",
                    (target, finished, campaign_id),
                )
            if cancel_rows:
                conn.execute(
                    "update messages set state = 'cancelled', skip_reason = 'cancelled'"
                    " where campaign_id = ? and state = 'planned'",
                    (campaign_id,),
                )
        return _load(conn, campaign_id)


def retry_failed(campaign_id: int, home: str | Path | None = None) -> int:
    """Give messages that failed for a transient reason one more try; the number re-queued.

    Re-queued: rows ``rejected`` as :data:`TRANSIENT_FAILURES` (the dispatcher gave up after
    its retries: throttling, a provider outage). They go back to ``planned``, due now, with
    the same idempotency key and attempt count (``send_attempts`` keeps each try), so the
    dispatcher tries each once more. Nothing new is created, and permanent failures
    (invalid number, STOP at the provider), fates still ``unknown`` (never re-sent blindly)
    and undelivered messages are left alone. A finished campaign runs again."""
    reasons = sorted(TRANSIENT_FAILURES)
    marks = ", ".join("?" * len(reasons))
    with _store(home) as conn, store.transaction(conn):
        campaign = _load(conn, campaign_id)
        if campaign.status not in ("running", "paused", "finished"):
            raise CampaignStateError(
                f"campaign {campaign_id} is {campaign.status}: nothing was sent to retry"
            )
        count = conn.execute(
            "update messages set state = 'planned', skip_reason = null, error_code = null, not_before = null"
            f" where campaign_id = ? and state = 'rejected' and skip_reason in ({marks})",
            (campaign_id, *reasons),
        ).rowcount
        if count and campaign.status == "finished":
            conn.execute(
                "update campaigns set status = 'running', finished_at = null where campaign_id = ?",
                (campaign_id,),
            )
    return count


# ---------------------------------------------------------------------------------------
# Scheduled campaigns


def schedule(
    campaign_id: int,
    at: datetime | None = None,
    *,
    now: datetime | None = None,
    home: str | Path | None = None,
) -> Campaign:
    """Start the campaign by itself at ``at`` (default: the time it was created with): a draft
    becomes ``scheduled``. Its audience is not frozen yet; :func:`start_due` plans it when
    the time comes, exactly as a launch would. Scheduling again moves the time."""
    moment = _now(now)
    with _store(home) as conn, store.transaction(conn):
        campaign = _load(conn, campaign_id)
        if campaign.status not in _LAUNCHABLE:
            raise CampaignStateError(
                N_("campaign {id} is {status}: it cannot be scheduled"),
                id=campaign_id,
                status=campaign.status,
            )
        _check_launchable(campaign)
        when = campaign.scheduled_at if at is None else _check_time(at, "at")
        if when is None:
            raise CampaignError(N_("campaign {id}: no start time given"), id=campaign_id)
        if when <= moment:
            raise CampaignError(
                N_("at: {when} UTC has passed (now {now} UTC): launch it now instead"),
                when=f"{when:%Y-%m-%d %H:%M}",
                now=f"{moment:%Y-%m-%d %H:%M}",
            )
        conn.execute(
            "update campaigns set status = 'scheduled', scheduled_at = ? where campaign_id = ?",
            (_stamp(when), campaign_id),
        )
        return _load(conn, campaign_id)


def local_time(day: date, clock: dtime, zone: str) -> datetime:
    """The UTC moment of wall-clock ``day`` ``clock`` in ``zone`` (how a marketer enters a
    start time; ``SMSOPS_TIME_ZONE``). A time skipped by a DST change reads as the later
    offset's."""
    if not isinstance(day, date) or not isinstance(clock, dtime):
        raise CampaignError(f"start time: expected a day and a time of day, got {day!r} {clock!r}")
    return datetime.combine(day, clock.replace(tzinfo=None), tzinfo=zone_info(zone)).astimezone(UTC)


def next_start(zone: str, now: datetime | None = None, step: timedelta = timedelta(minutes=15)) -> datetime:
    """The first whole ``step`` after ``now`` on the wall clock of ``zone`` (aware, in that
    zone): what a start-time picker offers first, in the team's zone, not the server's."""
    if not timedelta(0) < step <= timedelta(days=1) or timedelta(days=1) % step:
        raise CampaignError(f"next_start: the step must divide a day, got {step}")
    local = _now(now).astimezone(zone_info(zone))
    midnight = local.replace(hour=0, minute=0, second=0, microsecond=0, tzinfo=None)
    steps = (local.replace(tzinfo=None) - midnight) // step + 1
    return (midnight + steps * step).replace(tzinfo=local.tzinfo)


def zone_info(name: str) -> ZoneInfo:
    """The IANA zone ``name``; a clear error for an unknown one."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, TypeError):
        raise CampaignError(f"time zone {name!r} is not an IANA zone name such as 'Europe/Moscow'") from None


def unschedule(campaign_id: int, home: str | Path | None = None) -> Campaign:
    """A scheduled campaign back to a draft (it keeps its time, to schedule again)."""
    return _transition(campaign_id, "unschedule", {"scheduled": "draft", "draft": "draft"}, home)


def start_due(now: datetime | None = None, home: str | Path | None = None) -> dict[int, PlanResult | str]:
    """Plan every ``scheduled`` campaign whose time has come; what happened by campaign id:
    the plan, or why it could not start (it then stays scheduled and is tried again).

    Safe to call from several processes at once: :func:`plan` writes a campaign's outbox and
    moves it out of ``scheduled`` in one transaction under the store's write lock, so one
    caller starts it and the others find it started (and leave it out of their answer)."""
    moment = _now(now)
    with _store(home) as conn:
        due = [
            cid
            for (cid,) in conn.execute(
                "select campaign_id from campaigns where status = 'scheduled' and scheduled_at <= ?"
                " and test_of is null order by scheduled_at, campaign_id",
                (_stamp(moment),),
            )
        ]
    started: dict[int, PlanResult | str] = {}
    for cid in due:
        try:
            result = plan(cid, now=moment, home=home)
        except (CampaignError, warehouse.WarehouseError, segments.SegmentError, policy.PolicyError) as exc:
            log.error("scheduled campaign %s could not start: %s", cid, exc)
            started[cid] = str(exc)
            continue
        if not result.already_planned:
            started[cid] = result
    return started


# ---------------------------------------------------------------------------------------
# Test sends to the team's own numbers


def test_send(
    campaign_id: int,
    numbers: Sequence[str] | str,
    *,
    home: str | Path | None = None,
    now: datetime | None = None,
    opt_out_text: str | None = None,
) -> TestSend:
    """Send each variant, as one audience member would get it, to each of ``numbers`` (the
    team's own; a list or comma-separated text, any usual format). The messages go through
    the outbox and the dispatcher like any other (so they reach the real provider), in a
    hidden service campaign of their own (``test_of``): not the tested campaign's audience,
    results or caps, and no consent or quiet hours apply (the numbers are internal).

    The audience member is the segment's lowest contact id now, so the texts show real
    personalisation; :attr:`TestSend.sample_phone` says whose (masked)."""
    moment = _now(now)
    seeds = _check_seed_numbers(numbers)
    campaign = get(campaign_id, home)
    if campaign.test_of is not None:
        raise CampaignError(N_("campaign {id} is itself a test send"), id=campaign_id)
    _check_launchable(campaign)
    footer = settings.opt_out_text() if opt_out_text is None else opt_out_text
    compiled = {
        v.name: templates.compile(composer.message_source(v.template_source, campaign.kind, footer))
        for v in campaign.variants
    }
    names = list(dict.fromkeys(name for t in compiled.values() for name in t.fields))
    sample = _audience(campaign.segment, names, moment, home, limit=1).to_pylist()
    if not sample:
        raise CampaignError(
            N_("campaign {id}: its segment is empty now, so there is nobody to test with"), id=campaign_id
        )
    contact_id = int(sample[0]["contact_id"])
    values = [sample[0][f"f{i}"] for i in range(len(names))]
    rendered = {}
    for name, template in compiled.items():
        done = _render_one(template, names, values)
        if done is None:
            raise CampaignError(
                N_("variant {name!r} cannot be personalised for contact {contact}"),
                name=name,
                contact=contact_id,
            )
        rendered[name] = done
    stamp = _stamp(moment)
    rules = json.dumps({"quiet": str(NO_QUIET_HOURS), "per_day": None, "per_week": None})
    with _store(home) as conn, store.transaction(conn):
        (sample_phone,) = conn.execute(
            "select phone_e164 from contacts where contact_id = ?", (contact_id,)
        ).fetchone() or (None,)
        (test_id,) = conn.execute(
            """
            insert into campaigns (name, kind, status, sender_id, created_at, launched_at, policy, test_of)
            values (?, 'service', 'running', ?, ?, ?, ?, ?)
            returning campaign_id
            """,
            (f"Test of {campaign.name}"[:MAX_NAME_LENGTH], campaign.variants[0].sender, stamp, stamp, rules,
             campaign_id),
        ).fetchone()  # fmt: skip
        conn.executemany(
            "insert into campaign_variants (campaign_id, variant, template, sender_id) values (?, ?, ?, ?)",
            [(test_id, v.name, v.template_source, v.sender) for v in campaign.variants],
        )
        rows = []
        for number in seeds:
            price = pricing.price(phones.normalize(number).country)
            for name, (text, enc, segs) in rendered.items():
                rows.append(
                    (f"{test_id}:{name}:{number}", test_id, name, contact_id, number, text, enc, segs,
                     round(segs * price.per_segment, 4), price.currency, stamp)
                )  # fmt: skip
        conn.executemany(
            """
            insert into messages (
                idempotency_key, campaign_id, variant, contact_id, phone_e164, body, encoding, segments,
                price, currency, state, planned_at
            )
            values (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'planned', ?)
            """,
            rows,
        )
    return TestSend(test_id, campaign_id, contact_id, phones.mask(sample_phone), seeds, len(rows))


test_send.__test__ = False  # type: ignore[attr-defined] — not a pytest test when imported


def _check_seed_numbers(numbers: Sequence[str] | str) -> tuple[str, ...]:
    if isinstance(numbers, str):
        numbers = [n for n in numbers.split(",")]
    raw = [n.strip() for n in numbers if isinstance(n, str) and n.strip()]
    if len(raw) != len([n for n in numbers if not isinstance(n, str) or n.strip()]):
        raise CampaignError(
            N_("numbers: expected phone numbers as text, got {numbers}"), numbers=f"{list(numbers)!r:.80}"
        )
    guard = composer.no_seed_numbers(raw)
    if guard is not None:
        raise Refused(guard)
    if len(raw) > 20:
        raise CampaignError(N_("numbers: at most 20 seed numbers, got {n}"), n=len(raw))
    out: list[str] = []
    for value in raw:
        parsed = phones.normalize(value)
        if not parsed.valid or parsed.e164 is None:
            raise CampaignError(
                N_("seed number {value!r}: {reason}"),
                value=value,
                reason=parsed.reason or "not a valid mobile number",
            )
        if parsed.e164 not in out:
            out.append(parsed.e164)
    return tuple(out)


def test_results(campaign_id: int, home: str | Path | None = None) -> pd.DataFrame:
    """The latest test send of ``campaign_id``, one row per message: ``number`` (masked),
    ``variant``, ``state`` in the outbox, the provider's latest ``status`` (``delivered`` …),
    ``reason`` and ``sent_at`` (UTC). Empty when it was never test-sent."""
    with _store(home) as conn:
        frame = pd.read_sql_query(
            """
            with latest as (select max(campaign_id) as cid from campaigns where test_of = ?),
            statuses as (
                select
                    e.message_id,
                    e.status,
                    row_number() over (
                        partition by e.message_id
                        order by case e.status when 'accepted' then 0 when 'queued' then 1 when 'sending' then 2
                                 when 'sent' then 3 else 4 end desc, e.occurred_at desc
                    ) as pick
                from message_status_events as e
                where e.message_id in (select message_id from messages where campaign_id = (select cid from latest))
            )
            select
                m.campaign_id as test_campaign_id,
                m.phone_e164 as number,
                m.variant,
                m.state,
                s.status,
                m.skip_reason as reason,
                m.submitted_at as sent_at
            from messages as m
            left join statuses as s on s.message_id = m.message_id and s.pick = 1
            where m.campaign_id = (select cid from latest)
            order by m.phone_e164, m.variant
            """,
            conn,
            params=(campaign_id,),
        )
    frame["number"] = frame["number"].map(phones.mask)
    frame["sent_at"] = pd.to_datetime(frame["sent_at"]).dt.tz_localize("UTC")
    return frame


test_results.__test__ = False  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------
# A/B verdicts from the operational store


def variant_counts(
    campaign_id: int, metric: str = "ctr", home: str | Path | None = None
) -> dict[str, tuple[int, int]]:
    """``{variant: (successes, delivered)}`` of an A/B test's variants, holdout and remainder
    aside. ``ctr`` reads the operational store, fresh: a message counts as delivered when its
    latest receipt says so and as a success when it was clicked. ``conversion`` needs orders
    attributed by the dbt models, so it comes from the published build
    (:func:`smsops.metrics.variant_results`)."""
    if metric == "conversion":
        from smsops import metrics

        return metrics.variant_results(campaign_id, "conversion", home=home)
    if metric != "ctr":
        raise CampaignError(f"metric: expected 'ctr' or 'conversion', got {metric!r}")
    with _store(home) as conn:
        campaign = _load(conn, campaign_id)
        conn.create_function("is_link_preview", 2, links.is_link_preview, deterministic=True)
        # one index seek per message (its receipts, its clicks) instead of ranking every receipt
        # of the campaign: a message is delivered when a "delivered" receipt came and no failure
        # was reported after it (a final status only moves on to a later final one)
        rows = conn.execute(
            f"""
            select
                m.variant,
                sum(exists (
                    select 1 from clicks as k
                    where k.message_id = m.message_id and not is_link_preview(k.method, k.user_agent)
                )) as clicked,
                count(*) as delivered
            from messages as m
            where m.campaign_id = ?
                and m.variant not in ('{HOLDOUT}', '{REMAINDER}')
                and exists (
                    select 1 from message_status_events as d
                    where d.message_id = m.message_id and d.status = 'delivered'
                )
                and not exists (
                    select 1
                    from message_status_events as d
                    join message_status_events as f
                        on f.message_id = d.message_id
                        and f.status in ('undelivered', 'failed')
                        and f.occurred_at > d.occurred_at
                    where d.message_id = m.message_id and d.status = 'delivered'
                )
            group by m.variant
            """,
            (campaign_id,),
        ).fetchall()
    found = {variant: (int(clicked), int(delivered)) for variant, clicked, delivered in rows}
    return {v.name: found.get(v.name, (0, 0)) for v in campaign.variants}


def release_due_winners(
    now: datetime | None = None, home: str | Path | None = None
) -> dict[int, tuple[str, int]]:
    """For each running A/B test created with ``auto_release`` whose window has passed and
    whose remainder still waits: judge it by CTR (:func:`variant_counts`, fresh from the
    store) and, when :func:`smsops.abtest.compare` names a winner, release the remainder to
    it. ``{campaign_id: (winner, rows released)}`` of what was released; a test without a
    clear winner keeps waiting (the page offers the choice). Safe to repeat: a released
    remainder is not waiting any more."""
    moment = _now(now)
    with _store(home) as conn:
        candidates = conn.execute(
            """
            select campaign_id, launched_at, ab_window_hours from campaigns as c
            where status = 'running' and auto_release = 1 and ab_window_hours is not null
              and launched_at is not null and test_of is null
              and exists (
                  select 1 from messages as m
                  where m.campaign_id = c.campaign_id and m.state = 'planned' and m.skip_reason = 'awaiting_winner'
              )
            """
        ).fetchall()
    released: dict[int, tuple[str, int]] = {}
    for cid, launched, hours in candidates:
        if _parse(launched) + timedelta(hours=hours) > moment:
            continue
        counts = variant_counts(cid, "ctr", home)
        if len(counts) < 2:
            continue
        verdict = abtest.compare(counts)
        if verdict.winner is None:
            continue
        try:
            released[cid] = (verdict.winner, release_remainder(cid, verdict.winner, now=moment, home=home))
        except (CampaignError, warehouse.WarehouseError) as exc:
            log.error("campaign %s: the winner %s could not be released: %s", cid, verdict.winner, exc)
    return released


# ---------------------------------------------------------------------------------------
# Listing


_LEFT_OUT = (
    "state = 'holdout' or (state = 'suppressed' and provider is null and skip_reason is not 'render_failed')"
)
"""Outbox rows the launch did not plan: the control group, and those the checks left out (never
claimed by a dispatcher; a row stopped at sending, by an opt-out that came in meanwhile, keeps
the provider it was claimed for)."""


def list_all(home: str | Path | None = None) -> pd.DataFrame:
    """Every campaign (test sends aside), newest first, with ``scheduled_at`` and
    ``launched_at`` (UTC) and its outbox as it stands: ``audience`` (rows: everyone the segment
    held at launch), ``planned`` (what the launch planned, as :class:`Tally` counts it) and
    ``left_out`` (the rest), ``waiting`` (planned or being sent), ``sent`` (accepted by the
    provider), ``delivered`` (receipts so far), ``not_sent`` (suppressed, holdout, rejected,
    cancelled, unknown: ``left_out`` included) and ``cost`` of what was sent, from the
    operational store (fresh, no build needed)."""
    with _store(home) as conn:
        frame = pd.read_sql_query(
            f"""
            with
            -- states from the (campaign, state) index alone; what needs other columns seeks the
            -- rows of the states concerned (a third faster than one scan of every row's columns)
            outbox as (
                select
                    campaign_id,
                    count(*) as audience,
                    sum(state in ('planned', 'sending')) as waiting,
                    sum(state = 'submitted') as sent,
                    sum(state not in ('planned', 'sending', 'submitted')) as not_sent
                from messages
                group by campaign_id
            ),
            left_out as (
                select campaign_id, count(*) as left_out
                from messages
                where campaign_id in (select campaign_id from campaigns)
                    and state in ('holdout', 'suppressed')
                    and ({_LEFT_OUT})
                group by campaign_id
            ),
            costs as (
                select campaign_id, round(sum(price), 2) as cost, min(currency) as currency
                from messages
                where campaign_id in (select campaign_id from campaigns) and state = 'submitted'
                group by campaign_id
            ),
            delivered as (
                select m.campaign_id, count(*) as delivered
                from message_status_events as e
                join messages as m on m.message_id = e.message_id
                where e.status = 'delivered'
                group by m.campaign_id
            )
            select
                c.campaign_id,
                c.name,
                c.kind,
                c.status,
                c.scheduled_at,
                c.launched_at,
                coalesce(o.audience, 0) as audience,
                coalesce(o.audience - coalesce(l.left_out, 0), 0) as planned,
                coalesce(l.left_out, 0) as left_out,
                coalesce(o.waiting, 0) as waiting,
                coalesce(o.sent, 0) as sent,
                coalesce(d.delivered, 0) as delivered,
                coalesce(o.not_sent, 0) as not_sent,
                coalesce(k.cost, 0) as cost,
                k.currency
            from campaigns as c
            left join outbox as o on o.campaign_id = c.campaign_id
            left join left_out as l on l.campaign_id = c.campaign_id
            left join costs as k on k.campaign_id = c.campaign_id
            left join delivered as d on d.campaign_id = c.campaign_id
            where c.test_of is null
            order by c.campaign_id desc
            """,
            conn,
        )
    for column in ("scheduled_at", "launched_at"):
        frame[column] = pd.to_datetime(frame[column]).dt.tz_localize("UTC")
    return frame


@dataclass(frozen=True, slots=True)
class Tally:
    """A launched campaign's outbox in one read, as its progress counts it.

    ``planned = sent + not_sent + sum(unknown) + due + waiting + sending``. ``sent`` and
    ``not_sent`` only grow while the campaign sends (a person's "Retry the failed" or "Send them
    again" aside); ``planned`` is what the launch planned, so progress counts against it, not
    against everyone who matched the segment (``in_segment``)."""

    campaign_id: int
    status: str
    in_segment: int
    """Everyone the segment held at launch (the outbox's rows)."""
    planned: int
    """What the launch planned: after consent, opt-outs, duplicates, frequency caps and the control group."""
    sent: int
    """Handed to the provider."""
    not_sent: int
    """Planned and not sent, each with a reason: rejected, cancelled, stopped at sending, closed unsent."""
    unknown: dict[str, int]
    """Planned messages whose outcome is not known yet, by reason (``awaiting_lookup`` settles by itself)."""
    due: int
    """Planned, may be sent now."""
    waiting: int
    """Planned, not due yet: quiet hours, a retry's back-off, an A/B remainder awaiting its winner."""
    sending: int
    """Handed to a dispatcher, no answer recorded yet."""
    left_out: dict[str, int]
    """Why the rest of the segment was not planned, by reason (largest first)."""
    reasons: dict[str, int]
    """Why planned messages were not sent, or wait (largest first)."""

    @property
    def done(self) -> int:
        """Planned messages settled: sent, or not sent with a reason."""
        return self.sent + self.not_sent

    @property
    def unsettled(self) -> int:
        return sum(self.unknown.values())

    @property
    def fraction(self) -> float:
        """Share of the planned messages settled (1.0 when nothing was planned)."""
        return self.done / self.planned if self.planned else 1.0

    @property
    def moving(self) -> bool:
        """Whether these counts may change by themselves (:func:`still_moving`)."""
        return still_moving(self.status, self.unknown.get("awaiting_lookup", 0))


def tally(campaign_id: int, home: str | Path | None = None, *, now: datetime | None = None) -> Tally:
    """The campaign's status and outbox counts, read in one statement (one consistent snapshot)."""
    moment = _stamp(_now(now))
    with _store(home) as conn:
        rows = conn.execute(
            f"""
            select c.status, m.state, m.skip_reason, coalesce({_LEFT_OUT}, 0), count(m.message_id),
                   coalesce(sum(m.state = 'planned' and (m.not_before is null or m.not_before <= ?)), 0)
            from campaigns as c
            left join messages as m on m.campaign_id = c.campaign_id
            where c.campaign_id = ?
            group by 1, 2, 3, 4
            """,
            (moment, campaign_id),
        ).fetchall()
    if not rows:
        raise CampaignNotFound(f"no campaign has id {campaign_id}")
    counts: dict[str, int] = {"in_segment": 0, "planned": 0, "sent": 0, "not_sent": 0, "due": 0, "waiting": 0,
                              "sending": 0}  # fmt: skip
    unknown: dict[str, int] = {}
    left_out: dict[str, int] = {}
    reasons: dict[str, int] = {}
    for _status, state, reason, excluded, n, due in rows:
        if state is None:  # a campaign with no outbox
            continue
        counts["in_segment"] += n
        if excluded:
            left_out[reason or state] = left_out.get(reason or state, 0) + n
            continue
        counts["planned"] += n
        if state == "submitted":
            counts["sent"] += n
        elif state == "planned":
            counts["due"] += due
            counts["waiting"] += n - due
        elif state == "sending":
            counts["sending"] += n
        elif state == "unknown" and reason != "unknown_given_up":
            unknown[reason or state] = unknown.get(reason or state, 0) + n
        else:
            counts["not_sent"] += n
        if reason is not None and state != "submitted":
            reasons[reason] = reasons.get(reason, 0) + n
    return Tally(
        campaign_id=campaign_id,
        status=rows[0][0],
        unknown=unknown,
        left_out=dict(sorted(left_out.items(), key=lambda kv: -kv[1])),
        reasons=dict(sorted(reasons.items(), key=lambda kv: -kv[1])),
        **counts,
    )


def still_moving(status: str, awaiting_lookup: int = 0) -> bool:
    """Whether a campaign's counts may change by themselves, so that a view of them should keep
    reading: it is sending (``running``), or outcomes are being looked up with the provider."""
    return status == "running" or awaiting_lookup > 0


READY_MADE = "Ready-made: "
"""How :func:`audiences` keys a ready-made segment."""


def audiences(home: str | Path | None = None) -> dict[str, segments.Segment]:
    """What a campaign can be sent to, by a key that reads the same in every language: each
    saved segment's latest version (``"<name> (v<version>)"``), then the ready-made ones
    (``"Ready-made: <key>"``). :func:`audience_label` is what a person reads."""
    found = {f"{s.name} (v{s.version})": s.segment for s in segments.list_saved(home)}
    found.update({READY_MADE + key: segment for key, segment in segments.ready_made().items()})
    return found


def audience_label(key: str) -> str:
    """An :func:`audiences` key as a person reads it, in the current language."""
    if key.startswith(READY_MADE):
        name = i18n.label(segments.READY_MADE_LABELS, key.removeprefix(READY_MADE))
        return _("Ready-made: {name}").format(name=name)
    return key


def signature(home: str | Path | None = None) -> tuple[int, int, str]:
    """A value that changes whenever a campaign is created or changes status (one small read):
    what a page keys its cached campaign list on."""
    with _store(home) as conn:
        count, last, statuses = conn.execute(
            "select count(*), coalesce(max(campaign_id), 0), coalesce(group_concat(status, ','), '')"
            " from (select campaign_id, status from campaigns order by campaign_id)"
        ).fetchone()
    return int(count), int(last), str(statuses)


def drafts(home: str | Path | None = None) -> list[Campaign]:
    """Campaigns not launched yet (draft or scheduled), newest first."""
    return _with_status(_LAUNCHABLE, home)


def launched(home: str | Path | None = None) -> list[Campaign]:
    """Campaigns launched (running, paused, finished or cancelled after launch), newest first."""
    return [c for c in _with_status(("running", "paused", "finished", "cancelled"), home) if c.launched_at]


def _with_status(statuses: Sequence[str], home: str | Path | None) -> list[Campaign]:
    with _store(home) as conn:
        ids = [
            row[0]
            for row in conn.execute(
                f"select campaign_id from campaigns where status in ({', '.join('?' * len(statuses))})"
                " and test_of is null order by campaign_id desc",
                tuple(statuses),
            )
        ]
        return [_load(conn, campaign_id) for campaign_id in ids]


# ---------------------------------------------------------------------------------------
# At the moment of dispatch


def check_before_send(
    conn: sqlite3.Connection,
    message_rows: Iterable[int | Mapping[str, Any]],
    *,
    now: datetime | None = None,
    quiet: QuietHours | None = None,
    default_zone: str = DEFAULT_ZONE,
) -> list[tuple[int, bool, str | None]]:
    """``(message_id, ok, reason)`` for each row, decided at ``now`` (default: the current
    time) from the operational store, for the dispatcher to call just before sending:

    - an erased number gets nothing (``erased``), a row without a usable number neither
      (``invalid_number``);
    - a promotion needs a current marketing opt-in and any message stops on an opt-out
      that covers it (``no_consent``, ``opted_out``) — so an opt-out recorded after planning
      stops the rest of a running campaign (invariant 2);
    - with ``quiet`` given, a message that would now arrive in the recipient's quiet hours
      waits (``quiet_hours`` or ``quiet_hours_candidate_zones``: held reasons, so leave the
      row planned and call :func:`defer`; never suppress it), e.g. after a late resume.
      A campaign that keeps its own quiet hours is judged by them instead of ``quiet``.

    Every other reason is final for this message: mark the row suppressed with it.

    A row is an outbox ``message_id``, or a mapping with ``message_id`` and, to override
    what the outbox holds, ``phone_e164`` and ``kind`` (or ``campaign_id``). Set-based: a
    few queries per batch, whatever its size."""
    rows = list(message_rows)
    ids = [int(r["message_id"]) if isinstance(r, Mapping) else int(r) for r in rows]
    stored = _outbox_facts(conn, ids)
    wanted = {
        r["campaign_id"]
        for r in rows
        if isinstance(r, Mapping) and r.get("kind") is None and "campaign_id" in r
    }
    kinds = _campaign_kinds(conn, wanted)
    facts: list[tuple[int, str | None, str | None]] = []
    for message_id, r in zip(ids, rows, strict=True):
        phone, kind, _, _, _ = stored.get(message_id, (None, None, None, None, None))
        if isinstance(r, Mapping):
            phone = r.get("phone_e164", phone)
            kind = r.get("kind") or kinds.get(r.get("campaign_id")) or kind
        facts.append((message_id, phone, kind))
    numbers = sorted({p for _, p, _ in facts if _is_e164(p)})
    marketing = consent.states(conn, numbers, "marketing") if numbers else {}
    service = consent.states(conn, numbers, "service") if numbers else {}
    erased = erasure.erased_numbers(conn, numbers) if numbers else set()
    moment = _now(now)
    deferrals: dict[tuple[str, int], tuple[Any, str | None]] = {}
    out: list[tuple[int, bool, str | None]] = []
    for message_id, phone, kind in facts:
        if kind not in ("promo", "service"):
            raise CampaignError(f"message {message_id}: unknown message or campaign kind {kind!r}")
        if phone is not None and erasure.is_pseudonym(phone):
            reason: str | None = "erased"
        elif not _is_e164(phone):
            reason = "invalid_number"
        elif phone in erased:
            reason = "erased"
        else:
            reason = policy.consent_verdict(kind, marketing[phone].last_action, service[phone].last_action)
        if reason is None and quiet is not None:
            _, _, zone_key, candidates, own = stored.get(message_id, (None, None, "", 0, None))
            window = _own_quiet(own, quiet)
            reason = _quiet_now(deferrals, (zone_key or "", candidates or 0), moment, window, default_zone)[1]
        out.append((message_id, reason is None, reason))
    return out


def defer(
    conn: sqlite3.Connection,
    message_ids: Iterable[int],
    *,
    now: datetime | None = None,
    quiet: QuietHours = QuietHours(),  # noqa: B008
    default_zone: str = DEFAULT_ZONE,
) -> dict[int, datetime]:
    """Move ``planned`` rows whose recipient is in quiet hours at ``now`` to the next allowed
    minute (``not_before`` and the held reason set); the new times by message id. Rows in
    another state, or whose recipient may be messaged now, are left as they are.

    Each row is judged by its campaign's own quiet hours (kept with the campaign, see
    :func:`create`); ``quiet`` applies to campaigns that keep none."""
    ids = list(message_ids)
    moment = _now(now)
    stored = _outbox_facts(conn, ids)
    deferrals: dict[tuple[str, int], tuple[Any, str | None]] = {}
    moved: dict[int, datetime] = {}
    updates = []
    for message_id in ids:
        if message_id not in stored:
            continue
        _, _, zone_key, candidates, own = stored[message_id]
        window = _own_quiet(own, quiet)
        due, reason = _quiet_now(deferrals, (zone_key or "", candidates or 0), moment, window, default_zone)
        if due is not None:
            updates.append((_stamp(due), reason, message_id))
            moved[message_id] = due.replace(tzinfo=UTC)
    with store.transaction(conn):
        before = conn.total_changes
        conn.executemany(
            "update messages set not_before = ?, skip_reason = ? where message_id = ? and state = 'planned'",
            updates,
        )
        changed = conn.total_changes - before
    if changed != len(updates):  # some were no longer planned: report only the rows moved
        planned = {
            m
            for (m,) in _chunked(
                conn, "select message_id from messages where state = 'planned' and message_id in", ids
            )
        }
        moved = {m: t for m, t in moved.items() if m in planned}
    return moved


def _own_quiet(rules: str | None, fallback: QuietHours) -> QuietHours:
    """A campaign's own quiet hours from its stored policy, else ``fallback``."""
    if not rules:
        return fallback
    return _read_policy(rules)[0] or fallback


def _quiet_now(
    cache: dict[Any, tuple[Any, str | None]],
    key: tuple[str, int],
    moment: datetime,
    quiet: QuietHours,
    default_zone: str,
) -> tuple[Any, str | None]:
    """``(not_before, reason)`` for a zone key at ``moment``; ``(None, None)`` when allowed."""
    if quiet == NO_QUIET_HOURS:
        return None, None
    if (key, quiet) not in cache:
        row = _deferrals([key], moment, quiet, default_zone).to_pylist()[0]
        cache[(key, quiet)] = (row["not_before"], row["reason"])
    return cache[(key, quiet)]


def _outbox_facts(conn: sqlite3.Connection, ids: Sequence[int]) -> dict[int, tuple[Any, ...]]:
    """message_id -> (number, campaign kind, zone key, candidates, campaign policy) from the
    outbox, its campaign and contacts."""
    sql = """
        select
            m.message_id,
            m.phone_e164,
            c.kind,
            coalesce(nullif(trim(ct.time_zone), ''), nullif(trim(ct.phone_time_zones), ''), ''),
            coalesce(nullif(trim(ct.time_zone), ''), '') = '' and instr(coalesce(ct.phone_time_zones, ''), ',') > 0,
            c.policy
        from messages as m
        left join campaigns as c on c.campaign_id = m.campaign_id
        left join contacts as ct on ct.contact_id = m.contact_id
        where m.message_id in
    """
    return {row[0]: tuple(row[1:]) for row in _chunked(conn, sql, ids)}


def _chunked(conn: sqlite3.Connection, sql: str, values: Sequence[Any]) -> Iterator[tuple[Any, ...]]:
    """``sql`` ending in ``in`` run over ``values`` 900 at a time."""
    for start in range(0, len(values), 900):
        chunk = list(values[start : start + 900])
        yield from conn.execute(f"{sql} ({', '.join('?' * len(chunk))})", chunk)


def _campaign_kinds(conn: sqlite3.Connection, campaign_ids: Iterable[int]) -> dict[int, str]:
    return dict(
        _chunked(conn, "select campaign_id, kind from campaigns where campaign_id in", list(campaign_ids))
    )


_E164 = re.compile(r"\+[1-9]\d{7,14}")


def _is_e164(value: Any) -> bool:
    return isinstance(value, str) and _E164.fullmatch(value) is not None


# ---------------------------------------------------------------------------------------
# Helpers


@contextmanager
def _store(home: str | Path | None) -> Iterator[sqlite3.Connection]:
    conn = store.open_store(home)
    try:
        yield conn
    finally:
        conn.close()


@contextmanager
def _duckdb() -> Iterator[duckdb.DuckDBPyConnection]:
    con = duckdb.connect(":memory:", config=settings.duckdb_settings())
    try:
        yield con
    finally:
        con.close()


def _now(value: datetime | None) -> datetime:
    """An aware UTC datetime (naive means UTC)."""
    if value is None:
        return datetime.now(UTC)
    if not isinstance(value, datetime):
        raise CampaignError(f"now: expected a datetime, got {type(value).__name__}")
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _stamp(value: datetime) -> str:
    """The store's UTC text, to the second."""
    if value.tzinfo is not None:
        value = value.astimezone(UTC).replace(tzinfo=None)
    return value.replace(microsecond=0).isoformat(sep=" ")


def _parse(text: str) -> datetime:
    return datetime.fromisoformat(str(text)).replace(tzinfo=UTC)


class _Clock:
    """Seconds spent per phase."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(self.laps.get(name, 0.0) + now - self._last, 3)
        self._last = now


def _since(started: float) -> float:
    return round(time.perf_counter() - started, 3)
