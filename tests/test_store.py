import sqlite3
import subprocess
import sys

import pytest

from smsops import store


def test_schema_is_created_and_safe_to_run_twice(home):
    conn = store.open_store(home)
    store.create_schema(conn)
    store.create_schema(conn)
    assert set(store.table_counts(conn)) == set(store.TABLES)
    assert all(count == 0 for count in store.table_counts(conn).values())
    assert conn.execute("pragma journal_mode").fetchone()[0] == "wal"


def test_store_lives_under_smsops_home(home):
    assert store.store_path() == home / "ops.sqlite"
    store.open_store().close()
    assert (home / "ops.sqlite").exists()


def test_strict_tables_refuse_a_wrong_type(home):
    conn = store.open_store(home)
    with pytest.raises(sqlite3.IntegrityError, match="cannot store TEXT value in INTEGER column"):
        conn.execute(
            "insert into contacts (contact_id, phone_valid, created_at, updated_at) values (1, 'yes', 'a', 'a')"
        )


def test_enum_checks_refuse_an_unknown_status(home):
    conn = store.open_store(home)
    with pytest.raises(sqlite3.IntegrityError, match="CHECK constraint failed"):
        conn.execute(
            "insert into message_status_events (message_id, provider, status, occurred_at, received_at)"
            " values (1, 'sandbox', 'teleported', '2025-01-01 00:00:00', '2025-01-01 00:00:00')"
        )


def test_unique_keys_make_repeated_writes_no_ops(home):
    conn = store.open_store(home)
    row = (
        "k1",
        "+79123456789",
        "marketing",
        "opt_in",
        "web_form",
        "2025-01-01 00:00:00",
        "2025-01-01 00:00:00",
    )
    sql = (
        "insert into consent_events (event_key, phone_e164, purpose, action, source, occurred_at, recorded_at)"
        " values (?, ?, ?, ?, ?, ?, ?) on conflict (event_key) do nothing"
    )
    conn.execute(sql, row)
    conn.execute(sql, row)
    assert conn.execute("select count(*) from consent_events").fetchone()[0] == 1
    # the outbox admits one message per campaign x contact
    outbox = (
        "insert into messages (idempotency_key, campaign_id, variant, contact_id, state, planned_at)"
        " values ('1:1', 1, 'A', 1, 'planned', '2025-01-01 00:00:00')"
    )
    conn.execute(outbox)
    with pytest.raises(sqlite3.IntegrityError, match="UNIQUE"):
        conn.execute(outbox)


def test_transaction_leaves_nothing_half_written(home):
    conn = store.open_store(home)
    with pytest.raises(RuntimeError), store.transaction(conn):
        conn.execute(
            "insert into campaigns (name, kind, status, created_at) values ('a', 'promo', 'draft', '2025-01-01')"
        )
        raise RuntimeError("crash mid-way")
    assert conn.execute("select count(*) from campaigns").fetchone()[0] == 0


def test_an_unknown_schema_version_is_refused(home):
    conn = store.open_store(home)
    conn.execute("pragma user_version = 99")
    with pytest.raises(store.StoreError, match="schema version 99"):
        store.create_schema(conn)


