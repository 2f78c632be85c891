"""Launching a campaign: the outbox it writes, and the invariants it keeps (DESIGN.md 1-5).

Each test works on its own copy of the session's demo store; the warehouse snapshot it
reads is the session's, read-only.
"""

from __future__ import annotations

import itertools
import json
import os
import sqlite3
import subprocess
import sys
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from datetime import time as local_time
from pathlib import Path

import pytest

from smsops import campaigns, consent, erasure, policy, segments, store, warehouse
from smsops.campaigns import CampaignError, CampaignStateError, Variant
from smsops.policy import FrequencyCaps

NOW = datetime.now(UTC).replace(hour=12, minute=0, second=0, microsecond=0)
"""Noon UTC: 15:00 in Moscow, 22:00 in Vladivostok, 14:00 in Kaliningrad."""
EVERYONE = segments.Segment("everyone")
TEXT_A = "{{ first_name | default('клиент') }}, скидка 20% до воскресенья: {{ link('https://shop.example.ru/sale') }}"
TEXT_B = "{{ first_name | default('клиент') }}, только до воскресенья −20%: {{ link('https://shop.example.ru/sale') }}"
SENDER = "SHOPMARKET"


@pytest.fixture
def home(built_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of the demo store, reading the session's published snapshot."""
    target = tmp_path / "home"
    (target / "warehouse").mkdir(parents=True)
    source = sqlite3.connect(built_home / "ops.sqlite")
    copy = sqlite3.connect(target / "ops.sqlite")
    source.backup(copy)
    source.close()
    copy.close()
    (target / "warehouse" / "current.json").write_text(
        (built_home / "warehouse" / "current.json").read_text()
    )
    monkeypatch.setenv("SMSOPS_HOME", str(target))
    monkeypatch.delenv(erasure.SECRET_ENV, raising=False)
    monkeypatch.delenv("SMSOPS_SENDERS", raising=False)
    return target


def create(home: Path, kind="promo", variants=(("A", TEXT_A),), **kwargs) -> campaigns.Campaign:
    return campaigns.create(
        "Тест",
        kind,
        kwargs.pop("segment", EVERYONE),
        [Variant(n, t, SENDER) for n, t in variants],
        home=home,
        **kwargs,
    )


def outbox(home: Path, campaign_id: int) -> list[dict]:
    conn = store.open_store(home)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("select * from messages where campaign_id = ?", (campaign_id,))]
    finally:
        conn.close()


def audience_size(home: Path) -> int:
    return segments.count(EVERYONE, home)


def opt_in(home: Path, contact_ids: list[int]) -> list[str]:
    """Give contacts with a number of their own a fresh marketing opt-in; their numbers."""
    conn = store.open_store(home)
    try:
        numbers = []
        for cid in contact_ids:
            (phone,) = conn.execute("select phone_e164 from contacts where contact_id = ?", (cid,)).fetchone()
            consent.record(
                conn, phone_e164=phone, purpose="marketing", action="opt_in", source="web_form",
                occurred_at=datetime.now(UTC) - timedelta(minutes=5), contact_id=cid,
            )  # fmt: skip
            numbers.append(phone)
        return numbers
    finally:
        conn.close()


def own_numbers(home: Path, n: int) -> list[int]:
    """Contacts with a valid mobile number no other contact holds."""
    conn = store.open_store(home)
    try:
        return [
            r[0]
            for r in conn.execute(
                """
                select min(contact_id) from contacts where phone_valid = 1
                group by phone_e164 having count(*) = 1 order by 1 limit ?
                """,
                (n,),
            )
        ]
    finally:
        conn.close()


def set_zone(home: Path, contact_id: int, time_zone: str | None, candidates: str | None = None) -> None:
    conn = store.open_store(home)
    try:
        conn.execute(
            "update contacts set time_zone = ?, phone_time_zones = ? where contact_id = ?",
            (time_zone, candidates, contact_id),
        )
    finally:
        conn.close()


# -- the outbox is the frozen audience --------------------------------------------------------


def test_every_recipient_gets_one_row_and_every_unsent_row_a_reason(home: Path) -> None:
    campaign = create(home, holdout_fraction=0.05)
    result = campaigns.plan(campaign.campaign_id, home=home, now=NOW)
    rows = outbox(home, campaign.campaign_id)

    assert len(rows) == result.audience == result.written == audience_size(home)
    assert len({r["contact_id"] for r in rows}) == len(rows)
    assert all(r["idempotency_key"] == f"{campaign.campaign_id}:{r['contact_id']}" for r in rows)
    unsent = [r for r in rows if r["state"] != "planned"]
    assert unsent and all(r["skip_reason"] in policy.SKIP_REASONS for r in unsent)
    assert {r["state"] for r in unsent} == {"suppressed", "holdout"}
    for r in rows:
        if r["state"] == "planned":
            assert r["body"] and r["encoding"] and r["segments"] >= 1 and r["price"] > 0
            assert (r["not_before"] is None) == (r["skip_reason"] is None)
        else:
            assert r["body"] is None and r["price"] is None and r["not_before"] is None
    assert campaigns.get(campaign.campaign_id, home).status == "running"


def test_the_waterfall_counts_each_step_in_policy_order(home: Path) -> None:
    campaign = create(home, holdout_fraction=0.05)
    result = campaigns.plan(campaign.campaign_id, home=home, now=NOW)
    steps = result.waterfall
    assert steps[0].reason == "audience" and steps[0].remaining == result.audience
    reasons = [s.reason for s in steps[1:]]
    assert reasons == [r for r in policy.POLICY_ORDER if r in reasons]
    assert {"invalid_number", "no_consent", "duplicate", "holdout"} <= set(reasons)
    for before, step in itertools.pairwise(steps):
        assert step.remaining == before.remaining - step.removed
        assert step.removed == result.skip_reasons[step.reason]
    assert steps[-1].remaining == result.to_send == result.states["planned"]
    assert campaigns.waterfall(campaign.campaign_id, home) == steps
    assert result.cost["RUB"] > 0 and result.segments >= result.to_send


def test_a_dry_run_writes_nothing_and_predicts_the_launch(home: Path) -> None:
    campaign = create(home, variants=(("A", TEXT_A), ("B", TEXT_B)), test_fraction=0.2, holdout_fraction=0.05)
    preview = campaigns.plan(campaign.campaign_id, home=home, now=NOW, dry_run=True)
    assert outbox(home, campaign.campaign_id) == []
    assert campaigns.get(campaign.campaign_id, home).status == "draft"
    launched = campaigns.plan(campaign.campaign_id, home=home, now=NOW)
    assert preview.waterfall == launched.waterfall
    assert preview.variants == launched.variants
    assert preview.cost == launched.cost
    assert set(preview.remainder_cost) == {"A", "B"}


def _copy_store(home: Path, target: Path) -> Path:
    (target / "warehouse").mkdir(parents=True)
    source, copy = sqlite3.connect(store.store_path(home)), sqlite3.connect(target / "ops.sqlite")
    source.backup(copy)
    source.close()
    copy.close()
    (target / "warehouse" / "current.json").write_text((home / "warehouse" / "current.json").read_text())
    return target


