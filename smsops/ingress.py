"""The ingress journal: what providers and recipients sent us, kept before it is answered.

A receipt, a reply, a click or a Segment batch (:mod:`smsops.collect`) is checked by the
webhook app (signature or write key, size, form) and then appended to the journal, a SQLite file
of its own (``$SMSOPS_HOME/ingress.sqlite``, WAL) that only the receivers write and the applier
prunes. Answering therefore never waits on the
operational store's write lock, which a launch, a build's load or an erasure may hold for a
minute (DESIGN.md invariant 8): a 2xx means *journaled*, and the journal survives the process
(``kill -9`` included; a power cut may lose the last commits, as with the store itself).

:class:`Journal` is the append side: one thread per process writes the entries of requests that
arrive together in one transaction (group commit) and settles each request's future once its
entries are committed.

:class:`Applier` (and :func:`apply_pending` for one batch) moves entries into the operational
store in order, in batches, each batch in one store transaction that also advances the store's
``ingress_cursor`` for this journal, so an entry is applied exactly once whoever applies it and
whenever the process dies. A batch that meets a busy store waits and tries again; an entry the
store refuses is kept in ``ingress_rejects`` with the error, never dropped and never blocking the
entries behind it. Applied entries are then deleted from the journal (``secure_delete``: their
bytes are zeroed, and the log is truncated once the journal is empty).

The journal has an id of its own (``meta.journal_id``): a journal file deleted and made again
starts a new cursor rather than having its entries taken for ones already applied.

Opt-outs take effect at once (invariant 2): the dispatcher reads STOP replies from the journal
before they are applied (:func:`stops_since`), see :class:`smsops.revocations.Revocations`. So
that it need not read the journal after every commit of receipts, a writer that journals a
STOP or START counts it in a small file of its own beside the journal (:func:`keyword_writes`):
``begun`` before the journal's transaction, ``done`` after it. A reader that sees the two equal
and unchanged since its last read of the journal has missed no STOP; any other reading sends it
to the journal.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import queue
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from smsops import consent, store
from smsops.config import paths, private_file
from smsops.providers import StatusUpdate

__all__ = [
    "Applier",
    "ApplyReport",
    "Entry",
    "Journal",
    "apply_pending",
    "journal_path",
    "pending",
]

log = logging.getLogger(__name__)

Kind = Literal["status", "inbound", "click", "segment"]

_SCHEMA = (
    "create table if not exists meta (key text primary key, value text not null) strict",
    # autoincrement: an id is never handed out twice, even after every entry was pruned
    """create table if not exists entries (
        entry_id     integer primary key autoincrement,
        kind         text not null check (kind in ('status', 'inbound', 'click', 'segment')),
        provider     text,
        phone        text,
        keyword      text check (keyword in ('stop', 'start', 'help')),
        payload      text not null,
        received_at  text not null
    ) strict""",
    "create index if not exists ix_entries_keyword on entries (keyword) where keyword is not null",
)

APPLY_BATCH = 5000
"""Entries applied per store transaction at most."""


def journal_path(home: str | os.PathLike[str] | None = None) -> Path:
    return paths(home).home / "ingress.sqlite"


def _now() -> str:
    return datetime.now(UTC).replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds")


def connect(path: str | os.PathLike[str], *, timeout: float = 30.0) -> sqlite3.Connection:
    """Open the journal (made if missing): WAL, zeroed deletes, its schema and id."""
    conn = _open(path, timeout)
    if conn.execute("select count(*) from sqlite_master where name = 'meta'").fetchone()[0] == 0:
        with store.transaction(conn):
            for ddl in _SCHEMA:
                conn.execute(ddl)
            conn.execute(
                "insert into meta (key, value) values ('journal_id', ?) on conflict do nothing",
                (uuid.uuid4().hex,),
            )
    elif (
        "'segment'" not in conn.execute("select sql from sqlite_master where name = 'entries'").fetchone()[0]
    ):
        _widen_kinds(conn)
    return conn


def _widen_kinds(conn: sqlite3.Connection) -> None:
    """A journal made before ``segment`` entries: its table made again with the kinds of now
    (SQLite cannot change a CHECK in place), the entries and the id sequence kept, so that no
    id already applied is handed out again."""
    with store.transaction(conn):
        sql = conn.execute("select sql from sqlite_master where name = 'entries'").fetchone()[0]
        if "'segment'" in sql:  # another process did it first
            return
        row = conn.execute("select seq from sqlite_sequence where name = 'entries'").fetchone()
        seq = max(
            row[0] if row else 0, conn.execute("select coalesce(max(entry_id), 0) from entries").fetchone()[0]
        )
        conn.execute("drop index if exists ix_entries_keyword")
        conn.execute("alter table entries rename to entries_before_segment")
        for ddl in _SCHEMA[1:]:
            conn.execute(ddl)
        conn.execute("insert into entries select * from entries_before_segment")
        conn.execute("drop table entries_before_segment")
        conn.execute("delete from sqlite_sequence where name = 'entries'")
        conn.execute("insert into sqlite_sequence (name, seq) values ('entries', ?)", (seq,))


def keywords_path(journal: str | os.PathLike[str]) -> Path:
    """The journal's count of STOP/START writes, beside it (``ingress-keywords.sqlite``)."""
    path = Path(journal)
    return path.with_name(f"{path.stem}-keywords{path.suffix}")


