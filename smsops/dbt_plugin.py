"""Reading the operational store into the warehouse: a dbt-duckdb source plugin, and the
incremental load that ``smsops build`` runs before dbt starts.

DuckDB cannot attach SQLite offline (that extension downloads), so each ``ops`` table is
read here, columnar, through the ADBC SQLite driver, and lands as a table in the ``ops``
schema of the warehouse being built.

Two ways in:

- :func:`sync` (what ``smsops build`` and ``warehouse.refresh`` use): the build starts from
  a copy of the published snapshot, which already holds every ``ops`` table as of the last
  build, so only what changed is read and merged in DuckDB: for the append-only tables the
  rows above the largest key the snapshot holds, for the outbox those rows plus the rows that
  were still unsettled at the last load (see :data:`UNSETTLED_STATES`). Anything that
  suggests the copy cannot be trusted loads the table whole: an erasure since the last load
  (it rewrites rows in place everywhere), fewer or other rows than the snapshot holds, a
  different last row (another store), another set of columns. dbt then keeps these tables
  (the sources' ``save_mode`` is ``ignore`` when ``SMSOPS_OPS_PRELOADED`` is set).
- :class:`Plugin` (plain ``dbt build`` from ``dbt_project/``): each source is read whole
  from the live store when dbt reaches it.

Configured in ``profiles.yml``::

    plugins:
      - module: smsops.dbt_plugin
        alias: ops
        config:
          home: "{{ env_var('SMSOPS_HOME', '../data') }}"
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa
from dbt.adapters.duckdb.plugins import BasePlugin
from dbt.adapters.duckdb.utils import SourceConfig

from smsops import store
from smsops.config import paths

if TYPE_CHECKING:
    import duckdb

# dbt loads sources from several threads; one read at a time keeps the store's WAL
# recovery and the reads from tripping over each other (each read takes well under 1 s).
_read_lock = threading.Lock()

# The store's tables the dbt project reads (the ``ops`` source), in the order they are loaded.
SOURCES: tuple[str, ...] = (
    "campaigns",
    "campaign_variants",
    "messages",
    "message_status_events",
    "clicks",
    "inbound_messages",
    "orders",
    "consent_events",
    "customer_events",
    "links",
    "contacts",
)

# Tables whose rows are only ever added, under an increasing integer key (erasure aside,
# which :func:`erasure_mark` notices): a load reads the rows above the largest key it has.
APPEND_ONLY: dict[str, str] = {
    "message_status_events": "event_id",
    "clicks": "click_id",
    "inbound_messages": "inbound_id",
    "orders": "order_id",
    "consent_events": "event_id",
    "customer_events": "event_id",
}

# The outbox is updated in place, but only while a row is unsettled: the writers change a
# row only from these states (campaigns.py: release of an A/B winner, cancel, quiet-hours
# deferral from 'planned', retry_failed from 'rejected'; dispatch.py: claim from 'planned',
# the outcome of 'sending'; links.py: the body at claim time). Erasure is noticed apart.
# A row settled at the last load (submitted, holdout, suppressed, cancelled) is final.
UNSETTLED_STATES: tuple[str, ...] = ("planned", "sending", "unknown", "rejected")

# Environment variable that tells the dbt project its ``ops`` tables are already loaded.
PRELOADED_ENV = "SMSOPS_OPS_PRELOADED"

# A lock file that ``smsops build`` holds while it loads the ops tables: it starts dbt at the
# same time (dbt's start-up takes seconds), and the plugin waits here before dbt opens the
# warehouse.
LOAD_GATE_ENV = "SMSOPS_OPS_LOAD_GATE"

# One row per loaded table: how the last build loaded it, the store's erasure mark then, and
# for an incremental load the key the new rows lie above (NULL when the table was read whole),
# so that a model can tell the rows this build brought from the ones it had.
LOADS_TABLE = "ops._loads"


@dataclass(frozen=True, slots=True)
class Load:
    """How one table was brought up to date: ``how`` is ``full`` (read whole, ``reason``
    says why), ``append`` (only new rows) or ``merge`` (new and changed outbox rows);
    ``rows`` is the number of rows read from the store."""

    table: str
    how: str
    rows: int
    seconds: float
    reason: str | None = None


def read_table(db_path: str, table: str) -> pa.Table:
    """The whole ``table`` as Arrow, each column typed as the store declares it."""
    _check(table)
    with _read_lock, _store_reader(db_path) as cur:
        return _read(cur, table)


def sync(
    warehouse: duckdb.DuckDBPyConnection,
    db_path: str | os.PathLike[str],
    tables: Iterable[str] = SOURCES,
    *,
    full: bool = False,
) -> list[Load]:
    """Bring the ``ops`` tables of ``warehouse`` up to date with the store at ``db_path``,
    reading only what changed where that is safe (see the module docstring); ``full=True``
    reads every table whole. All tables are read in one read transaction, so they show the
    store at one moment."""
    tables = list(tables)
    for table in tables:
        _check(table)
    conn = store.connect(db_path)
    try:
        store.create_schema(conn)  # a fresh install builds empty marts, not an error
    finally:
        conn.close()
    _rows(warehouse, "create schema if not exists ops")
    _rows(
        warehouse,
        f"create table if not exists {LOADS_TABLE} (table_name varchar primary key,"
        " erasure_mark varchar, how varchar, rows_read bigint, loaded_at timestamp)",
    )
    _rows(warehouse, f"alter table {LOADS_TABLE} add column if not exists loaded_above bigint")
    with _read_lock, _store_reader(str(db_path)) as cur:
        mark = erasure_mark(cur)
        return [_sync_table(warehouse, cur, table, mark, full) for table in tables]


def erasure_mark(cur: Any) -> str:
    """What changes whenever ``smsops.erasure.erase`` changes anything: every erasure marks
    its contacts erased (with a fresh ``updated_at``) or records erasure events in the
    consent ledger (a number no contact holds), and usually both."""
    cur.execute("select count(*), max(updated_at) from contacts where phone_reason = 'erased'")
    contacts, latest = cur.fetchone()
    # the ledger's unique index on event_key answers this without a scan
    cur.execute(
        "select count(*) from consent_events where event_key >= 'erasure:' and event_key < 'erasure;'"
    )
    (events,) = cur.fetchone()
    return f"{contacts}|{latest}|{events}"


def _check(table: str) -> None:
    if table not in store.TABLES:
        raise ValueError(f"'{table}' is not an operational table; known: {', '.join(store.TABLES)}")


@contextmanager
def _store_reader(db_path: str) -> Iterator[Any]:
    """An ADBC cursor on the store inside one read transaction (the driver does not
    autocommit), so every read sees the same moment."""
    import adbc_driver_sqlite.dbapi as adbc

    with adbc.connect(db_path) as conn, conn.cursor() as cur:
        # Opening a WAL database can briefly need a lock (recovery after the last close):
        # wait for it instead of failing.
        cur.execute("pragma busy_timeout = 30000")
        cur.fetchall()
        yield cur


def _declared(cur: Any, table: str) -> pa.Schema:
    cur.execute(f"select name, lower(type) from pragma_table_info('{table}')")
    fields = []
    for name, kind in cur.fetchall():
        if kind not in store.ARROW_TYPES:
            raise ValueError(
                f"{table}.{name} is declared {kind!r}: the warehouse takes {', '.join(store.ARROW_TYPES)} columns"
            )
        fields.append(pa.field(name, store.ARROW_TYPES[kind]))
    return pa.schema(fields)


def _read(
    cur: Any, table: str, where: str = "", params: Sequence[Any] = (), rows: int | None = None
) -> pa.Table:
    """Rows of ``table`` (``where`` filters them) as Arrow, typed as the store declares.

    The driver infers a column's type from the values of the first batch, so the batch is
    the whole result; a column that holds only NULLs would still come back as int64, so
    every column is cast to its declared type."""
    schema = _declared(cur, table)
    if rows is None:
        cur.execute(f"select count(*) from {table} {where}", params)
        rows = cur.fetchone()[0]
    cur.adbc_statement.set_options(**{"adbc.sqlite.query.batch_rows": str(max(rows, 1) + 1)})
    cur.execute(f"select * from {table} {where}", params)
    data = cur.fetch_arrow_table()
    schema = pa.schema([schema.field(name) for name in data.column_names])
    return data.cast(schema) if data.schema != schema else data


_DUCK_TYPES = {pa.int64(): "BIGINT", pa.float64(): "DOUBLE", pa.string(): "VARCHAR"}


def _rows(wh: duckdb.DuckDBPyConnection, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    """Run ``sql`` on the warehouse and fetch everything (DuckDB 2.0 refuses the next
    statement while a result is only partly fetched)."""
    return wh.execute(sql, list(params)).fetchall()


def _sync_table(wh: duckdb.DuckDBPyConnection, cur: Any, table: str, mark: str, full: bool) -> Load:
    started = time.perf_counter()
    key = APPEND_ONLY.get(table) or ("message_id" if table == "messages" else None)
    loaded = _rows(
        wh,
        "select column_name, data_type from information_schema.columns"
        " where table_schema = 'ops' and table_name = ? order by ordinal_position",
        [table],
    )
    previous = _rows(wh, f"select erasure_mark from {LOADS_TABLE} where table_name = ?", [table])
    declared = _declared(cur, table)
    reason = None
    if full:
        reason = "full refresh"
    elif key is None:
        reason = "updated in place, no change marker"
    elif not loaded:
        reason = "not loaded before"
    elif not previous:
        reason = "no record of its last load (an older snapshot)"
    elif previous[0][0] != mark:
        reason = "an erasure since the last load"
    elif loaded != [(f.name, _DUCK_TYPES[f.type]) for f in declared]:
        reason = "its columns changed"
    above = None
    if reason is None:
        rows, reason, above = _load_changes(wh, cur, table, key)
        how = "merge" if table == "messages" else "append"
    if reason is not None:
        how, above, data = "full", None, _read(cur, table)
        rows = data.num_rows
        wh.register("ops_load", data)
        try:
            _rows(wh, f"create or replace table ops.{table} as select * from ops_load")
        finally:
            wh.unregister("ops_load")
    _rows(
        wh,
        f"insert or replace into {LOADS_TABLE} (table_name, erasure_mark, how, rows_read, loaded_at, loaded_above)"
        " values (?, ?, ?, ?, now()::timestamp, ?)",
        [table, mark, how, rows, above],
    )
    return Load(table, how, rows, round(time.perf_counter() - started, 3), reason)


def _load_changes(
    wh: duckdb.DuckDBPyConnection, cur: Any, table: str, key: str
) -> tuple[int, str | None, int | None]:
    """Read and merge what changed since the last load: ``(rows read, None, the key the new
    rows lie above)``, or ``(0, why, None)`` when the table must be read whole instead."""
    outbox = table == "messages"
    unsettled = "state in (" + ", ".join(f"'{s}'" for s in UNSETTLED_STATES) + ")"
    [(had, top)] = _rows(wh, f"select count(*), coalesce(max({key}), 0) from ops.{table}")
    cur.execute(f"select count(*) from {table}")
    (now,) = cur.fetchone()
    cur.execute(f"select count(*) from {table} where {key} > ?", (top,))
    (added,) = cur.fetchone()
    if now != had + added:
        return 0, f"the store holds {now:,} rows, the warehouse {had:,} and {added:,} are new", None
    # The last settled row must read the same in both: else this is not the store the
    # snapshot was loaded from (a new demo base, a restored backup).
    settled = f" and not {unsettled}" if outbox else ""
    [(last,)] = _rows(wh, f"select max({key}) from ops.{table} where true{settled}")
    if last is not None:
        theirs = _rows(wh, f"select * from ops.{table} where {key} = ?", [last])
        ours = _read(cur, table, f"where {key} = ?", (last,), rows=1).to_pylist()
        if [tuple(row.values()) for row in ours] != theirs:
            return 0, f"row {key} = {last} differs from the warehouse's copy", None
    if outbox:
        ids = [row[0] for row in _rows(wh, f"select {key} from ops.{table} where {unsettled}")]
        delta = _read(
            cur, table, f"where {key} > ? or {key} in (select value from json_each(?))", (top, json.dumps(ids)),
            rows=added + len(ids),
        )  # fmt: skip
    else:
        delta = _read(cur, table, f"where {key} > ?", (top,), rows=added)
    if delta.num_rows:
        wh.register("ops_delta", delta)
        try:
            wh.begin()
            if outbox:
                _rows(wh, f"delete from ops.{table} where {key} in (select {key} from ops_delta)")
            _rows(wh, f"insert into ops.{table} select * from ops_delta")
            wh.commit()
        finally:
            wh.unregister("ops_delta")
    return delta.num_rows, None, top


class Plugin(BasePlugin):
    def initialize(self, plugin_config: dict[str, Any]) -> None:
        # dbt-duckdb creates the plugins just before it first opens the warehouse
        gate = os.environ.get(LOAD_GATE_ENV)
        if gate:
            with open(gate, "a+") as fh:
                fcntl.flock(fh, fcntl.LOCK_SH)  # blocks until smsops build has loaded the tables
        self.db_path = str(paths(plugin_config.get("home")).ops_store)
        conn = store.connect(self.db_path)
        try:
            store.create_schema(conn)  # a fresh install builds empty marts, not an error
        finally:
            conn.close()

    def load(self, source_config: SourceConfig) -> pa.Table:
        return read_table(self.db_path, source_config.identifier)

    def default_materialization(self) -> str:
        return "table"
