"""The operational store: raw, append-mostly tables that every process may write.

Embedded default: one SQLite file in WAL mode (``$SMSOPS_HOME/ops.sqlite``). Tables are
``STRICT`` so a wrong type is refused at write time instead of surfacing in a mart, and
every table has a natural unique key so that writing the same fact twice is a no-op.

Conventions: timestamps are UTC text ``YYYY-MM-DD HH:MM:SS[.ffffff]``; booleans are
``0``/``1``; JSON documents are text.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa

from smsops.config import paths, private_file

SCHEMA_VERSION = 2
"""1: the first schema. 2: the outbox's provider id is unique through a partial index (rows not
yet submitted have no id and stay out of it) and its due index holds planned rows only: both
are written for every row a launch plans. :func:`create_schema` upgrades a version-1 store."""

PAGE_SIZE = 16384
"""Bytes per page of a new store. A launch writes a million outbox rows and their index entries
in one transaction; with 16 KiB pages it dirties and commits fewer, shallower pages than with
SQLite's default 4 KiB (docs/performance.md, "Planning"). An existing store keeps its size."""

# How each declared column type travels as Arrow (bulk writes, and reads into the warehouse).
ARROW_TYPES = {"integer": pa.int64(), "real": pa.float64(), "text": pa.string()}

