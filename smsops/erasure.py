"""Data-subject requests: erase a contact, keep the consent proof the law requires.

:func:`erase` removes or irreversibly pseudonymises a person's data everywhere in the
operational store, in one transaction (all or nothing). The next ``smsops build`` rebuilds
every mart from the store, so the marts hold nothing personal for the contact either.

What happens to each table, for the erased contacts (by phone: every contact holding the
number; by id: that one contact):

- ``contacts``: names, gender, birth date, email, city, region, time zone, raw phone, the
  number's candidate time zones, attributes and the CRM ``external_id`` become NULL; the
  number becomes its pseudonym; ``phone_valid = 0`` and ``phone_reason = 'erased'`` (that
  is how an erased contact is recognised; the schema gains nothing). The ``contact_id``,
  number type and country stay, so orders, messages and every aggregate stay correct.
- ``messages`` (the outbox): ``body`` becomes NULL (it was personalised) and the number its
  pseudonym. Other contacts' messages to a released number (below) get the pseudonym too.
- ``inbound_messages``: ``body`` becomes ``''`` (the column is NOT NULL) and the sender's
  number its pseudonym; the keyword the reply was read as stays.
- ``clicks``: ``user_agent`` becomes NULL. ``links``: the contact's numbers, email, names and
  CRM id are cut out of target URLs (numbers become the pseudonym, the rest ``[erased]``).
- ``orders``: the CRM order id becomes a pseudonym of its own (a CRM order id leads back to
  the person); amounts, dates and categories stay. ``customer_events``: ``properties`` become
  NULL and the known personal strings are cut out of ``event_key``.
- ``consent_events`` (the ledger, append-only everywhere else): never deleted, minimised.
  38-FZ art. 18 puts the burden of proof on the sender and the records are kept at least
  four years, so each event keeps purpose, action, source, the text agreed to, its times and
  its proof, but the number becomes its pseudonym, the number is cut out of ``event_key``,
  and proof keys that identify a person or a device (``ip``, ``session``, ``user_agent``,
  ``email`` …) are dropped, their names listed under ``"redacted"`` (so the proof still shows
  that an IP was recorded). A keyword reply's text stays only when it is just the keyword.

Pseudonyms. ``erased:`` + the first 24 hex digits of HMAC-SHA256(secret, E.164 number): the
same number always gets the same pseudonym, so joins (consent state per number, opt-outs
after a message) and the proof survive; without the secret it cannot be reversed, whereas a
plain hash of a phone number falls to enumerating ~10^10 numbers. The secret is per install:
``$SMSOPS_ERASURE_SECRET`` (at least 16 characters), else the file ``erasure.key`` beside the
operational store (``$SMSOPS_HOME/erasure.key``), created on the first erasure with mode
0600. It is never written to the database. Back it up with the store: without it, a number
erased before can no longer be recognised, so :func:`erase` refuses to make a new key once
the ledger holds erasures.

A number that came back. The ledger gets one ``opt_out`` per purpose for each pseudonymised
number (source ``admin``, text ``erasure request``, proof ``{"erasure", "requested_by",
"reason"}``, key ``erasure:<erasure_key>:<pseudonym digest>:<purpose>``). Recording the real
number as opted out would keep it in clear, so the check works by pseudonym instead:
:func:`is_erased_number` (and :func:`erased_numbers` for many) tells the importer and the
campaign engine that a number was erased, i.e. is opted out from everything, however it is
imported again; a new, explicit opt-in recorded after the erasure is the caller's to weigh.

Shared numbers. A number is *released* (pseudonymised in the ledger, inbound messages and
other contacts' outbox rows, and given the erasure events) only when no contact outside the
erasure holds it. Erasing one of two contacts holding the same number by id scrubs that
contact and its own rows, but leaves the number's ledger in clear: it still decides what the
other contact may receive, and rewriting it could turn an opt-out into an opt-in.

Idempotent: rows already scrubbed are not touched again, so a second erasure changes nothing,
reports zero counts and the first erasure's key. A dry run does all of it and rolls back.

Leftovers outside the store's tables (DESIGN.md invariant 10). The connection is put in
``secure_delete`` mode for the erasure; once it has committed, :func:`purge` rewrites the store
without its free pages (``vacuum``) and truncates its log, deletes the ingress journal's applied
entries and scrubs the others (``smsops.ingress.scrub``), deletes every file under
``SMSOPS_HOME`` that holds one of the numbers in any usual form (``+7 912 …``, ``8 (912) …``)
in UTF-8 or UTF-16 (uploads, rejects files, temporary files) or scrubs it when it is a log, and
deletes every warehouse file but the published snapshot; the next build starts from an empty
warehouse file and then deletes that one too (``smsops.warehouse.build``). Each erasure is also
appended to ``erasures.jsonl`` (pseudonyms and contact ids only), which a restore of an older
backup replays (``smsops.backup``). The provider's own logs are outside our reach.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import phonenumbers

from smsops import consent, ingress, phones, store
from smsops.config import paths
from smsops.i18n import _, ngettext

log = logging.getLogger(__name__)

__all__ = [
    "ERASED_REASON",
    "KEY_FILE",
    "PSEUDONYM_PREFIX",
    "SECRET_ENV",
    "ErasureError",
    "ErasureResult",
    "NothingToErase",
    "Purged",
    "append_log",
    "erase",
    "erase_again",
    "erased_numbers",
    "erased_proof",
    "install_secret",
    "is_erased_number",
    "is_pseudonym",
    "load_secret",
    "pseudonym",
    "purge",
    "purged_lines",
    "summary_lines",
]

PSEUDONYM_PREFIX = "erased:"
ERASED_REASON = "erased"
"""``contacts.phone_reason`` of an erased contact."""
KEY_FILE = "erasure.key"
SECRET_ENV = "SMSOPS_ERASURE_SECRET"
MIN_SECRET_LENGTH = 16
ERASURE_TEXT = "erasure request"
REDACTED = "[erased]"

# Proof keys that identify a person, a device or a browser session: dropped from the ledger.
PERSONAL_PROOF_KEYS = frozenset(
    {
        "ip",
        "ip_address",
        "ipaddress",
        "remote_addr",
        "remote_ip",
        "client_ip",
        "x_forwarded_for",
        "forwarded_for",
        "session",
        "session_id",
        "sid",
        "cookie",
        "cookies",
        "user_agent",
        "device_id",
        "email",
        "phone",
        "phone_e164",
        "name",
        "first_name",
        "last_name",
        "full_name",
        "address",
        "birth_date",
    }
)


class ErasureError(ValueError):
    """An erasure request is not valid, or the erasure key is missing or unsafe."""


class NothingToErase(ErasureError):
    """No contact and no stored record matches the request."""


@dataclass(frozen=True, slots=True)
class ErasureResult:
    """What one erasure changed (rows per table), and its key in the consent ledger."""

    contacts_erased: int
    messages_scrubbed: int
    inbound_scrubbed: int
    clicks_scrubbed: int
    consent_events_minimised: int
    erasure_key: str | None
    links_scrubbed: int = 0
    orders_scrubbed: int = 0
    customer_events_scrubbed: int = 0
    erasure_events_recorded: int = 0
    contact_ids: tuple[int, ...] = ()
    numbers_in_use: int = 0
    """Numbers left in clear in the ledger because a contact outside the erasure holds them."""
    dry_run: bool = False
    purged: Purged | None = None
    """What went outside the store's tables (None for a dry run or inside a caller's transaction)."""

    @property
    def changed(self) -> bool:
        """True when the erasure changed (or, for a dry run, would change) anything."""
        return any(
            (
                self.contacts_erased,
                self.messages_scrubbed,
                self.inbound_scrubbed,
                self.clicks_scrubbed,
                self.consent_events_minimised,
                self.links_scrubbed,
                self.orders_scrubbed,
                self.customer_events_scrubbed,
            )
        )


# ---------------------------------------------------------------------------------------
# Pseudonyms and the secret


def pseudonym(phone_e164: str, secret: bytes) -> str:
    """The stable, irreversible stand-in for a number: ``erased:`` + 24 hex of its HMAC."""
    return PSEUDONYM_PREFIX + _digest(secret, phone_e164)


def is_pseudonym(value: str | None) -> bool:
    return value is not None and value.startswith(PSEUDONYM_PREFIX)


def _digest(secret: bytes, value: str) -> str:
    return hmac.new(secret, value.encode(), hashlib.sha256).hexdigest()[:24]


def load_secret(home: str | os.PathLike[str] | None = None, *, create: bool = True) -> bytes | None:
    """The install's erasure secret: ``$SMSOPS_ERASURE_SECRET``, else ``<home>/erasure.key``,
    which is created (mode 0600) when missing and ``create``; None when there is none."""
    value = os.environ.get(SECRET_ENV, "").strip()
    if value:
        if len(value) < MIN_SECRET_LENGTH:
            raise ErasureError(
                f"{SECRET_ENV} must be at least {MIN_SECRET_LENGTH} characters; "
                "generate one with `python -c 'import secrets; print(secrets.token_hex(32))'`"
            )
        return value.encode()
    path = paths(home).home / KEY_FILE
    try:
        return _read_key(path)
    except FileNotFoundError:
        if not create:
            return None
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        with suppress(FileExistsError):  # a link is atomic and never replaces: one key wins
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return _read_key(path)


def _read_key(path: Path) -> bytes:
    mode = path.stat().st_mode
    if mode & 0o077:
        raise ErasureError(
            f"{path} is readable by other users (mode {mode & 0o777:o}); run `chmod 600 {path}`"
        )
    text = path.read_text().strip()
    if len(text) < MIN_SECRET_LENGTH:
        raise ErasureError(f"{path} is empty or too short; restore it from a backup of this install")
    return text.encode()


def _store_file(conn: sqlite3.Connection) -> Path | None:
    """The file of the store ``conn`` is connected to (None for an in-memory store)."""
    for _seq, name, file in conn.execute("pragma database_list").fetchall():
        if name == "main" and file:
            return Path(file)
    return None


def _store_home(conn: sqlite3.Connection) -> Path | None:
    """The folder of the store ``conn`` is connected to (None for an in-memory store)."""
    file = _store_file(conn)
    return file.parent if file is not None else None


def _has_erasures(conn: sqlite3.Connection) -> bool:
    # a range, not LIKE, so the unique index on event_key answers it
    row = conn.execute(
        "select exists (select 1 from consent_events where event_key >= 'erasure:' and event_key < 'erasure;')"
    )
    return row.fetchone()[0] == 1


def _secret(conn: sqlite3.Connection, *, create: bool) -> bytes | None:
    """The secret of the install ``conn`` belongs to; refuses to start a new key when the
    ledger already holds erasures made with a lost one."""
    home = _store_home(conn)
    secret = load_secret(home, create=False)
    if secret is None and _has_erasures(conn):
        where = paths(home).home / KEY_FILE
        raise ErasureError(
            f"the store holds erased numbers but the erasure key is missing ({where} or ${SECRET_ENV}); "
            "restore it from a backup: a new key could not recognise numbers erased before"
        )
    if secret is None and create:
        secret = load_secret(home, create=True)
    return secret


# ---------------------------------------------------------------------------------------
# Checking numbers


def _number(raw: object) -> str:
    if not isinstance(raw, str) or not raw.strip():
        raise ErasureError(f"phone must be a phone number as text, got {raw!r:.40}")
    e164 = phones.normalize(raw).e164
    if e164 is None:
        raise ErasureError(f"{phones.mask(raw)} is not a phone number; give it as +79123456789 or 8 912 …")
    return e164


def erased_numbers(conn: sqlite3.Connection, numbers: Iterable[str]) -> set[str]:
    """Which of ``numbers`` (E.164) were erased: the ledger holds an opt-out for their
    pseudonym. Such a number is opted out of everything, whatever an import says."""
    wanted = list(dict.fromkeys(numbers))
    secret = _secret(conn, create=False) if wanted else None
    if secret is None:
        return set()
    by_pseudonym = {pseudonym(number, secret): number for number in wanted}
    found: set[str] = set()
    keys = list(by_pseudonym)
    for start in range(0, len(keys), 900):
        chunk = keys[start : start + 900]
        rows = conn.execute(
            f"select distinct phone_e164 from consent_events where action = 'opt_out'"
            f" and phone_e164 in ({_marks(chunk)})",
            chunk,
        )
        found.update(by_pseudonym[row[0]] for row in rows)
    return found


def is_erased_number(conn: sqlite3.Connection, phone_e164: str) -> bool:
    """True when this number (in any form ``smsops.phones`` reads) was erased and so stays
    opted out: for the importer and the campaign engine, before they trust a new record."""
    number = _number(phone_e164)
    return number in erased_numbers(conn, [number])


def erased_proof(conn: sqlite3.Connection, phone_e164: str) -> list[dict[str, Any]]:
    """The minimised ledger of an erased number in time order: the proof that survives."""
    number = _number(phone_e164)
    secret = _secret(conn, create=False)
    if secret is None:
        return []
    return consent.ledger_of(conn, pseudonym(number, secret))


# ---------------------------------------------------------------------------------------
# Redaction (pure)


def _number_forms(e164: str) -> list[str]:
    """How a number may be written inside text or a URL."""
    forms = [e164, e164[1:], quote(e164, safe="")]
    try:
        national = str(phonenumbers.parse(e164).national_number)
    except phonenumbers.NumberParseException:
        national = ""
    if len(national) >= 7:
        forms.append(national)
        if e164.startswith("+7"):
            forms.append("8" + national)  # how Russian numbers are written at home
    return forms


def _redactor(numbers: dict[str, str], others: Iterable[str]) -> Callable[[str], str]:
    """A function that replaces each form of each number by its pseudonym and every other
    known personal string (whole words, any case) by ``[erased]``."""
    replacement: dict[str, str] = {}
    for e164, alias in numbers.items():
        for form in _number_forms(e164):
            replacement.setdefault(form.casefold(), alias)
    for value in others:
        value = value.strip()
        if len(value) >= 2:
            replacement.setdefault(value.casefold(), REDACTED)
            replacement.setdefault(quote(value, safe="").casefold(), REDACTED)
    if not replacement:
        return lambda text: text
    alternatives = "|".join(re.escape(form) for form in sorted(replacement, key=len, reverse=True))
    pattern = re.compile(rf"(?<![\w+])(?:{alternatives})(?!\w)", re.IGNORECASE)
    return lambda text: pattern.sub(lambda m: replacement.get(m.group(0).casefold(), REDACTED), text)


def _minimise(value: Any, redact: Callable[[str], str]) -> Any:
    """A proof document without personal keys (their names listed under ``redacted``) and
    with known personal strings cut out of every text value."""
    if isinstance(value, dict):
        kept = {
            key: _minimise(item, redact)
            for key, item in value.items()
            if key.lower() not in PERSONAL_PROOF_KEYS
        }
        dropped = sorted(key for key in value if key.lower() in PERSONAL_PROOF_KEYS)
        if dropped:
            before = kept.get("redacted")
            earlier = [str(item) for item in before] if isinstance(before, list) else []
            kept["redacted"] = sorted({*earlier, *dropped})
        return kept
    if isinstance(value, list):
        return [_minimise(item, redact) for item in value]
    if isinstance(value, str):
        return redact(value)
    return value


def _minimised_proof(text: str | None, redact: Callable[[str], str]) -> str | None:
    if text is None:
        return None
    try:
        document = json.loads(text)
    except ValueError:
        return redact(text)
    return json.dumps(_minimise(document, redact), ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def _minimised_text(source: str, text: str | None, redact: Callable[[str], str]) -> str | None:
    """The text agreed to, without personal strings; a reply that is more than a keyword
    is the person's own words and goes."""
    if text is None:
        return None
    if source == "keyword_reply" and consent.classify_reply(text) is None:
        return REDACTED
    return redact(text)