def test_a_launch_in_parts_writes_what_a_launch_in_one_piece_writes(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A large audience is decided and written in parts by ranges of numbers (the store writes
    one while DuckDB decides the next). Duplicates, caps and consent are judged per number, so
    the parts must add up to exactly the outbox and outcome of one piece."""
    first = create(home)
    campaigns.plan(first.campaign_id, home=home, now=NOW - timedelta(hours=2))  # history for the caps
    campaign = create(home, variants=(("A", TEXT_A), ("B", TEXT_B)), test_fraction=0.3, holdout_fraction=0.1)
    other = _copy_store(home, tmp_path / "other")
    whole = campaigns.plan(
        campaign.campaign_id, home=home, now=NOW, caps=FrequencyCaps(per_day=2, per_week=3)
    )

    ranges = campaigns._phone_ranges
    cut: list[int] = []
    monkeypatch.setattr(campaigns, "_PART_ROWS", 40)
    monkeypatch.setattr(campaigns, "_MAX_PARTS", 9)
    monkeypatch.setattr(campaigns, "_phone_ranges", lambda *a: cut.append(len(r := ranges(*a))) or r)
    parted = campaigns.plan(
        campaign.campaign_id, home=other, now=NOW, caps=FrequencyCaps(per_day=2, per_week=3)
    )
    assert cut == [9]

    def rows(where: Path) -> list[dict]:
        found = sorted(outbox(where, campaign.campaign_id), key=lambda r: r["idempotency_key"])
        return [{k: v for k, v in r.items() if k != "message_id"} for r in found]

    assert rows(other) == rows(home)
    assert {r["skip_reason"] for r in rows(home)} >= {"duplicate", "holdout", "awaiting_winner", "no_consent"}
    assert replace(parted, seconds=0.0, timings={}) == replace(whole, seconds=0.0, timings={})
    assert parted.written == whole.audience > 0


def test_a_launch_that_fails_while_writing_a_part_leaves_nothing(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    campaign = create(home)
    monkeypatch.setattr(campaigns, "_PART_ROWS", 40)
    insert = campaigns._OutboxWriter._insert
    calls = itertools.count()

    def failing(self, rows):
        if next(calls) == 2:
            raise sqlite3.OperationalError("disk I/O error (simulated)")
        return insert(self, rows)

    monkeypatch.setattr(campaigns._OutboxWriter, "_insert", failing)
    with pytest.raises(sqlite3.OperationalError, match="simulated"):
        campaigns.plan(campaign.campaign_id, home=home, now=NOW)
    assert outbox(home, campaign.campaign_id) == []
    assert campaigns.get(campaign.campaign_id, home).status == "draft"
    monkeypatch.setattr(campaigns._OutboxWriter, "_insert", insert)
    result = campaigns.plan(campaign.campaign_id, home=home, now=NOW)  # and it can be launched again
    assert result.written == result.audience == len(outbox(home, campaign.campaign_id))


def test_a_launch_never_opens_the_store_with_a_second_sqlite_library(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ADBC's driver carries its own SQLite. Two SQLite libraries in one process cannot see each
    other's locks, so the second to open a WAL store resets the WAL index under the first and
    deletes the WAL on close (seen: "disk I/O error" for a connection that stayed open). A
    launch in the app or in `smsops serve` runs beside connections that stay open, so ADBC
    may only open private files."""
    import adbc_driver_sqlite.dbapi as adbc

    opened: list[Path] = []
    connect = adbc.connect
    monkeypatch.setattr(
        adbc, "connect", lambda path, **kw: opened.append(Path(path).resolve()) or connect(path, **kw)
    )
    keeper = store.connect(store.store_path(home))  # as the dispatcher keeps one open
    keeper.execute(
        "insert into campaigns (name, kind, status, created_at) values ('keeper', 'promo', 'draft', 'x')"
    )
    monkeypatch.setattr(campaigns, "_PART_ROWS", 40)
    campaign = create(home, variants=(("A", TEXT_A), ("B", TEXT_B)), test_fraction=0.5)
    result = campaigns.plan(campaign.campaign_id, home=home, now=NOW)
    keeper.execute(
        "insert into campaigns (name, kind, status, created_at) values ('keeper 2', 'promo', 'draft', 'x')"
    )
    keeper.close()
    assert opened and store.store_path(home).resolve() not in opened
    conn = store.connect(store.store_path(home))
    assert conn.execute("pragma integrity_check").fetchone() == ("ok",)
    assert conn.execute("select count(*) from campaigns where name like 'keeper%'").fetchone() == (2,)
    assert conn.execute(
        "select count(*) from messages where campaign_id = ?", (campaign.campaign_id,)
    ).fetchone() == (result.audience,)
    conn.close()


def test_a_launch_leaves_no_private_files_and_clears_those_a_killed_one_left(home: Path) -> None:
    scratch = home / "tmp"
    scratch.mkdir()
    stale, fresh = scratch / "smsops-plan-killed", scratch / "smsops-plan-running"
    for folder in (stale, fresh):
        folder.mkdir()
        (folder / "part0.sqlite").write_bytes(b"x")
    six_hours_ago = time.time() - 6 * 3600 - 60
    os.utime(stale, (six_hours_ago, six_hours_ago))
    campaign = create(home)
    campaigns.plan(campaign.campaign_id, home=home, now=NOW)
    assert sorted(p.name for p in scratch.iterdir()) == ["smsops-plan-running"]


# -- invariant 1: never twice -------------------------------------------------------------------


def test_a_second_launch_writes_nothing(home: Path) -> None:
    campaign = create(home)
    first = campaigns.plan(campaign.campaign_id, home=home, now=NOW)
    again = campaigns.plan(campaign.campaign_id, home=home, now=NOW + timedelta(hours=1))
    assert first.written == first.audience > 0
    assert again.already_planned and again.written == 0
    assert again.waterfall == first.waterfall
    assert len(outbox(home, campaign.campaign_id)) == first.audience


LAUNCH = """
import sys, time
from datetime import datetime
from smsops import campaigns
home, campaign_id, start, now = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
while time.time() < start:
    time.sleep(0.002)
result = campaigns.plan(campaign_id, home=home, now=datetime.fromisoformat(now))
print(result.written, result.already_planned)
"""


def test_two_processes_launching_at_once_write_each_recipient_once(home: Path) -> None:
    campaign = create(home, variants=(("A", TEXT_A), ("B", TEXT_B)), holdout_fraction=0.1)
    start = time.time() + 3.0
    env = {**os.environ, "SMSOPS_HOME": str(home)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", LAUNCH, str(home), str(campaign.campaign_id), str(start), NOW.isoformat()],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outputs]
    written = sorted(int(out.split()[0]) for out, _ in outputs)
    rows = outbox(home, campaign.campaign_id)
    assert written == [0, len(rows)]
    assert len(rows) == audience_size(home)
    assert len({r["contact_id"] for r in rows}) == len(rows)


# -- invariant 2: consent, at planning and at sending -------------------------------------------


def test_no_promotion_is_planned_without_a_current_opt_in(home: Path) -> None:
    campaign = create(home, holdout_fraction=0.05)
    campaigns.plan(campaign.campaign_id, home=home, now=NOW)
    rows = outbox(home, campaign.campaign_id)
    conn = store.open_store(home)
    try:
        kept = [r for r in rows if r["state"] in ("planned", "holdout")]
        states = consent.states(conn, [r["phone_e164"] for r in kept], "marketing")
        assert kept and all(states[r["phone_e164"]].opted_in for r in kept)
        # and every consent exclusion is what the consent module itself says
        for r in rows:
            if r["skip_reason"] in ("opted_out", "no_consent"):
                assert consent.may_send(conn, r["phone_e164"], "promo") == (False, r["skip_reason"])
    finally:
        conn.close()


def test_the_plan_agrees_with_the_pure_policy_for_every_recipient(home: Path) -> None:
    campaign = create(home)
    campaigns.plan(campaign.campaign_id, home=home, now=NOW, caps=FrequencyCaps(None, None))
    rows = outbox(home, campaign.campaign_id)
    conn = store.open_store(home)
    try:
        contacts = {
            cid: (phone, valid)
            for cid, phone, valid in conn.execute("select contact_id, phone_e164, phone_valid from contacts")
        }
        numbers = sorted({p for p, v in contacts.values() if v == 1 and p})
        marketing = consent.states(conn, numbers, "marketing")
        service = consent.states(conn, numbers, "service")
    finally:
        conn.close()
    seen: set[str] = set()
    for r in sorted(rows, key=lambda r: r["contact_id"]):
        phone, valid = contacts[r["contact_id"]]
        ok = valid == 1 and phone is not None
        expected = policy.exclusion(
            "promo",
            valid_number=ok,
            erased=False,
            marketing_last_action=marketing[phone].last_action if ok else None,
            service_last_action=service[phone].last_action if ok else None,
            duplicate=ok and phone in seen,
        )
        if expected is None:
            seen.add(phone)
        assert (r["skip_reason"] if r["state"] == "suppressed" else None) == expected, r


def test_an_opt_out_after_planning_is_caught_before_sending(home: Path) -> None:
    campaign = create(home)
    campaigns.plan(campaign.campaign_id, home=home, now=NOW)
    planned = [
        r for r in outbox(home, campaign.campaign_id) if r["state"] == "planned" and not r["not_before"]
    ][:3]
    conn = store.open_store(home)
    try:
        ids = [r["message_id"] for r in planned]
        assert campaigns.check_before_send(conn, ids, now=NOW) == [(i, True, None) for i in ids]
        consent.handle_inbound(
            conn, provider="sandbox", provider_message_id="in-1", from_e164=planned[0]["phone_e164"],
            body="СТОП", received_at=datetime.now(UTC),
        )  # fmt: skip
        consent.record(
            conn, phone_e164=planned[1]["phone_e164"], purpose="marketing", action="opt_out", source="link",
            occurred_at=datetime.now(UTC),
        )  # fmt: skip
        assert campaigns.check_before_send(conn, ids, now=NOW) == [
            (ids[0], False, "opted_out"),
            (ids[1], False, "opted_out"),
            (ids[2], True, None),
        ]
        as_mappings = [
            {"message_id": r["message_id"], "phone_e164": r["phone_e164"], "kind": "promo"} for r in planned
        ]
        assert [ok for _, ok, _ in campaigns.check_before_send(conn, as_mappings, now=NOW)] == [
            False,
            False,
            True,
        ]
    finally:
        conn.close()


def test_service_messages_need_no_opt_in_but_stop_on_keyword_stop(home: Path) -> None:
    campaign = create(home, kind="service", variants=(("A", "Заказ передан в доставку."),))
    result = campaigns.plan(campaign.campaign_id, home=home, now=NOW)
    assert "no_consent" not in result.skip_reasons
    planned = [
        r for r in outbox(home, campaign.campaign_id) if r["state"] == "planned" and not r["not_before"]
    ]
    assert "Отказ" not in planned[0]["body"]  # no opt-out footer on service messages
    conn = store.open_store(home)
    try:
        consent.handle_inbound(
            conn, provider="sandbox", provider_message_id="in-2", from_e164=planned[0]["phone_e164"],
            body="stop", received_at=datetime.now(UTC),
        )  # fmt: skip
        rows = [{"message_id": r["message_id"], "phone_e164": r["phone_e164"], "campaign_id": campaign.campaign_id}
                for r in planned[:2]]  # fmt: skip
        assert [ok for _, ok, _ in campaigns.check_before_send(conn, rows, now=NOW)] == [False, True]
    finally:
        conn.close()


def test_erased_people_are_never_planned_and_their_number_is_not_written(home: Path) -> None:
    erased_contact, reused, other = own_numbers(home, 3)
    opt_in(home, [erased_contact, reused, other])
    conn = store.open_store(home)
    try:
        (old_number,) = conn.execute(
            "select phone_e164 from contacts where contact_id = ?", (erased_contact,)
        ).fetchone()
        erasure.erase(conn, contact_id=erased_contact, requested_by="ticket 42")
        # the erased number comes back on another contact (a later CRM import)
        conn.execute("update contacts set phone_e164 = ? where contact_id = ?", (old_number, reused))
    finally:
        conn.close()
    campaign = create(home)
    campaigns.plan(campaign.campaign_id, home=home, now=NOW)
    rows = {r["contact_id"]: r for r in outbox(home, campaign.campaign_id)}
    assert rows[erased_contact]["skip_reason"] == "erased"
    assert rows[reused]["skip_reason"] == "erased"
    assert rows[reused]["phone_e164"] is None and rows[erased_contact]["phone_e164"] is None
    assert rows[other]["state"] == "planned"
    conn = store.open_store(home)
    try:
        check = campaigns.check_before_send(
            conn, [{"message_id": 1, "phone_e164": old_number, "kind": "service"}], now=NOW
        )
        assert check == [(1, False, "erased")]
    finally:
        conn.close()


# -- invariant 3: quiet hours in the recipient's own zone ---------------------------------------


def test_quiet_hours_are_judged_in_each_recipients_zone(home: Path) -> None:
    east, west, unknown = own_numbers(home, 3)
    opt_in(home, [east, west, unknown])
    set_zone(home, east, "Asia/Vladivostok")
    set_zone(home, west, "Europe/Kaliningrad")
    set_zone(home, unknown, None, "Asia/Vladivostok,Europe/Kaliningrad")
    campaign = create(home)
    result = campaigns.plan(campaign.campaign_id, home=home, now=NOW)
    rows = {r["contact_id"]: r for r in outbox(home, campaign.campaign_id)}
    day = NOW.date()

    # 22:00 in Vladivostok: deferred to 09:00 there, 23:00 UTC
    assert rows[east]["state"] == "planned"
    assert rows[east]["not_before"] == f"{day} 23:00:00"
    assert rows[east]["skip_reason"] == "quiet_hours"
    # 14:00 in Kaliningrad: goes now
    assert rows[west]["state"] == "planned"
    assert rows[west]["not_before"] is None and rows[west]["skip_reason"] is None
    # only candidates known: the next minute allowed in both, 07:00 UTC, and labelled so
    assert rows[unknown]["not_before"] == f"{day + timedelta(days=1)} 07:00:00"
    assert rows[unknown]["skip_reason"] == "quiet_hours_candidate_zones"
    assert result.deferred >= 2
    assert result.earliest_not_before is not None and result.earliest_not_before <= datetime.combine(
        day, datetime.min.time(), UTC
    ) + timedelta(hours=23)


def test_a_message_due_at_night_is_held_at_dispatch_and_deferred(home: Path) -> None:
    """Planned by day, paused, resumed at night: the dispatcher's check holds it."""
    (east,) = own_numbers(home, 1)
    opt_in(home, [east])
    set_zone(home, east, "Asia/Vladivostok")
    campaign = create(home)
    morning = NOW - timedelta(hours=10)  # 12:00 in Vladivostok
    campaigns.plan(campaign.campaign_id, home=home, now=morning)
    (row,) = [r for r in outbox(home, campaign.campaign_id) if r["contact_id"] == east]
    assert row["state"] == "planned" and row["not_before"] is None
    conn = store.open_store(home)
    try:
        quiet = policy.QuietHours()
        ok = campaigns.check_before_send(conn, [row["message_id"]], now=morning, quiet=quiet)
        assert ok == [(row["message_id"], True, None)]
        night = campaigns.check_before_send(conn, [row["message_id"]], now=NOW, quiet=quiet)  # 22:00 there
        assert night == [(row["message_id"], False, "quiet_hours")]
        assert campaigns.check_before_send(conn, [row["message_id"]], now=NOW) == ok  # consent only
        moved = campaigns.defer(conn, [row["message_id"]], now=NOW)
        nine_there = datetime.combine(NOW.date(), datetime.min.time(), UTC) + timedelta(hours=23)
        assert moved == {row["message_id"]: nine_there}
        (after,) = [r for r in outbox(home, campaign.campaign_id) if r["contact_id"] == east]
        assert after["state"] == "planned" and after["skip_reason"] == "quiet_hours"
        assert after["not_before"] == f"{NOW.date()} 23:00:00"
    finally:
        conn.close()


# -- invariant 4: caps across campaigns -------------------------------------------------------


def test_caps_hold_across_two_campaigns(home: Path) -> None:
    first = create(home)
    campaigns.plan(first.campaign_id, home=home, now=NOW)
    # three who agreed since: the second campaign has someone to send to (else it is refused)
    reached = {r["contact_id"] for r in outbox(home, first.campaign_id) if r["state"] == "planned"}
    opt_in(home, [c for c in own_numbers(home, 400) if c not in reached][:3])
    second = create(home)
    result = campaigns.plan(second.campaign_id, home=home, now=NOW + timedelta(hours=3))
    assert result.to_send == 3
    planned_first = [r for r in outbox(home, first.campaign_id) if r["state"] == "planned"]
    got_first = {r["phone_e164"] for r in planned_first}
    rows = outbox(home, second.campaign_id)
    assert not got_first & {r["phone_e164"] for r in rows if r["state"] == "planned"}
    first_ids = {r["contact_id"] for r in planned_first}
    assert {r["skip_reason"] for r in rows if r["contact_id"] in first_ids} == {"capped_daily"}
    assert result.skip_reasons["capped_daily"] == len(got_first)
    # a day later the daily cap is free again, the weekly one still counts both
    third = create(home)
    with pytest.raises(campaigns.Refused, match="weekly frequency cap") as refused:  # nobody is left
        campaigns.plan(third.campaign_id, home=home, now=NOW + timedelta(days=1, hours=4),
                       caps=FrequencyCaps(per_day=1, per_week=1))  # fmt: skip
    later = refused.value.result
    assert "capped_daily" not in later.skip_reasons
    assert later.skip_reasons["capped_weekly"] >= len(got_first)


def test_caps_hold_when_another_process_plans_in_between(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cap history is read before the write lock; promotions planned by someone else in
    the meantime are read again under the lock."""
    first, second = create(home), create(home)
    read_history = campaigns._cap_history

    def stale_history(*args, **kwargs):
        history = read_history(*args, **kwargs)
        with monkeypatch.context() as m:
            m.setattr(campaigns, "_cap_history", read_history)
            campaigns.plan(first.campaign_id, home=home, now=NOW)  # lands after the read
        return history

    monkeypatch.setattr(campaigns, "_cap_history", stale_history)
    # everyone the second could reach got the first meanwhile: the launch is refused, nothing written
    with pytest.raises(campaigns.Refused, match="daily frequency cap") as refused:
        campaigns.plan(second.campaign_id, home=home, now=NOW)
    got_first = {r["phone_e164"] for r in outbox(home, first.campaign_id) if r["state"] == "planned"}
    assert got_first and not outbox(home, second.campaign_id)
    assert refused.value.result.skip_reasons["capped_daily"] == len(got_first)
    assert campaigns.get(second.campaign_id, home).status == "draft"


# -- A/B split, holdout, remainder --------------------------------------------------------------


def test_the_split_is_reproducible_and_proportionate(home: Path, tmp_path: Path, built_home: Path) -> None:
    campaign = create(home, variants=(("A", TEXT_A), ("B", TEXT_B)), test_fraction=0.4, holdout_fraction=0.1)
    result = campaigns.plan(campaign.campaign_id, home=home, now=NOW)
    rows = outbox(home, campaign.campaign_id)
    eligible = [r for r in rows if r["state"] in ("planned", "holdout")]
    for r in eligible:
        unit = policy.split_unit(campaign.campaign_id, r["contact_id"])
        assert r["variant"] == policy.assign(unit, ["A", "B"], holdout_fraction=0.1, test_fraction=0.4)
    n = len(eligible)
    share = {v: sum(r["variant"] == v for r in eligible) / n for v in ("holdout", "A", "B", "remainder")}
    assert share["holdout"] == pytest.approx(0.1, abs=0.03)
    assert share["A"] == pytest.approx(0.2, abs=0.04)
    assert share["B"] == pytest.approx(0.2, abs=0.04)
    assert share["remainder"] == pytest.approx(0.5, abs=0.05)
    assert result.variants["remainder"] == result.awaiting_winner
    # suppressed rows sit in a real variant; the holdout variant holds the control group only
    assert {r["variant"] for r in rows if r["state"] == "suppressed"} <= {"A", "B"}


def test_the_same_campaign_splits_the_same_way_on_another_launch(
    home: Path, built_home: Path, tmp_path: Path
) -> None:
    def launch(target: Path) -> dict[int, str]:
        campaign = create(
            target, variants=(("A", TEXT_A), ("B", TEXT_B)), test_fraction=0.5, holdout_fraction=0.1
        )
        campaigns.plan(campaign.campaign_id, home=target, now=NOW)
        return {r["contact_id"]: r["variant"] for r in outbox(target, campaign.campaign_id)}

    twin = tmp_path / "twin"
    (twin / "warehouse").mkdir(parents=True)
    src, dst = sqlite3.connect(built_home / "ops.sqlite"), sqlite3.connect(twin / "ops.sqlite")
    src.backup(dst)
    src.close()
    dst.close()
    (twin / "warehouse" / "current.json").write_text((built_home / "warehouse" / "current.json").read_text())
    assert launch(home) == launch(twin)


def test_the_holdout_is_recorded_and_never_sendable(home: Path) -> None:
    campaign = create(home, holdout_fraction=0.2)
    campaigns.plan(campaign.campaign_id, home=home, now=NOW)
    held = [r for r in outbox(home, campaign.campaign_id) if r["variant"] == "holdout"]
    assert held
    assert all(r["state"] == "holdout" and r["skip_reason"] == "holdout" and r["body"] is None for r in held)
    campaigns.cancel(campaign.campaign_id, home)
    assert all(
        r["state"] == "holdout" for r in outbox(home, campaign.campaign_id) if r["variant"] == "holdout"
    )


def test_the_remainder_waits_for_the_winner_then_gets_its_text(home: Path) -> None:
    campaign = create(home, variants=(("A", TEXT_A), ("B", TEXT_B)), test_fraction=0.2)
    campaigns.plan(campaign.campaign_id, home=home, now=NOW)
    waiting = [r for r in outbox(home, campaign.campaign_id) if r["variant"] == "remainder"]
    assert waiting
    assert all(
        r["state"] == "planned" and r["body"] is None and r["not_before"] == campaigns.AWAITING_WINNER
        and r["skip_reason"] == "awaiting_winner"
        for r in waiting
    )  # fmt: skip
    released = campaigns.release_remainder(campaign.campaign_id, "B", home=home, now=NOW)
    assert released == len(waiting)
    after = {r["message_id"]: r for r in outbox(home, campaign.campaign_id)}
    for r in waiting:
        row = after[r["message_id"]]
        assert row["variant"] == "B" and "до воскресенья −20%" in row["body"] and row["price"] > 0
        assert row["skip_reason"] in (None, "quiet_hours", "quiet_hours_candidate_zones")
        assert (row["not_before"] is None) == (row["skip_reason"] is None)
    assert campaigns.release_remainder(campaign.campaign_id, "B", home=home, now=NOW) == 0
    with pytest.raises(CampaignError, match="no variant"):
        campaigns.release_remainder(campaign.campaign_id, "C", home=home)


# -- status changes -------------------------------------------------------------------------------


def test_pause_resume_and_cancel(home: Path) -> None:
    campaign = create(home)
    with pytest.raises(CampaignStateError):
        campaigns.pause(campaign.campaign_id, home)
    campaigns.plan(campaign.campaign_id, home=home, now=NOW)
    assert campaigns.pause(campaign.campaign_id, home).status == "paused"
    assert campaigns.pause(campaign.campaign_id, home).status == "paused"
    assert campaigns.resume(campaign.campaign_id, home).status == "running"
    planned = sum(r["state"] == "planned" for r in outbox(home, campaign.campaign_id))
    cancelled = campaigns.cancel(campaign.campaign_id, home)
    assert cancelled.status == "cancelled" and cancelled.finished_at is not None
    rows = outbox(home, campaign.campaign_id)
    assert not any(r["state"] == "planned" for r in rows)
    assert sum(r["state"] == "cancelled" and r["skip_reason"] == "cancelled" for r in rows) == planned
    assert campaigns.waterfall(campaign.campaign_id, home)[-1].remaining == 0
    with pytest.raises(CampaignStateError):
        campaigns.resume(campaign.campaign_id, home)
    assert campaigns.plan(campaign.campaign_id, home=home).already_planned


def test_retry_failed_requeues_transient_failures_only(home: Path) -> None:
    campaign = create(home)
    with pytest.raises(CampaignStateError):
        campaigns.retry_failed(campaign.campaign_id, home)
    campaigns.plan(campaign.campaign_id, home=home, now=NOW)
    first, second, third = [
        r["message_id"] for r in outbox(home, campaign.campaign_id) if r["state"] == "planned"
    ][:3]
    conn = store.open_store(home)
    try:  # what the dispatcher leaves behind
        conn.execute(
            "update messages set state = 'rejected', skip_reason = 'gave_up_after_retries', error_code = '20429',"
            " attempts = 5 where message_id = ?",
            (first,),
        )
        conn.execute(
            "update messages set state = 'rejected', skip_reason = 'provider_rejected', error_code = '21211',"
            " attempts = 1 where message_id = ?",
            (second,),
        )
        conn.execute(
            "update messages set state = 'unknown', skip_reason = 'fate_unknown', attempts = 1 where message_id = ?",
            (third,),
        )
        conn.execute(
            "update campaigns set status = 'finished' where campaign_id = ?", (campaign.campaign_id,)
        )
    finally:
        conn.close()
    assert campaigns.retry_failed(campaign.campaign_id, home) == 1
    rows = {r["message_id"]: r for r in outbox(home, campaign.campaign_id)}
    assert (rows[first]["state"], rows[first]["skip_reason"], rows[first]["attempts"]) == ("planned", None, 5)
    assert rows[second]["state"] == "rejected" and rows[third]["state"] == "unknown"
    assert campaigns.get(campaign.campaign_id, home).status == "running"
    assert campaigns.retry_failed(campaign.campaign_id, home) == 0
    assert len(rows) == audience_size(home)  # nothing new


def test_listing_shows_drafts_and_launched_campaigns(home: Path) -> None:
    draft = create(home)
    running = create(home, holdout_fraction=0.1)
    result = campaigns.plan(running.campaign_id, home=home, now=NOW)
    assert [c.campaign_id for c in campaigns.drafts(home)] == [draft.campaign_id]
    assert running.campaign_id in [c.campaign_id for c in campaigns.launched(home)]
    listing = campaigns.list_all(home).set_index("campaign_id")
    row = listing.loc[running.campaign_id]
    assert (row["status"], row["audience"], row["waiting"]) == ("running", result.audience, result.to_send)
    assert row["not_sent"] == result.audience - result.to_send
    assert listing.loc[draft.campaign_id, "audience"] == 0
    assert listing.loc[1, "sent"] > 0 and listing.loc[1, "delivered"] > 0 and listing.loc[1, "cost"] > 0


# -- creating -------------------------------------------------------------------------------------


def test_a_campaign_keeps_its_segment_definition_and_variants(home: Path) -> None:
    saved = segments.save("Москва", segments.Segment("x", segments.all_of(segments.Rule("city", "eq", "Москва"))),
                          home=home)  # fmt: skip
    campaign = create(home, segment=("Москва", saved.version), variants=(("A", TEXT_A), ("B", TEXT_B)))
    assert campaign.status == "draft" and campaign.segment == saved.segment
    assert [v.name for v in campaign.variants] == ["A", "B"]
    conn = store.open_store(home)
    try:
        (definition,) = conn.execute(
            "select segment from campaigns where campaign_id = ?", (campaign.campaign_id,)
        ).fetchone()
    finally:
        conn.close()
    assert json.loads(definition)["rules"] == [{"field": "city", "op": "eq", "value": "Москва"}]
    result = campaigns.plan(campaign.campaign_id, home=home, now=NOW)
    assert result.audience == segments.count(saved.segment, home)


@pytest.mark.parametrize(
    ("variants", "kwargs", "message"),
    [
        ((("A", "{{ shoe_size }}"),), {}, "shoe_size is not a field"),
        ((("A", "{{ first_name"),), {}, "variant 'A'"),
        ((("A", TEXT_A), ("A", TEXT_B)), {}, "two variants"),
        ((("holdout", TEXT_A),), {}, "reserved"),
        (tuple((str(i), TEXT_A) for i in range(6)), {}, "1 to 5"),
        ((("A", TEXT_A),), {"test_fraction": 0.2}, "2 to 5 variants"),
        ((("A", TEXT_A), ("B", TEXT_B)), {"test_fraction": 1.5}, "test_fraction"),
        ((("A", TEXT_A),), {"holdout_fraction": 0.7}, "holdout_fraction"),
        ((("A", TEXT_A), ("B", TEXT_B)), {"test_fraction": 0.8, "holdout_fraction": 0.3}, "exceeds"),
    ],
)
def test_create_refuses_what_cannot_be_sent(home: Path, variants, kwargs, message: str) -> None:
    with pytest.raises(CampaignError, match=message):
        create(home, variants=variants, **kwargs)


def test_create_checks_senders_and_service_holdouts(home: Path) -> None:
    with pytest.raises(CampaignError, match="not configured"):
        campaigns.create("x", "promo", EVERYONE, [Variant("A", TEXT_A, "OTHERSHOP")], home=home)
    with pytest.raises(CampaignError, match="11 are allowed"):
        campaigns.create("x", "promo", EVERYONE, [Variant("A", TEXT_A, "A VERY LONG SENDER")], home=home)
    with pytest.raises(CampaignError, match="service messages"):
        create(home, kind="service", holdout_fraction=0.1)


# -- the marts read what the plan wrote ---------------------------------------------------------


def test_the_outbox_flows_through_smsops_build_into_fct_messages(home: Path) -> None:
    campaign = create(home, variants=(("A", TEXT_A), ("B", TEXT_B)), test_fraction=0.5, holdout_fraction=0.1)
    result = campaigns.plan(campaign.campaign_id, home=home, now=NOW)
    warehouse.build(home)
    marts = warehouse.query(
        """
        select status, outbox_state, is_holdout, skip_reason, variant, count(*) as n
        from fct_messages where campaign_id = ? group by all
        """,
        [campaign.campaign_id],
        home=home,
    )
    assert int(marts["n"].sum()) == result.audience
    by_status = marts.groupby("status")["n"].sum().to_dict()
    assert by_status == result.states
    assert set(marts.loc[marts["is_holdout"], "variant"]) == {"holdout"}
    assert marts.loc[marts["status"] == "suppressed", "skip_reason"].notna().all()
    performance = warehouse.query(
        "select variant, audience, holdout, suppressed, pending from fct_campaign_performance where campaign_id = ?",
        [campaign.campaign_id],
        home=home,
    )
    assert set(performance["variant"]) == {"A", "B", "holdout", "remainder"}
    assert int(performance["pending"].sum()) == result.to_send


# -- a campaign's own settings -------------------------------------------------------------------


def test_a_campaign_keeps_its_quiet_hours_and_caps_and_planning_uses_them(home: Path) -> None:
    (east,) = own_numbers(home, 1)
    opt_in(home, [east])
    set_zone(home, east, "Asia/Vladivostok")  # 22:00 there at NOW
    campaign = create(home, quiet="23:00-07:00", caps=FrequencyCaps(2, None))
    stored = campaigns.get(campaign.campaign_id, home)
    assert stored.quiet == policy.QuietHours(local_time(23, 0), local_time(7, 0))
    assert stored.caps == FrequencyCaps(2, None)
    campaigns.plan(campaign.campaign_id, home=home, now=NOW)
    (row,) = [r for r in outbox(home, campaign.campaign_id) if r["contact_id"] == east]
    assert row["state"] == "planned" and row["not_before"] is None  # the default 21:00 would defer it


def test_a_campaign_without_settings_takes_the_installs_defaults(home: Path, monkeypatch) -> None:
    monkeypatch.setenv("SMSOPS_QUIET_HOURS", "22:00-08:00")
    monkeypatch.setenv("SMSOPS_DAILY_CAP", "2")
    monkeypatch.setenv("SMSOPS_WEEKLY_CAP", "off")
    stored = create(home)
    assert stored.quiet == policy.QuietHours(local_time(22, 0), local_time(8, 0))
    assert stored.caps == FrequencyCaps(2, None)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"quiet": "25:00-09:00"}, "'25:00' is not a time of day"),
        ({"quiet": "21:00"}, "expected start-end"),
        ({"caps": (1, 3)}, "caps: expected FrequencyCaps"),
        ({"auto_release": True}, "auto_release: needs ab_window_hours"),
        ({"ab_window_hours": 4}, "only an A/B test"),
        ({"scheduled_at": "tomorrow"}, "scheduled_at: expected a datetime"),
    ],
)
def test_bad_campaign_settings_are_refused_naming_the_setting(home: Path, kwargs, message) -> None:
    with pytest.raises(CampaignError, match=message):
        create(home, **kwargs)


def test_the_send_time_check_honours_the_campaigns_own_quiet_hours(home: Path) -> None:
    east, west = own_numbers(home, 2)
    opt_in(home, [east, west])
    set_zone(home, east, "Asia/Vladivostok")  # 22:00 at NOW
    set_zone(home, west, "Europe/Moscow")  # 15:00 at NOW
    campaign = create(home, quiet="14:00-16:00")
    campaigns.plan(campaign.campaign_id, home=home, now=NOW, quiet=policy.NO_QUIET_HOURS)  # all due now
    rows = {r["contact_id"]: r["message_id"] for r in outbox(home, campaign.campaign_id)}
    conn = store.open_store(home)
    try:
        # the dispatcher passes its own default window; the campaign's 14:00-16:00 wins
        moved = campaigns.defer(conn, [rows[east], rows[west]], now=NOW, quiet=policy.QuietHours())
        checked = campaigns.check_before_send(conn, [rows[east]], now=NOW, quiet=policy.QuietHours())
    finally:
        conn.close()
    assert moved == {rows[west]: NOW + timedelta(hours=1)}  # 16:00 in Moscow
    assert checked == [(rows[east], True, None)]  # 22:00 in Vladivostok is allowed by this campaign


# -- schedules ----------------------------------------------------------------------------------

START_DUE = """
import sys, time
from datetime import datetime
from smsops import campaigns
home, start, now = sys.argv[1], float(sys.argv[2]), sys.argv[3]
while time.time() < start:
    time.sleep(0.002)
print(" ".join(str(c) for c in campaigns.start_due(datetime.fromisoformat(now), home=home)))
"""


def test_a_scheduled_campaign_starts_on_time_once_even_with_two_schedulers(home: Path) -> None:
    campaign = create(home, variants=(("A", TEXT_A), ("B", TEXT_B)))
    at = NOW + timedelta(hours=1)
    scheduled = campaigns.schedule(campaign.campaign_id, at, now=NOW, home=home)
    assert scheduled.status == "scheduled" and scheduled.scheduled_at == at
    assert campaigns.start_due(at - timedelta(minutes=1), home=home) == {}  # not yet
    assert outbox(home, campaign.campaign_id) == []  # the audience is not frozen before it starts

    start = time.time() + 3.0
    env = {**os.environ, "SMSOPS_HOME": str(home)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", START_DUE, str(home), str(start), (at + timedelta(seconds=5)).isoformat()],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outputs]
    assert sorted(out.strip() for out, _ in outputs) == ["", str(campaign.campaign_id)]
    rows = outbox(home, campaign.campaign_id)
    assert len(rows) == audience_size(home) == len({r["contact_id"] for r in rows})
    started = campaigns.get(campaign.campaign_id, home)
    assert started.status in ("running", "finished")
    assert started.launched_at == at + timedelta(seconds=5)
    assert campaigns.start_due(at + timedelta(hours=1), home=home) == {}


def test_a_past_start_time_is_refused_and_a_scheduled_campaign_can_be_cancelled(home: Path) -> None:
    campaign = create(home)
    with pytest.raises(CampaignError, match="has passed"):
        campaigns.schedule(campaign.campaign_id, NOW - timedelta(minutes=1), now=NOW, home=home)
    campaigns.schedule(campaign.campaign_id, NOW + timedelta(hours=2), now=NOW, home=home)
    assert campaigns.unschedule(campaign.campaign_id, home).status == "draft"
    campaigns.schedule(campaign.campaign_id, NOW + timedelta(hours=2), now=NOW, home=home)
    assert campaigns.cancel(campaign.campaign_id, home).status == "cancelled"
    assert campaigns.start_due(NOW + timedelta(hours=3), home=home) == {}
    assert outbox(home, campaign.campaign_id) == []


@pytest.mark.parametrize(
    ("utc", "zone", "expected"),
    [
        ("2026-12-04 01:47", "Europe/Moscow", "2026-12-04 05:00+03:00"),  # the team's clock, not UTC
        ("2026-12-04 02:00", "Europe/Moscow", "2026-12-04 05:15+03:00"),  # on a quarter: the next one
        ("2026-12-04 20:50", "Asia/Vladivostok", "2026-12-05 07:00+10:00"),  # already tomorrow there
        ("2026-12-04 23:59", "America/New_York", "2026-12-04 19:00-05:00"),
    ],
)
def test_a_start_time_picker_offers_the_next_quarter_hour_in_the_teams_zone(utc, zone, expected) -> None:
    found = campaigns.next_start(zone, datetime.fromisoformat(utc).replace(tzinfo=UTC))
    assert found == datetime.fromisoformat(expected) and str(found.tzinfo) == zone
    assert found.isoformat(sep=" ", timespec="minutes") == expected  # shown on that zone's clock
    with pytest.raises(CampaignError, match="step"):
        campaigns.next_start(zone, step=timedelta(minutes=7))


# -- test sends ---------------------------------------------------------------------------------


def test_a_test_send_reaches_the_seed_numbers_and_counts_nowhere(home: Path) -> None:
    campaign = create(home, variants=(("A", TEXT_A), ("B", TEXT_B)), caps=FrequencyCaps(1, None))
    sample = campaigns.test_send(
        campaign.campaign_id, "8 999 000-00-01, +7 (999) 000 00 02", home=home, now=NOW
    )
    assert sample.numbers == ("+79990000001", "+79990000002") and sample.messages == 4
    assert "***" in sample.sample_phone
    rows = outbox(home, sample.test_campaign_id)
    assert {(r["variant"], r["phone_e164"]) for r in rows} == {
        (v, n) for v in ("A", "B") for n in sample.numbers
    }
    assert all(r["state"] == "planned" and r["not_before"] is None and "Отказ" in r["body"] for r in rows)
    assert all(r["contact_id"] == sample.sample_contact_id for r in rows)
    # hidden from the lists, and the tested campaign is still an untouched draft
    assert sample.test_campaign_id not in set(campaigns.list_all(home)["campaign_id"])
    assert sample.test_campaign_id not in {c.campaign_id for c in campaigns.drafts(home)}
    assert campaigns.get(campaign.campaign_id, home).status == "draft"
    assert outbox(home, campaign.campaign_id) == []
    # no consent is needed and no quiet hours apply at night (internal numbers)
    conn = store.open_store(home)
    try:
        ids = [r["message_id"] for r in rows]
        night = NOW.replace(hour=21)  # midnight in Moscow
        assert all(
            ok for _, ok, _ in campaigns.check_before_send(conn, ids, now=night, quiet=policy.QuietHours())
        )
        assert campaigns.defer(conn, ids, now=night) == {}
        # a seed number that is also in the audience is not capped by the test
        (contact,) = own_numbers(home, 1)
        (phone,) = opt_in(home, [contact])
    finally:
        conn.close()
    campaigns.test_send(campaign.campaign_id, [phone], home=home, now=NOW)
    campaigns.plan(campaign.campaign_id, home=home, now=NOW + timedelta(minutes=1))
    (row,) = [r for r in outbox(home, campaign.campaign_id) if r["contact_id"] == contact]
    assert row["state"] == "planned" and row["skip_reason"] is None


@pytest.mark.parametrize(
    ("numbers", "message"),
    [("", "at least one seed number"), ("+7 495 123-45-67", "landline|mobile"), ("12", "'12'")],
)
def test_a_test_send_refuses_bad_seed_numbers_naming_them(home: Path, numbers, message) -> None:
    campaign = create(home)
    with pytest.raises(CampaignError, match=message):
        campaigns.test_send(campaign.campaign_id, numbers, home=home)


def test_a_test_send_is_left_out_of_campaign_performance(home: Path) -> None:
    campaign = create(home)
    sample = campaigns.test_send(campaign.campaign_id, ["+79990000001"], home=home, now=NOW)
    conn = store.open_store(home)
    try:
        conn.execute("update messages set state = 'submitted', submitted_at = ? where campaign_id = ?",
                     ("2030-01-01 00:00:00", sample.test_campaign_id))  # fmt: skip
    finally:
        conn.close()
    warehouse.refresh(home)
    judged = set(
        warehouse.query("select distinct campaign_id from fct_campaign_performance", home=home)["campaign_id"]
    )
    sent = warehouse.query("select campaign_id, sent_at from fct_messages where campaign_id = ?",
                           [sample.test_campaign_id], home=home)  # fmt: skip
    assert sample.test_campaign_id not in judged and judged  # the demo's campaigns are still there
    assert len(sent) == 1 and sent["sent_at"].notna().all()  # the message itself is kept: it was sent


def test_test_results_show_each_seed_numbers_delivery(home: Path) -> None:
    campaign = create(home)
    sample = campaigns.test_send(campaign.campaign_id, ["+79990000001"], home=home, now=NOW)
    (row,) = outbox(home, sample.test_campaign_id)
    conn = store.open_store(home)
    try:
        conn.execute("update messages set state = 'submitted', submitted_at = ? where message_id = ?",
                     ("2030-01-01 00:00:00", row["message_id"]))  # fmt: skip
        for status in ("delivered", "sent"):  # out of order: delivered stays
            conn.execute(
                "insert into message_status_events (message_id, provider, status, occurred_at, received_at)"
                " values (?, 'sandbox', ?, '2030-01-01 00:00:01', '2030-01-01 00:00:02')",
                (row["message_id"], status),
            )
    finally:
        conn.close()
    frame = campaigns.test_results(campaign.campaign_id, home)
    assert frame[["number", "variant", "state", "status"]].values.tolist() == [
        ["+7 999 ***-**-01", "A", "submitted", "delivered"]
    ]


# -- A/B: fresh counts, automatic release --------------------------------------------------------


def deliver(
    home: Path, campaign_id: int, clicked_variant: str, *, method: str = "GET", agent: str | None = None
) -> None:
    """Every sent test message delivered; every message of ``clicked_variant`` clicked (with
    ``method`` and user ``agent``)."""
    conn = store.open_store(home)
    try:
        with store.transaction(conn):
            rows = conn.execute(
                "select message_id, variant from messages where campaign_id = ? and state = 'planned'"
                " and variant not in ('holdout', 'remainder')",
                (campaign_id,),
            ).fetchall()
            for message_id, variant in rows:
                conn.execute("update messages set state = 'submitted' where message_id = ?", (message_id,))
                conn.execute(
                    "insert into message_status_events (message_id, provider, status, occurred_at, received_at)"
                    " values (?, 'sandbox', 'delivered', '2030-01-01 00:00:00', '2030-01-01 00:00:00')",
                    (message_id,),
                )
                if variant == clicked_variant:
                    conn.execute(
                        "insert into clicks (token, message_id, clicked_at, method, user_agent)"
                        " values (?, ?, '2030-01-01 00:01:00', ?, ?)",
                        (f"t{message_id}", message_id, method, agent),
                    )
    finally:
        conn.close()


def test_the_remainder_gets_the_clear_winner_by_itself_once_the_window_has_passed(home: Path) -> None:
    campaign = create(
        home, variants=(("A", TEXT_A), ("B", TEXT_B)), test_fraction=0.5, ab_window_hours=2, auto_release=True,
        caps=FrequencyCaps(None, None),
    )  # fmt: skip
    result = campaigns.plan(campaign.campaign_id, home=home, now=NOW)
    assert result.awaiting_winner > 0
    deliver(home, campaign.campaign_id, "B")
    counts = campaigns.variant_counts(campaign.campaign_id, home=home)
    assert counts["A"][0] == 0 and counts["B"][0] == counts["B"][1] > 0
    assert campaigns.release_due_winners(NOW + timedelta(hours=1), home=home) == {}  # the window is open
    released = campaigns.release_due_winners(NOW + timedelta(hours=2, minutes=1), home=home)
    assert released == {campaign.campaign_id: ("B", result.awaiting_winner)}
    assert campaigns.release_due_winners(NOW + timedelta(hours=3), home=home) == {}  # nothing left waiting
    assert not [r for r in outbox(home, campaign.campaign_id) if r["variant"] == "remainder"]


@pytest.mark.parametrize(
    ("method", "agent"),
    [("HEAD", None), ("GET", "WhatsApp/2.23.20.0"), ("GET", "Slackbot-LinkExpanding 1.0")],
)
def test_link_previews_do_not_pick_an_ab_winner(home: Path, method: str, agent: str) -> None:
    campaign = create(
        home, variants=(("A", TEXT_A), ("B", TEXT_B)), test_fraction=0.5, ab_window_hours=2, auto_release=True,
        caps=FrequencyCaps(None, None),
    )  # fmt: skip
    campaigns.plan(campaign.campaign_id, home=home, now=NOW)
    deliver(home, campaign.campaign_id, "B", method=method, agent=agent)
    counts = campaigns.variant_counts(campaign.campaign_id, home=home)
    assert counts["A"][0] == counts["B"][0] == 0 and counts["B"][1] > 0
    assert campaigns.release_due_winners(NOW + timedelta(hours=3), home=home) == {}


def test_without_auto_release_the_remainder_waits_for_a_click(home: Path) -> None:
    campaign = create(home, variants=(("A", TEXT_A), ("B", TEXT_B)), test_fraction=0.5, ab_window_hours=1,
                      caps=FrequencyCaps(None, None))  # fmt: skip
    campaigns.plan(campaign.campaign_id, home=home, now=NOW)
    deliver(home, campaign.campaign_id, "A")
    assert campaigns.release_due_winners(NOW + timedelta(days=1), home=home) == {}
    assert campaigns.outcome(campaign.campaign_id, home).awaiting_winner > 0


# -- smsops serve's scheduler ---------------------------------------------------------------------


def test_the_serve_scheduler_starts_a_due_campaign(home: Path) -> None:
    import asyncio

    from smsops import serve

    campaign = create(home)
    due = datetime.now(UTC) + timedelta(seconds=2)
    campaigns.schedule(campaign.campaign_id, due, home=home)

    async def main() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(serve.scheduler(home, stop, interval=0.5))
        deadline = time.monotonic() + 60
        while campaigns.get(campaign.campaign_id, home).status == "scheduled" and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        stop.set()
        await task

    asyncio.run(main())
    started = campaigns.get(campaign.campaign_id, home)
    assert started.status in ("running", "finished") and started.launched_at >= due.replace(microsecond=0)
    assert len(outbox(home, campaign.campaign_id)) == audience_size(home)


def test_the_scheduled_refresh_builds_every_interval_but_never_two_at_once(home: Path) -> None:
    from smsops import serve

    before = warehouse.current(home).build_id
    state = serve.SchedulerState()
    assert serve.scheduler_tick(home, state, refresh_minutes=0) == {}  # off
    assert serve.scheduler_tick(home, state, refresh_minutes=0.001, now=100.0) == {"build": "started"}
    (build,) = state.builds
    again = serve.scheduler_tick(home, state, refresh_minutes=0.001, now=200.0)
    assert again == {"build": "already running"} and state.builds == [build]
    assert build.wait(timeout=300) == 0
    assert warehouse.current(home).build_id != before
    assert serve.scheduler_tick(home, state, refresh_minutes=10, now=300.0) == {}  # not due yet


def test_ab_counts_take_each_messages_last_final_receipt(home: Path) -> None:
    """Delivered, then a later failure: not delivered; a failure, then a later delivery: delivered."""
    campaign = create(
        home, variants=(("A", TEXT_A), ("B", TEXT_B)), test_fraction=0.5, ab_window_hours=2,
        caps=FrequencyCaps(None, None),
    )  # fmt: skip
    campaigns.plan(campaign.campaign_id, home=home, now=NOW)
    deliver(home, campaign.campaign_id, "B")
    before = campaigns.variant_counts(campaign.campaign_id, home=home)
    conn = store.connect(store.store_path(home))
    try:
        with conn:
            ids = [r[0] for r in conn.execute(
                "select message_id from messages where campaign_id = ? and variant in ('A', 'B') and state = 'submitted'"
                " order by message_id", (campaign.campaign_id,))]  # fmt: skip
            later_failure, earlier_failure = ids[0], ids[1]
            conn.execute(
                "insert into message_status_events (message_id, provider, status, occurred_at, received_at)"
                " values (?, 'sandbox', 'undelivered', '2030-01-01 00:00:05', '2030-01-01 00:00:05')",
                (later_failure,),
            )
            conn.execute(
                "insert into message_status_events (message_id, provider, status, occurred_at, received_at)"
                " values (?, 'sandbox', 'failed', '2029-12-31 23:59:00', '2029-12-31 23:59:00')",
                (earlier_failure,),
            )
            variant_of = dict(conn.execute(
                "select message_id, variant from messages where message_id in (?, ?)", (later_failure, earlier_failure)
            ).fetchall())  # fmt: skip
    finally:
        conn.close()
    after = campaigns.variant_counts(campaign.campaign_id, home=home)
    lost = variant_of[later_failure]
    assert after[lost][1] == before[lost][1] - 1
    assert sum(d for _, d in after.values()) == sum(d for _, d in before.values()) - 1
