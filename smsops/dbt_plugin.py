"""dbt-duckdb source plugin: reads the operational store's tables into the warehouse.

DuckDB cannot attach SQLite offline (that extension downloads), so each ``ops`` source is
read here, columnar, through the ADBC SQLite driver, and dbt-duckdb materialises it as a
table in the warehouse being built. Plain ``dbt build`` therefore always sees the live
operational store, and so does ``smsops build``.

Configured in ``profiles.yml``::

    plugins:
      - module: smsops.dbt_plugin
        alias: ops
        config:
          home: "{{ env_var('SMSOPS_HOME', '../data') }}"
"""

from __future__ import annotations

import threading
from typing import Any

import pyarrow as pa
from dbt.adapters.duckdb.plugins import BasePlugin
from dbt.adapters.duckdb.utils import SourceConfig

from smsops import store
from smsops.config import paths

# dbt loads sources from several threads; one read at a time keeps the store's WAL
# recovery and the reads from tripping over each other (each read takes well under 1 s).
_read_lock = threading.Lock()


def read_table(db_path: str, table: str) -> pa.Table:
    """The whole ``table`` as Arrow, each column typed as the store declares it.

    The driver infers a column's type from the values of the first batch, so the batch is
    the whole table; a column that holds only NULLs would still come back as int64, so
    every column is cast to its declared type."""
    import adbc_driver_sqlite.dbapi as adbc

    if table not in store.TABLES:
        raise ValueError(f"'{table}' is not an operational table; known: {', '.join(store.TABLES)}")
    with _read_lock, adbc.connect(db_path) as conn, conn.cursor() as cur:
        # Opening a WAL database can briefly need a lock (recovery after the last close):
        # wait for it instead of failing.
        cur.execute("pragma busy_timeout = 30000")
        cur.fetchall()
        cur.execute(f"select name, lower(type) from pragma_table_info('{table}')")
        declared = {name: store.ARROW_TYPES[kind] for name, kind in cur.fetchall()}
        cur.execute(f"select count(*) from {table}")
        rows = cur.fetchone()[0]
        cur.adbc_statement.set_options(**{"adbc.sqlite.query.batch_rows": str(max(rows, 1) + 1)})
        cur.execute(f"select * from {table}")
        data = cur.fetch_arrow_table()
    schema = pa.schema([pa.field(name, declared[name]) for name in data.column_names])
    return data.cast(schema) if data.schema != schema else data


class Plugin(BasePlugin):
    def initialize(self, plugin_config: dict[str, Any]) -> None:
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