TABLES: dict[str, str] = {
    "contacts": """
        create table if not exists contacts (
            contact_id        integer primary key,
            external_id       text unique,
            first_name        text,
            last_name         text,
            gender            text check (gender in ('f', 'm')),
            birth_date        text,
            email             text,
            city              text,
            region            text,
            time_zone         text,
            phone_raw         text,
            phone_e164        text,
            phone_valid       integer not null default 0 check (phone_valid in (0, 1)),
            phone_reason      text,
            number_type       text,
            phone_country     text,
            phone_time_zones  text,
            attributes        text,
            created_at        text not null,
            updated_at        text not null
        ) strict""",
    "consent_events": """
        create table if not exists consent_events (
            event_id      integer primary key,
            event_key     text not null unique,
            phone_e164    text not null,
            contact_id    integer,
            purpose       text not null check (purpose in ('marketing', 'service')),
            action        text not null check (action in ('opt_in', 'opt_out')),
            source        text not null check (
                source in ('web_form', 'import', 'keyword_reply', 'link', 'api', 'admin', 'provider')
            ),
            consent_text  text,
            proof         text,
            occurred_at   text not null,
            recorded_at   text not null
        ) strict""",
    "orders": """
        create table if not exists orders (
            order_id     integer primary key,
            external_id  text not null unique,
            contact_id   integer not null,
            ordered_at   text not null,
            amount       real not null,
            currency     text not null,
            category     text,
            status       text not null check (status in ('paid', 'cancelled', 'refunded'))
        ) strict""",
    "customer_events": """
        create table if not exists customer_events (
            event_id     integer primary key,
            event_key    text not null unique,
            contact_id   integer not null,
            event_type   text not null,
            occurred_at  text not null,
            properties   text
        ) strict""",
    "campaigns": """
        create table if not exists campaigns (
            campaign_id       integer primary key,
            name              text not null,
            kind              text not null check (kind in ('promo', 'service')),
            status            text not null check (
                status in ('draft', 'scheduled', 'running', 'paused', 'finished', 'cancelled')
            ),
            sender_id         text,
            segment           text,
            trigger_event     text,
            test_fraction     real,
            holdout_fraction  real,
            created_at        text not null,
            launched_at       text,
            finished_at       text,
            policy            text,
            scheduled_at      text,
            test_of           integer,
            ab_window_hours   real,
            auto_release      integer check (auto_release in (0, 1))
        ) strict""",
    "campaign_variants": """
        create table if not exists campaign_variants (
            campaign_id  integer not null,
            variant      text not null,
            template     text not null,
            sender_id    text,
            primary key (campaign_id, variant)
        ) strict""",
    # The outbox: one row per campaign x contact, holdout and suppressed included, so the
    # outbox *is* the frozen audience and every recipient not sent to carries a reason.
    "messages": """
        create table if not exists messages (
            message_id           integer primary key,
            idempotency_key      text not null unique,
            campaign_id          integer not null,
            variant              text not null,
            contact_id           integer not null,
            phone_e164           text,
            body                 text,
            encoding             text check (encoding in ('GSM-7', 'UCS-2')),
            segments             integer,
            price                real,
            currency             text,
            state                text not null check (
                state in ('planned', 'holdout', 'suppressed', 'sending', 'submitted',
                          'unknown', 'rejected', 'cancelled')
            ),
            skip_reason          text,
            error_code           text,
            provider             text,
            provider_message_id  text,
            planned_at           text not null,
            not_before           text,
            submitted_at         text,
            attempts             integer not null default 0
        ) strict""",
    # Provider receipts as they arrived: out of order, sometimes twice (kept once).
    "message_status_events": """
        create table if not exists message_status_events (
            event_id             integer primary key,
            message_id           integer not null,
            provider             text not null,
            provider_message_id  text,
            status               text not null check (
                status in ('accepted', 'queued', 'sending', 'sent', 'delivered',
                           'undelivered', 'failed')
            ),
            error_code           text,
            occurred_at          text not null,
            received_at          text not null,
            unique (message_id, status)
        ) strict""",
    # Receipts that arrived before the dispatcher recorded the provider's id for their message
    # (a fast provider can call back before the send returns); attached by webhooks.adopt_orphans.
    "orphan_status_events": """
        create table if not exists orphan_status_events (
            orphan_id            integer primary key,
            provider             text not null,
            provider_message_id  text not null,
            status               text not null,
            error_code           text,
            occurred_at          text not null,
            received_at          text not null,
            unique (provider, provider_message_id, status)
        ) strict""",
    # Every hand-over of an outbox row to a provider (smsops.dispatch). Written when the row is
    # claimed, before the provider is called, so a row a dead process left in 'sending' shows
    # when and by whom it was claimed; ``finished_at`` and ``outcome`` come with the answer.
    # ``interrupted``: the process died before an answer was recorded; ``reconciled`` says what
    # the provider's records showed afterwards. Claims that never reached the provider (the
    # consent re-check stopped them, a pause) are removed, so every row here was a request.
    "send_attempts": """
        create table if not exists send_attempts (
            attempt_id           integer primary key,
            message_id           integer not null,
            attempt              integer not null,
            provider             text not null,
            dispatcher           text not null,
            started_at           text not null,
            finished_at          text,
            outcome              text check (
                outcome in ('accepted', 'transient', 'permanent', 'unknown', 'auth_refused',
                            'interrupted')
            ),
            http_status          integer,
            error_code           text,
            retry_after          real,
            provider_message_id  text,
            reconciled           text check (reconciled in ('found', 'absent', 'unsearchable')),
            unique (message_id, attempt)
        ) strict""",
    "links": """
        create table if not exists links (
            token        text primary key,
            message_id   integer not null,
            url          text not null,
            created_at   text not null
        ) strict""",
    "clicks": """
        create table if not exists clicks (
            click_id     integer primary key,
            token        text not null,
            message_id   integer not null,
            clicked_at   text not null,
            user_agent   text,
            method       text check (method in ('GET', 'HEAD')),
            unique (token, clicked_at)
        ) strict""",
    # One row per distinct import (file content x options): re-importing the same file with
    # the same options is recognised and changes nothing.
    "import_batches": """
        create table if not exists import_batches (
            batch_id      integer primary key,
            batch_key     text not null unique,
            file_name     text not null,
            file_sha256   text not null,
            options       text not null,
            rows_read     integer not null,
            new           integer not null,
            updated       integer not null,
            unchanged     integer not null,
            rejected      integer not null,
            imported_at   text not null
        ) strict""",
    "inbound_messages": """
        create table if not exists inbound_messages (
            inbound_id           integer primary key,
            provider             text not null,
            provider_message_id  text not null,
            from_e164            text not null,
            to_number            text,
            body                 text not null,
            keyword              text check (keyword in ('stop', 'start', 'help')),
            contact_id           integer,
            in_reply_to          integer,
            received_at          text not null,
            unique (provider, provider_message_id)
        ) strict""",
    # How far each ingress journal (smsops.ingress: receipts, replies and clicks as answered)
    # has been applied to this store: advanced in the same transaction as the rows it applies,
    # so each journal entry lands exactly once, whoever applies it.
    "ingress_cursor": """
        create table if not exists ingress_cursor (
            journal_id       text primary key,
            applied_through  integer not null,
            applied_at       text not null
        ) strict""",
    # Journal entries that could not be applied (a bug, or a fact the store refuses): kept with
    # the error instead of being lost or blocking the entries behind them.
    "ingress_rejects": """
        create table if not exists ingress_rejects (
            reject_id    integer primary key,
            journal_id   text not null,
            entry_id     integer not null,
            kind         text not null,
            payload      text not null,
            error        text not null,
            recorded_at  text not null,
            unique (journal_id, entry_id)
        ) strict""",
    # A person's decision about messages of unknown fate (smsops.unsettled): send them again,
    # or close them unsent; who and when, so a resend can always be accounted for.
    "outbox_decisions": """
        create table if not exists outbox_decisions (
            decision_id  integer primary key,
            campaign_id  integer not null,
            decision     text not null check (decision in ('retry', 'give_up')),
            messages     integer not null,
            decided_by   text not null,
            decided_at   text not null
        ) strict""",
    # Receipts asked of the provider because they never came (smsops.receipts): when each
    # message was last looked up and what was found, so a pass does not ask again too soon.
    "receipt_lookups": """
        create table if not exists receipt_lookups (
            message_id      integer primary key,
            lookups         integer not null,
            looked_up_at    text not null,
            last_status     text,
            next_lookup_at  text not null,
            errors          integer not null default 0,
            last_error      text
        ) strict""",
    # Saved segments: each save of a changed definition is a new version; the definition
    # is the segment's canonical JSON (rules, never contact ids), evaluated again at launch.
    "segments": """
        create table if not exists segments (
            segment_id  integer primary key,
            name        text not null,
            version     integer not null,
            definition  text not null,
            created_at  text not null,
            created_by  text,
            unique (name, version)
        ) strict""",
}