def connect_keywords(journal: str | os.PathLike[str], *, timeout: float = 30.0) -> sqlite3.Connection:
    """Open the count of STOP/START writes of the journal at ``journal`` (made if missing)."""
    conn = _open(keywords_path(journal), timeout)
    if conn.execute("select count(*) from sqlite_master where name = 'keyword_writes'").fetchone()[0] == 0:
        with store.transaction(conn):
            conn.execute(
                "create table if not exists keyword_writes"
                " (id integer primary key check (id = 1), begun integer not null, done integer not null) strict"
            )
            conn.execute("insert into keyword_writes values (1, 0, 0) on conflict do nothing")
    return conn


def keyword_writes(kconn: sqlite3.Connection) -> tuple[int, int]:
    """``(begun, done)``: journal transactions holding a STOP or START, started and finished.
    Unequal while one is under way (or after a writer died in one: then always unequal)."""
    return kconn.execute("select begun, done from keyword_writes").fetchone()


def _open(path: str | os.PathLike[str], timeout: float) -> sqlite3.Connection:
    target = Path(path)
    private_file(target)  # readable by its owner only (SQLite gives its -wal and -shm the same mode)
    conn = sqlite3.connect(target, timeout=timeout, isolation_level=None, check_same_thread=False)
    deadline = time.monotonic() + timeout
    while True:  # SQLite refuses a switch to WAL at once, busy timeout or not, while another
        try:  # connection holds the new file's lock (it is switching it too): wait for it
            conn.execute("pragma journal_mode = wal")
            break
        except sqlite3.OperationalError as exc:
            if not _busy(exc) or time.monotonic() >= deadline:
                conn.close()
                raise
            time.sleep(0.005)
    conn.execute("pragma synchronous = normal")
    conn.execute("pragma secure_delete = on")
    conn.execute(f"pragma busy_timeout = {int(timeout * 1000)}")
    return conn


def journal_id(conn: sqlite3.Connection) -> str:
    return conn.execute("select value from meta where key = 'journal_id'").fetchone()[0]


@dataclass(frozen=True, slots=True)
class Entry:
    """One fact to journal: its kind, the JSON-able ``payload``, and for a reply the sender's
    number and keyword (what the dispatcher's opt-out gate reads before the reply is applied)."""

    kind: Kind
    payload: dict[str, Any]
    provider: str | None = None
    phone: str | None = None
    keyword: str | None = None


