"""Data-subject erasure: the store forgets the person, the ledger keeps the proof, the marts follow."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import stat
import subprocess
import sys
from datetime import date, datetime
from pathlib import Path

import pandas as pd
import pytest

from smsops import consent, demo, erasure, ingress, phones, store, warehouse
from smsops.erasure import ErasureError, NothingToErase

PHONE = "+79123456789"
PHONE_AS_CRM = "8 (912) 345-67-89"
OTHER = "+79990001122"
T0 = "2025-03-01 12:00:00"
SUBJECT = {
    "external_id": "CRM-0000001",
    "first_name": "Зольтан",
    "last_name": "Эрасуров",
    "email": "zoltan.erasurov@example.org",
    "phone_raw": PHONE_AS_CRM,
    "ip": "203.0.113.77",
    "user_agent": "Mozilla/5.0 (ZoltanPhone 1.0)",
    "order": "ORD-00000001",
}
# What must not survive anywhere in the store, in any text column.
PERSONAL = [PHONE, PHONE[1:], "%2B79123456789", *SUBJECT.values()]


@pytest.fixture
def conn(home, monkeypatch):
    monkeypatch.delenv(erasure.SECRET_ENV, raising=False)
    connection = store.open_store(home)
    yield connection
    connection.close()


def add_contact(conn, contact_id, external_id, first, last, email, raw, phone) -> None:
    conn.execute(
        """
        insert into contacts (
            contact_id, external_id, first_name, last_name, gender, birth_date, email, city, region,
            time_zone, phone_raw, phone_e164, phone_valid, phone_reason, number_type, phone_country,
            phone_time_zones, attributes, created_at, updated_at
        )
        values (?, ?, ?, ?, 'm', '1990-05-05', ?, 'Казань', 'Татарстан', 'Europe/Moscow', ?, ?, 1, null,
                'mobile', 'RU', 'Europe/Moscow', '{"loyalty_tier": "gold"}', ?, ?)
        """,
        (contact_id, external_id, first, last, email, raw, phone, T0, T0),
    )


def add_message(conn, message_id, contact_id, phone, body) -> None:
    conn.execute(
        """
        insert into messages (
            message_id, idempotency_key, campaign_id, variant, contact_id, phone_e164, body, encoding,
            segments, price, currency, state, provider, provider_message_id, planned_at, submitted_at
        )
        values (?, ?, 1, 'A', ?, ?, ?, 'UCS-2', 1, 3.5, 'RUB', 'submitted', 'sandbox', ?, ?, ?)
        """,
        (message_id, f"1:{contact_id}", contact_id, phone, body, f"SM{message_id}", T0, T0),
    )


def seed(conn) -> None:
    """The subject (contact 1, with everything a contact can leave behind) and a bystander (2)."""
    with store.transaction(conn):
        add_contact(
            conn, 1, SUBJECT["external_id"], "Зольтан", "Эрасуров", SUBJECT["email"], PHONE_AS_CRM, PHONE
        )
        add_contact(conn, 2, "CRM-0000002", "Анна", "Петрова", "anna@example.org", "+7 999 000-11-22", OTHER)
        conn.execute(
            "insert into campaigns (campaign_id, name, kind, status, created_at) "
            "values (1, 'Sale', 'promo', 'finished', ?)",
            (T0,),
        )
        add_message(conn, 1, 1, PHONE, "Зольтан, −30% на всё! https://s.example.ru/l/tok1")
        add_message(conn, 2, 2, OTHER, "Анна, −30% на всё! https://s.example.ru/l/tok2")
        conn.executemany(
            "insert into links (token, message_id, url, created_at) values (?, ?, ?, ?)",
            [
                (
                    "tok1",
                    1,
                    f"https://shop.example.ru/sale?utm_source=sms&phone=%2B79123456789&uid={SUBJECT['external_id']}",
                    T0,
                ),
                ("tok2", 2, "https://shop.example.ru/sale?utm_source=sms", T0),
            ],
        )
        conn.executemany(
            "insert into clicks (token, message_id, clicked_at, user_agent) values (?, ?, ?, ?)",
            [
                ("tok1", 1, "2025-03-01 13:00:00", SUBJECT["user_agent"]),
                ("tok2", 2, "2025-03-01 13:00:00", "Other UA"),
            ],
        )
        conn.executemany(
            "insert into orders (order_id, external_id, contact_id, ordered_at, amount, currency, category, status)"
            " values (?, ?, ?, '2025-03-01 15:00:00', ?, 'RUB', 'shoes', 'paid')",
            [(1, SUBJECT["order"], 1, 4200.0), (2, "ORD-00000002", 2, 990.0)],
        )
        conn.executemany(
            "insert into customer_events (event_key, contact_id, event_type, occurred_at, properties)"
            " values (?, ?, 'signup', ?, '{\"platform\": \"ios\"}')",
            [(f"signup:{SUBJECT['email']}", 1, T0), ("signup:anna", 2, T0)],
        )
    for phone, contact_id, ip in ((PHONE, 1, SUBJECT["ip"]), (OTHER, 2, "198.51.100.2")):
        consent.record(
            conn,
            phone_e164=phone,
            purpose="marketing",
            action="opt_in",
            source="web_form",
            occurred_at="2025-02-01 10:00:00",
            consent_text="Согласен получать рекламные SMS.",
            proof={"form_url": "https://shop.example.ru/signup", "ip": ip, "session": "s-1"},
            contact_id=contact_id,
        )
    consent.record(
        conn,
        phone_e164=PHONE,
        purpose="service",
        action="opt_in",
        source="import",
        occurred_at="2025-02-02 10:00:00",
        proof={"import_batch": "b1", "file": "crm.csv", "file_sha256": "ab" * 32, "line": 2},
        contact_id=1,
        event_key=f"import:{'ab' * 32}:service:{PHONE}",
    )
    consent.handle_inbound(
        conn,
        provider="sandbox",
        provider_message_id="IN1",
        from_e164=PHONE,
        body="СТОП",
        received_at="2025-03-01 14:00:00",
        in_reply_to=1,
    )


def dump(conn) -> dict[str, list[tuple]]:
    return {table: conn.execute(f"select * from {table} order by 1, 2").fetchall() for table in store.TABLES}


def texts(conn) -> list[tuple[str, str]]:
    """Every text value in the store, with the table it is in."""
    return [
        (table, value)
        for table, rows in dump(conn).items()
        for row in rows
        for value in row
        if isinstance(value, str)
    ]


def leftovers(conn, needles) -> list[tuple[str, str, str]]:
    return [(table, needle, value) for table, value in texts(conn) for needle in needles if needle in value]


BYSTANDER = {
    "contacts": "contact_id = 2",
    "messages": "contact_id = 2",
    "links": "message_id = 2",
    "clicks": "message_id = 2",
    "orders": "contact_id = 2",
    "customer_events": "contact_id = 2",
    "consent_events": f"phone_e164 = '{OTHER}'",
    "campaigns": "true",
}


def bystander(conn) -> dict[str, list[tuple]]:
    """Contact 2's rows, which erasing contact 1 must not touch."""
    return {
        table: conn.execute(f"select * from {table} where {where} order by 1").fetchall()
        for table, where in BYSTANDER.items()
    }