# Columns added after a table first shipped: ``create_schema`` adds them to older stores
# (``alter table … add column``), so a store written by an earlier smsops keeps working.
# ``campaigns.policy``: the campaign's quiet hours and frequency caps as JSON (null: the
# install's defaults); ``scheduled_at``: when a scheduled campaign starts (UTC);
# ``test_of``: the campaign a test send belongs to (hidden from lists and never counted);
# ``ab_window_hours`` / ``auto_release``: when an A/B test is judged, and whether the
# remainder then gets the winner without a click. ``clicks.method``: ``HEAD`` for a link
# preview's or scanner's probe (kept, but not counted as a person's click), null before it existed.
ADDED_COLUMNS: dict[str, tuple[tuple[str, str], ...]] = {
    "clicks": (("method", "text check (method in ('GET', 'HEAD'))"),),
    "campaigns": (
        ("policy", "text"),
        ("scheduled_at", "text"),
        ("test_of", "integer"),
        ("ab_window_hours", "real"),
        ("auto_release", "integer check (auto_release in (0, 1))"),
    ),
}

INDEXES: tuple[str, ...] = (
    "create index if not exists ix_contacts_phone on contacts (phone_e164)",
    "create index if not exists ix_contacts_names on contacts (last_name, first_name)",
    "create index if not exists ix_consent_phone on consent_events (phone_e164, purpose, occurred_at)",
    "create index if not exists ix_orders_contact on orders (contact_id, ordered_at)",
    "create index if not exists ix_events_contact on customer_events (contact_id, occurred_at)",
    "create index if not exists ix_messages_campaign on messages (campaign_id, state)",
    # Rows are looked up by provider id once sent, by due time while planned and by state
    # while in flight; a launch writes a million rows that are none of these (not yet sent,
    # suppressed, held out), so these indexes leave out what they never look for.
    "create unique index if not exists ux_messages_provider_id on messages (provider, provider_message_id)"
    " where provider_message_id is not null",
    "create index if not exists ix_messages_planned on messages (not_before) where state = 'planned'",
    "create index if not exists ix_messages_sending on messages (provider) where state = 'sending'",
    # sent messages by age, for the lookup of receipts that never came (smsops.receipts)
    "create index if not exists ix_messages_submitted on messages (provider, submitted_at)"
    " where state = 'submitted'",
    # ambiguous sends waiting for their settle window, looked up again by the dispatcher
    "create index if not exists ix_messages_unknown on messages (not_before) where state = 'unknown'",
    "create index if not exists ix_messages_phone on messages (phone_e164, planned_at)",
    "create index if not exists ix_status_message on message_status_events (message_id)",
    "create index if not exists ix_clicks_message on clicks (message_id)",
    "create index if not exists ix_inbound_from on inbound_messages (from_e164, received_at)",
    "create index if not exists ix_campaigns_status on campaigns (status, scheduled_at)",
)