# ---------------------------------------------------------------------------------------
# Erasing


@dataclass(frozen=True, slots=True)
class _Plan:
    contact_ids: tuple[int, ...]
    aliases: dict[str, str]  # real number -> pseudonym, for every number of the erasure
    released: frozenset[str]  # numbers no contact outside the erasure holds
    owners: dict[str, int]  # released number -> the lowest erased contact that held it
    redact: Callable[[str], str]
    secret: bytes


def _marks(values: Sequence[object]) -> str:
    return ", ".join("?" * len(values))


def _stamp(now: datetime | None) -> str:
    if now is None:
        now = datetime.now(UTC)
    if not isinstance(now, datetime):
        raise ErasureError(f"now must be a datetime (naive means UTC), got {type(now).__name__}")
    if now.tzinfo is not None:
        now = now.astimezone(UTC).replace(tzinfo=None)
    return now.isoformat(sep=" ")


def _plan(
    conn: sqlite3.Connection, secret: bytes, numbers: Sequence[str], contact_ids: Sequence[int]
) -> _Plan:
    """Who an erasure covers: every contact holding one of ``numbers``, and ``contact_ids``."""
    held: set[int] = set()
    for number in numbers:
        alias = pseudonym(number, secret)
        ids = [
            r[0]
            for r in conn.execute(
                "select contact_id from contacts where phone_e164 in (?, ?)", (number, alias)
            )
        ]
        if not ids:
            known = conn.execute(
                """
                select exists (select 1 from messages where phone_e164 in (?1, ?2))
                    or exists (select 1 from inbound_messages where from_e164 in (?1, ?2))
                    or exists (select 1 from consent_events where phone_e164 in (?1, ?2))
                """,
                (number, alias),
            ).fetchone()[0]
            if not known:
                raise NothingToErase(f"nothing to erase: no contact or record holds {phones.mask(number)}")
        held.update(ids)
    for contact_id in contact_ids:
        if conn.execute("select 1 from contacts where contact_id = ?", (contact_id,)).fetchone() is None:
            raise NothingToErase(f"nothing to erase: there is no contact {contact_id}")
        held.add(contact_id)
    ids = sorted(held)
    marks = _marks(ids)
    people = conn.execute(
        f"select first_name, last_name, email, phone_raw, external_id, phone_e164"
        f" from contacts where contact_id in ({marks})",
        ids,
    ).fetchall()
    found = set(numbers)
    found.update(row[5] for row in people)
    for sql in (
        f"select distinct phone_e164 from messages where contact_id in ({marks})",
        f"select distinct from_e164 from inbound_messages where contact_id in ({marks})",
        f"select distinct phone_e164 from consent_events where contact_id in ({marks})",
    ):
        found.update(row[0] for row in conn.execute(sql, ids))
    numbers = sorted(n for n in found if n is not None and not is_pseudonym(n))
    aliases = {n: pseudonym(n, secret) for n in numbers}
    in_use = set()
    if numbers:
        in_use = {
            row[0]
            for row in conn.execute(
                f"select distinct phone_e164 from contacts where phone_e164 in ({_marks(numbers)})"
                f" and contact_id not in ({marks})",
                [*numbers, *ids],
            )
        }
    released = frozenset(numbers) - in_use
    owners: dict[str, int] = {}
    for cid, phone in conn.execute(
        f"select contact_id, phone_e164 from contacts where contact_id in ({marks}) order by contact_id", ids
    ):
        if phone in released:
            owners.setdefault(phone, cid)
    others = [value for row in people for value in row[:5] if value]
    return _Plan(
        contact_ids=tuple(sorted(ids)),
        aliases=aliases,
        released=released,
        owners=owners,
        redact=_redactor(aliases, others),
        secret=secret,
    )