def secret_of(conn) -> bytes:
    return erasure.load_secret(Path(conn.execute("pragma database_list").fetchone()[2]).parent)


def erase_subject(conn, **extra) -> erasure.ErasureResult:
    return erasure.erase(
        conn, phone_e164=PHONE_AS_CRM, requested_by="dpo@shop", reason="e-mail request", **extra
    )


# ---------------------------------------------------------------------------------------
# What erasing does to each table


def test_erase_leaves_no_personal_string_anywhere_in_the_store(conn):
    seed(conn)
    assert leftovers(conn, PERSONAL)  # the check finds them before
    result = erase_subject(conn)
    assert leftovers(conn, PERSONAL) == []
    assert result.contact_ids == (1,)
    assert (result.contacts_erased, result.messages_scrubbed, result.inbound_scrubbed) == (1, 1, 1)
    assert (result.clicks_scrubbed, result.links_scrubbed, result.orders_scrubbed) == (1, 1, 1)
    assert (result.customer_events_scrubbed, result.consent_events_minimised) == (1, 3)
    assert result.erasure_events_recorded == 2 and result.changed and not result.dry_run


def test_a_reply_journaled_but_not_applied_is_erased_with_the_rest(conn, home):
    """A STOP answered a moment before the erasure sits in the ingress journal: it is applied
    inside the erasure, so it never lands afterwards with the person's number."""
    seed(conn)
    journal = ingress.Journal(ingress.journal_path(home))
    payload = {"provider": "sandbox", "provider_message_id": "SM-late-stop", "from": PHONE, "to": "SHOP",
               "body": "STOP", "received_at": "2025-03-02T10:00:00+00:00"}  # fmt: skip
    journal.append_sync([ingress.Entry("inbound", payload, "sandbox", PHONE, "stop")])
    refused = {**payload, "provider_message_id": "SM-refused", "from": "not a number"}
    journal.append_sync([ingress.Entry("inbound", {**refused, "note": f"from {PHONE}"})])
    journal.close()
    erase_subject(conn)
    ingress.apply_pending(home)  # what an applier does next: nothing left to apply, the journal pruned
    assert leftovers(conn, PERSONAL) == []
    stop = conn.execute(
        "select from_e164, body from inbound_messages where provider_message_id = 'SM-late-stop'"
    )
    assert stop.fetchone() == (erasure.pseudonym(PHONE, erasure.load_secret(home)), "")
    assert conn.execute("select count(*) from ingress_rejects").fetchone()[0] == 1
    jconn = ingress.connect(ingress.journal_path(home))
    assert jconn.execute("select count(*) from entries").fetchone()[0] == 0
    jconn.close()
    assert PHONE.encode() not in ingress.journal_path(home).read_bytes()


