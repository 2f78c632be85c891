"""The campaign marts: attribution, incremental refresh, interval maths, uplift, segments,
replies and the error-code seed, checked against the raw data and against Python."""

from __future__ import annotations

import math
import shutil
import sqlite3
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pandas as pd
import pytest

from smsops import dbt_plugin, demo, erasure, store, warehouse

Z = 1.959964
FMT = "%Y-%m-%d %H:%M:%S"


def wilson(successes: int, trials: int) -> tuple[float, float] | tuple[None, None]:
    """The Wilson score interval, written out independently of the macro."""
    if trials == 0:
        return None, None
    p = successes / trials
    centre = (p + Z * Z / (2 * trials)) / (1 + Z * Z / trials)
    half = Z / (1 + Z * Z / trials) * math.sqrt(p * (1 - p) / trials + Z * Z / (4 * trials * trials))
    return max(0.0, centre - half), min(1.0, centre + half)


def read(home: Path, sql: str) -> pd.DataFrame:
    return warehouse.query(sql, home=home)


def copy_home(source: Path, target: Path, *, with_snapshot: bool) -> Path:
    """A home of its own with a copy of ``source``'s operational store and, optionally,
    of its published snapshot (so the next build there is incremental)."""
    (target / "warehouse").mkdir(parents=True)
    src, dst = sqlite3.connect(store.store_path(source)), sqlite3.connect(target / "ops.sqlite")
    src.backup(dst)
    src.close()
    dst.close()
    if with_snapshot:
        snapshot = warehouse.current(source)
        copy = target / "warehouse" / snapshot.path.name
        shutil.copyfile(snapshot.path, copy)
        (target / "warehouse" / "current.json").write_text(
            (source / "warehouse" / "current.json").read_text().replace(str(snapshot.path), str(copy))
        )
    return target


def add_old_delivery(
    db: Path, now: datetime, *, key: str = "test:old", days: int = 10, receipt: bool = True
) -> int:
    """A promotional message sent ``days`` ago (delivered then unless ``receipt`` is false)
    to a contact nothing else happened to for three weeks: older than the refresh's lookback
    by the time the next build runs. Returns its message id."""
    at = (now - timedelta(days=days)).strftime(FMT)
    quiet = (now - timedelta(days=21)).strftime(FMT)
    conn = sqlite3.connect(db)
    with conn:
        contact_id, phone = conn.execute(
            "select contact_id, phone_e164 from contacts where phone_valid = 1 and contact_id not in"
            " (select contact_id from messages where planned_at >= ?1) and contact_id not in"
            " (select contact_id from orders where ordered_at >= ?1) order by contact_id limit 1",
            (quiet,),
        ).fetchone()
        campaign_id = conn.execute(
            "insert into campaigns (name, kind, status, created_at, launched_at, finished_at)"
            " values ('Old promo', 'promo', 'finished', ?1, ?1, ?1) returning campaign_id",
            (at,),
        ).fetchone()[0]
        message_id = conn.execute(
            "insert into messages (idempotency_key, campaign_id, variant, contact_id, phone_e164, state,"
            " planned_at, submitted_at, price, currency, segments, provider, attempts)"
            " values (?5, ?1, 'A', ?2, ?3, 'submitted', ?4, ?4, 4.2, 'RUB', 1, 'sandbox', 1)"
            " returning message_id",
            (campaign_id, contact_id, phone, at, key),
        ).fetchone()[0]
        if receipt:
            conn.execute(
                "insert into message_status_events (message_id, provider, status, occurred_at, received_at)"
                " values (?, 'sandbox', 'delivered', ?2, ?2)",
                (message_id, at),
            )
    conn.close()
    return message_id


def add_order(db: Path, external_id: str, message_id: int, hours_after: float) -> None:
    """A paid order by the recipient of ``message_id``, ``hours_after`` its sending."""
    conn = sqlite3.connect(db)
    with conn:
        contact_id, sent = conn.execute(
            "select contact_id, submitted_at from messages where message_id = ?", (message_id,)
        ).fetchone()
        conn.execute(
            "insert into orders (external_id, contact_id, ordered_at, amount, currency, category, status)"
            " values (?, ?, ?, 2500, 'RUB', 'test', 'paid')",
            (
                external_id,
                contact_id,
                (datetime.strptime(sent, FMT) + timedelta(hours=hours_after)).strftime(FMT),
            ),
        )
    conn.close()


def add_late_receipt(db: Path, message_id: int) -> None:
    """A delivery receipt for ``message_id`` that reaches the store only now, stamped with the
    moment it happened (a minute after sending) as a provider's backfill is."""
    conn = sqlite3.connect(db)
    with conn:
        sent = conn.execute(
            "select submitted_at from messages where message_id = ?", (message_id,)
        ).fetchone()[0]
        at = (datetime.strptime(sent, FMT) + timedelta(minutes=1)).strftime(FMT)
        conn.execute(
            "insert into message_status_events (message_id, provider, status, occurred_at, received_at)"
            " values (?, 'sandbox', 'delivered', ?2, ?2)",
            (message_id, at),
        )
    conn.close()


def max_keys(db: Path) -> dict[str, int]:
    """The largest key of each table a refresh appends from, and of the outbox."""
    conn = sqlite3.connect(db)
    keys = {
        table: conn.execute(f"select coalesce(max({key}), 0) from {table}").fetchone()[0]
        for table, key in {**dbt_plugin.APPEND_ONLY, "messages": "message_id"}.items()
    }
    conn.close()
    return keys