def _alias_case(column: str, aliases: dict[str, str]) -> tuple[str, list[str]]:
    """``case column when <number> then <pseudonym> … else column end`` and its parameters."""
    if not aliases:
        return column, []
    whens = " ".join("when ? then ?" for _ in aliases)
    return f"case {column} {whens} else {column} end", [v for pair in aliases.items() for v in pair]


def _scrub_contacts(conn: sqlite3.Connection, plan: _Plan, stamp: str) -> int:
    changed = 0
    rows = conn.execute(
        f"select contact_id, phone_e164 from contacts where contact_id in ({_marks(plan.contact_ids)})",
        plan.contact_ids,
    ).fetchall()
    for cid, phone in rows:
        alias = plan.aliases.get(phone, phone)
        cur = conn.execute(
            """
            update contacts set
                external_id = null, first_name = null, last_name = null, gender = null,
                birth_date = null, email = null, city = null, region = null, time_zone = null,
                phone_raw = null, phone_e164 = ?, phone_valid = 0, phone_reason = ?,
                phone_time_zones = null, attributes = null, updated_at = ?
            where contact_id = ?
                and (
                    phone_reason is not ? or phone_valid <> 0 or phone_e164 is not ?
                    or coalesce(external_id, first_name, last_name, gender, birth_date, email, city,
                                region, time_zone, phone_raw, phone_time_zones, attributes) is not null
                )
            """,
            (alias, ERASED_REASON, stamp, cid, ERASED_REASON, alias),
        )
        changed += cur.rowcount
    return changed


