"""Backups of the operational store that cannot bring back a person who asked to be forgotten.

:func:`backup` copies the store with SQLite's online backup API, in one step: one read
transaction, so the copy is the store at one moment while the dispatcher, the webhook applier
and the pages keep writing (in WAL mode a reader does not block them). Beside it go the erasure
key (``erasure.key``: without it erased numbers cannot be recognised again) and a manifest
(``smsops-backup.json``: what it is, when it was taken, a checksum). The warehouse is not backed
up: it is rebuilt from the store.

:func:`restore` checks the backup, writes it into the live store (the backup API again, so the
store's log and other connections stay coherent), then replays every erasure the install knows
of, from two sources that survive the restore:

- the erasure log, ``$SMSOPS_HOME/erasures.jsonl``: one line per erasure, appended by
  :func:`smsops.erasure.erase` after it commits (pseudonyms and contact ids, never a number);
- the erasure events and erased contacts of the store being replaced, read before it is.

A replay finds the numbers in the restored store whose pseudonym an erasure names (HMAC with
the install's key) and erases them again under the original key and time, so the consent
ledger comes out as the erasure left it. Consent events the replaced store holds and the backup
does not (opt-outs recorded after the backup) are carried over too: a restore must not make a
STOP forgotten. Everything else recorded after the backup is lost, as with any restore.

A restore refuses while a dispatcher (``smsops serve``, ``smsops campaign send``) or a build
runs under the same home; stop ``smsops serve`` (and the app) first.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from smsops import erasure, store
from smsops.config import paths, private_file
from smsops.i18n import _

__all__ = [
    "FORMAT",
    "MANIFEST",
    "BackupError",
    "BackupResult",
    "RestoreResult",
    "backup",
    "restore",
]

FORMAT = "smsops-backup"
VERSION = 1
MANIFEST = "smsops-backup.json"
STORE_FILE = "ops.sqlite"
STAGING_FILE = "ops.sqlite.restoring"


class BackupError(RuntimeError):
    """A backup cannot be taken or restored; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class BackupResult:
    path: Path
    taken_at: str
    bytes: int
    erasures: int
    """Erasures the backed-up ledger records."""
    key_included: bool
    """False when the key comes from ``$SMSOPS_ERASURE_SECRET``: keep that secret yourself."""


@dataclass(frozen=True, slots=True)
class RestoreResult:
    taken_at: str
    erasures_replayed: int
    contacts_erased: int
    consent_events_carried: int
    purged: erasure.Purged | None