class StoreError(RuntimeError):
    """The operational store is missing, unreadable or of an unknown schema version."""


def store_path(home: str | os.PathLike[str] | None = None) -> Path:
    return paths(home).ops_store


def connect(path: str | os.PathLike[str] | None = None, *, timeout: float = 30.0) -> sqlite3.Connection:
    """Open the store for a short unit of work: WAL, a busy timeout, foreign-key pragmas."""
    target = Path(path) if path is not None else store_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        found = target.stat()
    except FileNotFoundError:
        found = None
    new = found is None or found.st_size == 0
    if new:  # readable by its owner only, and so are the -wal and -shm SQLite makes beside it
        private_file(target)
    elif found.st_mode & 0o077:  # written by another tool (or an older smsops): close it
        with contextlib.suppress(OSError):
            target.chmod(0o600)
    conn = sqlite3.connect(target, timeout=timeout, isolation_level=None)
    if new:  # only before the first table, and before WAL mode: later it cannot change
        conn.execute(f"pragma page_size = {PAGE_SIZE}")
    conn.execute("pragma journal_mode = wal")
    conn.execute("pragma synchronous = normal")
    conn.execute(f"pragma busy_timeout = {int(timeout * 1000)}")
    return conn


def checkpoint_in_background(path: str | os.PathLike[str]) -> threading.Thread:
    """Copy what the write-ahead log holds into the store file, on a thread of its own.

    For a large write (a launch, an import) that commits with ``wal_autocheckpoint = 0``: the
    rows are committed and visible once the commit returns, and SQLite would otherwise copy them
    into the file inside that commit. Best effort: when it cannot (the store is busy, gone), the
    next writer's automatic checkpoint does it instead. Join the thread to wait for it."""

    def run() -> None:
        try:  # mode=rw: never create a store that is no longer there
            conn = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=rw", uri=True, timeout=30.0)
            try:
                conn.execute("pragma wal_checkpoint(passive)").fetchall()
            finally:
                conn.close()
        except sqlite3.Error:
            pass

    thread = threading.Thread(target=run, name="smsops-checkpoint")
    thread.start()
    return thread


@contextmanager
def transaction(conn: sqlite3.Connection, *, keep: bool = True) -> Iterator[sqlite3.Connection]:
    """All-or-nothing: ``begin immediate`` takes the write lock up front, so two
    processes never interleave half a unit of work. Inside a transaction the caller already
    holds, the unit is a savepoint that rolls back alone on error. ``keep=False`` rolls the
    work back at the end even when it succeeded (a dry run)."""
    if conn.in_transaction:
        name = f"unit_{next(_savepoints)}"
        conn.execute(f"savepoint {name}")
        try:
            yield conn
        except BaseException:
            conn.execute(f"rollback to {name}")
            conn.execute(f"release {name}")
            raise
        if not keep:
            conn.execute(f"rollback to {name}")
        conn.execute(f"release {name}")
        return
    conn.execute("begin immediate")
    try:
        yield conn
    except BaseException:
        conn.execute("rollback")
        raise
    conn.execute("commit" if keep else "rollback")