def settled_recent_message(db: Path, before: dict[str, int], changed: list[int], since: datetime) -> int:
    """A message with a receipt received after ``since`` (so the timestamp rule would recompute
    it) that nothing written after ``before`` (the keys from :func:`max_keys`) or ``changed``
    concerns: not its contact, nor its number."""
    conn = sqlite3.connect(db)
    row = conn.execute(
        f"""
        select m.message_id from messages m
        where m.state = 'submitted' and m.message_id <= :msg
            and exists (select 1 from message_status_events e where e.message_id = m.message_id
                and e.received_at >= :since)
            and not exists (select 1 from messages o where o.contact_id = m.contact_id and (
                o.message_id > :msg or o.message_id in ({", ".join(map(str, changed)) or "null"})
                or o.message_id in (select message_id from message_status_events where event_id > :mse
                    union select message_id from clicks where click_id > :clicks
                    union select in_reply_to from inbound_messages where inbound_id > :inbound)))
            and not exists (select 1 from orders where contact_id = m.contact_id and order_id > :orders)
            and not exists (select 1 from consent_events where phone_e164 = m.phone_e164 and event_id > :consent)
            and not exists (select 1 from messages o where o.phone_e164 = m.phone_e164
                and o.contact_id <> m.contact_id)
        order by m.message_id desc limit 1
        """,
        {
            "msg": before["messages"], "mse": before["message_status_events"], "clicks": before["clicks"],
            "inbound": before["inbound_messages"], "orders": before["orders"],
            "consent": before["consent_events"], "since": since.strftime(FMT),
        },
    ).fetchone()  # fmt: skip
    conn.close()
    assert row, f"the demo base has no message with a receipt since {since:{FMT}} that nothing new concerns"
    return row[0]


def add_activity(db: Path, now: datetime) -> dict[str, int]:
    """What comes back between two builds: receipts, clicks, replies, orders, an opt-out,
    an outbox row that changes state and a new campaign with a holdout. Returns the ids
    the assertions look at."""
    ts = lambda t: t.strftime(FMT)  # noqa: E731
    conn = sqlite3.connect(db)
    with conn:
        q = conn.execute
        # receipts for messages still waiting for one: half delivered, half undelivered
        waiting = [r[0] for r in q(
            "select message_id from messages where state = 'submitted' and message_id not in"
            " (select message_id from message_status_events where status in ('delivered', 'undelivered', 'failed'))"
            " order by message_id limit 20"
        )]  # fmt: skip
        for i, message_id in enumerate(waiting):
            status, code = ("delivered", None) if i % 2 == 0 else ("undelivered", "30003")
            q(
                "insert into message_status_events (message_id, provider, status, error_code, occurred_at,"
                " received_at) values (?, 'sandbox', ?, ?, ?, ?)",
                (message_id, status, code, ts(now - timedelta(minutes=5)), ts(now - timedelta(minutes=4))),
            )
        # clicks on delivered promotional messages, each followed by an order an hour later
        clicked = q(
            "select m.message_id, m.contact_id from messages m join campaigns c using (campaign_id)"
            " where c.kind = 'promo' and m.state = 'submitted' and exists (select 1 from"
            " message_status_events e where e.message_id = m.message_id and e.status = 'delivered')"
            " and m.idempotency_key not like 'test:old%' order by m.message_id desc limit 15"
        ).fetchall()
        for n, (message_id, contact_id) in enumerate(clicked):
            q(
                "insert into clicks (token, message_id, clicked_at, user_agent) values (?, ?, ?, 'test')",
                (f"test{n}", message_id, ts(now - timedelta(hours=2))),
            )
            q(
                "insert into orders (external_id, contact_id, ordered_at, amount, currency, category, status)"
                " values (?, ?, ?, 1234.5, 'RUB', 'test', 'paid')",
                (f"TEST-CLICK-{n}", contact_id, ts(now - timedelta(hours=1))),
            )
        # an order alone (nothing else happened to that contact) two days after a delivery
        recent = q(
            "select m.contact_id, max(e.occurred_at) from messages m join campaigns c using (campaign_id)"
            " join message_status_events e on e.message_id = m.message_id and e.status = 'delivered'"
            " where c.kind = 'promo' and m.idempotency_key not like 'test:old%' group by 1 order by 2 desc limit 10"
        ).fetchall()
        for n, (contact_id, delivered_at) in enumerate(recent):
            at = datetime.strptime(delivered_at, FMT) + timedelta(hours=48)
            q(
                "insert into orders (external_id, contact_id, ordered_at, amount, currency, category, status)"
                " values (?, ?, ?, 777, 'RUB', 'test', 'paid')",
                (f"TEST-LATE-{n}", contact_id, ts(min(at, now))),
            )
        # an order loaded late, 60 h after the old delivery (add_old_delivery): only the order
        # itself can tell the refresh to look at that message again
        old = q(
            "select message_id, contact_id, submitted_at from messages where idempotency_key = 'test:old'"
        ).fetchone()
        q(
            "insert into orders (external_id, contact_id, ordered_at, amount, currency, category, status)"
            " values ('TEST-LOADED-LATE', ?, ?, 4321, 'RUB', 'test', 'paid')",
            (old[1], ts(datetime.strptime(old[2], FMT) + timedelta(hours=60))),
        )
        # replies: a complaint, a free-text opt-out, a STOP, a neutral answer
        replied = [r[0] for r in q(
            "select message_id from messages where state = 'submitted' order by message_id limit 4"
        )]  # fmt: skip
        bodies = [("This is spam, who gave you my number?", None), ("не пишите мне больше", None),
                  ("STOP", "stop"), ("Thanks, see you Saturday", None)]  # fmt: skip
        for n, (message_id, (body, keyword)) in enumerate(zip(replied, bodies, strict=True)):
            q(
                "insert into inbound_messages (provider, provider_message_id, from_e164, body, keyword,"
                " contact_id, in_reply_to, received_at) select 'sandbox', ?, phone_e164, ?, ?, contact_id,"
                " message_id, ? from messages where message_id = ?",
                (f"TEST-IN-{n}", body, keyword, ts(now - timedelta(minutes=30)), message_id),
            )
        phone = q("select phone_e164 from messages where message_id = ?", (replied[2],)).fetchone()[0]
        q(
            "insert into consent_events (event_key, phone_e164, purpose, action, source, occurred_at, recorded_at)"
            " values ('test:stop', ?, 'marketing', 'opt_out', 'keyword_reply', ?, ?)",
            (phone, ts(now - timedelta(minutes=30)), ts(now - timedelta(minutes=29))),
        )
        # an outbox row that was planned long ago goes out now and is delivered
        late = q(
            "select message_id from messages where state = 'planned' order by message_id limit 1"
        ).fetchone()
        if late:
            q("update messages set state = 'submitted', submitted_at = ?, attempts = 1 where message_id = ?",
              (ts(now - timedelta(hours=2)), late[0]))  # fmt: skip
            q(
                "insert into message_status_events (message_id, provider, status, occurred_at, received_at)"
                " values (?, 'sandbox', 'delivered', ?, ?)",
                (late[0], ts(now - timedelta(hours=2)), ts(now - timedelta(hours=2))),
            )
        # a new promotional campaign: 30 sent and delivered, 10 held out; orders on both sides
        campaign_id = q(
            "insert into campaigns (name, kind, status, created_at, launched_at) values"
            " ('Refresh test', 'promo', 'running', ?, ?) returning campaign_id",
            (ts(now - timedelta(hours=6)), ts(now - timedelta(hours=6))),
        ).fetchone()[0]
        # recipients nothing else happened to lately, so each order has one touch to go to
        quiet = ts(now - timedelta(days=10))
        contacts = [r[0] for r in q(
            "select contact_id from contacts where contact_id not in (select contact_id from orders where"
            " ordered_at >= ?1) and contact_id not in (select contact_id from messages where planned_at >= ?1)"
            " order by contact_id desc limit 40", (quiet,),
        )]  # fmt: skip
        assert len(contacts) == 40
        for n, contact_id in enumerate(contacts):
            holdout = n >= 30
            message_id = q(
                "insert into messages (idempotency_key, campaign_id, variant, contact_id, phone_e164, state,"
                " planned_at, submitted_at, price, currency, segments, provider) select ?, ?, ?, contact_id,"
                " phone_e164, ?, ?, ?, ?, 'RUB', ?, ? from contacts where contact_id = ? returning message_id",
                (f"{campaign_id}:{contact_id}", campaign_id, "holdout" if holdout else "A",
                 "holdout" if holdout else "submitted", ts(now - timedelta(hours=5)),
                 None if holdout else ts(now - timedelta(hours=5)), None if holdout else 4.2,
                 None if holdout else 1, None if holdout else "sandbox", contact_id),
            ).fetchone()[0]  # fmt: skip
            if not holdout:
                q(
                    "insert into message_status_events (message_id, provider, status, occurred_at, received_at)"
                    " values (?, 'sandbox', 'delivered', ?, ?)",
                    (message_id, ts(now - timedelta(hours=5)), ts(now - timedelta(hours=5))),
                )
            if n % 3 == 0:
                q(
                    "insert into orders (external_id, contact_id, ordered_at, amount, currency, category, status)"
                    " values (?, ?, ?, 500, 'RUB', 'test', 'paid')",
                    (f"TEST-NEW-{n}", contact_id, ts(now - timedelta(hours=3))),
                )
    conn.close()
    return {
        "campaign_id": campaign_id,
        "loaded_late": old[0],
        "complaint": replied[0],
        "opt_out_text": replied[1],
        "stop": replied[2],
    }