def _now() -> str:
    return datetime.now(UTC).replace(tzinfo=None).isoformat(sep=" ", timespec="seconds")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def backup(dest: str | os.PathLike[str], home: str | os.PathLike[str] | None = None) -> BackupResult:
    """Copy the store under ``home`` (and its erasure key) into the new or empty folder ``dest``."""
    p = paths(home)
    target = Path(dest).expanduser().resolve()
    if not p.ops_store.exists():
        raise BackupError(
            _("there is no operational store at {path}: nothing to back up").format(path=p.ops_store)
        )
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise BackupError(
            _("{path} exists and is not an empty folder: give a new folder").format(path=target)
        )
    if target == p.home or target.is_relative_to(p.home):
        raise BackupError(
            _("{path} is inside SMSOPS_HOME: a backup belongs on other storage").format(path=target)
        )
    target.mkdir(mode=0o700, parents=True, exist_ok=True)
    copy = private_file(target / STORE_FILE)
    source = store.connect(p.ops_store)
    try:
        secret = erasure.load_secret(p.home, create=False)  # refuses a key others can read
        taken_at = _now()
        out = sqlite3.connect(copy)
        try:
            source.backup(out)  # one step: one read transaction, the store at one moment
            out.execute("pragma journal_mode = delete")  # one self-contained file
            (check,) = out.execute("pragma quick_check").fetchone()
            (erasures,) = out.execute(
                "select count(distinct substr(event_key, 9, 16)) from consent_events"
                " where event_key >= 'erasure:' and event_key < 'erasure;'"
            ).fetchone()
            (schema,) = out.execute("pragma user_version").fetchone()
        finally:
            out.close()
    finally:
        source.close()
    if check != "ok":
        shutil.rmtree(target, ignore_errors=True)
        raise BackupError(
            _("the copy failed its integrity check ({check}); nothing kept").format(check=check)
        )
    key_file = p.home / erasure.KEY_FILE
    key_included = secret is not None and key_file.exists() and not os.environ.get(erasure.SECRET_ENV)
    if key_included:
        shutil.copyfile(key_file, private_file(target / erasure.KEY_FILE))
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "taken_at": taken_at,
        "schema_version": schema,
        "erasures": erasures,
        "store_sha256": _sha256(copy),
        "key_included": key_included,
    }
    private_file(target / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return BackupResult(target, taken_at, copy.stat().st_size, erasures, key_included)


def _manifest(src: Path) -> dict:
    folder = src.parent if src.name == MANIFEST else src
    if not src.exists():
        raise BackupError(_("{path} does not exist").format(path=src))
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        raise BackupError(
            _(
                "{path} is not an smsops backup (no readable {manifest}); give the folder `smsops backup` wrote"
            ).format(path=src, manifest=MANIFEST)
        ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BackupError(_("{path} is not an smsops backup").format(path=src))
    if manifest.get("version") != VERSION or manifest.get("schema_version", 0) > store.SCHEMA_VERSION:
        raise BackupError(
            _("{path} was written by a newer smsops; restore it with that version").format(path=src)
        )
    copy = folder / STORE_FILE
    if not copy.exists() or _sha256(copy) != manifest.get("store_sha256"):
        raise BackupError(
            _("{path} is damaged: its store is missing or does not match its checksum").format(path=src)
        )
    manifest["folder"] = folder
    return manifest


def _held(path: Path) -> bool:
    """Whether a process holds the advisory lock on ``path``."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def _refuse_while_running(home: Path) -> None:
    p = paths(home)
    busy = [lock.name for lock in sorted(home.glob("dispatch-*.lock")) if _held(lock)]
    if _held(p.build_lock):
        busy.append(p.build_lock.name)
    if busy:
        raise BackupError(
            _(
                "smsops is running under {home} (held: {locks}): stop `smsops serve`, sends and"
                " builds, then restore"
            ).format(home=home, locks=", ".join(busy))
        )


def restore(src: str | os.PathLike[str], home: str | os.PathLike[str] | None = None) -> RestoreResult:
    """Bring back the backup at ``src`` into the store under ``home``, then replay every
    erasure the install knows of and carry over consent events the backup lacks."""
    p = paths(home)
    manifest = _manifest(Path(src).expanduser().resolve())
    folder: Path = manifest["folder"]
    _refuse_while_running(p.home)
    backed_key = folder / erasure.KEY_FILE
    key_file = p.home / erasure.KEY_FILE
    if backed_key.exists() and key_file.exists() and backed_key.read_bytes() != key_file.read_bytes():
        raise BackupError(
            _(
                "the backup's erasure key differs from this install's ({path}): it was taken from another"
                " install; restore it into an empty SMSOPS_HOME"
            ).format(path=key_file)
        )
    records = read_log(p.erasure_log)
    erased_ids: set[int] = set()
    carried_events: list[tuple] = []
    if p.ops_store.exists():
        current = store.open_store(p.home)
        try:
            records += recorded_erasures(current)
            erased_ids = erased_contact_ids(current)
            carried_events = current.execute(
                "select event_key, phone_e164, contact_id, purpose, action, source, consent_text, proof,"
                " occurred_at, recorded_at from consent_events where event_key not like 'erasure:%'"
                " order by event_id"
            ).fetchall()
        finally:
            current.close()
    if backed_key.exists() and not key_file.exists():
        p.home.mkdir(mode=0o700, parents=True, exist_ok=True)
        shutil.copyfile(backed_key, private_file(key_file))
    if (records or erased_ids) and erasure.load_secret(p.home, create=False) is None:
        raise BackupError(
            _(
                "erasures are to be replayed but there is no erasure key ({path} or $SMSOPS_ERASURE_SECRET):"
                " put the install's key back first; nothing was restored"
            ).format(path=key_file)
        )
    # The backup is brought up to date (erasures replayed, consent carried over) in a private
    # copy first: the live store never holds a forgotten person again, not even for a moment,
    # and a restore that fails half-way leaves it as it was.
    staging = p.home / STAGING_FILE
    _remove_staging(staging)
    private_file(staging)
    source = sqlite3.connect(f"{(folder / STORE_FILE).as_uri()}?mode=ro", uri=True)
    work = sqlite3.connect(staging, isolation_level=None)
    try:
        source.backup(work)
        store.create_schema(work)
        replayed = replay(work, records, erased_ids)
        carried = _carry_over(work, carried_events)
        work.execute("vacuum")
        _write_into_the_store(work, p.ops_store)
    finally:
        source.close()
        work.close()
        _remove_staging(staging)
    # what the warehouse holds is newer than the store now, or erased: build it anew
    private_file(p.fresh_build_marker)
    return RestoreResult(
        taken_at=manifest["taken_at"],
        erasures_replayed=replayed.erasures,
        contacts_erased=replayed.contacts_erased,
        consent_events_carried=carried,
        purged=replayed.purged,
    )


# ---------------------------------------------------------------------------------------
# Replaying erasures


@dataclass(frozen=True, slots=True)
class ErasureRecord:
    """One erasure as a restore replays it: pseudonyms, never numbers."""

    key: str
    at: str
    pseudonyms: tuple[str, ...]
    contact_ids: tuple[int, ...] = ()
    requested_by: str = "erasure log"
    reason: str | None = None


def read_log(path: Path) -> list[ErasureRecord]:
    """The erasure log at ``path`` (empty when there is none); a torn last line is skipped."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    records = []
    for line in lines:
        try:
            data = json.loads(line)
            records.append(
                ErasureRecord(
                    key=data["key"],
                    at=data["at"],
                    pseudonyms=tuple(data["pseudonyms"]),
                    contact_ids=tuple(int(c) for c in data.get("contact_ids", ())),
                    requested_by=data.get("requested_by") or "erasure log",
                    reason=data.get("reason"),
                )
            )
        except (ValueError, KeyError, TypeError):
            continue
    return records


def recorded_erasures(conn: sqlite3.Connection) -> list[ErasureRecord]:
    """The erasures a store's consent ledger records, rebuilt from its erasure events (which
    contacts each covered is not in the ledger: see :func:`erased_contact_ids`)."""
    found: dict[str, dict[str, Any]] = {}
    rows = conn.execute(
        "select event_key, phone_e164, proof, recorded_at from consent_events"
        " where event_key >= 'erasure:' and event_key < 'erasure;' order by event_id"
    )
    for event_key, alias, proof, recorded_at in rows:
        key = event_key.split(":")[1]
        entry = found.setdefault(key, {"at": recorded_at, "pseudonyms": set(), "proof": proof})
        entry["pseudonyms"].add(alias)
    records = []
    for key, entry in found.items():
        try:
            proof = json.loads(entry["proof"] or "{}")
        except ValueError:
            proof = {}
        records.append(
            ErasureRecord(
                key=key,
                at=entry["at"],
                pseudonyms=tuple(sorted(entry["pseudonyms"])),
                requested_by=proof.get("requested_by") or "erasure log",
                reason=proof.get("reason"),
            )
        )
    return records


def erased_contact_ids(conn: sqlite3.Connection) -> set[int]:
    return {
        r[0]
        for r in conn.execute(
            "select contact_id from contacts where phone_reason = ?", (erasure.ERASED_REASON,)
        )
    }


@dataclass(frozen=True, slots=True)
class Replayed:
    """What :func:`replay` erased again."""

    erasures: int = 0
    contacts_erased: int = 0
    numbers: int = 0
    purged: erasure.Purged | None = None


def replay(
    conn: sqlite3.Connection, records: Iterable[ErasureRecord], contact_ids: Iterable[int] = ()
) -> Replayed:
    """Erase again, in the store ``conn`` holds (a restored backup), every number whose pseudonym
    one of ``records`` names and the contacts they name, each under its original key and time
    (so the ledger comes out as the erasure left it), then every contact of ``contact_ids`` not
    erased yet; then :func:`smsops.erasure.purge`. Records the store already reflects change
    nothing."""
    if conn.in_transaction:
        raise erasure.ErasureError("replay runs its own transactions: call it outside one")
    records = sorted({r.key: r for r in records}.values(), key=lambda r: (r.at, r.key))
    wanted = {alias for r in records for alias in r.pseudonyms}
    numbers: dict[str, str] = {}
    secret = erasure.install_secret(conn) if wanted else None
    if secret is not None:
        for sql in (
            "select distinct phone_e164 from contacts",
            "select distinct phone_e164 from messages",
            "select distinct from_e164 from inbound_messages",
            "select distinct phone_e164 from consent_events",
        ):
            for (number,) in conn.execute(sql):
                if number and not erasure.is_pseudonym(number):
                    alias = erasure.pseudonym(number, secret)
                    if alias in wanted:
                        numbers.setdefault(alias, number)
    erasures = contacts = 0
    erased = erased_contact_ids(conn)
    redactions: list[Callable[[str], str]] = []
    pending = [
        (
            record.requested_by,
            record.reason,
            record.at,
            record.key,
            [numbers[a] for a in record.pseudonyms if a in numbers],
            record.contact_ids,
        )
        for record in records
    ]
    pending += [
        ("restore", "erased in the store the backup replaced", _now(), None, [], (contact_id,))
        for contact_id in sorted(set(contact_ids))
    ]
    for requested_by, reason, at, key, found, ids in pending:
        ids = [c for c in ids if c not in erased and _exists(conn, c)]
        if not found and not ids:
            continue
        result, redact = erasure.erase_again(
            conn, numbers=found, contact_ids=ids, requested_by=requested_by, reason=reason, at=at, key=key
        )
        erasures += result.changed
        contacts += result.contacts_erased
        erased |= set(result.contact_ids)
        redactions.append(redact)

    def redact_all(text: str) -> str:
        for redact in redactions:
            text = redact(text)
        return text

    purged = erasure.purge(conn, numbers.values(), redact_all) if erasures else None
    return Replayed(erasures=erasures, contacts_erased=contacts, numbers=len(numbers), purged=purged)


def _exists(conn: sqlite3.Connection, contact_id: int) -> bool:
    return conn.execute("select 1 from contacts where contact_id = ?", (contact_id,)).fetchone() is not None


def _remove_staging(staging: Path) -> None:
    for path in (staging, Path(f"{staging}-journal"), Path(f"{staging}-wal"), Path(f"{staging}-shm")):
        path.unlink(missing_ok=True)


def _write_into_the_store(work: sqlite3.Connection, path: Path) -> None:
    """Make the store at ``path`` hold what ``work`` holds: through the store's own pager (its
    log and any reader stay coherent), or, when its page size differs from the backup's (a store
    made by an older smsops), by replacing the file with nothing else running."""
    live = store.connect(path)
    try:
        work.backup(live)
        live.execute("pragma wal_checkpoint(truncate)").fetchall()
        return
    except sqlite3.Error:
        pass
    finally:
        live.close()
    copy = private_file(path.with_name(path.name + ".new"))
    out = sqlite3.connect(copy)
    try:
        work.backup(out)
    finally:
        out.close()
    for suffix in ("-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    os.replace(copy, path)


def _carry_over(conn: sqlite3.Connection, events: list[tuple]) -> int:
    """Consent events of the replaced store that the restored one lacks (by key), unless they
    are about a number erased since (its events are then pseudonymised already, or it is)."""
    if not events:
        return 0
    with store.transaction(conn):
        before = conn.total_changes
        conn.executemany(
            """
            insert into consent_events (
                event_key, phone_e164, contact_id, purpose, action, source,
                consent_text, proof, occurred_at, recorded_at
            )
            values (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
            on conflict (event_key) do nothing
            """,
            events,
        )
        return conn.total_changes - before