def test_erased_contact_keeps_its_id_and_only_what_is_not_personal(conn):
    seed(conn)
    erase_subject(conn, now=datetime(2025, 6, 1, 9, 30))
    alias = erasure.pseudonym(PHONE, secret_of(conn))
    row = conn.execute("select * from contacts where contact_id = 1").fetchone()
    columns = [d[0] for d in conn.execute("select * from contacts").description]
    contact = dict(zip(columns, row, strict=True))
    assert alias.startswith("erased:") and len(alias) == len("erased:") + 24
    assert contact["phone_e164"] == alias
    assert (contact["phone_valid"], contact["phone_reason"]) == (0, "erased")
    for column in ("external_id", "first_name", "last_name", "gender", "birth_date", "email", "city", "region",
                   "time_zone", "phone_raw", "phone_time_zones", "attributes"):  # fmt: skip
        assert contact[column] is None, column
    assert (contact["number_type"], contact["phone_country"], contact["created_at"]) == ("mobile", "RU", T0)
    assert contact["updated_at"] == "2025-06-01 09:30:00"


def test_outbox_replies_clicks_links_orders_and_events_are_scrubbed_and_the_bystander_is_not(conn):
    seed(conn)
    before = bystander(conn)
    erase_subject(conn)
    alias = erasure.pseudonym(PHONE, secret_of(conn))
    assert conn.execute("select phone_e164, body, price from messages where message_id = 1").fetchone() == (
        alias,
        None,
        3.5,
    )
    assert conn.execute("select from_e164, body, keyword, contact_id from inbound_messages").fetchone() == (
        alias,
        "",
        "stop",
        1,
    )
    assert conn.execute("select user_agent from clicks where message_id = 1").fetchone() == (None,)
    url = conn.execute("select url from links where token = 'tok1'").fetchone()[0]
    assert url.startswith("https://shop.example.ru/sale?utm_source=sms&phone=erased:")
    order = conn.execute("select external_id, amount, category from orders where order_id = 1").fetchone()
    assert order[0].startswith("erased:") and order[1:] == (4200.0, "shoes")
    event = conn.execute("select event_key, properties, event_type from customer_events where contact_id = 1")
    assert event.fetchone() == ("signup:[erased]", None, "signup")
    assert bystander(conn) == before