def _scrub_messages(conn: sqlite3.Connection, plan: _Plan) -> int:
    ids, numbers = list(plan.contact_ids), list(plan.aliases)
    case, case_args = _alias_case("phone_e164", plan.aliases)
    own = conn.execute(
        f"update messages set body = null, phone_e164 = {case}"
        f" where contact_id in ({_marks(ids)})"
        f" and (body is not null or phone_e164 in ({_marks(numbers)}))",
        [*case_args, *ids, *numbers],
    ).rowcount
    released = sorted(plan.released)
    if not released:
        return own
    # Another contact's message to a released number: the number goes, the text (theirs) stays.
    others = conn.execute(
        f"update messages set phone_e164 = {case}"
        f" where phone_e164 in ({_marks(released)}) and contact_id not in ({_marks(ids)})",
        [*case_args, *released, *ids],
    ).rowcount
    return own + others


def _scrub_inbound(conn: sqlite3.Connection, plan: _Plan) -> int:
    ids, numbers, released = list(plan.contact_ids), list(plan.aliases), sorted(plan.released)
    case, case_args = _alias_case("from_e164", plan.aliases)
    return conn.execute(
        f"update inbound_messages set body = '', from_e164 = {case}"
        f" where (contact_id in ({_marks(ids)}) or from_e164 in ({_marks(released)}))"
        f" and (body <> '' or from_e164 in ({_marks(numbers)}))",
        [*case_args, *ids, *released, *numbers],
    ).rowcount


def _own_messages(plan: _Plan) -> tuple[str, list[int]]:
    return f"select message_id from messages where contact_id in ({_marks(plan.contact_ids)})", list(
        plan.contact_ids
    )


def _scrub_clicks(conn: sqlite3.Connection, plan: _Plan) -> int:
    messages, args = _own_messages(plan)
    return conn.execute(
        f"update clicks set user_agent = null where user_agent is not null and message_id in ({messages})",
        args,
    ).rowcount


def _scrub_links(conn: sqlite3.Connection, plan: _Plan) -> int:
    messages, args = _own_messages(plan)
    rows = conn.execute(f"select token, url from links where message_id in ({messages})", args).fetchall()
    changes = [(plan.redact(url), token) for token, url in rows if plan.redact(url) != url]
    conn.executemany("update links set url = ? where token = ?", changes)
    return len(changes)


