"""Erasure that a scan cannot contradict (DESIGN.md invariant 10, issue 16 items 1 and 6).

One demo base uses a number everywhere a number goes: imported from a file (kept as an upload,
with a rejects file), sent a campaign through the sandbox (outbox, attempts, receipts), clicked
and replied to (through the webhook app and its journal, one reply still unapplied), logged,
built twice, copied to a development warehouse and backed up. Then it is erased, the warehouse is
built, and every byte of every file under ``SMSOPS_HOME`` is searched for the number as people
write it: E.164 (``+7916…``), without the ``+``, and nationally with ``8``, each in UTF-8 and in
UTF-16 (LE and BE). Then the backup taken before the erasure is restored, built and searched
again. Before erasure purged outside the store's tables, the scan found the number in the
ingress journal, the services' log, the upload, the snapshot published before the erasure and
the one built after it (a copy of the old file).
"""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from dataclasses import replace
from datetime import UTC, date, datetime
from pathlib import Path

import httpx
import pytest
from sandboxes import FAST
from zones import zone_where_it_is

from smsops import consent, demo, dispatch, erasure, importer, ingress, store, warehouse, webhooks
from smsops.dispatch import DispatchSettings
from smsops.providers import from_config
from smsops.providers.sandbox import run_in_thread, serve_in_thread

PHONE = "+79163217458"  # in no file of the project (its docs use +79123456789 as an example)
WRITTEN = (PHONE, PHONE[1:], "8" + PHONE[2:])
ENCODINGS = ("utf-8", "utf-16-le", "utf-16-be")
FIRST, LAST, EMAIL = "Зольтан", "Эрасуров", "zoltan.erasurov@example.org"
SENDER = "SHOPMARKET"


def scan(home: Path, forms: tuple[str, ...] = WRITTEN) -> dict[str, list[str]]:
    """Every file under ``home`` holding one of ``forms`` in one of :data:`ENCODINGS`, and which."""
    needles = {f"{form} ({encoding})": form.encode(encoding) for form in forms for encoding in ENCODINGS}
    hits: dict[str, list[str]] = {}
    for folder, _, files in os.walk(home):
        for name in files:
            path = Path(folder, name)
            try:
                data = path.read_bytes()
            except FileNotFoundError:  # a lock file or log removed while walking
                continue
            found = [label for label, needle in needles.items() if needle in data]
            if found:
                hits[str(path.relative_to(home))] = found
    return hits


def rows(home: Path, sql: str, *params) -> list[tuple]:
    conn = store.open_store(home)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def cli(home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "smsops.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "SMSOPS_HOME": str(home)},
    )


def import_subject(home: Path) -> None:
    """The number comes in from a CRM export (kept under uploads/), written twice: the first
    row is rejected as a duplicate into a rejects file the app writes under the home."""
    data = (
        "phone;first_name;last_name;email\n"
        f"{PHONE};{FIRST};{LAST};{EMAIL}\n"
        f"8 916 321-74-58;{FIRST};{LAST};{EMAIL}\n"
        "+79990001122;Анна;Петрова;anna@example.org\n"
    ).encode()
    upload = importer.save_upload("crm-export.csv", data, home=home)
    (home / "rejects").mkdir(exist_ok=True)
    result = importer.run(
        upload,
        importer.Options(consent_source="signup form, 2025"),
        home=home,
        rejects=home / "rejects" / "crm-export.rejects.csv",
    )
    assert result.rejected_total == 1 and result.new + result.updated == 2


