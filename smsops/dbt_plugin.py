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

from typing import Any

import pyarrow as pa
from dbt.adapters.duckdb.plugins import BasePlugin
from dbt.adapters.duckdb.utils import SourceConfig

from smsops import store
from smsops.config import paths


def read_table(db_path: str, table: str) -> pa.Table:
    """The whole ``table`` as Arrow. The driver infers each column's type from the first
    batch, so the batch is the whole table: a column NULL in its first rows stays typed."""
    import adbc_driver_sqlite.dbapi as adbc

    if table not in store.TABLES:
        raise ValueError(f"'{table}' is not an operational table; known: {', '.join(store.TABLES)}")
    with adbc.connect(db_path) as conn, conn.cursor() as cur:
        cur.execute(f"select count(*) from {table}")
        rows = cur.fetchone()[0]
        cur.adbc_statement.set_options(**{"adbc.sqlite.query.batch_rows": str(max(rows, 1) + 1)})
        cur.execute(f"select * from {table}")
        return cur.fetch_arrow_table()


class Plugin(BasePlugin):
    def initialize(self, plugin_config: dict[str, Any]) -> None:
        self.db_path = str(paths(plugin_config.get("home")).ops_store)

    def load(self, source_config: SourceConfig) -> pa.Table:
        conn = store.connect(self.db_path)
        try:
            store.create_schema(conn)  # a fresh install builds empty marts, not an error
        finally:
            conn.close()
        return read_table(self.db_path, source_config.identifier)

    def default_materialization(self) -> str:
        return "table"
