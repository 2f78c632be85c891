"""The opt-out gate: what the dispatcher asks immediately before each provider request.

Consent is decided for a chunk of claimed rows just before they are queued
(:func:`smsops.campaigns.check_before_send`); a row may then wait for its place in the rate
window. An opt-out recorded in between must still stop it (DESIGN.md invariant 2), so before
each request the dispatcher asks :meth:`Revocations.verdict`, which sees

- every opt-out in the store's consent ledger since the row was checked (a staff opt-out, an
  unsubscribe link, an import, a STOP already applied): the row is checked again;
- every STOP reply in the ingress journal that is not applied to the store yet
  (:mod:`smsops.ingress`): a STOP covers every purpose, so the row is not sent.

A check asks two SQLite databases whether anything was committed since it last looked, from
their wal-index headers (:class:`Commits`: 48 bytes of shared memory, read without a call into
SQLite, so the event loop keeps Python's GIL; a pragma read hands it to the receiver's threads
and waits to get it back):

- the store: when it changed, one statement, in one snapshot, reads the ledger's new events and
  how far the journal is applied;
- the journal's count of STOP/START writes (:func:`smsops.ingress.keyword_writes`), not the
  journal itself: the journal commits for every batch of receipts, hundreds of times a second
  while a campaign sends, and a STOP is rare. Its writers count ``begun`` before the journal's
  transaction and ``done`` after it, so a check that finds them unequal, or ``done`` moved since
  the last read of the journal, reads the journal's new STOP/START entries; one that finds them
  equal and unmoved has missed none.

Every commit by another connection is seen by the next check: no window between "decided to
send" and "request sent" that an opt-out can fall into.
"""

from __future__ import annotations

import logging
import mmap
import os
import sqlite3

from smsops import ingress

__all__ = ["Commits", "Revocations"]

log = logging.getLogger(__name__)

_LEDGER_SQL = """
    select null, null, coalesce((select applied_through from ingress_cursor where journal_id = ?), 0)
    union all
    select event_id, phone_e164, action from consent_events where event_id > ?
"""


_MAPS: dict[tuple[str, int, int], mmap.mmap] = {}
"""The wal-index headers mapped in this process, by file: never unmapped, their descriptors never
closed. A close of *any* descriptor of the ``-shm`` file drops every POSIX lock this process's
SQLite connections hold on it (record locks belong to the process and the file, not to the
descriptor), and Python's mmap keeps a duplicate descriptor that its close would close: another
process could then take the file for unused, reset it under live connections (SQLite's "locking
protocol" errors) and truncate it under the map (SIGBUS)."""


def _header(path: str) -> mmap.mmap | None:
    shm = f"{path}-shm"
    stat = os.stat(shm)
    key = (shm, stat.st_dev, stat.st_ino)
    mapped = _MAPS.get(key)
    if mapped is None and stat.st_size >= Commits.HEADER:
        fd = os.open(shm, os.O_RDONLY)  # never closed: see _MAPS
        mapped = _MAPS[key] = mmap.mmap(fd, Commits.HEADER, mmap.MAP_SHARED, mmap.PROT_READ)
    return mapped


class Commits:
    """Whether another connection committed to a WAL-mode SQLite database since the last look.

    SQLite publishes every commit in the wal-index header at the start of the database's
    ``-shm`` file (sqlite.org/walformat.html: ``iChange`` counts transactions, ``mxFrame`` and
    the salts move with each one), which its readers read to see the commit: a header unchanged
    since the last look means nothing new is visible to a read started now. :meth:`changed` is
    True at the first look, after any change of the header (a torn read of it too: a false
    alarm costs one read, never a missed commit), and on every look when the file cannot be
    mapped (not in WAL mode): then it asks ``pragma data_version`` instead.

    ``conn`` must stay open while this is used: an open connection keeps SQLite from resetting
    the ``-shm`` file under the map."""

    HEADER = 48  # the first copy of the header: the one SQLite writes last

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self._map: mmap.mmap | None = None
        self._seen: bytes | int | None = None
        conn.execute("select 1 from sqlite_master limit 1").fetchall()  # the -shm exists once read
        path = conn.execute("pragma database_list").fetchone()[2]
        mode = conn.execute("pragma journal_mode").fetchone()[0]
        if path and mode == "wal":
            try:
                self._map = _header(path)
            except OSError as exc:
                log.info("reading %s-shm failed (%s): commits are asked of SQLite instead", path, exc)

    def changed(self) -> bool:
        """Call before reading what changed: a commit after this call is seen by the next."""
        now: bytes | int = (
            self._map[: self.HEADER]
            if self._map is not None
            else self.conn.execute("pragma data_version").fetchone()[0]
        )
        if now == self._seen:
            return False
        self._seen = now
        return True

    def close(self) -> None:
        self._map = None  # stays mapped in _MAPS