def campaign_to_subject(home: Path) -> tuple[int, str]:
    """A running campaign planned for the subject and a few others, with a tracked link each."""
    now = datetime.now(UTC).replace(tzinfo=None).isoformat(sep=" ", timespec="seconds")
    conn = store.open_store(home)
    try:
        (subject,) = conn.execute("select contact_id from contacts where phone_e164 = ?", (PHONE,)).fetchone()
        others = [
            r[0]
            for r in conn.execute(
                "select contact_id from contacts where phone_valid = 1 and phone_e164 <> ?"
                " and substr(phone_e164, -2) not in ('00', '13', '14', '97', '98', '99')"
                " order by contact_id limit 4",
                (PHONE,),
            )
        ]
        with store.transaction(conn):
            (cid,) = conn.execute(
                "insert into campaigns (name, kind, status, sender_id, created_at, launched_at)"
                " values ('Весна', 'promo', 'running', ?, ?, ?) returning campaign_id",
                (SENDER, now, now),
            ).fetchone()
            conn.execute(
                "insert into campaign_variants (campaign_id, variant, template, sender_id)"
                " values (?, 'A', '{{ first_name }}, −20%: {{ link }}', ?)",
                (cid, SENDER),
            )
            for contact_id in [subject, *others]:
                phone, first = conn.execute(
                    "select phone_e164, coalesce(first_name, '') from contacts where contact_id = ?",
                    (contact_id,),
                ).fetchone()
                token = f"t{cid}x{contact_id}"
                (message_id,) = conn.execute(
                    "insert into messages (idempotency_key, campaign_id, variant, contact_id, phone_e164, body,"
                    " state, planned_at) values (?, ?, 'A', ?, ?, ?, 'planned', ?) returning message_id",
                    (
                        f"{cid}:{contact_id}",
                        cid,
                        contact_id,
                        phone,
                        f"{first}, −20%: https://s.example/l/{token}",
                        now,
                    ),
                ).fetchone()
                conn.execute(
                    "insert into links (token, message_id, url, created_at) values (?, ?, ?, ?)",
                    (token, message_id, f"https://shop.example.ru/spring?phone={phone[1:]}", now),
                )
        conn.execute(  # a zone where it is early afternoon: quiet hours never hold these back
            "update contacts set time_zone = ?"
            " where contact_id in (select contact_id from messages where campaign_id = ?)",
            (zone_where_it_is(13), cid),
        )
        consent.record_many(
            conn,
            [
                consent.ConsentEvent(phone, "marketing", "opt_in", "web_form", now)
                for (phone,) in conn.execute("select phone_e164 from messages where campaign_id = ?", (cid,))
            ],
        )
    finally:
        conn.close()
    return cid, f"t{cid}x{subject}"


def send_click_and_reply(home: Path, cid: int, token: str) -> None:
    """Send through the sandbox, with receipts, a click and a reply through the webhook app; a
    log of the run under the home; and one more reply journaled but not yet applied."""
    handler = logging.FileHandler(home / "serve.log")
    handler.setLevel(logging.INFO)
    logging.getLogger().addHandler(handler)
    try:
        placeholder = from_config("sandbox", {"SANDBOX_URL": "http://127.0.0.1:9"})
        with serve_in_thread(webhooks.create_app({"sandbox": placeholder}, home=home)) as hooks:
            settings = replace(FAST, inbound_url=f"{hooks.url}/webhooks/sandbox/inbound")
            with run_in_thread(settings) as sandbox:
                provider = from_config("sandbox", {"SANDBOX_URL": sandbox.url})
                options = DispatchSettings(
                    rate_per_second=1_000, concurrency=4, clients=2, backoff_base=0.05, unknown_grace=0.0,
                    linger=10, settle_window=0.0,
                    status_callback_url=f"{hooks.url}/webhooks/sandbox/status",
                )  # fmt: skip
                report = dispatch.run_sync(home, provider, options, campaign_id=cid)
                assert report.submitted == 5, report
                assert httpx.get(f"{hooks.url}/l/{token}", follow_redirects=False).status_code in (302, 307)
                answer = httpx.post(
                    f"{sandbox.url}/sandbox/inbound",
                    data={"From": PHONE, "Body": f"Спасибо, это {FIRST}, звоните на 8 916 321-74-58"},
                    auth=(settings.account_sid, settings.auth_token),
                )
                assert answer.status_code == 200, answer.text
                deadline = time.monotonic() + 20
                while not (
                    rows(home, "select count(*) from message_status_events where status = 'delivered'")[0][0]
                    >= 5
                    and rows(home, "select count(*) from inbound_messages where from_e164 = ?", PHONE)[0][0]
                    and rows(home, "select count(*) from clicks")[0][0]
                ):
                    assert time.monotonic() < deadline, "receipts, the reply or the click did not arrive"
                    time.sleep(0.05)
        logging.getLogger("smsops.webhooks").warning("reply from %s could not be matched to a message", PHONE)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    journal = ingress.Journal(ingress.journal_path(home))
    journal.append_sync(
        [
            ingress.Entry(
                "inbound",
                {
                    "provider": "sandbox",
                    "provider_message_id": "SM-late-reply",
                    "from": PHONE,
                    "to": "+15005550006",
                    "body": "СТОП",
                    "received_at": datetime.now(UTC).isoformat(),
                },
                provider="sandbox",
                phone=PHONE,
                keyword="stop",
            )
        ]
    )
    journal.close()


