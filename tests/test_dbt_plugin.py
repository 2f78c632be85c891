"""The incremental load of the operational store into the warehouse (smsops.dbt_plugin.sync):
after any mix of changes, the warehouse's ``ops`` tables equal the store row for row, and
anything an incremental read could miss makes the table load whole."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pytest

from smsops import dbt_plugin, demo, erasure, store

KEYS = {**dbt_plugin.APPEND_ONLY, "messages": "message_id"}


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("plugin_base")
    demo.generate(300, 11, as_of=datetime.now(UTC).replace(microsecond=0), home=home)
    return store.store_path(home)


@pytest.fixture
def db(base: Path, tmp_path: Path) -> Path:
    """A store of this test's own (a copy of the module's demo base)."""
    target = tmp_path / "ops.sqlite"
    src, dst = sqlite3.connect(base), sqlite3.connect(target)
    src.backup(dst)
    src.close()
    dst.close()
    return target


@pytest.fixture
def wh(tmp_path: Path):
    conn = duckdb.connect(str(tmp_path / "wh.duckdb"))
    yield conn
    conn.close()


def write(db: Path, *statements: str) -> None:
    conn = store.connect(db)
    with store.transaction(conn):
        for sql in statements:
            conn.execute(sql)
    conn.close()


def rows(values) -> list[tuple]:
    return sorted((tuple(v) for v in values), key=repr)


def assert_same_as_the_store(wh, db: Path) -> None:
    for table in dbt_plugin.SOURCES:
        ours = rows(wh.execute(f"select * from ops.{table}").fetchall())
        theirs = rows(row.values() for row in dbt_plugin.read_table(str(db), table).to_pylist())
        assert ours == theirs, table


def how(loads) -> dict[str, tuple[str, int]]:
    return {load.table: (load.how, load.rows) for load in loads}


def test_the_first_load_reads_every_table_whole(wh, db):
    loads = dbt_plugin.sync(wh, db)
    assert {load.how for load in loads} == {"full"}
    assert [load.table for load in loads] == list(dbt_plugin.SOURCES)
    assert_same_as_the_store(wh, db)


def test_a_second_load_reads_only_the_rows_added_since(wh, db):
    dbt_plugin.sync(wh, db)
    now = "2030-01-01 10:00:00"
    write(
        db,
        "insert into message_status_events (message_id, provider, status, occurred_at, received_at)"
        f" select message_id, 'sandbox', 'failed', '{now}', '{now}' from messages where state = 'submitted'"
        " and message_id not in (select message_id from message_status_events where status = 'failed') limit 5",
        f"insert into clicks (token, message_id, clicked_at) select 'new' || message_id, message_id, '{now}'"
        " from messages limit 3",
        "insert into inbound_messages (provider, provider_message_id, from_e164, body, received_at)"
        f" values ('sandbox', 'IN-NEW', '+79120000000', 'hello', '{now}')",
        "insert into orders (external_id, contact_id, ordered_at, amount, currency, status)"
        f" values ('NEW-1', 1, '{now}', 10.5, 'RUB', 'paid'), ('NEW-2', 2, '{now}', 20, 'RUB', 'refunded')",
        "insert into consent_events (event_key, phone_e164, purpose, action, source, occurred_at, recorded_at)"
        f" values ('new:1', '+79120000000', 'marketing', 'opt_out', 'link', '{now}', '{now}')",
        "insert into customer_events (event_key, contact_id, event_type, occurred_at)"
        f" values ('new:1', 1, 'app_open', '{now}')",
    )
    loads = how(dbt_plugin.sync(wh, db))
    assert loads["message_status_events"] == ("append", 5)
    assert loads["clicks"] == ("append", 3)
    assert loads["inbound_messages"] == ("append", 1)
    assert loads["orders"] == ("append", 2)
    assert loads["consent_events"] == ("append", 1)
    assert loads["customer_events"] == ("append", 1)
    assert loads["contacts"][0] == "full"  # updated in place with no change marker
    assert_same_as_the_store(wh, db)
    # what a model needs to tell this load's rows from the earlier ones
    [(above,)] = wh.execute("select loaded_above from ops._loads where table_name = 'orders'").fetchall()
    assert [
        r[0]
        for r in wh.execute(
            f"select external_id from ops.orders where order_id > {above} order by order_id"
        ).fetchall()
    ] == [
        "NEW-1",
        "NEW-2",
    ]
    assert wh.execute("select loaded_above from ops._loads where table_name = 'contacts'").fetchall() == [
        (None,)
    ]
    assert how(dbt_plugin.sync(wh, db))["orders"] == ("append", 0)


def test_outbox_rows_unsettled_at_the_last_load_are_read_again(wh, db):
    write(
        db,
        "update messages set state = 'planned', submitted_at = null"
        " where message_id in (select message_id from messages where state = 'submitted' limit 4)",
        "update messages set state = 'rejected', skip_reason = 'provider_error'"
        " where message_id in (select message_id from messages where state = 'submitted' limit 2)",
    )
    dbt_plugin.sync(wh, db)
    unsettled = wh.execute(
        "select count(*) from ops.messages where state in ('planned', 'rejected')"
    ).fetchall()
    assert unsettled == [(6,)]
    write(
        db,
        # the dispatcher sends what was planned, retry_failed re-plans what was rejected
        "update messages set state = 'submitted', submitted_at = '2030-01-01 10:00:00', attempts = attempts + 1"
        " where state = 'planned'",
        "update messages set state = 'planned', skip_reason = null where state = 'rejected'",
        "insert into messages (idempotency_key, campaign_id, variant, contact_id, state, planned_at)"
        " select 'new:' || contact_id, campaign_id, 'A', contact_id, 'planned', '2030-01-01 10:00:00'"
        " from messages limit 3",
    )
    assert how(dbt_plugin.sync(wh, db))["messages"] == ("merge", 6 + 3)
    assert_same_as_the_store(wh, db)
    # the re-planned rows are unsettled now: the next load reads them (and nothing else) again
    assert how(dbt_plugin.sync(wh, db))["messages"] == ("merge", 2 + 3)


def test_an_erasure_between_loads_reads_the_tables_whole(wh, db):
    dbt_plugin.sync(wh, db)
    conn = store.connect(db)
    contact_id, phone = conn.execute(
        "select contact_id, phone_e164 from contacts where phone_valid = 1 and contact_id in"
        " (select contact_id from messages where state = 'submitted') order by contact_id limit 1"
    ).fetchone()
    result = erasure.erase(conn, contact_id=contact_id, requested_by="dpo")
    conn.close()
    assert result.contacts_erased == 1
    loads = dbt_plugin.sync(wh, db)
    for load in loads:
        assert load.how == "full", load
        if load.table in KEYS:
            assert load.reason == "an erasure since the last load"
    assert_same_as_the_store(wh, db)
    assert wh.execute("select count(*) from ops.messages where phone_e164 = ?", [phone]).fetchall() == [(0,)]


def test_deleted_rows_make_the_table_load_whole(wh, db):
    dbt_plugin.sync(wh, db)
    write(
        db,
        "delete from orders where order_id = (select min(order_id) from orders)",
        "insert into orders (external_id, contact_id, ordered_at, amount, currency, status)"
        " values ('NEW-1', 1, '2030-01-01 10:00:00', 10.5, 'RUB', 'paid')",
    )
    loads = {load.table: load for load in dbt_plugin.sync(wh, db)}
    assert loads["orders"].how == "full" and "rows" in loads["orders"].reason
    assert_same_as_the_store(wh, db)


def test_another_store_with_as_many_rows_loads_whole(wh, db):
    dbt_plugin.sync(wh, db)
    write(
        db,
        "update clicks set clicked_at = '2001-01-01 00:00:00' where click_id = (select max(click_id) from clicks)",
    )
    loads = {load.table: load for load in dbt_plugin.sync(wh, db)}
    assert loads["clicks"].how == "full" and "differs" in loads["clicks"].reason
    assert_same_as_the_store(wh, db)


def test_a_new_column_in_the_store_loads_the_table_whole(wh, db):
    dbt_plugin.sync(wh, db)
    write(
        db,
        "alter table inbound_messages add column channel text",
        "update inbound_messages set channel = 'sms'",
    )
    loads = {load.table: load for load in dbt_plugin.sync(wh, db)}
    assert (
        loads["inbound_messages"].how == "full" and loads["inbound_messages"].reason == "its columns changed"
    )
    assert_same_as_the_store(wh, db)


def test_tables_loaded_without_a_record_load_whole(wh, db):
    """A snapshot from an older smsops, or a development copy the plugin filled: no marks."""
    wh.execute("create schema ops")
    wh.register("orders_then", dbt_plugin.read_table(str(db), "orders"))
    wh.execute("create table ops.orders as select * from orders_then")
    loads = {load.table: load for load in dbt_plugin.sync(wh, db, ["orders"])}
    assert loads["orders"].how == "full" and "no record" in loads["orders"].reason
    assert how(dbt_plugin.sync(wh, db, ["orders"]))["orders"] == ("append", 0)


def test_full_reads_every_table_whole(wh, db):
    dbt_plugin.sync(wh, db)
    assert {load.how for load in dbt_plugin.sync(wh, db, full=True)} == {"full"}
    assert_same_as_the_store(wh, db)


def test_a_selection_loads_only_those_tables(wh, db):
    loads = dbt_plugin.sync(wh, db, ["orders", "clicks"])
    assert [load.table for load in loads] == ["orders", "clicks"]
    tables = {
        r[0]
        for r in wh.execute(
            "select table_name from information_schema.tables where table_schema = 'ops'"
        ).fetchall()
    }
    assert tables == {"orders", "clicks", "_loads"}


def test_an_unknown_table_is_refused_by_name(wh, db):
    with pytest.raises(ValueError, match="'invoices' is not an operational table"):
        dbt_plugin.sync(wh, db, ["orders", "invoices"])