def _scrub_orders(conn: sqlite3.Connection, plan: _Plan) -> int:
    rows = conn.execute(
        f"select order_id, external_id from orders where contact_id in ({_marks(plan.contact_ids)})"
        " and external_id not like 'erased:%'",
        plan.contact_ids,
    ).fetchall()
    changes = [(PSEUDONYM_PREFIX + _digest(plan.secret, "order:" + ext), oid) for oid, ext in rows]
    conn.executemany("update orders set external_id = ? where order_id = ?", changes)
    return len(changes)


def _scrub_customer_events(conn: sqlite3.Connection, plan: _Plan) -> int:
    rows = conn.execute(
        f"select event_id, event_key, properties from customer_events"
        f" where contact_id in ({_marks(plan.contact_ids)})",
        plan.contact_ids,
    ).fetchall()
    changes = [
        (plan.redact(key), event_id)
        for event_id, key, properties in rows
        if properties is not None or plan.redact(key) != key
    ]
    conn.executemany(
        "update customer_events set event_key = ?, properties = null where event_id = ?", changes
    )
    return len(changes)


def _minimise_ledger(conn: sqlite3.Connection, plan: _Plan) -> int:
    released = sorted(plan.released)
    if not released:
        return 0
    rows = conn.execute(
        f"select event_id, event_key, phone_e164, source, consent_text, proof from consent_events"
        f" where phone_e164 in ({_marks(released)})",
        released,
    ).fetchall()
    changes = [
        (
            plan.redact(key),
            plan.aliases[phone],
            _minimised_text(source, text, plan.redact),
            _minimised_proof(proof, plan.redact),
            event_id,
        )
        for event_id, key, phone, source, text, proof in rows
    ]
    conn.executemany(
        "update consent_events set event_key = ?, phone_e164 = ?, consent_text = ?, proof = ? where event_id = ?",
        changes,
    )
    return len(changes)


def _record_erasure(
    conn: sqlite3.Connection, plan: _Plan, key: str, stamp: str, requested_by: str, reason: str | None
) -> int:
    """One opt-out per purpose for each released number's pseudonym: the trace of the
    erasure, and what keeps the number opted out if it is ever imported again."""
    proof = json.dumps(
        {
            "erasure": key,
            "requested_by": plan.redact(requested_by),
            "reason": plan.redact(reason) if reason is not None else None,
        },
        ensure_ascii=False,
        sort_keys=True,
        separators=(",", ":"),
    )
    rows = []
    for number in sorted(plan.released):
        alias = plan.aliases[number]
        # never earlier than the latest event of the number, so the opt-out is its current state
        (latest,) = conn.execute(
            "select max(occurred_at) from consent_events where phone_e164 = ?", (alias,)
        ).fetchone()
        occurred = max(stamp, latest or stamp)
        for purpose in sorted(consent.PURPOSES):
            rows.append(
                (
                    f"erasure:{key}:{alias.removeprefix(PSEUDONYM_PREFIX)}:{purpose}",
                    alias,
                    plan.owners.get(number),
                    purpose,
                    ERASURE_TEXT,
                    proof,
                    occurred,
                    stamp,
                )
            )
    before = conn.total_changes
    conn.executemany(
        """
        insert into consent_events (
            event_key, phone_e164, contact_id, purpose, action, source,
            consent_text, proof, occurred_at, recorded_at
        )
        values (?, ?, ?, ?, 'opt_out', 'admin', ?, ?, ?, ?)
        on conflict (event_key) do nothing
        """,
        rows,
    )
    return conn.total_changes - before


def _earlier_key(conn: sqlite3.Connection, plan: _Plan) -> str | None:
    """The key of the latest erasure that covered this request's numbers or contacts."""
    aliases = list(plan.aliases.values())
    aliases += [
        row[0]
        for row in conn.execute(
            f"select phone_e164 from contacts where contact_id in ({_marks(plan.contact_ids)})",
            plan.contact_ids,
        )
        if is_pseudonym(row[0])
    ]
    if not aliases:
        return None
    row = conn.execute(
        f"select event_key from consent_events where event_key like 'erasure:%'"
        f" and phone_e164 in ({_marks(aliases)}) order by recorded_at desc, event_id desc limit 1",
        aliases,
    ).fetchone()
    return row[0].split(":")[1] if row else None


def _apply_journal(conn: sqlite3.Connection) -> None:
    """Replies and receipts answered but not yet applied to the store are applied first, inside
    the erasure's transaction: a STOP from the person journaled a moment ago is erased with the
    rest instead of landing, with their number, after the erasure."""
    home = _store_home(conn)
    if home is None or not ingress.journal_path(home).exists():
        return
    jconn = ingress.connect(ingress.journal_path(home))
    try:
        while ingress.apply_pending(home, conn=conn, jconn=jconn).applied:
            pass
    finally:
        jconn.close()


def _scrub_ingress_rejects(conn: sqlite3.Connection, plan: _Plan) -> None:
    """Journal entries the store refused keep their payload for a person to look at: the
    erased numbers are cut out of them."""
    if not plan.aliases:
        return
    for reject_id, payload, error in conn.execute("select reject_id, payload, error from ingress_rejects"):
        cleaned = (plan.redact(payload), plan.redact(error))
        if cleaned != (payload, error):
            conn.execute(
                "update ingress_rejects set payload = ?, error = ? where reject_id = ?", (*cleaned, reject_id)
            )


@contextmanager
def _secure_delete(conn: sqlite3.Connection) -> Iterator[None]:
    """Freed space is overwritten with zeros while erasing, so old values do not linger."""
    (before,) = conn.execute("pragma secure_delete").fetchone()
    conn.execute("pragma secure_delete = on")
    try:
        yield
    finally:
        conn.execute(f"pragma secure_delete = {int(before)}")