_savepoints = itertools.count(1)


def create_schema(conn: sqlite3.Connection, *, indexes: bool = True) -> None:
    """Create every table (and index); safe to run any number of times."""
    version = conn.execute("pragma user_version").fetchone()[0]
    if version == SCHEMA_VERSION and not _missing_tables(conn) and not _missing_columns(conn):
        return  # the common case: no write lock taken
    if version not in (0, 1, SCHEMA_VERSION):
        raise StoreError(
            f"ops store has schema version {version}, this smsops knows {SCHEMA_VERSION}; "
            "upgrade smsops or point SMSOPS_HOME at another folder"
        )
    if version == 0 and conn.execute("select count(*) from sqlite_master").fetchone()[0] == 0:
        # a new file (in WAL mode already when `connect` opened it, which set the size first)
        conn.execute(f"pragma page_size = {PAGE_SIZE}")
    with transaction(conn):
        if version == 1:
            _upgrade_from_1(conn)
        for ddl in TABLES.values():
            conn.execute(ddl)
        for table, column, declared in _missing_columns(conn):
            conn.execute(f"alter table {table} add column {column} {declared}")
        if indexes:
            for ddl in INDEXES:
                conn.execute(ddl)
        conn.execute(f"pragma user_version = {SCHEMA_VERSION}")


def _upgrade_from_1(conn: sqlite3.Connection) -> None:
    """Version 1 declared ``unique (provider, provider_message_id)`` on the outbox itself, an
    index SQLite cannot drop: the table is rebuilt with its rows and ids as they were (one
    pass over the outbox, under the caller's write lock). Its ``(state, not_before)`` index
    gives way to the partial ``ix_messages_planned``; the loop after this creates the new ones."""
    conn.execute("drop index if exists ix_messages_due")
    (autoindexes,) = conn.execute(
        "select count(*) from sqlite_master where tbl_name = 'messages' and name like 'sqlite_autoindex_%'"
    ).fetchone()
    if autoindexes < 2:  # only the idempotency key's: nothing to rebuild
        return
    columns = ", ".join(row[1] for row in conn.execute("pragma table_info(messages)"))
    conn.execute("alter table messages rename to messages_v1")
    conn.execute(TABLES["messages"])
    conn.execute(f"insert into messages ({columns}) select {columns} from messages_v1")
    conn.execute("drop table messages_v1")


def _missing_tables(conn: sqlite3.Connection) -> set[str]:
    """Tables, and indexes added by later versions, that this store does not have yet."""
    present = {r[0] for r in conn.execute("select name from sqlite_master where type in ('table', 'index')")}
    wanted = set(TABLES) | {ddl.split(" if not exists ")[1].split(" ")[0] for ddl in INDEXES}
    return wanted - present


def _missing_columns(conn: sqlite3.Connection) -> list[tuple[str, str, str]]:
    """``(table, column, declaration)`` of :data:`ADDED_COLUMNS` an older store lacks."""
    missing = []
    for table, columns in ADDED_COLUMNS.items():
        present = {row[1] for row in conn.execute(f"pragma table_info({table})")}
        if present:  # a table not created yet gets them from its DDL
            missing += [(table, name, declared) for name, declared in columns if name not in present]
    return missing


def open_store(home: str | os.PathLike[str] | None = None) -> sqlite3.Connection:
    """Connect to the store under ``home`` and make sure its schema exists."""
    conn = connect(store_path(home))
    create_schema(conn)
    return conn


def table_counts(conn: sqlite3.Connection) -> dict[str, int]:
    """Row count of every operational table."""
    return {name: conn.execute(f"select count(*) from {name}").fetchone()[0] for name in TABLES}


def is_empty(home: str | os.PathLike[str] | None = None) -> bool:
    """True when there is no store yet or it holds no contacts."""
    path = store_path(home)
    if not path.exists():
        return True
    conn = connect(path)
    try:
        create_schema(conn)
        return conn.execute("select not exists (select 1 from contacts)").fetchone()[0] == 1
    finally:
        conn.close()