def change_outbox(db: Path, now: datetime) -> list[int]:
    """Outbox rows changing as the writers change them: a rejected message re-planned (retry),
    a planned one sent. Returns their ids."""
    conn = sqlite3.connect(db)
    with conn:
        rejected = conn.execute(
            "select message_id from messages where state = 'rejected' order by message_id limit 2"
        )
        retried = [r[0] for r in rejected]
        conn.executemany(
            "update messages set state = 'planned', skip_reason = null, error_code = null where message_id = ?",
            [(m,) for m in retried],
        )
        planned = conn.execute(
            "select message_id from messages where state = 'planned' and message_id not in"
            f" ({', '.join(map(str, retried)) or 'null'}) order by message_id limit 1"
        ).fetchall()
        for (message_id,) in planned:
            conn.execute(
                "update messages set state = 'submitted', submitted_at = ?, attempts = attempts + 1, provider ="
                " 'sandbox' where message_id = ?",
                ((now - timedelta(minutes=20)).strftime(FMT), message_id),
            )
    conn.close()
    return retried + [m for (m,) in planned]


def erase_and_delete(db: Path, keep: set[int]) -> int:
    """Between the refresh and the next build: a contact with messages is erased and one
    suppressed outbox row (it touches no other message's attribution) is deleted, neither
    of them concerning the messages ``keep``. Returns the erased contact."""
    conn = store.connect(db)
    contact_id = conn.execute(
        "select contact_id from contacts where phone_valid = 1 and contact_id in (select contact_id from"
        " messages where state = 'submitted') and contact_id not in (select contact_id from messages where"
        f" message_id in ({', '.join(map(str, keep))})) order by contact_id desc limit 1"
    ).fetchone()[0]
    erasure.erase(conn, contact_id=contact_id, requested_by="test")
    with store.transaction(conn):
        conn.execute(
            "delete from messages where message_id = (select max(message_id) from messages where state ="
            f" 'suppressed' and message_id not in ({', '.join(map(str, keep))}))"
        )
    conn.close()
    return contact_id