def test_two_processes_write_concurrently_without_losing_rows(home):
    store.open_store(home).close()
    code = (
        "import sys; from smsops import store\n"
        "conn = store.connect(sys.argv[1])\n"
        "for i in range(300):\n"
        "    with store.transaction(conn):\n"
        '        conn.execute("insert into customer_events (event_key, contact_id, event_type, occurred_at)'
        " values (?, 1, 'app_open', '2025-01-01 00:00:00')\", (f'{sys.argv[2]}-{i}',))\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(store.store_path(home)), tag]) for tag in ("a", "b")
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    conn = store.connect(store.store_path(home))
    assert conn.execute("select count(*) from customer_events").fetchone()[0] == 600


def test_a_transaction_inside_another_is_a_savepoint_that_rolls_back_alone(home):
    conn = store.open_store(home)
    insert = (
        "insert into campaigns (name, kind, status, created_at) values (?, 'promo', 'draft', '2025-01-01')"
    )
    with store.transaction(conn):
        conn.execute(insert, ("outer",))
        with pytest.raises(RuntimeError), store.transaction(conn):
            conn.execute(insert, ("inner",))
            raise RuntimeError("inner unit fails")
        with store.transaction(conn, keep=False):  # a dry run inside
            conn.execute(insert, ("dry",))
    assert [r[0] for r in conn.execute("select name from campaigns")] == ["outer"]
    with store.transaction(conn, keep=False):
        conn.execute(insert, ("dry at the top",))
    assert conn.execute("select count(*) from campaigns").fetchone()[0] == 1


def test_an_older_store_gets_the_new_campaign_columns_once_and_keeps_its_rows(home):
    path = store.store_path(home)
    old = sqlite3.connect(path)
    old_ddl = store.TABLES["campaigns"].split(",\n            policy ")[0] + "\n        ) strict"
    old.execute(old_ddl)
    old.execute(
        "insert into campaigns (name, kind, status, created_at) values ('old', 'promo', 'draft', '2025-01-01')"
    )
    old.execute(f"pragma user_version = {store.SCHEMA_VERSION}")
    old.commit()
    old.close()
    conn = store.open_store(home)
    store.create_schema(conn)  # a second run finds nothing to add
    columns = {row[1] for row in conn.execute("pragma table_info(campaigns)")}
    assert {name for name, _ in store.ADDED_COLUMNS["campaigns"]} <= columns
    assert conn.execute("select name, policy, scheduled_at from campaigns").fetchall() == [
        ("old", None, None)
    ]
    with pytest.raises(sqlite3.IntegrityError, match="CHECK constraint failed"):
        conn.execute("update campaigns set auto_release = 2")


def test_a_new_store_has_16k_pages_and_an_existing_one_keeps_its_own(home, tmp_path):
    conn = store.open_store(home)
    assert conn.execute("pragma page_size").fetchone()[0] == store.PAGE_SIZE == 16384
    plain = sqlite3.connect(tmp_path / "plain.sqlite")  # as the demo's writer opens its new file
    store.create_schema(plain, indexes=False)
    assert plain.execute("pragma page_size").fetchone()[0] == 16384
    old_path = tmp_path / "old" / "ops.sqlite"
    old_path.parent.mkdir()
    old = sqlite3.connect(old_path)
    old.execute("create table t (x)")  # an existing store with SQLite's default page size
    old.close()
    conn = store.connect(old_path)
    store.create_schema(conn)
    assert conn.execute("pragma page_size").fetchone()[0] == 4096


def test_a_version_1_store_is_upgraded_and_keeps_every_outbox_row(home):
    """Version 1 declared the provider id unique on the table itself, which put every planned
    row (no provider id yet) into that index; version 2 uses a partial index instead."""
    path = store.store_path(home)
    old = sqlite3.connect(path)
    v1_messages = store.TABLES["messages"].replace(
        "attempts             integer not null default 0",
        "attempts             integer not null default 0,\n            unique (provider, provider_message_id)",
    )
    assert v1_messages != store.TABLES["messages"]
    old.execute(v1_messages)
    old.execute("create index ix_messages_due on messages (state, not_before)")
    rows = [
        (7, "1:1", 1, "A", 1, "planned", None, None),
        (9, "1:2", 1, "A", 2, "submitted", "sandbox", "SM1"),
        (12, "1:3", 1, "A", 3, "suppressed", None, None),
    ]
    old.executemany(
        "insert into messages (message_id, idempotency_key, campaign_id, variant, contact_id, state,"
        " provider, provider_message_id, planned_at) values (?, ?, ?, ?, ?, ?, ?, ?, '2025-01-01 00:00:00')",
        rows,
    )
    old.execute("pragma user_version = 1")
    old.commit()
    old.close()

    conn = store.open_store(home)
    assert conn.execute("pragma user_version").fetchone()[0] == store.SCHEMA_VERSION == 2
    kept = conn.execute(
        "select message_id, idempotency_key, campaign_id, variant, contact_id, state, provider,"
        " provider_message_id from messages order by message_id"
    ).fetchall()
    assert kept == rows
    indexes = {r[0] for r in conn.execute("select name from sqlite_master where tbl_name = 'messages'")}
    assert "ix_messages_due" not in indexes
    assert {"ux_messages_provider_id", "ix_messages_planned", "ix_messages_sending"} <= indexes
    assert len([name for name in indexes if name.startswith("sqlite_autoindex")]) == 1
    # the provider id is still unique once there is one; rows without one are many
    with pytest.raises(sqlite3.IntegrityError, match="UNIQUE"):
        conn.execute(
            "update messages set provider = 'sandbox', provider_message_id = 'SM1' where message_id = 7"
        )
    conn.execute("update messages set provider = 'sandbox' where message_id in (7, 12)")
    # the idempotency key is still unique
    with pytest.raises(sqlite3.IntegrityError, match="UNIQUE"):
        conn.execute(
            "insert into messages (idempotency_key, campaign_id, variant, contact_id, state, planned_at)"
            " values ('1:1', 1, 'A', 1, 'planned', '2025-01-01 00:00:00')"
        )
    store.create_schema(conn)  # nothing left to do
    assert conn.execute("select count(*) from messages").fetchone()[0] == 3