def test_consent_ledger_is_minimised_not_deleted_and_the_erasure_is_recorded(conn):
    seed(conn)
    before = conn.execute("select count(*) from consent_events where phone_e164 = ?", (PHONE,)).fetchone()[0]
    result = erase_subject(conn, now=datetime(2025, 6, 1, 9, 30))
    assert (
        conn.execute("select count(*) from consent_events where phone_e164 = ?", (PHONE,)).fetchone()[0] == 0
    )
    proof = erasure.erased_proof(conn, "+7 912 345 67 89")
    alias = erasure.pseudonym(PHONE, secret_of(conn))
    assert len(proof) == before + 2 and {event["phone_e164"] for event in proof} == {alias}
    web_form = next(e for e in proof if e["source"] == "web_form")
    assert web_form["proof"] == {"form_url": "https://shop.example.ru/signup", "redacted": ["ip", "session"]}
    assert (web_form["action"], web_form["purpose"], web_form["occurred_at"]) == (
        "opt_in",
        "marketing",
        "2025-02-01 10:00:00",
    )
    assert web_form["consent_text"] == "Согласен получать рекламные SMS."
    imported = next(e for e in proof if e["source"] == "import")
    assert imported["event_key"] == f"import:{'ab' * 32}:service:{alias}"
    assert imported["proof"]["file_sha256"] == "ab" * 32 and imported["proof"]["line"] == 2
    stop = next(e for e in proof if e["source"] == "keyword_reply")
    assert (stop["action"], stop["consent_text"]) == ("opt_out", "СТОП")  # a bare keyword is not personal
    erasures = [e for e in proof if e["event_key"].startswith("erasure:")]
    assert sorted(e["purpose"] for e in erasures) == ["marketing", "service"]
    for event in erasures:
        assert (
            event["event_key"]
            == f"erasure:{result.erasure_key}:{alias.removeprefix('erased:')}:{event['purpose']}"
        )
        assert (event["action"], event["source"], event["consent_text"]) == (
            "opt_out",
            "admin",
            "erasure request",
        )
        assert event["proof"] == {
            "erasure": result.erasure_key,
            "requested_by": "dpo@shop",
            "reason": "e-mail request",
        }
        assert event["occurred_at"] == "2025-06-01 09:30:00" and event["contact_id"] == 1


def test_personal_strings_are_cut_out_of_the_request_reason(conn):
    seed(conn)
    erasure.erase(
        conn,
        phone_e164=PHONE,
        requested_by="dpo",
        reason=f"Зольтан Эрасуров ({SUBJECT['email']}) asked by phone",
    )
    (proof,) = conn.execute(
        "select proof from consent_events where event_key like 'erasure:%marketing'"
    ).fetchone()
    assert json.loads(proof)["reason"] == "[erased] [erased] ([erased]) asked by phone"


def test_a_returning_number_is_recognised_as_erased(conn):
    seed(conn)
    assert not erasure.is_erased_number(conn, PHONE)
    erase_subject(conn)
    assert erasure.is_erased_number(conn, PHONE)
    assert erasure.is_erased_number(conn, "8 912 345 67 89")
    assert not erasure.is_erased_number(conn, OTHER)
    # imported again with an opt-in: the number in clear has a clean ledger, the erasure still tells
    add_contact(conn, 3, "CRM-0000003", "Z", "E", None, PHONE, PHONE)
    consent.record(
        conn, phone_e164=PHONE, purpose="marketing", action="opt_in", source="import", occurred_at=T0
    )
    assert erasure.erased_numbers(conn, [PHONE, OTHER]) == {PHONE}