def quiet_message(db: Path, since: datetime) -> int:
    """A message whose contact and number have had nothing happen since ``since``."""
    conn = sqlite3.connect(db)
    cutoff = since.strftime(FMT)
    row = conn.execute(
        """
        select m.message_id from messages m
        where m.planned_at < ?1
            and not exists (select 1 from messages o where o.contact_id = m.contact_id
                and (o.planned_at >= ?1 or o.submitted_at >= ?1 or o.message_id in (
                    select message_id from message_status_events where received_at >= ?1 or occurred_at >= ?1
                    union select message_id from clicks where clicked_at >= ?1
                    union select in_reply_to from inbound_messages where received_at >= ?1)))
            and not exists (select 1 from orders where contact_id = m.contact_id and ordered_at >= ?1)
            and not exists (select 1 from consent_events where phone_e164 = m.phone_e164
                and (occurred_at >= ?1 or recorded_at >= ?1))
        order by m.message_id limit 1
        """,
        (cutoff,),
    ).fetchone()
    conn.close()
    assert row, f"the demo base has no message quiet since {cutoff}"
    return row[0]


@pytest.fixture(scope="module")
def refreshed(built_home: Path, tmp_path_factory: pytest.TempPathFactory):
    """The same store built after new activity: incrementally on top of the session's
    snapshot (two refreshes, then a whole build after an erasure and a deleted outbox row),
    and from scratch (--full-refresh). A row nothing touched is tampered with in the copied
    snapshot first: if it survives, the refresh did not recompute everything. ``loads`` holds
    how each incremental build loaded the store, and ``store_then`` a copy of the store as the
    second refresh read it."""
    now = datetime.now(UTC).replace(microsecond=0, tzinfo=None)  # the store keeps naive UTC
    incremental = copy_home(built_home, tmp_path_factory.mktemp("incremental"), with_snapshot=True)
    db = incremental / "ops.sqlite"
    add_old_delivery(db, now)
    # late data, older than the timestamp rule's lookback (216 h) when it arrives: a receipt
    # for a message sent 14 days ago, whose recipient ordered a day later, and an order 11 days
    # ago, two days after a delivery 13 days ago
    late_receipt = add_old_delivery(db, now, key="test:old-receipt", days=14, receipt=False)
    add_order(db, "TEST-BEFORE-RECEIPT", late_receipt, hours_after=24)
    late_order = add_old_delivery(db, now, key="test:old-order", days=13)
    first = warehouse.refresh(incremental)  # the campaign-side refresh, on top of the session's snapshot
    before = max_keys(db)
    add_late_receipt(db, late_receipt)  # first: add_activity answers the messages still waiting
    ids = add_activity(db, now)
    ids["changed"] = change_outbox(db, now)
    add_order(db, "TEST-10-DAYS-LATE", late_order, hours_after=48)
    ids["late_receipt"], ids["late_order"] = late_receipt, late_order
    # a message the timestamp rule would recompute but nothing this refresh loads concerns:
    # tampered with, it must come out of the second refresh as it was
    ids["not_loaded"] = settled_recent_message(db, before, ids["changed"], now - timedelta(days=8))
    with duckdb.connect(str(warehouse.current(incremental).path)) as conn:
        conn.execute("update fct_messages set replies = -2 where message_id = ?", [ids["not_loaded"]])
    second = warehouse.refresh(incremental)  # receipts, clicks, replies, orders, opt-outs, changed rows
    store_then = copy_home(incremental, tmp_path_factory.mktemp("store_then"), with_snapshot=False)
    # the build after the erasure below starts from an empty file and deletes every older
    # snapshot (issue 16): the second refresh's snapshot is kept aside for the tests that read it
    kept = tmp_path_factory.mktemp("second") / second.path.name
    shutil.copyfile(second.path, kept)
    second = replace(second, path=kept)
    untouched = quiet_message(db, now - timedelta(days=20))
    keep = {untouched, ids["loaded_late"], ids["complaint"], ids["opt_out_text"], ids["stop"]}
    keep |= {ids["late_receipt"], ids["late_order"], ids["not_loaded"]}
    ids["erased"] = erase_and_delete(db, keep)
    with duckdb.connect(str(warehouse.current(incremental).path)) as conn:
        conn.execute("update fct_messages set replies = -1 where message_id = ?", [untouched])
    last = warehouse.build(incremental)
    full = copy_home(incremental, tmp_path_factory.mktemp("full"), with_snapshot=False)
    warehouse.build(full, full_refresh=True)
    loads = {name: {load.table: load for load in snap.loads} for name, snap in
             [("first", first), ("second", second), ("last", last)]}  # fmt: skip
    runs = {"loads": loads, "second": second, "store_then": store_then, "last_purged": last.purged}
    return incremental, full, untouched, ids, runs


PHONE = "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 Mobile/15E148"


