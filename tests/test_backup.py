"""Backups of the operational store: consistent while smsops writes, and never a way back for a
person who asked to be forgotten (issue 16, item 6). The full round trip through a build and a
scan of every file is in test_erasure_scan.py."""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from test_erasure import PHONE, SUBJECT, seed

from smsops import backup, consent, erasure, store
from smsops.backup import BackupError


@pytest.fixture
def conn(home, monkeypatch):
    monkeypatch.delenv(erasure.SECRET_ENV, raising=False)
    connection = store.open_store(home)
    seed(connection)
    yield connection
    connection.close()


@pytest.fixture
def away(tmp_path_factory) -> Path:
    """A folder outside the test's SMSOPS_HOME, for backups."""
    return tmp_path_factory.mktemp("away")


def dump(home: Path) -> dict[str, list[tuple]]:
    c = sqlite3.connect(home / "ops.sqlite")
    try:
        return {
            table: c.execute(f"select * from {table} order by 1").fetchall()
            for table in ("consent_events", "messages", "contacts", "inbound_messages", "links", "clicks")
        }
    finally:
        c.close()


def holds_number(path: Path) -> bool:
    data = b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*"))
    return any(form.encode(enc) in data for form in (PHONE, PHONE[1:]) for enc in ("utf-8", "utf-16-le"))


def erase_subject(conn) -> erasure.ErasureResult:
    return erasure.erase(conn, phone_e164=PHONE, requested_by="dpo@shop", reason="ticket 7")


def test_a_backup_taken_while_others_write_is_the_store_at_one_moment(conn, home, away):
    stop = threading.Event()

    def write_pairs() -> None:  # each transaction adds two events: a copy holds an even number
        writer = store.connect(home / "ops.sqlite")
        n = 0
        while not stop.is_set():
            with store.transaction(writer):
                for _ in range(2):
                    n += 1
                    writer.execute(
                        "insert into customer_events (event_key, contact_id, event_type, occurred_at)"
                        " values (?, 2, 'view', '2025-03-02 00:00:00')",
                        (f"pair:{n}",),
                    )
        writer.close()

    thread = threading.Thread(target=write_pairs)
    thread.start()
    try:
        results = [backup.backup(away / f"b{i}", home) for i in range(5)]
    finally:
        stop.set()
        thread.join()
    for result in results:
        copy = sqlite3.connect(result.path / "ops.sqlite")
        assert copy.execute("pragma integrity_check").fetchone()[0] == "ok"
        (pairs,) = copy.execute(
            "select count(*) from customer_events where event_key like 'pair:%'"
        ).fetchone()
        assert pairs % 2 == 0
        copy.close()
    manifest = json.loads((results[0].path / backup.MANIFEST).read_text())
    assert manifest["format"] == backup.FORMAT and manifest["taken_at"] == results[0].taken_at


def test_the_backup_holds_the_erasure_key_and_is_readable_by_its_owner_only(conn, home, away):
    erase_subject(conn)  # makes the key
    result = backup.backup(away / "b", home)
    assert result.key_included and result.erasures == 1
    assert (result.path / erasure.KEY_FILE).read_bytes() == (home / erasure.KEY_FILE).read_bytes()
    assert stat.S_IMODE(result.path.stat().st_mode) == 0o700
    for path in result.path.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path.name
    assert not (result.path / "warehouse").exists()  # rebuilt, not backed up


def test_backup_refuses_a_used_folder_a_folder_inside_the_home_and_a_missing_store(conn, home, away):
    used = away / "used"
    used.mkdir()
    (used / "x").write_text("x")
    with pytest.raises(BackupError, match="not an empty folder"):
        backup.backup(used, home)
    with pytest.raises(BackupError, match="inside SMSOPS_HOME"):
        backup.backup(home / "backups", home)
    with pytest.raises(BackupError, match="no operational store"):
        backup.backup(away / "b", away / "elsewhere")


def test_restore_refuses_what_is_not_a_good_smsops_backup_and_changes_nothing(conn, home, away):
    before = dump(home)
    with pytest.raises(BackupError, match="does not exist"):
        backup.restore(away / "nowhere", home)
    stranger = away / "stranger"
    stranger.mkdir()
    (stranger / "ops.sqlite").write_bytes(b"SQLite format 3\x00")
    with pytest.raises(BackupError, match="not an smsops backup"):
        backup.restore(stranger, home)
    (stranger / backup.MANIFEST).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(BackupError, match="not an smsops backup"):
        backup.restore(stranger, home)
    damaged = backup.backup(away / "damaged", home).path
    with open(damaged / "ops.sqlite", "r+b") as fh:
        fh.seek(5000)
        fh.write(b"\xff" * 64)
    with pytest.raises(BackupError, match="damaged"):
        backup.restore(damaged, home)
    assert dump(home) == before