def test_erasing_by_phone_erases_every_contact_holding_the_number(conn):
    seed(conn)
    add_contact(conn, 3, "CRM-0000003", "Зольтан", "Эрасуров", None, PHONE, PHONE)
    result = erase_subject(conn)
    assert result.contact_ids == (1, 3) and result.contacts_erased == 2 and result.numbers_in_use == 0
    reasons = conn.execute("select contact_id, phone_reason from contacts order by 1").fetchall()
    assert reasons == [(1, "erased"), (2, None), (3, "erased")]


def test_erasing_one_of_two_contacts_sharing_a_number_keeps_the_numbers_ledger(conn):
    seed(conn)
    add_contact(conn, 3, None, "Другой", "Человек", None, PHONE, PHONE)
    ledger_before = conn.execute(
        "select * from consent_events where phone_e164 = ? order by 1", (PHONE,)
    ).fetchall()
    result = erasure.erase(conn, contact_id=1, requested_by="dpo")
    assert result.contacts_erased == 1 and result.numbers_in_use == 1
    assert result.consent_events_minimised == 0 and result.erasure_events_recorded == 0
    after = conn.execute("select * from consent_events where phone_e164 = ? order by 1", (PHONE,)).fetchall()
    assert after == ledger_before  # it still decides what contact 3 may receive
    assert consent.may_send(conn, PHONE, "promo") == (False, "opted_out")
    assert conn.execute("select first_name, phone_e164 from contacts where contact_id = 3").fetchone() == (
        "Другой",
        PHONE,
    )
    assert conn.execute("select phone_reason from contacts where contact_id = 1").fetchone() == ("erased",)
    assert conn.execute("select body from messages where message_id = 1").fetchone() == (None,)
    assert not erasure.is_erased_number(conn, PHONE)


def test_a_number_only_the_ledger_knows_is_minimised_and_blocked(conn):
    seed(conn)
    stranger = "+79005556677"
    consent.record(
        conn,
        phone_e164=stranger,
        purpose="marketing",
        action="opt_in",
        source="web_form",
        occurred_at=T0,
        proof={"form_url": "https://shop.example.ru/signup", "ip": "192.0.2.1"},
    )
    result = erasure.erase(conn, phone_e164="8 900 555-66-77", requested_by="dpo")
    assert result.contact_ids == () and result.contacts_erased == 0
    assert result.consent_events_minimised == 1 and result.erasure_events_recorded == 2
    assert erasure.is_erased_number(conn, stranger)
    assert leftovers(conn, [stranger, stranger[1:], "192.0.2.1"]) == []


# ---------------------------------------------------------------------------------------
# Idempotent, all or nothing, dry run


def test_erasing_twice_changes_nothing_and_reports_the_first_erasure(conn):
    seed(conn)
    first = erase_subject(conn)
    after_first = dump(conn)
    again = erase_subject(conn)
    by_id = erasure.erase(conn, contact_id=1, requested_by="someone else")
    assert dump(conn) == after_first
    for result in (again, by_id):
        assert not result.changed and result.erasure_events_recorded == 0
        assert result.erasure_key == first.erasure_key and result.contact_ids == (1,)


def test_a_dry_run_reports_the_counts_and_changes_nothing(conn):
    seed(conn)
    before = dump(conn)
    preview = erase_subject(conn, dry_run=True)
    assert dump(conn) == before and preview.dry_run
    real = erase_subject(conn)
    assert (preview.contacts_erased, preview.messages_scrubbed, preview.consent_events_minimised) == (
        real.contacts_erased,
        real.messages_scrubbed,
        real.consent_events_minimised,
    )


@pytest.mark.parametrize(
    "trigger",
    [
        "before update on clicks",  # half-way through
        "before insert on consent_events",  # the very last write
    ],
)
def test_a_failure_half_way_leaves_everything_as_it_was(conn, trigger):
    seed(conn)
    before = dump(conn)
    conn.execute(f"create temp trigger fail {trigger} begin select raise(abort, 'disk on fire'); end")
    with pytest.raises(sqlite3.DatabaseError, match="disk on fire"):
        erase_subject(conn)
    assert not conn.in_transaction
    assert dump(conn) == before