def add_settling_campaign(db: Path, now: datetime) -> dict[str, int]:
    """A promotion sent 110 hours ago to 15 quiet recipients: 10 delivered, 3 with only a
    'sent' receipt, 2 with none (both awaiting their final receipt). Its links were fetched by
    previews and people: message ``head_then_person`` by a HEAD and a Slackbot GET within
    seconds of delivery, then by its recipient 20 minutes later; ``preview_only`` only by
    WhatsApp's preview, and its recipient ordered 105 h after delivery (beyond the delivery's
    window, inside a click's); ``no_agent`` by a GET without a user agent. Returns the ids."""
    ts = lambda t: t.strftime(FMT)  # noqa: E731
    sent = now - timedelta(hours=110)
    delivered = sent + timedelta(seconds=30)
    quiet = ts(now - timedelta(days=20))
    conn = sqlite3.connect(db)
    with conn:
        q = conn.execute
        contacts = [r[0] for r in q(
            "select contact_id from contacts where phone_valid = 1 and contact_id not in (select contact_id"
            " from orders where ordered_at >= ?1) and contact_id not in (select contact_id from messages"
            " where planned_at >= ?1) order by contact_id limit 15", (quiet,),
        )]  # fmt: skip
        assert len(contacts) == 15
        campaign_id = q(
            "insert into campaigns (name, kind, status, created_at, launched_at) values"
            " ('Receipts still coming', 'promo', 'running', ?1, ?1) returning campaign_id",
            (ts(sent),),
        ).fetchone()[0]
        ids = []
        for n, contact_id in enumerate(contacts):
            message_id = q(
                "insert into messages (idempotency_key, campaign_id, variant, contact_id, phone_e164, state,"
                " planned_at, submitted_at, price, currency, segments, provider, attempts) select ?, ?, 'A',"
                " contact_id, phone_e164, 'submitted', ?3, ?3, 4.2, 'RUB', 1, 'sandbox', 1 from contacts"
                " where contact_id = ? returning message_id",
                (f"{campaign_id}:{contact_id}", campaign_id, ts(sent), contact_id),
            ).fetchone()[0]
            ids.append(message_id)
            statuses = ["sent", "delivered"] if n < 10 else ["sent"] if n < 13 else []
            for status in statuses:
                at = ts(delivered if status == "delivered" else sent + timedelta(seconds=2))
                q(
                    "insert into message_status_events (message_id, provider, status, occurred_at, received_at)"
                    " values (?, 'sandbox', ?, ?3, ?3)",
                    (message_id, status, at),
                )
        head_then_person, preview_only, no_agent = ids[0], ids[1], ids[2]
        clicks = [
            (head_then_person, delivered + timedelta(seconds=1), PHONE, "HEAD"),
            (head_then_person, delivered + timedelta(seconds=2), "Slackbot-LinkExpanding 1.0", "GET"),
            (head_then_person, delivered + timedelta(minutes=20), PHONE, "GET"),
            (preview_only, delivered + timedelta(seconds=3), "WhatsApp/2.24.25.78 A", "GET"),
            (no_agent, delivered + timedelta(hours=1), None, "GET"),
        ]
        for n, (message_id, at, agent, method) in enumerate(clicks):
            q(
                "insert into clicks (token, message_id, clicked_at, user_agent, method) values (?, ?, ?, ?, ?)",
                (f"settle{n}", message_id, ts(at), agent, method),
            )
        q(
            "insert into orders (external_id, contact_id, ordered_at, amount, currency, category, status)"
            " select 'TEST-AFTER-PREVIEW', contact_id, ?, 990, 'RUB', 'test', 'paid' from messages"
            " where message_id = ?",
            (ts(delivered + timedelta(hours=105)), preview_only),
        )
    conn.close()
    return {
        "campaign_id": campaign_id,
        "head_then_person": head_then_person,
        "preview_only": preview_only,
        "no_agent": no_agent,
        "first_person_click": delivered + timedelta(minutes=20),
    }