def status_entry(provider: str, updates: Sequence[StatusUpdate]) -> Entry:
    return Entry(
        "status",
        {
            "updates": [
                [u.provider, u.provider_message_id, u.status, u.error_code, u.occurred_at.isoformat()]
                for u in updates
            ]
        },
        provider=provider,
    )


# ---------------------------------------------------------------------------------------
# Appending: group commit on a thread of its own


class Journal:
    """Appends entries to the journal at ``path`` from any event loop; one writer thread.

    :meth:`append` hands a request's entries to the thread and returns once they are committed.
    The thread takes everything queued at that moment (up to ``max_batch`` requests) and commits
    it in one transaction: under load one commit serves many requests."""

    def __init__(self, path: str | os.PathLike[str], *, max_batch: int = 1024) -> None:
        self.path = Path(path)
        self.max_batch = max_batch
        self._queue: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.commits = 0
        self.received = 0  # requests handed over, committed or not yet
        self.appended = 0  # entries committed
        self.committed = threading.Event()  # set after each commit (the applier waits on it)

    def _ensure_started(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="smsops-journal", daemon=True)
                self._thread.start()

    async def append(self, entries: Sequence[Entry]) -> None:
        """Journal ``entries`` (one request's) and return once they are committed."""
        self._ensure_started()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self.received += 1
        self._queue.put((list(entries), future, loop))
        await future

    def append_sync(self, entries: Sequence[Entry]) -> None:
        """:meth:`append` from a thread without an event loop."""
        done = threading.Event()
        box: list[BaseException | None] = [None]

        def settle(result: BaseException | None) -> None:
            box[0] = result
            done.set()

        self._ensure_started()
        self.received += 1
        self._queue.put((list(entries), settle, None))
        done.wait()
        if box[0] is not None:
            raise box[0]

    def close(self, timeout: float = 10.0) -> None:
        """Finish what is queued, then stop the thread."""
        thread = self._thread
        if thread is not None and thread.is_alive():
            self._queue.put(None)
            thread.join(timeout)
        self._thread = None

    def _run(self) -> None:
        conn: sqlite3.Connection | None = None
        kconn: sqlite3.Connection | None = None
        try:
            while True:
                first = self._queue.get()
                if first is None:
                    return
                batch = [first]
                stop = False
                while len(batch) < self.max_batch:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is None:
                        stop = True
                        break
                    batch.append(item)
                try:
                    if conn is None:
                        conn = connect(self.path)
                    if kconn is None:
                        kconn = connect_keywords(self.path)
                    self._write(conn, kconn, batch)
                    error: BaseException | None = None
                except Exception as exc:  # answered 503: the sender retries, nothing was kept
                    log.exception("could not journal %d requests at %s", len(batch), self.path)
                    error = exc
                    for c in (conn, kconn):
                        if c is not None:
                            c.close()
                    conn = kconn = None
                _settle_all(batch, error)
                if stop:
                    return
        finally:
            for c in (conn, kconn):
                if c is not None:
                    c.close()

    def _write(
        self, conn: sqlite3.Connection, kconn: sqlite3.Connection, batch: list[tuple[Any, ...]]
    ) -> None:
        now = _now()
        rows = [
            (e.kind, e.provider, e.phone, e.keyword, json.dumps(e.payload, ensure_ascii=False), now)
            for entries, _, _ in batch
            for e in entries
        ]
        keywords = any(row[3] in ("stop", "start") for row in rows)
        if keywords:  # counted before and after: a reader in between goes to the journal
            kconn.execute("update keyword_writes set begun = begun + 1")
        try:
            with store.transaction(conn):
                conn.executemany(
                    "insert into entries (kind, provider, phone, keyword, payload, received_at)"
                    " values (?, ?, ?, ?, ?, ?)",
                    rows,
                )
        finally:
            if keywords:
                kconn.execute("update keyword_writes set done = done + 1")
        self.commits += 1
        self.appended += len(rows)
        self.committed.set()