def test_restore_refuses_while_a_dispatcher_runs_under_the_same_home(conn, home, away):
    taken = backup.backup(away / "b", home)
    with open(home / "dispatch-sandbox.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(BackupError, match="stop `smsops serve`"):
            backup.restore(taken.path, home)
    backup.restore(taken.path, home)  # released: it goes


def test_a_backup_from_before_an_erasure_comes_back_with_the_erasure_replayed(conn, home, away):
    taken = backup.backup(away / "b", home)
    assert holds_number(taken.path / "ops.sqlite")  # the backup itself holds the person
    erase_subject(conn)
    after_erasure = dump(home)
    result = backup.restore(taken.path, home)
    assert result.erasures_replayed == 1 and result.contacts_erased == 1
    assert dump(home) == after_erasure  # as the erasure left it: same keys, times and rows
    assert erasure.is_erased_number(conn, PHONE)
    assert not holds_number(home / "ops.sqlite")
    assert (home / "warehouse" / "fresh-build-required").exists()


def test_the_erasure_log_alone_brings_the_erasure_back_when_the_store_was_lost(conn, home, away):
    taken = backup.backup(away / "b", home)
    erase_subject(conn)
    after_erasure = dump(home)
    log = (home / "erasures.jsonl").read_text()
    assert PHONE[1:] not in log and SUBJECT["email"] not in log  # pseudonyms only
    conn.close()
    for path in home.glob("ops.sqlite*"):
        path.unlink()
    backup.restore(taken.path, home)
    assert dump(home) == after_erasure
    assert not holds_number(home / "ops.sqlite")


def test_the_replaced_stores_ledger_alone_brings_the_erasure_back_when_the_log_was_lost(conn, home, away):
    taken = backup.backup(away / "b", home)
    erase_subject(conn)
    after_erasure = dump(home)
    (home / "erasures.jsonl").unlink()
    result = backup.restore(taken.path, home)
    assert result.erasures_replayed == 1
    assert dump(home)["consent_events"] == after_erasure["consent_events"]
    assert dump(home)["contacts"] == after_erasure["contacts"]
    assert not holds_number(home / "ops.sqlite")


def test_an_opt_out_recorded_after_the_backup_is_not_forgotten_by_the_restore(conn, home, away):
    taken = backup.backup(away / "b", home)
    consent.record_many(
        conn,
        [
            consent.ConsentEvent(
                "+79990001122", "marketing", "opt_out", "keyword_reply", "2025-03-05 10:00:00"
            )
        ],
    )
    result = backup.restore(taken.path, home)
    assert result.consent_events_carried == 1
    assert consent.state(conn, "+79990001122", "marketing").last_action == "opt_out"


def test_the_restore_refuses_a_backup_of_another_install(conn, home, away, monkeypatch):
    other = away / "other"
    other_conn = store.open_store(other)
    seed(other_conn)
    erasure.erase(other_conn, phone_e164="+79990001122", requested_by="dpo")
    other_conn.close()
    taken = backup.backup(away / "b", other)
    erase_subject(conn)  # this install's own key
    with pytest.raises(BackupError, match="erasure key differs"):
        backup.restore(taken.path, home)


def smsops(home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "smsops.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "SMSOPS_HOME": str(home)},
    )


def test_cli_backs_up_and_restores_and_asks_before_replacing_the_store(conn, home, away):
    out = smsops(home, "backup", str(away / "b"))
    assert out.returncode == 0, out.stderr
    assert "backed up the operational store" in out.stdout and "not backed up" in out.stdout
    erase_subject(conn)
    refused = smsops(home, "restore", str(away / "b"))
    assert refused.returncode == 1 and "add --yes" in refused.stderr
    done = smsops(home, "restore", str(away / "b"), "--yes")
    assert done.returncode == 0, done.stderr
    assert "1 erasure(s) made since replayed" in done.stdout and "smsops build" in done.stdout
    bad = smsops(home, "restore", str(away / "nowhere"), "--yes")
    assert bad.returncode == 2 and "does not exist" in bad.stderr


def test_without_the_erasure_key_nothing_is_restored_rather_than_the_person(conn, home, away):
    taken = backup.backup(away / "b", home)  # before any erasure: no key to copy yet
    assert not taken.key_included
    erase_subject(conn)
    after_erasure = dump(home)
    (home / erasure.KEY_FILE).unlink()
    with pytest.raises(BackupError, match="no erasure key"):
        backup.restore(taken.path, home)
    assert dump(home) == after_erasure
    assert not (home / backup.STAGING_FILE).exists()