def erase(
    conn: sqlite3.Connection,
    *,
    phone_e164: str | None = None,
    contact_id: int | None = None,
    requested_by: str,
    reason: str | None = None,
    now: datetime | None = None,
    dry_run: bool = False,
) -> ErasureResult:
    """Erase a data subject: every contact holding ``phone_e164`` (any form a CRM writes),
    or the contact ``contact_id``. One transaction; ``dry_run`` reports and rolls back.

    Outside a caller's transaction, an erasure that changed something then purges what lies
    outside the store's tables (:func:`purge`: its free pages, the ingress journal, uploads,
    logs, older warehouse files; the next build starts from an empty file) and is appended to
    the erasure log that a restore replays (:mod:`smsops.backup`); ``purged`` says what went.

    Raises :class:`NothingToErase` when nothing in the store matches, and
    :class:`ErasureError` for a bad request or a missing or unsafe erasure key."""
    if (phone_e164 is None) == (contact_id is None):
        raise ErasureError("give exactly one of phone_e164 and contact_id")
    number = _number(phone_e164) if phone_e164 is not None else None
    if contact_id is not None and (
        not isinstance(contact_id, int) or isinstance(contact_id, bool) or contact_id < 1
    ):
        raise ErasureError(f"contact_id must be a positive integer, got {contact_id!r:.40}")
    if not isinstance(requested_by, str) or not requested_by.strip():
        raise ErasureError("requested_by must name who asked for the erasure (a person or a ticket)")
    if reason is not None and not isinstance(reason, str):
        raise ErasureError(f"reason must be text or None, got {type(reason).__name__}")
    secret = _secret(conn, create=True)
    assert secret is not None
    nested = conn.in_transaction
    result, plan = _run(
        conn,
        secret,
        numbers=[number] if number is not None else [],
        contact_ids=[contact_id] if contact_id is not None else [],
        requested_by=requested_by.strip(),
        reason=reason,
        stamp=_stamp(now),
        dry_run=dry_run,
    )
    if dry_run or nested:
        return result
    if result.changed:
        _log_erasure(conn, plan, result, requested_by.strip(), reason)
    purged = purge(conn, {*plan.aliases, *([number] if number else [])}, plan.redact)
    return replace(result, purged=purged)


def _run(
    conn: sqlite3.Connection,
    secret: bytes,
    *,
    numbers: Sequence[str],
    contact_ids: Sequence[int],
    requested_by: str,
    reason: str | None,
    stamp: str,
    dry_run: bool = False,
    key: str | None = None,
) -> tuple[ErasureResult, _Plan]:
    """The erasure itself, in the store (see :func:`erase`); ``key`` names the erasure in the
    ledger (a replay gives the original's, so the ledger comes out as it was)."""
    nested = conn.in_transaction
    with _secure_delete(conn):
        with store.transaction(conn, keep=not dry_run):
            _apply_journal(conn)
            plan = _plan(conn, secret, numbers, contact_ids)
            counts = {
                "contacts_erased": _scrub_contacts(conn, plan, stamp),
                "messages_scrubbed": _scrub_messages(conn, plan),
                "inbound_scrubbed": _scrub_inbound(conn, plan),
                "clicks_scrubbed": _scrub_clicks(conn, plan),
                "links_scrubbed": _scrub_links(conn, plan),
                "orders_scrubbed": _scrub_orders(conn, plan),
                "customer_events_scrubbed": _scrub_customer_events(conn, plan),
                "consent_events_minimised": _minimise_ledger(conn, plan),
            }
            _scrub_ingress_rejects(conn, plan)
            if any(counts.values()):
                key = key or secrets.token_hex(8)
                recorded = _record_erasure(conn, plan, key, stamp, requested_by, reason)
            else:
                key, recorded = _earlier_key(conn, plan), 0
        if not dry_run and not nested:
            conn.execute("pragma wal_checkpoint(truncate)").fetchall()
    result = ErasureResult(
        **counts,
        erasure_key=key,
        erasure_events_recorded=recorded,
        contact_ids=plan.contact_ids,
        numbers_in_use=len(plan.aliases) - len(plan.released),
        dry_run=dry_run,
    )
    return result, plan


# ---------------------------------------------------------------------------------------
# Outside the store's tables: free pages, the journal, files, older warehouse files


_SEPARATORS = (" ", "\t", "-", "(", ")", ".", "\u00a0")
_LOG_SUFFIXES = (".log", ".out", ".err")


@functools.lru_cache(maxsize=256)
def _loose(e164: str, encoding: str | None = None) -> re.Pattern:
    """The number as people write it, with or without its prefix (``+7``, ``7``, ``8`` for
    Russia) and with spaces, dashes, dots or brackets between digits: a text pattern, or with
    ``encoding`` a pattern over that encoding's bytes."""
    parsed = phonenumbers.parse(e164)
    code, national = str(parsed.country_code), str(parsed.national_number)

    def lit(text: str) -> Any:
        return re.escape(text if encoding is None else text.encode(encoding))

    def raw(text: str) -> Any:
        return text if encoding is None else text.encode("ascii")

    sep = raw("(?:") + raw("|").join(lit(c) for c in _SEPARATORS) + raw("){0,3}")
    digit = raw("(?:") + raw("|").join(lit(str(d)) for d in range(10)) + raw(")")
    prefixes = [f"+{code}", code, *(["8"] if code == "7" else [])]
    prefix = raw("(?:(?:") + raw("|").join(lit(item) for item in prefixes) + raw(")") + sep + raw(")?")
    body = sep.join(lit(d) for d in national)
    return re.compile(raw("(?<!") + digit + raw(")") + prefix + body + raw("(?!") + digit + raw(")"))


