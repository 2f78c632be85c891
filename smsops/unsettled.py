"""Messages whose fate is not known, and what a person decides about them.

A request that timed out or was cut off mid-way may or may not have reached the provider
(DESIGN.md invariant 9). The dispatcher looks such a message up and believes "no such message"
only after the provider's settle window (``awaiting_lookup`` until then); a provider that cannot
be asked leaves it ``fate_unknown``; an answer the store refused leaves it ``record_failed``.
None of them is ever sent again by itself, and a campaign holding any of them is not finished:
its page says "12 with an unknown outcome" until a lookup settles them or a person decides:

- ``retry``: send them again (the person accepts that some may get a second copy);
- ``give_up``: close them unsent (``unknown_given_up``).

Each decision is recorded in ``outbox_decisions`` (who, when, how many) and the campaign is
marked finished when nothing else is left.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

import pandas as pd

from smsops import campaigns, store
from smsops.dispatch import UNSETTLED

__all__ = ["Decision", "Unsettled", "by_campaign", "count", "decide", "listing"]

Decision = Literal["retry", "give_up"]

_MARKS = ", ".join("?" * len(UNSETTLED))


@dataclass(frozen=True, slots=True)
class Unsettled:
    """A campaign's messages of unknown fate, by reason."""

    campaign_id: int
    by_reason: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.by_reason.values())

    @property
    def awaiting_lookup(self) -> int:
        """Still to be looked up by the dispatcher (settles by itself)."""
        return self.by_reason.get("awaiting_lookup", 0)

    @property
    def needs_a_person(self) -> int:
        """Will not settle by itself: a person retries or gives up."""
        return self.total - self.awaiting_lookup


def count(campaign_id: int, home: str | os.PathLike[str] | None = None) -> Unsettled:
    conn = store.open_store(home)
    try:
        found = conn.execute(
            f"select skip_reason, count(*) from messages where campaign_id = ? and state = 'unknown'"
            f" and skip_reason in ({_MARKS}) group by 1",
            (campaign_id, *UNSETTLED),
        ).fetchall()
    finally:
        conn.close()
    return Unsettled(campaign_id, dict(found))


def by_campaign(home: str | os.PathLike[str] | None = None) -> dict[int, Unsettled]:
    """Every campaign that holds messages of unknown fate, by id (one read for a list)."""
    conn = store.open_store(home)
    try:
        found = conn.execute(
            # by campaign and state on the outbox's index (a seek per campaign), not a scan of it
            f"select campaign_id, skip_reason, count(*) from messages"
            f" where campaign_id in (select campaign_id from campaigns) and state = 'unknown'"
            f" and skip_reason in ({_MARKS}) group by 1, 2",
            UNSETTLED,
        ).fetchall()
    finally:
        conn.close()
    reasons: dict[int, dict[str, int]] = {}
    for campaign_id, reason, n in found:
        reasons.setdefault(campaign_id, {})[reason] = n
    return {cid: Unsettled(cid, by_reason) for cid, by_reason in reasons.items()}


def listing(home: str | os.PathLike[str] | None = None) -> pd.DataFrame:
    """:func:`smsops.campaigns.list_all` with the messages of unknown fate counted apart: an
    ``unknown`` column beside ``not_sent``, which no longer counts them (they may have been
    sent). Messages a person closed unsent (``unknown_given_up``) stay in ``not_sent``."""
    frame = campaigns.list_all(home)
    open_ = by_campaign(home)
    unknown = frame["campaign_id"].map(lambda cid: open_[cid].total if cid in open_ else 0).astype("int64")
    frame["not_sent"] = frame["not_sent"] - unknown
    frame.insert(frame.columns.get_loc("not_sent") + 1, "unknown", unknown)
    return frame


def decide(
    campaign_id: int, decision: Decision, *, by: str, home: str | os.PathLike[str] | None = None
) -> int:
    """Apply a person's ``decision`` to the campaign's messages that need one (not those still
    awaiting their lookup); the number changed. Recorded with ``by``."""
    if decision not in ("retry", "give_up"):
        raise ValueError(f"decision must be 'retry' or 'give_up', got {decision!r}")
    by = (by or "").strip()
    if not by:
        raise ValueError("say who decides (by=...): the decision is recorded")
    reasons = [r for r in UNSETTLED if r != "awaiting_lookup"]
    marks = ", ".join("?" * len(reasons))
    now = datetime.now(UTC).replace(tzinfo=None).isoformat(sep=" ", timespec="seconds")
    conn = store.open_store(home)
    try:
        with store.transaction(conn):
            if decision == "retry":
                changes = "state = 'planned', skip_reason = null, not_before = null"
            else:
                changes = "skip_reason = 'unknown_given_up'"
            changed = conn.execute(
                f"update messages set {changes}"
                f" where campaign_id = ? and state = 'unknown' and skip_reason in ({marks})",
                (campaign_id, *reasons),
            ).rowcount
            if changed:
                conn.execute(
                    "insert into outbox_decisions (campaign_id, decision, messages, decided_by, decided_at)"
                    " values (?, ?, ?, ?, ?)",
                    (campaign_id, decision, changed, by[:200], now),
                )
            if decision == "give_up":
                conn.execute(
                    f"""
                    update campaigns set status = 'finished', finished_at = ?
                    where campaign_id = ? and status = 'running' and not exists (
                        select 1 from messages where campaign_id = ? and (
                            state in ('planned', 'sending')
                            or (state = 'unknown' and skip_reason in ({_MARKS}))
                        )
                    )
                    """,
                    (now, campaign_id, campaign_id, *UNSETTLED),
                )
    finally:
        conn.close()
    return changed
