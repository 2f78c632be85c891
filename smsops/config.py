"""Where smsops keeps its files, read from the environment.

``SMSOPS_HOME`` (default ``./data``) holds the operational store and the published
warehouse snapshots, so tests and several installs never collide.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from smsops.policy import FrequencyCaps, QuietHours

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True, slots=True)
class Paths:
    """Every location smsops reads or writes, derived from one home folder."""

    home: Path

    @property
    def ops_store(self) -> Path:
        return self.home / "ops.sqlite"

    @property
    def scratch(self) -> Path:
        """Private files of a launch in progress (removed when it ends)."""
        return self.home / "tmp"

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

    @property
    def uploads(self) -> Path:
        """Files people uploaded to import (kept until an erasure finds a number in them)."""
        return self.home / "uploads"

    @property
    def fresh_build_marker(self) -> Path:
        """Present while the next build must start from an empty warehouse file (after an
        erasure or a restore): see ``smsops.warehouse.build``."""
        return self.warehouse_dir / "fresh-build-required"

    @property
    def erasure_log(self) -> Path:
        """One line per erasure, pseudonyms only: what a restore replays (``smsops.backup``)."""
        return self.home / "erasures.jsonl"


def paths(home: str | os.PathLike[str] | None = None) -> Paths:
    """Resolve the paths for ``home``, else ``$SMSOPS_HOME``, else ``./data``."""
    chosen = home if home is not None else os.environ.get("SMSOPS_HOME", "data")
    return Paths(home=Path(chosen).expanduser().resolve())


PRIVATE_UMASK = 0o077
"""What the command line's processes create files with: readable by their owner only."""


def secure_home(home: str | os.PathLike[str] | None = None) -> Path:
    """Create ``home`` readable by its owner only (0700), or take group and others' access away
    from an existing one; it holds phone numbers. Returns the folder."""
    folder = paths(home).home
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    mode = folder.stat().st_mode & 0o777
    if mode & 0o077:
        with contextlib.suppress(PermissionError):  # not ours (a shared mount): files are still 0600
            folder.chmod(mode & 0o700)
    return folder


def private_file(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` (and its folder, 0700) empty and readable by its owner only, unless it
    exists; SQLite gives a store's ``-wal`` and ``-shm`` files the mode of the store itself."""
    target = Path(path)
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    return target


def sign_in_configured() -> bool:
    """Whether the app asks who a person is before it shows anything. Not yet: smsops has no
    sign-in (issue 19), so anyone who can open the app can launch sends and reveal numbers."""
    return False


LOOPBACK_NAMES = frozenset({"localhost", "ip6-localhost", "ip6-loopback"})


def is_loopback(address: str) -> bool:
    """True for an address only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    host = address.strip().strip("[]").lower()
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to an outside address


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


PLACEHOLDER_LINK_BASE = "https://s.example/l/"
"""Where tracked links point until ``SMSOPS_LINK_BASE`` is set: an address that leads nowhere."""


def link_base() -> str:
    """Where tracked links point: ``$SMSOPS_LINK_BASE`` (default :data:`PLACEHOLDER_LINK_BASE`).

    The host must route ``/l/<token>`` to ``smsops serve``'s webhook port (a short domain of
    your own behind a reverse proxy). Each message's link is this base plus an 8-character token.
    """
    base = os.environ.get("SMSOPS_LINK_BASE", PLACEHOLDER_LINK_BASE).strip()
    return base if base.endswith("/") else base + "/"


def link_base_is_placeholder() -> bool:
    """True while tracked links would point to the placeholder (``SMSOPS_LINK_BASE`` unset)."""
    return link_base() == PLACEHOLDER_LINK_BASE


def max_parts() -> int:
    """SMS parts per message above which a launch needs a person's explicit yes:
    ``$SMSOPS_MAX_PARTS`` (6)."""
    text = os.environ.get("SMSOPS_MAX_PARTS", "").strip() or "6"
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"SMSOPS_MAX_PARTS: expected a whole number of SMS parts (1 or more), got {text!r}")
    return value


def max_cost() -> float | None:
    """The bill above which a launch needs a person's explicit yes, in the prices' currency:
    ``$SMSOPS_MAX_COST`` (100000; ``off`` for no such limit)."""
    text = os.environ.get("SMSOPS_MAX_COST", "").strip() or "100000"
    if text.lower() in ("off", "none"):
        return None
    try:
        value = float(text.replace(" ", "").replace("_", ""))
    except ValueError:
        value = -1.0
    if not value >= 0:  # NaN too
        raise ValueError(f"SMSOPS_MAX_COST: expected an amount such as 100000, or off, got {text!r}")
    return value


def quiet_hours() -> QuietHours:
    """Install-wide quiet hours, in each recipient's own zone: ``$SMSOPS_QUIET_HOURS``
    (``21:00-09:00`` by default; ``off`` for none). A campaign may set its own."""
    from smsops import policy

    return policy.parse_quiet_hours(os.environ.get("SMSOPS_QUIET_HOURS", "21:00-09:00"))


def frequency_caps() -> FrequencyCaps:
    """Install-wide frequency caps per number: ``$SMSOPS_DAILY_CAP`` (1) promotions a day and
    ``$SMSOPS_WEEKLY_CAP`` (3) a week; ``off`` for no such cap. A campaign may set its own."""
    from smsops import policy

    return policy.FrequencyCaps(
        policy.parse_cap(os.environ.get("SMSOPS_DAILY_CAP", "1"), "SMSOPS_DAILY_CAP"),
        policy.parse_cap(os.environ.get("SMSOPS_WEEKLY_CAP", "3"), "SMSOPS_WEEKLY_CAP"),
    )


def time_zone() -> str:
    """The marketing team's zone, in which schedule times are entered and shown:
    ``$SMSOPS_TIME_ZONE`` (``Europe/Moscow``). Times are stored in UTC."""
    return os.environ.get("SMSOPS_TIME_ZONE", "Europe/Moscow").strip() or "Europe/Moscow"


def seed_numbers() -> tuple[str, ...]:
    """The team's own numbers a test send goes to: ``$SMSOPS_SEED_NUMBERS``, comma-separated."""
    return tuple(n.strip() for n in os.environ.get("SMSOPS_SEED_NUMBERS", "").split(",") if n.strip())


def refresh_minutes() -> float:
    """How often ``smsops serve`` rebuilds the warehouse: ``$SMSOPS_REFRESH_MINUTES`` (0 or
    unset: never; the build is then started by hand or from the pages)."""
    text = os.environ.get("SMSOPS_REFRESH_MINUTES", "").strip()
    try:
        value = float(text) if text else 0.0
    except ValueError:
        raise ValueError(f"SMSOPS_REFRESH_MINUTES: expected a number of minutes, got {text!r}") from None
    if value < 0:
        raise ValueError(f"SMSOPS_REFRESH_MINUTES: expected 0 (off) or more minutes, got {text!r}")
    return value


def help_text(language: str) -> str | None:
    """What a HELP (ПОМОЩЬ) reply gets, e.g. your company, what you send and how to stop:
    ``$SMSOPS_HELP_TEXT`` (Russian keywords) and ``$SMSOPS_HELP_TEXT_EN`` (Latin ones);
    None when not set (a generic text is sent)."""
    text = os.environ.get("SMSOPS_HELP_TEXT_EN" if language == "en" else "SMSOPS_HELP_TEXT", "").strip()
    return text or None