class Revocations:
    """Opt-outs recorded since the dispatcher started, kept fresh by :meth:`refresh`.

    ``conn`` is a store connection used on the same thread (the dispatcher's event loop)."""

    def __init__(self, conn: sqlite3.Connection, journal: str | os.PathLike[str]) -> None:
        self.conn = conn
        self.jconn = ingress.connect(journal)
        self.kconn = ingress.connect_keywords(journal)
        self.journal_id = ingress.journal_id(self.jconn)
        self.mark = conn.execute("select coalesce(max(event_id), 0) from consent_events").fetchone()[0]
        """The last consent event seen: a row checked now has seen every event up to it."""
        self.opted_out: dict[str, int] = {}  # phone → its latest opt-out event id after the start
        self.journaled: dict[str, tuple[int, str]] = {}  # phone → (entry id, 'stop'/'start'), unapplied
        self.journal_mark = 0  # the last journal entry read
        self.applied_through = 0  # the journal's entries the store holds (as last read)
        self.journal_reads = 0  # reads of the journal (a test counts them)
        self._store = Commits(conn)
        self._keywords = Commits(self.kconn)
        self._keywords_done = -1  # the count of finished STOP/START writes the journal was read after
        self._writing = True  # a STOP/START write was under way at the last look
        self.refresh()

    def close(self) -> None:
        self._store.close()
        self._keywords.close()
        self.jconn.close()
        self.kconn.close()

    def refresh(self) -> None:
        """Read what other connections committed since the last call (two reads of shared
        memory when nothing did)."""
        if self._store.changed():
            self._read_ledger()
        if self._keywords.changed() or self._writing:
            begun, done = ingress.keyword_writes(self.kconn)
            self._writing = begun != done
            if self._writing or done != self._keywords_done:
                # read after the count: every write counted done is committed, so visible
                self._read_journal()
                self._keywords_done = done

    def _read_ledger(self) -> None:
        """New consent events, and how far the journal is applied, from one snapshot: a STOP
        the store holds by then is among the events read, so the journal's copy can go."""
        for event_id, phone, action in self.conn.execute(_LEDGER_SQL, (self.journal_id, self.mark)):
            if event_id is None:
                self.applied_through = action
                continue
            if action == "opt_out" and event_id > self.opted_out.get(phone, 0):
                self.opted_out[phone] = event_id
            self.mark = max(self.mark, event_id)
        if self.journaled:  # journaled replies the store holds now are judged by the ledger
            through = self.applied_through
            self.journaled = {p: e for p, e in self.journaled.items() if e[0] > through}

    def _read_journal(self) -> None:
        self.journal_reads += 1
        for entry_id, phone, keyword in ingress.stops_since(self.jconn, self.journal_mark):
            self.journal_mark = entry_id
            if entry_id > self.applied_through:
                self.journaled[phone] = (entry_id, keyword)

    def verdict(self, phone: str | None, checked: int) -> str | None:
        """For a row whose consent was checked when :attr:`mark` was ``checked``: ``"opted_out"``
        when a journaled STOP from its number is not applied yet, ``"recheck"`` when the ledger
        has an opt-out for it since, else None (send)."""
        self.refresh()
        if phone is None:
            return None
        journaled = self.journaled.get(phone)
        if journaled is not None and journaled[1] == "stop":
            return "opted_out"
        if self.opted_out.get(phone, 0) > checked:
            return "recheck"
        return None