def _text_scrubber(numbers: Iterable[str], redact: Callable[[str], str]) -> Callable[[str], str]:
    """``redact`` (each number's usual forms become its pseudonym), then every other way of
    writing the numbers (``8 (912) 345-67-89``) becomes ``[erased]``."""
    patterns = [_loose(number) for number in numbers]

    def scrub(text: str) -> str:
        text = redact(text)
        for pattern in patterns:
            text = pattern.sub(REDACTED, text)
        return text

    return scrub


def _holds(data: bytes, numbers: Iterable[str]) -> bool:
    return any(
        _loose(number, encoding).search(data)
        for number in numbers
        for encoding in ("utf-8", "utf-16-le", "utf-16-be")
    )


@dataclass(frozen=True, slots=True)
class Purged:
    """What an erasure removed outside the store's tables (paths relative to ``SMSOPS_HOME``)."""

    store_vacuumed: bool = False
    """The store was rewritten without its free pages (False: busy; erasing again retries)."""
    journal_deleted: int = 0
    """Ingress journal entries deleted (already applied to the store)."""
    journal_scrubbed: int = 0
    """Ingress journal entries not yet applied, the number cut out of them."""
    files_deleted: tuple[str, ...] = ()
    """Files that held the number: uploads, rejects files, temporary files."""
    files_scrubbed: tuple[str, ...] = ()
    """Logs that held the number: the lines are kept, the number is cut out."""
    snapshots_deleted: tuple[str, ...] = ()
    """Warehouse files other than the published one (older snapshots, the development copy)."""
    failed: tuple[str, ...] = ()
    """Steps that could not be done, with why (erasing again retries them)."""


def purge(
    conn: sqlite3.Connection, numbers: Iterable[str], redact: Callable[[str], str] | None = None
) -> Purged | None:
    """Remove what an erasure of ``numbers`` leaves outside the store's tables under the home of
    the store ``conn`` is connected to (None for a store in memory): the store's free pages and
    log (``vacuum``), journal entries (applied ones deleted, others scrubbed), files holding a
    number in any usual form and encoding (logs scrubbed line by line, other files deleted), and
    every warehouse file but the published one, whose turn comes at the next build (it starts
    from an empty file, then deletes the rest)."""
    from smsops import warehouse  # dbt's adapter comes with it: only when erasing

    home = _store_home(conn)
    if home is None:
        return None
    numbers = sorted({n for n in numbers if n and not is_pseudonym(n)})
    scrub = _text_scrubber(numbers, redact or (lambda text: text))
    try:
        conn.execute("vacuum")
        conn.execute("pragma wal_checkpoint(truncate)").fetchall()
        vacuumed = True
    except sqlite3.OperationalError:
        vacuumed = False
    deleted = scrubbed = 0
    failed: list[str] = []
    files_deleted: list[str] = []
    files_scrubbed: list[str] = []
    snapshots: list[Path] = []
    journal = ingress.journal_path(home)
    try:
        if journal.exists():
            jconn = ingress.connect(journal)
            try:
                jid = ingress.journal_id(jconn)
            finally:
                jconn.close()
            row = conn.execute(
                "select applied_through from ingress_cursor where journal_id = ?", (jid,)
            ).fetchone()
            deleted, scrubbed = ingress.scrub(journal, scrub, applied_through=row[0] if row else 0)
    except sqlite3.Error as exc:  # the erasure itself is committed: say what is left, go on
        failed.append(f"{journal.name}: {exc}")
    try:
        files_deleted, files_scrubbed = _purge_files(home, numbers, scrub, _store_file(conn))
    except OSError as exc:
        failed.append(f"files: {exc}")
    try:
        snapshots = warehouse.purge_snapshots(home)
    except OSError as exc:
        failed.append(f"warehouse: {exc}")
    warehouse.require_fresh_build(home)
    for problem in failed:
        log.error("erasure: could not purge %s", problem)
    return Purged(
        store_vacuumed=vacuumed,
        journal_deleted=deleted,
        journal_scrubbed=scrubbed,
        files_deleted=tuple(files_deleted),
        files_scrubbed=tuple(files_scrubbed),
        snapshots_deleted=tuple(str(path.relative_to(home)) for path in snapshots),
        failed=tuple(failed),
    )


def _purge_files(
    home: Path, numbers: list[str], scrub: Callable[[str], str], own: Path
) -> tuple[list[str], list[str]]:
    """Files under ``home`` holding one of ``numbers``: logs are scrubbed, the rest deleted.
    The databases are not read here: the store and the journal are scrubbed in place, and
    warehouse files are deleted whole (now, or after the next build for the published one)."""
    p = paths(home)
    skipped = {
        p.ops_store,
        own,  # the store the erasure ran in (a restore's private copy is not ops.sqlite)
        ingress.journal_path(home),
        home / KEY_FILE,
        p.erasure_log,
    }
    skipped |= {Path(f"{path}{suffix}") for path in list(skipped) for suffix in ("-wal", "-shm", "-journal")}
    deleted: list[str] = []
    scrubbed: list[str] = []
    if not numbers:
        return deleted, scrubbed
    for folder, _dirs, names in os.walk(home):
        for name in names:
            path = Path(folder, name)
            if path in skipped or name.endswith((".duckdb", ".duckdb.wal")) or path.is_symlink():
                continue
            try:
                data = path.read_bytes()
            except OSError:  # gone while walking, or not a regular file
                continue
            if not _holds(data, numbers):
                continue
            relative = str(path.relative_to(home))
            if _is_log(path):
                text = scrub(data.decode("utf-8", errors="surrogateescape"))
                cleaned = text.encode("utf-8", errors="surrogateescape")
                if not _holds(cleaned, numbers):
                    _rewrite(path, cleaned)
                    scrubbed.append(relative)
                    continue
            path.unlink(missing_ok=True)
            deleted.append(relative)
            parent = path.parent
            while parent != home and parent.is_relative_to(p.uploads) and not any(parent.iterdir()):
                parent.rmdir()
                parent = parent.parent
    return deleted, scrubbed