def test_inside_a_callers_transaction_a_failure_rolls_back_only_the_erasure(conn):
    seed(conn)
    conn.execute("begin immediate")
    conn.execute("update contacts set city = 'Самара' where contact_id = 2")
    conn.execute("create temp trigger fail before update on orders begin select raise(abort, 'no'); end")
    with pytest.raises(sqlite3.DatabaseError):
        erase_subject(conn)
    assert conn.in_transaction
    conn.execute("commit")
    assert conn.execute("select city from contacts where contact_id = 2").fetchone() == ("Самара",)
    assert conn.execute("select first_name from contacts where contact_id = 1").fetchone() == ("Зольтан",)


# ---------------------------------------------------------------------------------------
# Bad requests


def test_nothing_to_erase_names_the_number_masked(conn):
    seed(conn)
    with pytest.raises(NothingToErase) as info:
        erasure.erase(conn, phone_e164="+79001234567", requested_by="dpo")
    assert phones.mask("+79001234567") in str(info.value) and "+79001234567" not in str(info.value)
    with pytest.raises(NothingToErase, match="no contact 99"):
        erasure.erase(conn, contact_id=99, requested_by="dpo")


@pytest.mark.parametrize(
    "request_",
    [
        {"requested_by": "dpo"},
        {"phone_e164": PHONE, "contact_id": 1, "requested_by": "dpo"},
        {"phone_e164": "нет телефона", "requested_by": "dpo"},
        {"contact_id": 0, "requested_by": "dpo"},
        {"phone_e164": PHONE, "requested_by": "  "},
    ],
)
def test_bad_requests_are_refused_before_anything_is_written(conn, request_):
    seed(conn)
    before = dump(conn)
    with pytest.raises(ErasureError):
        erasure.erase(conn, **request_)
    assert dump(conn) == before


# ---------------------------------------------------------------------------------------
# The secret


def test_the_secret_from_the_environment_never_reaches_the_store(conn, home, monkeypatch):
    secret = "env-secret-" + "q7" * 16
    monkeypatch.setenv(erasure.SECRET_ENV, secret)
    seed(conn)
    erase_subject(conn)
    assert not (home / erasure.KEY_FILE).exists()
    assert (
        erasure.pseudonym(PHONE, secret.encode())
        == conn.execute("select phone_e164 from contacts where contact_id = 1").fetchone()[0]
    )
    assert leftovers(conn, [secret]) == []
    conn.execute("pragma wal_checkpoint(truncate)")
    assert secret.encode() not in (home / "ops.sqlite").read_bytes()


def test_the_key_file_is_created_once_readable_by_its_owner_only_and_kept_out_of_the_store(conn, home):
    seed(conn)
    erase_subject(conn)
    key = home / erasure.KEY_FILE
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    secret = key.read_text().strip()
    assert len(secret) == 64 and erasure.load_secret(home) == secret.encode() == secret_of(conn)
    assert leftovers(conn, [secret, secret[:16]]) == []
    erasure.erase(conn, phone_e164=OTHER, requested_by="dpo")
    assert key.read_text().strip() == secret  # the same key for every erasure


def test_a_key_file_others_can_read_is_refused(conn, home):
    seed(conn)
    erase_subject(conn)
    os.chmod(home / erasure.KEY_FILE, 0o644)
    with pytest.raises(ErasureError, match="chmod 600"):
        erasure.erase(conn, phone_e164=OTHER, requested_by="dpo")


def test_a_lost_key_is_not_silently_replaced(conn, home):
    seed(conn)
    erase_subject(conn)
    (home / erasure.KEY_FILE).unlink()
    with pytest.raises(ErasureError, match="restore it"):
        erasure.erase(conn, phone_e164=OTHER, requested_by="dpo")
    with pytest.raises(ErasureError, match="restore it"):
        erasure.is_erased_number(conn, PHONE)
    assert not (home / erasure.KEY_FILE).exists()