def _settle_all(batch: list[tuple[Any, ...]], error: BaseException | None) -> None:
    by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
    for _, future, loop in batch:
        if loop is None:
            future(error)
        else:
            by_loop.setdefault(loop, []).append(future)
    for loop, futures in by_loop.items():  # one wake-up of each event loop per batch
        with contextlib.suppress(RuntimeError):  # that server has stopped: nobody is waiting
            loop.call_soon_threadsafe(_settle, futures, error)


def _settle(futures: list[asyncio.Future[None]], error: BaseException | None) -> None:
    for future in futures:
        if future.done():  # the client went away and its request was cancelled
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(None)


# ---------------------------------------------------------------------------------------
# Applying: journal → operational store, exactly once


@dataclass(frozen=True, slots=True)
class ApplyReport:
    """What one :func:`apply_pending` did."""

    applied: int = 0
    rejected: int = 0
    through: int = 0
    """The journal's last applied entry id."""
    by_kind: dict[str, int] = field(default_factory=dict)


def pending(home: str | os.PathLike[str] | None = None) -> int:
    """Journal entries not yet applied to the store (0 when there is no journal)."""
    path = journal_path(home)
    if not path.exists():
        return 0
    jconn = connect(path)
    conn = store.open_store(home)
    try:
        jid = journal_id(jconn)
        row = conn.execute(
            "select applied_through from ingress_cursor where journal_id = ?", (jid,)
        ).fetchone()
        through = row[0] if row else 0
        return jconn.execute("select count(*) from entries where entry_id > ?", (through,)).fetchone()[0]
    finally:
        jconn.close()
        conn.close()


def _apply_status(conn: sqlite3.Connection, payload: dict[str, Any]) -> None:
    from smsops import webhooks  # webhooks imports this module for the journal

    updates = [
        StatusUpdate(p, sid, status, code, datetime.fromisoformat(at))
        for p, sid, status, code, at in payload["updates"]
    ]
    webhooks.record_status(conn, updates)


def _apply_inbound(conn: sqlite3.Connection, payload: dict[str, Any]) -> None:
    consent.handle_inbound(
        conn,
        provider=payload["provider"],
        provider_message_id=payload["provider_message_id"],
        from_e164=payload["from"],
        body=payload["body"],
        received_at=payload["received_at"],
        to_number=payload.get("to"),
    )


def _apply_click(conn: sqlite3.Connection, payload: dict[str, Any]) -> None:
    conn.execute(
        "insert into clicks (token, message_id, clicked_at, user_agent, method) values (?, ?, ?, ?, ?)"
        " on conflict (token, clicked_at) do nothing",
        (payload["token"], payload["message_id"], payload["clicked_at"], payload.get("user_agent"),
         payload.get("method", "GET")),
    )  # fmt: skip


def _apply_segment(conn: sqlite3.Connection, payload: dict[str, Any]) -> None:
    from smsops import collect  # collect imports this module for the journal

    received = datetime.fromisoformat(payload["received_at"])
    rows = collect.parse(payload["body"].encode("utf-8"), kind=payload["kind"], now=received)
    collect.write(conn, rows, now=received)


_APPLY = {
    "status": _apply_status, "inbound": _apply_inbound, "click": _apply_click, "segment": _apply_segment,
}  # fmt: skip


def _runs(entries: list[tuple[int, str, str]]) -> Iterator[list[tuple[int, str, str]]]:
    """The batch in order, consecutive receipts together, every other entry alone."""
    run: list[tuple[int, str, str]] = []
    for entry in entries:
        if entry[1] == "status":
            run.append(entry)
            continue
        if run:
            yield run
            run = []
        yield [entry]
    if run:
        yield run