@pytest.fixture(scope="module")
def settling(built_home: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The demo store plus :func:`add_settling_campaign`, built from scratch."""
    now = datetime.now(UTC).replace(microsecond=0, tzinfo=None)
    home = copy_home(built_home, tmp_path_factory.mktemp("settling"), with_snapshot=False)
    ids = add_settling_campaign(home / "ops.sqlite", now)
    warehouse.build(home)
    return home, ids


def frame(home: Path, table: str, key: str) -> pd.DataFrame:
    return read(home, f"select * from {table} order by {key}").reset_index(drop=True)


def test_incremental_refresh_gives_the_same_messages_as_a_full_refresh(refreshed):
    """Two refreshes and a build after an erasure give what a build from scratch gives. The build
    after the erasure starts from an empty file (nothing of the old one may survive it): the row
    tampered with in the old snapshot comes out recomputed."""
    incremental, full, untouched, _, runs = refreshed
    got, want = frame(incremental, "fct_messages", "message_id"), frame(full, "fct_messages", "message_id")
    assert got.loc[got["message_id"] == untouched, "replies"].tolist() != [-1], (
        "the old snapshot was carried over"
    )
    assert runs["last_purged"], "the build after the erasure deleted no older warehouse file"
    pd.testing.assert_frame_equal(got, want)


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ("fct_campaign_performance", "campaign_id, variant"),
        ("fct_campaign_uplift", "campaign_id"),
        ("fct_replies", "inbound_id"),
        ("fct_daily_kpis", "day"),
    ],
)
def test_incremental_refresh_gives_the_same_campaign_marts_as_a_full_refresh(refreshed, table, key):
    incremental, full, _, _, _ = refreshed
    got, want = frame(incremental, table, key), frame(full, table, key)
    if table == "fct_campaign_performance":  # the tampered row only counts replies
        got, want = got.drop(columns="replies"), want.drop(columns="replies")
    pd.testing.assert_frame_equal(got, want)


def test_refreshes_load_only_what_changed_and_a_build_after_an_erasure_loads_whole(refreshed):
    _, _, _, _, runs = refreshed
    loads = runs["loads"]
    assert set(loads["second"]) == set(warehouse.REFRESH_SOURCES)  # a refresh reads only its tables
    for name in ("first", "second"):
        assert {t: load.how for t, load in loads[name].items() if t in dbt_plugin.APPEND_ONLY} == dict.fromkeys(
            set(dbt_plugin.APPEND_ONLY) & set(warehouse.REFRESH_SOURCES), "append"
        ), name  # fmt: skip
        assert loads[name]["messages"].how == "merge", name
    second = loads["second"]
    # what add_activity and change_outbox wrote: 20 receipts and more, 15 clicks, 4 replies,
    # orders, an opt-out; the outbox rows re-read include the new campaign's 40 and the changed ones
    assert second["clicks"].rows == 15 and second["inbound_messages"].rows == 4
    assert second["consent_events"].rows == 1 and second["orders"].rows >= 15 + 1 + 14
    assert second["message_status_events"].rows >= 30 and second["messages"].rows >= 40
    last = loads["last"]
    assert set(last) == set(dbt_plugin.SOURCES)
    assert {last[t].reason for t in ("orders", "clicks", "messages")} == {"an erasure since the last load"}


def test_a_refreshed_snapshot_holds_the_store_as_it_was_read(refreshed):
    """Every table the second refresh loaded incrementally equals the store it read, row for row."""
    _, _, _, _, runs = refreshed
    db = str(store.store_path(runs["store_then"]))
    with duckdb.connect(str(runs["second"].path), read_only=True) as conn:
        for table in warehouse.REFRESH_SOURCES:
            got = sorted(conn.execute(f"select * from ops.{table}").fetchall(), key=repr)
            want = sorted((tuple(r.values()) for r in dbt_plugin.read_table(db, table).to_pylist()), key=repr)
            assert got == want, table


def test_the_erasure_reaches_every_table_of_the_snapshot(refreshed):
    incremental, _, _, ids, _ = refreshed
    contact = read(incremental, f"select * from stg_ops__contacts where contact_id = {ids['erased']}").iloc[0]
    assert contact.phone_e164.startswith(erasure.PSEUDONYM_PREFIX)
    phones = read(
        incremental, f"select distinct phone_e164 from fct_messages where contact_id = {ids['erased']}"
    )
    assert phones["phone_e164"].str.startswith(erasure.PSEUDONYM_PREFIX).all()


def test_refresh_sees_the_new_campaign_its_holdout_and_their_orders(refreshed):
    incremental, _, _, ids, _ = refreshed
    perf = read(
        incremental, f"select * from fct_campaign_performance where campaign_id = {ids['campaign_id']}"
    )
    by_variant = perf.set_index("variant")
    assert by_variant.loc["A", "delivered"] == 30 and by_variant.loc["holdout", "audience"] == 10
    # every 3rd recipient ordered 2 h after the send: 10 of the 30 sent, 4 of the 10 held out
    assert by_variant.loc["A", "converted_recipients"] == 10
    assert by_variant.loc["holdout", "converted_recipients"] == 4
    uplift = read(
        incremental, f"select * from fct_campaign_uplift where campaign_id = {ids['campaign_id']}"
    ).iloc[0]
    assert uplift.uplift == pytest.approx(10 / 30 - 4 / 10)


def test_a_click_wins_the_order_and_is_named_as_the_touch(refreshed):
    incremental, _, _, _, _ = refreshed
    clicked = read(
        incremental,
        "select attributed_touch, revenue from fct_messages where message_id in (select message_id from"
        " stg_ops__clicks where link_token like 'test%')",
    )
    assert len(clicked) == 15
    assert set(clicked["attributed_touch"]) == {"click"}
    assert (clicked["revenue"] >= 1234.5).all()


def test_an_order_loaded_late_is_attributed_to_an_older_delivery(refreshed):
    """Nothing but the order itself marks this message for the refresh."""
    incremental, _, _, ids, _ = refreshed
    row = read(incremental, f"select * from fct_messages where message_id = {ids['loaded_late']}").iloc[0]
    assert (row.attributed_touch, row.revenue) == ("delivery", 4321)


def test_a_receipt_arriving_two_weeks_late_delivers_and_converts_its_message(refreshed):
    """The receipt is stamped 14 days back, beyond any lookback: only its load marks it."""
    incremental, _, _, ids, _ = refreshed
    row = read(incremental, f"select * from fct_messages where message_id = {ids['late_receipt']}").iloc[0]
    assert (row.status, row.attributed_touch, row.revenue) == ("delivered", "delivery", 2500)


def test_an_order_loaded_ten_days_late_is_attributed_without_a_full_refresh(refreshed):
    incremental, _, _, ids, _ = refreshed
    row = read(incremental, f"select * from fct_messages where message_id = {ids['late_order']}").iloc[0]
    assert (row.attributed_touch, row.revenue) == ("delivery", 2500)


def test_a_refresh_recomputes_only_what_its_loads_concern(refreshed):
    """A recent message nothing new concerns keeps the value tampered into the snapshot the
    second refresh started from (the timestamp rule would have recomputed it)."""
    _, _, _, ids, runs = refreshed
    with duckdb.connect(str(runs["second"].path), read_only=True) as conn:
        [(replies,)] = conn.execute(
            "select replies from fct_messages where message_id = ?", [ids["not_loaded"]]
        ).fetchall()
    assert replies == -2


def test_replies_are_classified_as_complaints_or_not(refreshed):
    incremental, _, _, ids, _ = refreshed
    replies = read(
        incremental, "select message_id, keyword, is_complaint, complaint_kind from fct_replies"
        " where message_id is not null and inbound_id in (select inbound_id from stg_ops__inbound_messages"
        " where provider_message_id like 'TEST-IN-%')",
    ).set_index("message_id")  # fmt: skip
    assert replies.loc[ids["complaint"], "complaint_kind"] == "abuse"
    assert replies.loc[ids["opt_out_text"], "complaint_kind"] == "opt_out_text"
    assert not replies.loc[ids["stop"], "is_complaint"]  # a keyword is an opt-out, not a complaint
    assert replies["is_complaint"].sum() == 2


def test_complaints_in_campaign_performance_match_the_replies(built_home):
    perf = read(built_home, "select sum(complaints) n from fct_campaign_performance").iloc[0, 0]
    replies = read(
        built_home,
        "select count(distinct message_id) from fct_replies where is_complaint and message_id is not null",
    ).iloc[0, 0]
    assert perf == replies


def test_rate_intervals_are_wilson_score_intervals(built_home):
    perf = read(built_home, "select * from fct_campaign_performance")
    assert len(perf) > 5
    for row in perf.itertuples():
        for low, high, successes, trials in [
            (row.delivery_rate_low, row.delivery_rate_high, row.delivered, row.settled),
            (row.click_through_rate_low, row.click_through_rate_high, row.clicks, row.delivered),
            (row.opt_out_rate_low, row.opt_out_rate_high, row.opt_outs, row.delivered),
            (row.complaint_rate_low, row.complaint_rate_high, row.complaints, row.delivered),
        ]:
            want = wilson(min(successes, trials), trials)
            if trials == 0:
                assert pd.isna(low) and pd.isna(high)
            else:
                assert (low, high) == pytest.approx(want, abs=1e-12)
    assert wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    holdout = perf[perf["holdout"] > 0].iloc[0]
    assert (holdout.conversion_rate_low, holdout.conversion_rate_high) == pytest.approx(
        wilson(holdout.converted_recipients, holdout.audience)
    )


def test_delivery_rate_counts_settled_messages_and_awaiting_receipt_stands_apart(settling):
    """10 delivered, 5 still waiting for their final receipt, none failed: 100% of the settled
    are delivered (not 10 of 15), and the 5 are awaiting receipt, not "not delivered"."""
    home, ids = settling
    perf = read(home, f"select * from fct_campaign_performance where campaign_id = {ids['campaign_id']}")
    assert len(perf) == 1
    row = perf.iloc[0]
    assert (row.sent, row.delivered, row.undelivered, row.failed) == (15, 10, 0, 0)
    assert (row.settled, row.awaiting_receipt) == (10, 5)
    assert row.delivery_rate == 1.0
    assert (row.delivery_rate_low, row.delivery_rate_high) == pytest.approx(wilson(10, 10))
    messages = read(home, f"select * from fct_messages where campaign_id = {ids['campaign_id']}")
    assert int(messages["is_settled"].sum()) == 10 and int(messages["is_awaiting_receipt"].sum()) == 5
    assert set(messages.loc[messages["is_awaiting_receipt"], "status"]) == {"sent", "queued"}
    kpis = read(home, "select sum(messages_sent) sent, sum(settled) settled, sum(awaiting_receipt) awaiting"
                      " from fct_daily_kpis").iloc[0]  # fmt: skip
    assert kpis.sent == kpis.settled + kpis.awaiting


def test_link_previews_and_head_requests_are_kept_out_of_ctr(settling):
    """A HEAD and a Slackbot GET seconds after delivery, and a WhatsApp preview alone, are
    recorded as prefetches; only the recipient's own click and a GET without a user agent
    count. CTR is 2 of 10 delivered, not 3."""
    home, ids = settling
    row = read(home, f"select * from fct_campaign_performance where campaign_id = {ids['campaign_id']}").iloc[
        0
    ]
    assert (row.clicks, row.total_clicks, row.prefetch_clicks) == (2, 2, 3)
    assert row.click_through_rate == pytest.approx(0.2)
    messages = read(home, f"select * from fct_messages where campaign_id = {ids['campaign_id']}").set_index(
        "message_id"
    )
    both = messages.loc[ids["head_then_person"]]
    assert (both.clicked, both.clicks, both.prefetch_clicks) == (True, 1, 2)
    assert both.first_clicked_at == ids["first_person_click"]  # not the HEAD a second after delivery
    preview = messages.loc[ids["preview_only"]]
    assert (preview.clicked, preview.clicks, preview.prefetch_clicks) == (False, 0, 1)
    assert pd.isna(preview.first_clicked_at)
    # the preview is no touch: an order 105 h after the delivery is beyond its 72 h window
    assert (preview.converted, preview.revenue) == (False, 0)
    no_agent = messages.loc[ids["no_agent"]]
    assert (no_agent.clicked, no_agent.clicks, no_agent.prefetch_clicks) == (True, 1, 0)
    classified = read(home, "select method, is_prefetch, count(*) n from int_clicks_classified"
                            " where link_token like 'settle%' group by all order by all")  # fmt: skip
    assert classified.values.tolist() == [["GET", False, 2], ["GET", True, 2], ["HEAD", True, 1]]


def test_sent_is_settled_plus_awaiting_receipt_in_every_campaign(built_home):
    perf = read(built_home, "select * from fct_campaign_performance")
    assert (perf["sent"] == perf["settled"] + perf["awaiting_receipt"]).all()
    assert (perf["settled"] == perf["delivered"] + perf["undelivered"] + perf["failed"]).all()
    settled = perf[perf["settled"] > 0]
    assert settled["delivery_rate"].tolist() == pytest.approx(
        (settled["delivered"] / settled["settled"]).tolist()
    )
    assert perf.loc[perf["settled"] == 0, "delivery_rate"].isna().all()


def test_every_prefetch_in_the_demo_is_counted_apart_from_people(built_home):
    """The demo's link previews (HEAD, or a GET from a preview's agent) are all in
    prefetch_clicks and none in clicks."""
    ops = sqlite3.connect(store.store_path(built_home))
    agents = ", ".join("?" * len(demo.PREFETCH_AGENTS))
    raw = ops.execute(
        f"select count(*) filter (where method = 'HEAD' or user_agent in ({agents})), count(*) from clicks",
        demo.PREFETCH_AGENTS,
    ).fetchone()
    ops.close()
    marts = read(
        built_home, "select sum(prefetch_clicks) prefetches, sum(clicks) clicks from fct_messages"
    ).iloc[0]
    assert raw[0] > 0
    assert (marts.prefetches, marts.clicks) == (raw[0], raw[1] - raw[0])


def test_cost_per_conversion_and_roi(built_home):
    perf = read(built_home, "select * from fct_campaign_performance")
    paid = perf[(perf["cost"] > 0) & (perf["conversions"] > 0)]
    assert not paid.empty
    assert paid["cost_per_conversion"].tolist() == pytest.approx(
        (paid["cost"] / paid["conversions"]).tolist()
    )
    assert paid["roi"].tolist() == pytest.approx(((paid["revenue"] - paid["cost"]) / paid["cost"]).tolist())
    assert perf.loc[perf["cost"] == 0, "roi"].isna().all()
    assert perf.loc[perf["conversions"] == 0, "cost_per_conversion"].isna().all()


def test_uplift_is_treatment_minus_holdout_with_a_newcombe_interval(built_home):
    uplift = read(built_home, "select * from fct_campaign_uplift")
    perf = read(built_home, "select * from fct_campaign_performance")
    assert set(uplift["campaign_id"]) == set(perf.loc[perf["holdout"] > 0, "campaign_id"])
    for row in uplift.itertuples():
        camp = perf[perf["campaign_id"] == row.campaign_id]
        treated, held = camp[camp["holdout"] == 0], camp[camp["holdout"] > 0]
        n1, x1 = int(treated["sent"].sum()), int(treated["converted_recipients"].sum())
        n2, x2 = int(held["audience"].sum()), int(held["converted_recipients"].sum())
        assert (row.treatment_recipients, row.treatment_converted, row.holdout_recipients, row.holdout_converted) == (
            n1, x1, n2, x2)  # fmt: skip
        p1, p2 = x1 / n1, x2 / n2
        (l1, u1), (l2, u2) = wilson(x1, n1), wilson(x2, n2)
        assert row.uplift == pytest.approx(p1 - p2)
        assert row.uplift_low == pytest.approx(p1 - p2 - math.hypot(p1 - l1, u2 - p2))
        assert row.uplift_high == pytest.approx(p1 - p2 + math.hypot(u1 - p1, p2 - l2))
        assert row.uplift_low <= row.uplift <= row.uplift_high
        assert row.incremental_conversions == pytest.approx((p1 - p2) * n1)
        revenue1, revenue2 = treated["revenue"].sum(), held["revenue"].sum()
        assert row.incremental_revenue == pytest.approx(revenue1 - revenue2 / n2 * n1)


def test_segment_performance_adds_up_to_the_campaign_for_every_attribute(built_home):
    segments = read(built_home, "select * from fct_campaign_segment_performance")
    assert set(segments["attribute"]) == {"country", "rfm_segment", "gender", "age_band", "region"}
    assert not segments["value"].isna().any()
    perf = read(
        built_home,
        "select campaign_id, sum(sent) sent, sum(delivered) delivered, sum(clicks) clicks,"
        " sum(converted_recipients) conversions, sum(cost) cost from fct_campaign_performance"
        " where holdout = 0 group by 1",
    ).set_index("campaign_id")
    for attribute, part in segments.groupby("attribute"):
        totals = part.groupby("campaign_id")[["sent", "delivered", "clicks", "conversions", "cost"]].sum()
        totals = totals.loc[perf.index]
        for column in ["sent", "delivered", "clicks", "conversions"]:
            assert totals[column].tolist() == perf[column].tolist(), (attribute, column)
        assert totals["cost"].tolist() == pytest.approx(perf["cost"].tolist())
    rfm = set(segments.loc[segments["attribute"] == "rfm_segment", "value"])
    assert rfm <= {
        "champions",
        "new",
        "loyal",
        "at_risk",
        "hibernating",
        "needs_attention",
        "no_orders",
        "unknown",
    }


def test_replies_mart_has_every_inbound_message(built_home):
    ops = sqlite3.connect(store.store_path(built_home))
    raw = ops.execute("select count(*), count(in_reply_to) from inbound_messages").fetchone()
    ops.close()
    replies = read(built_home, "select count(*) n, count(campaign_id) linked from fct_replies").iloc[0]
    assert (replies.n, replies.linked) == raw


def test_error_codes_seen_in_messages_are_explained(built_home):
    codes = read(built_home, "select provider, error_code, meaning, is_permanent from sms_error_codes")
    assert not codes.duplicated(["provider", "error_code"]).any()
    twilio = set(codes.loc[codes["provider"] == "twilio", "error_code"])
    assert {"21211", "21610", "30003", "30007", "20429"} <= twilio
    assert {"103", "104", "108", "150", "202", "215"} <= set(
        codes.loc[codes["provider"] == "smsru", "error_code"]
    )
    seen = set(
        read(built_home, "select distinct error_code from fct_messages where error_code is not null")[
            "error_code"
        ]
    )
    assert seen <= twilio  # the demo's sandbox speaks Twilio's codes


def test_refresh_needs_a_published_snapshot(home):
    store.open_store(home).close()
    with pytest.raises(warehouse.WarehouseError, match="smsops build"):
        warehouse.refresh(home)
    with pytest.raises(ValueError, match="select"):
        warehouse.build(home, select=[])


def test_builds_after_the_first_parse_the_project_partially(refreshed):
    """Every build works on the same file path, so dbt's profile stays the same and its
    partial parsing (about 2.5 s of each build on the 1M base) survives between builds."""
    incremental, _, _, _, _ = refreshed
    log = (incremental / "dbt" / "logs" / "dbt.log").read_text()
    assert log.count("Unable to do partial parsing") <= 1, "a build after the first parsed the whole project"
    assert "profile has changed" not in log
