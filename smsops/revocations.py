"""The opt-out gate: what the dispatcher asks immediately before each provider request.

Consent is decided for a chunk of claimed rows just before they are queued
(:func:`smsops.campaigns.check_before_send`); a row may then wait for its place in the rate
window. An opt-out recorded in between must still stop it (DESIGN.md invariant 2), so before
each request the dispatcher asks :meth:`Revocations.verdict`, which sees

- every opt-out in the store's consent ledger since the row was checked (a staff opt-out, an
  unsubscribe link, an import, a STOP already applied): the row is checked again;
- every STOP reply in the ingress journal that is not applied to the store yet
  (:mod:`smsops.ingress`): a STOP covers every purpose, so the row is not sent.

Both are read through SQLite's ``data_version``: while nothing changed, a check costs two
pragma reads (a few microseconds), and any commit by another connection is seen by the next
check: no window between "decided to send" and "request sent" that an opt-out can fall into.
"""

from __future__ import annotations

import logging
import os
import sqlite3

from smsops import ingress

__all__ = ["Revocations"]

log = logging.getLogger(__name__)


class Revocations:
    """Opt-outs recorded since the dispatcher started, kept fresh by :meth:`refresh`.

    ``conn`` is a store connection used on the same thread (the dispatcher's event loop)."""

    def __init__(self, conn: sqlite3.Connection, journal: str | os.PathLike[str]) -> None:
        self.conn = conn
        self.jconn = ingress.connect(journal)
        self.journal_id = ingress.journal_id(self.jconn)
        self.mark = conn.execute("select coalesce(max(event_id), 0) from consent_events").fetchone()[0]
        """The last consent event seen: a row checked now has seen every event up to it."""
        self.opted_out: dict[str, int] = {}  # phone → its latest opt-out event id after the start
        self.journaled: dict[str, tuple[int, str]] = {}  # phone → (entry id, 'stop'/'start'), unapplied
        self.journal_mark = 0
        self._versions = (-1, -1)
        self.refresh()

    def close(self) -> None:
        self.jconn.close()

    def refresh(self) -> None:
        """Read what other connections committed since the last call (cheap when nothing did)."""
        versions = (
            self.conn.execute("pragma data_version").fetchone()[0],
            self.jconn.execute("pragma data_version").fetchone()[0],
        )
        if versions == self._versions:
            return
        store_changed = versions[0] != self._versions[0]
        self._versions = versions
        if store_changed:
            for event_id, phone in self.conn.execute(
                "select event_id, phone_e164 from consent_events where event_id > ? and action = 'opt_out'",
                (self.mark,),
            ):
                self.opted_out[phone] = event_id
            self.mark = self.conn.execute(
                "select coalesce(max(event_id), ?) from consent_events", (self.mark,)
            ).fetchone()[0]
            self._forget_applied()
        for entry_id, phone, keyword in ingress.stops_since(self.jconn, self.journal_mark):
            self.journaled[phone] = (entry_id, keyword)
            self.journal_mark = entry_id

    def _forget_applied(self) -> None:
        """Journaled replies the store holds now are judged by the ledger instead."""
        if not self.journaled:
            return
        row = self.conn.execute(
            "select applied_through from ingress_cursor where journal_id = ?", (self.journal_id,)
        ).fetchone()
        if row is not None:
            self.journaled = {p: e for p, e in self.journaled.items() if e[0] > row[0]}

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
