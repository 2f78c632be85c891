"""What the tests read back from an operational store."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

from smsops import store


def import_digest(home: Path) -> str:
    """A digest of what an import writes (contacts, consent events, import batches): equal before
    and after a refused file means the store was left unchanged."""
    conn = sqlite3.connect(store.store_path(home))
    try:
        h = hashlib.sha256()
        for table in ("contacts", "consent_events", "import_batches"):
            for row in conn.execute(f"select * from {table} order by 1"):
                h.update(repr(row).encode())
        return h.hexdigest()
    finally:
        conn.close()