def test_the_erased_values_are_gone_from_the_database_files_too(conn, home):
    seed(conn)
    conn.execute("pragma wal_checkpoint(truncate)")
    raw = home / "ops.sqlite"
    assert SUBJECT["email"].encode() in raw.read_bytes()
    erase_subject(conn)
    wal = home / "ops.sqlite-wal"
    data = raw.read_bytes() + (wal.read_bytes() if wal.exists() else b"")
    for needle in (PHONE, SUBJECT["email"], "Эрасуров", SUBJECT["ip"], SUBJECT["user_agent"]):
        assert needle.encode() not in data, needle


# ---------------------------------------------------------------------------------------
# The command line


def smsops(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "smsops.cli", "contacts", "erase", *args],
        capture_output=True,
        text=True,
        input=stdin,
    )


def test_cli_erases_with_yes_and_prints_the_counts(conn):
    seed(conn)
    out = smsops("--phone", PHONE_AS_CRM, "--requested-by", "dpo@shop", "--reason", "ticket 12", "--yes")
    assert out.returncode == 0, out.stderr
    assert re.search(r"contacts erased +1\n", out.stdout) and re.search(
        r"consent events minimised +3\n", out.stdout
    )
    assert leftovers(conn, PERSONAL) == []
    again = smsops("--contact-id", "1", "--requested-by", "dpo@shop", "--yes")
    assert again.returncode == 0 and "already erased" in again.stdout


def test_cli_without_yes_shows_what_would_go_and_refuses_without_a_terminal(conn):
    seed(conn)
    before = dump(conn)
    out = smsops("--contact-id", "1", "--requested-by", "dpo@shop")
    assert out.returncode == 1
    assert "would erase contact 1:" in out.stdout and re.search(r"messages scrubbed +1\n", out.stdout)
    assert "add --yes" in out.stderr
    assert dump(conn) == before


def test_cli_says_nothing_to_erase_with_the_number_masked(conn):
    seed(conn)
    out = smsops("--phone", "8 900 123-45-67", "--requested-by", "dpo", "--yes")
    assert out.returncode == 2
    assert "nothing to erase" in out.stderr and phones.mask("+79001234567") in out.stderr
    assert "4567" not in out.stderr


# ---------------------------------------------------------------------------------------
# The marts after the next build


def scan(home: Path, needles: list[str]) -> list[tuple[str, str, str]]:
    """Every text column of every table and view in the warehouse that holds one of ``needles``."""
    found = []
    with warehouse.connect(home) as wh:
        columns = wh.execute(
            """
            select table_schema, table_name, column_name
            from information_schema.columns
            where table_schema not in ('information_schema', 'pg_catalog')
                and (data_type like 'VARCHAR%' or data_type = 'JSON')
            """
        ).fetchall()
        for schema, table, column in columns:
            for needle in needles:
                hits = wh.execute(
                    f'select count(*) from "{schema}"."{table}" where contains(cast("{column}" as varchar), ?)',
                    [needle],
                ).fetchone()[0]
                if hits:
                    found.append((f"{schema}.{table}.{column}", needle, hits))
    return found


TOTALS = """
    select sum(audience), sum(sent), sum(delivered), sum(clicks), sum(opt_outs), round(sum(revenue), 2)
    from fct_campaign_performance
"""