def ledger_and_outbox(home: Path) -> tuple[list[tuple], list[tuple]]:
    """The consent ledger (in key order, without its row ids: events a restore carries over come
    after the replayed erasure's) and the outbox."""
    return (
        rows(
            home,
            "select event_key, phone_e164, contact_id, purpose, action, source, consent_text, proof,"
            " occurred_at, recorded_at from consent_events order by event_key",
        ),
        rows(home, "select * from messages order by message_id"),
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    """The base described in the module's docstring, built twice and backed up (not erased)."""
    root = tmp_path_factory.mktemp("erasure-scan")
    home = root / "home"
    saved = {k: os.environ.get(k) for k in ("SMSOPS_HOME", erasure.SECRET_ENV)}
    os.environ["SMSOPS_HOME"] = str(home)
    os.environ.pop(erasure.SECRET_ENV, None)
    try:
        demo.generate(300, 11, as_of=date(2026, 1, 1), home=home)
        import_subject(home)
        warehouse.build(home, tests=False)
        cid, token = campaign_to_subject(home)
        send_click_and_reply(home, cid, token)
        warehouse.build(home, tests=False)
        # a development copy, as a plain `dbt build` from dbt_project/ makes
        shutil.copyfile(warehouse.current(home).path, home / "warehouse" / "dev.duckdb")
        backup = cli(home, "backup", str(root / "backup"))
        assert backup.returncode == 0, backup.stderr
        yield home, root / "backup"
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def erased(world):
    """The world after `smsops contacts erase --phone … --yes` and the next build."""
    home, _ = world
    before = scan(home)
    assert {"ops.sqlite", "serve.log"} <= set(before), before  # the scan sees it
    assert any(path.startswith("ingress.sqlite") for path in before)
    assert any(path.startswith("uploads/") for path in before) and any("rejects" in p for p in before)
    assert sum(path.startswith("warehouse/wh_") for path in before) >= 2
    out = cli(
        home, "contacts", "erase", "--phone", "8 (916) 321-74-58", "--requested-by", "dpo@shop", "--yes"
    )
    assert out.returncode == 0, out.stderr
    warehouse.build(home, tests=False)
    return home, out.stdout, ledger_and_outbox(home)


def test_after_an_erasure_and_a_build_no_file_under_the_home_holds_the_number(erased):
    home, _, _ = erased
    assert scan(home) == {}
    snapshots = sorted(p.name for p in (home / "warehouse").glob("*.duckdb"))
    assert snapshots == [warehouse.current(home).path.name]  # older ones and the dev copy are gone


def test_snapshots_the_pointer_the_store_and_the_journal_are_their_owners_only(erased):
    home, _, _ = erased  # built in this process, whose umask lets others read what it creates
    private = [warehouse.current(home).path, home / "warehouse" / "current.json", home / "ops.sqlite"]
    private += [home / "ingress.sqlite", home / "erasures.jsonl", home / erasure.KEY_FILE]
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in private} == {p.name: "0o600" for p in private}


def test_the_erasure_says_what_it_purged(erased):
    _, output, _ = erased
    assert "older warehouse snapshot" in output and "journal entr" in output
    assert "uploads/" in output and "rejects/crm-export.rejects.csv" in output
    assert "serve.log" in output and "scrubbed" in output


def test_a_backup_from_before_the_erasure_restores_without_the_person(erased, world):
    home, _, (ledger, outbox) = erased
    _, backup = world
    restored = cli(home, "restore", str(backup), "--yes")
    assert restored.returncode == 0, restored.stderr
    assert "1 erasure" in restored.stdout
    assert ledger_and_outbox(home) == (ledger, outbox)  # as after the erasure, nothing else lost
    warehouse.build(home, tests=False)
    assert scan(home) == {}
    with sqlite3.connect(home / "ops.sqlite") as conn:
        assert erasure.is_erased_number(conn, PHONE)