def _is_log(path: Path) -> bool:
    return path.parent.name == "logs" or any(suffix in _LOG_SUFFIXES for suffix in path.suffixes)


def _rewrite(path: Path, data: bytes) -> None:
    """Replace ``path``'s content with ``data`` in one step, keeping its mode (a writer that
    still appends to the old file writes to a file no longer reachable)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------
# The erasure log (what a restore replays: smsops.backup)


def _log_erasure(
    conn: sqlite3.Connection, plan: _Plan, result: ErasureResult, requested_by: str, reason: str | None
) -> None:
    home = _store_home(conn)
    if home is None or result.erasure_key is None:
        return
    (at,) = conn.execute(
        "select max(recorded_at) from consent_events where event_key >= ? and event_key < ?",
        (f"erasure:{result.erasure_key}:", f"erasure:{result.erasure_key};"),
    ).fetchone()
    if at is None:  # every number still held by another contact: only the contacts were erased
        (at,) = conn.execute(
            f"select max(updated_at) from contacts where contact_id in ({_marks(plan.contact_ids)})",
            plan.contact_ids,
        ).fetchone()
    record = {
        "key": result.erasure_key,
        "at": at,
        "pseudonyms": sorted(plan.aliases[number] for number in plan.released),
        "contact_ids": list(plan.contact_ids),
        "requested_by": plan.redact(requested_by),
        "reason": plan.redact(reason) if reason is not None else None,
    }
    append_log(paths(home).erasure_log, [record])


def append_log(path: Path, records: Iterable[dict[str, Any]]) -> None:
    """Append erasure records to the log at ``path`` (made 0600), synced to disk."""
    lines = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a", encoding="utf-8") as fh:
        fh.write(lines)
        fh.flush()
        os.fsync(fh.fileno())


def erase_again(
    conn: sqlite3.Connection,
    *,
    numbers: Sequence[str],
    contact_ids: Sequence[int],
    requested_by: str,
    reason: str | None,
    at: str,
    key: str | None,
) -> tuple[ErasureResult, Callable[[str], str]]:
    """An erasure made before, made again in a store that lost it (a restored backup): the
    contacts holding ``numbers`` and ``contact_ids``, recorded under the original ``key`` and
    time ``at``, so the ledger comes out as that erasure left it. Returns the result and the
    erasure's redaction (for :func:`purge`); nothing outside the store is touched here."""
    secret = _secret(conn, create=False)
    if secret is None:
        raise ErasureError(
            f"there is no erasure key ({KEY_FILE} or ${SECRET_ENV}) to recognise erased numbers with:"
            " restore the key that was backed up with the store"
        )
    result, plan = _run(
        conn,
        secret,
        numbers=numbers,
        contact_ids=contact_ids,
        requested_by=requested_by,
        reason=reason,
        stamp=at,
        key=key,
    )
    return result, plan.redact


def install_secret(conn: sqlite3.Connection) -> bytes | None:
    """The erasure secret of the install ``conn``'s store belongs to, None when there is none."""
    return _secret(conn, create=False)


def summary_lines(result: ErasureResult) -> list[str]:
    """The counts as a person reads them (used by the CLI)."""
    shown = ", ".join(map(str, result.contact_ids[:10])) + (" …" if len(result.contact_ids) > 10 else "")
    who = f"contact {shown}" if len(result.contact_ids) == 1 else f"contacts {shown or '—'}"
    if not result.changed:
        earlier = f" (erasure {result.erasure_key})" if result.erasure_key else ""
        return [f"{who}: already erased, nothing to change{earlier}"]
    lines = [
        f"{'would erase' if result.dry_run else 'erased'} {who}:",
        f"  contacts erased            {result.contacts_erased:>8,}",
        f"  messages scrubbed          {result.messages_scrubbed:>8,}",
        f"  replies scrubbed           {result.inbound_scrubbed:>8,}",
        f"  clicks scrubbed            {result.clicks_scrubbed:>8,}",
        f"  links scrubbed             {result.links_scrubbed:>8,}",
        f"  orders pseudonymised       {result.orders_scrubbed:>8,}",
        f"  customer events scrubbed   {result.customer_events_scrubbed:>8,}",
        f"  consent events minimised   {result.consent_events_minimised:>8,}",
    ]
    if result.numbers_in_use:
        lines.append(
            f"  {result.numbers_in_use} number(s) stay in clear in the consent ledger: another contact holds them"
        )
    if not result.dry_run:
        lines.append(f"  erasure {result.erasure_key} recorded in the consent ledger")
    if result.purged is not None:
        lines += purged_lines(result.purged)
    return lines


def purged_lines(purged: Purged) -> list[str]:
    """What :func:`purge` removed, as a person reads it."""
    lines = [
        _("  the store rewritten without its free pages")
        if purged.store_vacuumed
        else _("  the store is busy: its free pages may still hold old values; erase again later"),
        ngettext(
            "  {n} ingress journal entry deleted, {m} scrubbed",
            "  {n} ingress journal entries deleted, {m} scrubbed",
            purged.journal_deleted,
        ).format(n=purged.journal_deleted, m=purged.journal_scrubbed),
    ]
    lines += [_("  deleted {path}: it held the number").format(path=path) for path in purged.files_deleted]
    lines += [_("  NOT purged, erase again: {problem}").format(problem=problem) for problem in purged.failed]
    lines += [_("  scrubbed {path}: the number cut out").format(path=path) for path in purged.files_scrubbed]
    lines.append(
        ngettext(
            "  {n} older warehouse snapshot or copy deleted",
            "  {n} older warehouse snapshots and copies deleted",
            len(purged.snapshots_deleted),
        ).format(n=len(purged.snapshots_deleted))
    )
    lines.append(
        _(
            "  the published warehouse holds the old data until the next `smsops build`, which starts"
            " from an empty file and then deletes the old one"
        )
    )
    return lines