def test_after_the_next_build_the_marts_hold_nothing_personal_of_an_erased_contact(tmp_path, monkeypatch):
    monkeypatch.delenv(erasure.SECRET_ENV, raising=False)
    demo.generate(300, 3, as_of=date(2026, 1, 1), home=tmp_path)
    conn = store.open_store(tmp_path)
    try:
        (contact_id, phone, external_id, raw) = conn.execute(
            """
            select c.contact_id, c.phone_e164, c.external_id, c.phone_raw
            from contacts as c
            where c.phone_valid = 1
                and (select count(*) from contacts as o where o.phone_e164 = c.phone_e164) = 1
                and exists (select 1 from clicks join messages using (message_id) where contact_id = c.contact_id)
                and exists (select 1 from consent_events as e where e.phone_e164 = c.phone_e164)
            order by c.contact_id
            limit 1
            """
        ).fetchone()
        # distinctive personal data, so a scan cannot mistake another Анна for this one
        first, last, email = "Зольтан", "Эрасуров", "zoltan.erasurov@example.org"
        conn.execute(
            "update contacts set first_name = ?, last_name = ?, email = ? where contact_id = ?",
            (first, last, email, contact_id),
        )
        conn.execute(
            "update messages set body = ? || body where contact_id = ?", (f"{first} {last}, ", contact_id)
        )
        consent.handle_inbound(
            conn,
            provider="sandbox",
            provider_message_id="IN-ERASE",
            from_e164=phone,
            body=f"{first} не пишите мне больше",
            received_at=datetime(2026, 1, 1, 10),
        )
        needles = [phone, phone[1:], first, last, email, external_id, raw]
        ledger = conn.execute(
            "select count(*) from consent_events where phone_e164 = ?", (phone,)
        ).fetchone()[0]
        assert ledger >= 1

        warehouse.build(tmp_path)
        assert {needle for _, needle, _ in scan(tmp_path, needles)} == set(needles)  # the scan finds them
        totals_before = warehouse.query(TOTALS, home=tmp_path).to_numpy().tolist()

        result = erasure.erase(conn, phone_e164=phone, requested_by="dpo")
        assert result.contacts_erased == 1 and result.clicks_scrubbed >= 1 and result.inbound_scrubbed >= 1
        warehouse.build(tmp_path)

        assert scan(tmp_path, needles) == []
        alias = conn.execute(
            "select phone_e164 from contacts where contact_id = ?", (contact_id,)
        ).fetchone()[0]
        dim = warehouse.query("select * from dim_contacts where contact_id = ?", [contact_id], home=tmp_path)
        row = dim.iloc[0].to_dict()
        assert row["phone_e164"] == alias and row["phone_reason"] == "erased"
        for column in (
            "first_name",
            "last_name",
            "email",
            "external_id",
            "birth_date",
            "age",
            "city",
            "attributes",
        ):
            assert pd.isna(row[column]), column
        assert (
            not row["phone_valid"] and not row["is_reachable_marketing"] and not row["is_reachable_service"]
        )
        assert row["opted_out"] and row["service_opted_out"]
        messages = warehouse.query(
            "select * from fct_messages where contact_id = ?", [contact_id], home=tmp_path
        )
        assert len(messages) and set(messages["phone_e164"]) == {alias} and "body" not in messages.columns
        # the aggregates do not move: the contact's id, messages, clicks and orders are all still there
        assert warehouse.query(TOTALS, home=tmp_path).to_numpy().tolist() == totals_before

        proof = erasure.erased_proof(conn, phone)
        assert len(proof) == ledger + 2
        assert all(event["phone_e164"] == alias for event in proof)
        assert not any(
            "ip" in (event["proof"] or {}) or "session" in (event["proof"] or {}) for event in proof
        )
        assert erasure.is_erased_number(conn, phone)
    finally:
        conn.close()


def test_an_erased_number_may_not_be_messaged_even_without_history_in_clear(tmp_path):
    from smsops import consent, erasure, store

    conn = store.open_store(tmp_path)
    conn.execute(
        "insert into contacts (contact_id, first_name, phone_e164, phone_valid, created_at, updated_at)"
        " values (1, 'Анна', '+79123456789', 1, '2026-01-01 00:00:00', '2026-01-01 00:00:00')"
    )
    assert consent.may_send(conn, "+79123456789", "service") == (True, None)
    erasure.erase(conn, phone_e164="+79123456789", requested_by="DPO")
    assert consent.may_send(conn, "+79123456789", "service") == (False, "erased")
    assert consent.may_send(conn, "+79123456789", "promo") == (False, "erased")