def _apply_receipts(conn: sqlite3.Connection, run: list[tuple[int, str, str]]) -> bool:
    """Apply consecutive receipt entries in one savepoint and one call to ``record_status``
    (two statements for the lot, where one at a time costs two savepoints and two statements a
    receipt): True if that worked, False (nothing applied) to apply them one by one."""
    from smsops import webhooks

    try:
        updates = [
            StatusUpdate(p, sid, status, code, datetime.fromisoformat(at))
            for _, _, payload in run
            for p, sid, status, code, at in json.loads(payload)["updates"]
        ]
        with store.transaction(conn):
            webhooks.record_status(conn, updates)
    except Exception as exc:
        if _busy(exc):
            raise
        return False
    return True


def _busy(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and (
        "locked" in str(exc).lower() or "busy" in str(exc).lower()
    )


def apply_pending(
    home: str | os.PathLike[str] | None = None,
    *,
    limit: int = APPLY_BATCH,
    conn: sqlite3.Connection | None = None,
    jconn: sqlite3.Connection | None = None,
    truncate: bool = True,
) -> ApplyReport:
    """Apply up to ``limit`` journal entries to the store in one transaction, then prune them
    from the journal. Raises ``sqlite3.OperationalError`` when the store stays busy (nothing is
    applied then; call again). Inside a transaction the caller holds (an erasure applies the
    journal first), the entries are applied in a savepoint and left in the journal: the next
    applier prunes them once the caller's transaction, cursor included, is committed. An idle
    call (nothing new) truncates the journal's log unless ``truncate`` is False."""
    own_conn, own_jconn = conn is None, jconn is None
    nested = conn is not None and conn.in_transaction
    conn = conn or store.open_store(home)
    jconn = jconn or connect(journal_path(home))
    try:
        jid = journal_id(jconn)
        applied = rejected = 0
        kinds: dict[str, int] = {}
        row = conn.execute(
            "select applied_through from ingress_cursor where journal_id = ?", (jid,)
        ).fetchone()
        if not jconn.execute(
            "select exists (select 1 from entries where entry_id > ?)", (row[0] if row else 0,)
        ).fetchone()[0]:
            through = row[0] if row else 0
            if not nested and (
                jconn.execute(
                    "select exists (select 1 from entries where entry_id <= ?)", (through,)
                ).fetchone()[0]
                or (truncate and _log_size(jconn))  # idle: the applied entries' log is truncated now
            ):
                # applied (by someone else too, an erasure): prune, and truncate when asked
                _prune(jconn, through, truncate=truncate)
            return ApplyReport(through=through)  # nothing new: no write lock taken
        with store.transaction(conn):  # the store's write lock: one applier at a time
            row = conn.execute(
                "select applied_through from ingress_cursor where journal_id = ?", (jid,)
            ).fetchone()
            through = row[0] if row else 0
            entries = jconn.execute(
                "select entry_id, kind, payload from entries where entry_id > ? order by entry_id limit ?",
                (through, limit),
            ).fetchall()
            if not entries:
                return ApplyReport(through=through)
            for run in _runs(entries):
                if len(run) > 1 and _apply_receipts(conn, run):  # the common case: all at once
                    applied += len(run)
                    kinds["status"] = kinds.get("status", 0) + len(run)
                    continue
                for entry_id, kind, payload in run:  # one by one: a refused entry rolls back alone
                    try:
                        with store.transaction(conn):  # a savepoint
                            _APPLY[kind](conn, json.loads(payload))
                        applied += 1
                        kinds[kind] = kinds.get(kind, 0) + 1
                    except Exception as exc:
                        if _busy(exc):
                            raise
                        log.error("journal entry %s (%s) could not be applied: %s", entry_id, kind, exc)
                        conn.execute(
                            "insert into ingress_rejects (journal_id, entry_id, kind, payload, error,"
                            " recorded_at) values (?, ?, ?, ?, ?, ?) on conflict do nothing",
                            (jid, entry_id, kind, payload, f"{type(exc).__name__}: {exc}"[:2000], _now()),
                        )
                        rejected += 1
            through = entries[-1][0]
            conn.execute(
                "insert into ingress_cursor (journal_id, applied_through, applied_at) values (?, ?, ?)"
                " on conflict (journal_id) do update set applied_through = excluded.applied_through,"
                " applied_at = excluded.applied_at",
                (jid, through, _now()),
            )
        if any(kind == "status" for _, kind, _ in entries):
            from smsops import webhooks

            if conn.execute("select exists (select 1 from orphan_status_events)").fetchone()[0]:
                webhooks.adopt_orphans(conn)
        if not nested:
            _prune(jconn, through, truncate=False)  # the idle pass truncates the log
        return ApplyReport(applied=applied, rejected=rejected, through=through, by_kind=kinds)
    finally:
        if own_conn:
            conn.close()
        if own_jconn:
            jconn.close()


def _log_size(jconn: sqlite3.Connection) -> int:
    """Bytes in the journal's write-ahead log (0 once truncated)."""
    path = jconn.execute("pragma database_list").fetchone()[2]
    try:
        return os.path.getsize(f"{path}-wal")
    except OSError:
        return 0


def _prune(jconn: sqlite3.Connection, through: int, *, truncate: bool = True) -> None:
    """Delete applied entries (zeroed on disk); with ``truncate``, an empty journal's log is
    truncated too (the applier does it once it is idle: after every batch it doubled the
    receiver's CPU under a steady trickle of receipts)."""
    try:
        with store.transaction(jconn):
            jconn.execute("delete from entries where entry_id <= ?", (through,))
            empty = jconn.execute("select not exists (select 1 from entries)").fetchone()[0]
        if empty and truncate:  # without waiting: while a truncation waits for a reader, no writer (no
            # webhook's answer) may go on; the idle applier tries again (apply_pending)
            (timeout,) = jconn.execute("pragma busy_timeout").fetchone()
            jconn.execute("pragma busy_timeout = 0")
            try:
                jconn.execute("pragma wal_checkpoint(truncate)").fetchall()
            finally:
                jconn.execute(f"pragma busy_timeout = {int(timeout)}")
    except sqlite3.OperationalError as exc:  # the next pass prunes them: they are applied already
        log.warning("could not prune the ingress journal: %s", exc)


class Applier:
    """Applies the journal under ``home`` to its store on a thread of its own, in batches, as
    entries arrive (woken by ``journal.committed``) or every ``interval`` seconds (entries other
    processes journaled). A busy store is waited out with a growing pause; nothing is lost."""

    def __init__(
        self,
        home: str | os.PathLike[str] | None,
        journal: Journal | None = None,
        *,
        interval: float = 0.2,
        busy_timeout: float = 2.0,
        truncate_every: float = 2.0,
    ) -> None:
        self.home = home
        self.journal = journal
        self.interval = interval
        self.truncate_every = truncate_every
        """Seconds between two truncations of the journal's log at least: while receipts arrive
        the applier is idle between most batches, and a checkpoint at each idle pass was a
        tenth of the receiver's CPU (docs/performance.md, "smsops serve as deployed")."""
        self._truncated = time.monotonic()
        self.busy_timeout = busy_timeout
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.applied = 0
        self.rejected = 0
        self.last_error: str | None = None
        self.idle = threading.Event()  # set while nothing is left to apply

    def start(self) -> Applier:
        self._thread = threading.Thread(target=self._run, name="smsops-ingress-applier", daemon=True)
        self._thread.start()
        return self

    def close(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self.journal is not None:
            self.journal.committed.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def drain(self, timeout: float = 30.0) -> bool:
        """Wait until everything journaled so far is applied (for tests and shutdown)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pending(self.home) == 0:
                return True
            if self.journal is not None:
                self.journal.committed.set()
            time.sleep(0.02)
        return False

    def _run(self) -> None:
        conn = jconn = None
        pause = self.interval
        try:
            while not self._stop.is_set():
                try:
                    if conn is None:
                        conn = store.connect(store.store_path(self.home), timeout=self.busy_timeout)
                        store.create_schema(conn)
                    if jconn is None:
                        jconn = connect(journal_path(self.home))
                    truncate = time.monotonic() - self._truncated >= self.truncate_every
                    report = apply_pending(self.home, conn=conn, jconn=jconn, truncate=truncate)
                    if truncate and not (report.applied or report.rejected):
                        self._truncated = time.monotonic()
                except Exception as exc:
                    self.last_error = f"{type(exc).__name__}: {exc}"
                    if not _busy(exc):
                        log.exception("applying the ingress journal failed; trying again")
                        for c in (conn, jconn):
                            with contextlib.suppress(Exception):
                                c.close()  # type: ignore[union-attr]
                        conn = jconn = None
                    self.idle.clear()
                    self._stop.wait(pause)
                    pause = min(pause * 2, 5.0)
                    continue
                pause = self.interval
                self.last_error = None
                self.applied += report.applied
                self.rejected += report.rejected
                if report.applied or report.rejected:
                    self.idle.clear()
                    continue  # more may be waiting
                self.idle.set()
                if self.journal is not None:
                    self.journal.committed.wait(self.interval)
                    self.journal.committed.clear()
                else:
                    self._stop.wait(self.interval)
        finally:
            if conn is not None and jconn is not None:
                self._last_pass(conn, jconn)
            for c in (conn, jconn):
                if c is not None:
                    c.close()

    def _last_pass(self, conn: sqlite3.Connection, jconn: sqlite3.Connection) -> None:
        """On the way out, apply what is left if the store lets us now; what it does not stays
        in the journal for the next applier."""
        try:
            while (report := apply_pending(self.home, conn=conn, jconn=jconn)).applied + report.rejected:
                self.applied += report.applied
                self.rejected += report.rejected
        except Exception as exc:
            log.warning(
                "stopping with journal entries not yet applied (%s); the next start applies them", exc
            )


# ---------------------------------------------------------------------------------------
# Reading for the dispatcher's opt-out gate


def stops_since(jconn: sqlite3.Connection, after: int) -> Iterator[tuple[int, str, str]]:
    """``(entry_id, phone, keyword)`` of journaled STOP/START replies after ``after``."""
    yield from jconn.execute(
        "select entry_id, phone, keyword from entries"
        " where keyword in ('stop', 'start') and entry_id > ? order by entry_id",
        (after,),
    )


# ---------------------------------------------------------------------------------------
# Erasure


def scrub(
    path: str | os.PathLike[str], redact: Callable[[str], str], *, applied_through: int
) -> tuple[int, int]:
    """After an erasure: delete the entries the store has applied (``applied_through``) and
    pass the others' number and payload through ``redact``; then rewrite the file (``vacuum``)
    and truncate its log, so no copy of an erased number is left in the journal's pages or log.
    Returns ``(deleted, rewritten)``. The log stays when a reader holds it; the next idle pass
    of the applier truncates it."""
    jconn = connect(path)
    try:
        with store.transaction(jconn):
            deleted = jconn.execute("delete from entries where entry_id <= ?", (applied_through,)).rowcount
            changes = []
            for entry_id, phone, payload in jconn.execute("select entry_id, phone, payload from entries"):
                cleaned = (redact(phone) if phone else phone, redact(payload))
                if cleaned != (phone, payload):
                    changes.append((*cleaned, entry_id))
            jconn.executemany("update entries set phone = ?, payload = ? where entry_id = ?", changes)
        jconn.execute("vacuum")
        jconn.execute("pragma wal_checkpoint(truncate)").fetchall()
    finally:
        jconn.close()
    return deleted, len(changes)
