"""Where smsops keeps its files, read from the environment.

``SMSOPS_HOME`` (default ``./data``) holds the operational store and the published
warehouse snapshots, so tests and several installs never collide.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True, slots=True)
class Paths:
    """Every location smsops reads or writes, derived from one home folder."""

    home: Path

    @property
    def ops_store(self) -> Path:
        return self.home / "ops.sqlite"

    @property
    def warehouse_dir(self) -> Path:
        return self.home / "warehouse"

    @property
    def warehouse_pointer(self) -> Path:
        return self.warehouse_dir / "current.json"

    @property
    def build_lock(self) -> Path:
        return self.warehouse_dir / "build.lock"

    @property
    def dbt_artifacts(self) -> Path:
        return self.home / "dbt"


def paths(home: str | os.PathLike[str] | None = None) -> Paths:
    """Resolve the paths for ``home``, else ``$SMSOPS_HOME``, else ``./data``."""
    chosen = home if home is not None else os.environ.get("SMSOPS_HOME", "data")
    return Paths(home=Path(chosen).expanduser().resolve())


def dbt_project_dir() -> Path:
    """The dbt project: ``$SMSOPS_DBT_PROJECT`` or ``dbt_project/`` beside the package."""
    return Path(os.environ.get("SMSOPS_DBT_PROJECT", REPO_ROOT / "dbt_project")).resolve()


def duckdb_settings() -> dict[str, str | int]:
    """Bounded DuckDB resources: by default a process would claim ~80% of RAM."""
    return {
        "memory_limit": os.environ.get("SMSOPS_DUCKDB_MEMORY", "4GB"),
        "threads": int(os.environ.get("SMSOPS_DUCKDB_THREADS", "2")),
    }


def senders() -> tuple[str, ...]:
    """The sender IDs and numbers this install may send from: ``$SMSOPS_SENDERS``, comma-separated."""
    configured = os.environ.get("SMSOPS_SENDERS", "SHOPMARKET")
    return tuple(s.strip() for s in configured.split(",") if s.strip())


def opt_out_text() -> str:
    """The opt-out instruction added to promotions: ``$SMSOPS_OPT_OUT_TEXT`` (e.g. «Отказ: СТОП на 900»)."""
    return os.environ.get("SMSOPS_OPT_OUT_TEXT", "Отказ: СТОП").strip()


def provider_name() -> str:
    """Which provider sends: ``$SMSOPS_PROVIDER`` (``sandbox`` by default, ``twilio``, ``smsru``)."""
    return os.environ.get("SMSOPS_PROVIDER", "sandbox").strip().lower() or "sandbox"


LINK_TOKEN_LENGTH = 8
"""Characters of a tracked link's token: 62**8 (about 2**47.6) possible values per link."""


def link_base() -> str:
    """Where tracked links point: ``$SMSOPS_LINK_BASE`` (default ``https://s.example/l/``).

    The host must route ``/l/<token>`` to ``smsops serve``'s webhook port (a short domain of
    your own behind a reverse proxy). Each message's link is this base plus an 8-character token.
    """
    base = os.environ.get("SMSOPS_LINK_BASE", "https://s.example/l/").strip()
    return base if base.endswith("/") else base + "/"
