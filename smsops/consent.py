"""The consent ledger: who agreed to what, who said STOP, and whether a number may get a message now.

The ledger (``consent_events`` in the operational store) is append-only: every opt-in and
opt-out is a new row with its source, the text the person agreed to and its proof; nothing
is ever updated or deleted. The current state is derived from it by the same rule as the dbt
model ``int_consent_state``: the latest event wins, an opt-out wins a tie, and an opt-out by
keyword reply (STOP) covers every purpose.

Pure decisions (:func:`classify_reply`, :func:`looks_like_opt_out`, the state rule) are
separate from the thin store adapters (:func:`record`, :func:`state`, :func:`may_send`,
:func:`handle_inbound` …), which always read the operational store, never a mart.
"""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from smsops import config, store

__all__ = [
    "ACTIONS",
    "HELP_REPLY",
    "HELP_REPLY_EN",
    "MAX_CLOCK_SKEW",
    "PURPOSES",
    "SOURCES",
    "START_REPLY",
    "START_REPLY_EN",
    "STOP_REPLY",
    "STOP_REPLY_EN",
    "ConsentError",
    "ConsentEvent",
    "ConsentState",
    "InboundResult",
    "classify_reply",
    "export_proof",
    "handle_inbound",
    "looks_like_opt_out",
    "may_send",
    "record",
    "record_many",
    "state",
    "states",
]

Keyword = Literal["stop", "start", "help"]
Purpose = Literal["marketing", "service"]
Action = Literal["opt_in", "opt_out"]
MessageKind = Literal["promo", "service"]

PURPOSES = frozenset({"marketing", "service"})
ACTIONS = frozenset({"opt_in", "opt_out"})
SOURCES = frozenset({"web_form", "import", "keyword_reply", "link", "api", "admin", "provider"})
"""The ``source`` values the ``consent_events`` table accepts."""

MAX_CLOCK_SKEW = timedelta(hours=1)
"""How far in the future an event may be dated: a future opt-in would outrank every opt-out
recorded before its date, so anything later than this is refused as a clock or input error."""

STOP_REPLY = "Вы отписаны от рассылки. Чтобы возобновить, ответьте СТАРТ."
START_REPLY = "Подписка возобновлена. Отказ: СТОП."
HELP_REPLY = "Информационная рассылка. Отказ: ответьте СТОП. Возобновить: СТАРТ."
STOP_REPLY_EN = "You are unsubscribed and will get no more messages. Reply START to resubscribe."
START_REPLY_EN = "You are resubscribed. Reply STOP to unsubscribe."
HELP_REPLY_EN = "Reply STOP to unsubscribe, START to resubscribe."

_REPLIES: dict[tuple[Keyword, str], str] = {
    ("stop", "ru"): STOP_REPLY,
    ("start", "ru"): START_REPLY,
    ("help", "ru"): HELP_REPLY,
    ("stop", "en"): STOP_REPLY_EN,
    ("start", "en"): START_REPLY_EN,
    ("help", "en"): HELP_REPLY_EN,
}


class ConsentError(ValueError):
    """A consent event, reply or query argument is not valid; the message names the field."""


# ---------------------------------------------------------------------------------------
# Replies: keywords and free-text revocations (pure)

_LATIN_KEYWORDS: dict[str, Keyword] = {
    **dict.fromkeys(
        (
            "STOP",
            "STOPALL",
            "STOP ALL",
            "UNSUBSCRIBE",
            "CANCEL",
            "END",
            "QUIT",
            "OPTOUT",
            "OPT OUT",
            "REVOKE",
        ),
        "stop",
    ),
    **dict.fromkeys(("START", "UNSTOP", "YES"), "start"),
    **dict.fromkeys(("HELP", "INFO"), "help"),
}
_CYRILLIC_KEYWORDS: dict[str, Keyword] = {
    **dict.fromkeys(("СТОП", "ОТПИСКА", "ОТПИСАТЬСЯ", "ОТМЕНА", "ХВАТИТ"), "stop"),
    **dict.fromkeys(("СТАРТ", "ПОДПИСКА"), "start"),
    "ПОМОЩЬ": "help",
}

# Letters that look the same in both scripts (after upper-casing, so "a", "c", "o" … too).
_LOOK_ALIKE_LATIN = "ABCEHKMOPTXY"
_LOOK_ALIKE_CYRILLIC = "АВСЕНКМОРТХУ"
_TO_CYRILLIC = str.maketrans(_LOOK_ALIKE_LATIN, _LOOK_ALIKE_CYRILLIC)
_TO_LATIN = str.maketrans(_LOOK_ALIKE_CYRILLIC, _LOOK_ALIKE_LATIN)
_DROPPED_CATEGORIES = frozenset({"Cf", "Mn", "Me"})  # zero-width and format characters, combining marks
_SEPARATORS = re.compile(r"[\W_]+")
_CYRILLIC = re.compile(r"[\u0400-\u04ff]")
_LATIN = re.compile(r"[A-Z]")


def _words(text: str) -> list[str]:
    """Upper-cased words of ``text``: NFKC, invisible characters dropped, ``Ё`` read as ``Е``,
    and every run of punctuation, emoji or space counted as one separator."""
    text = unicodedata.normalize("NFKC", text)
    text = "".join(ch for ch in text if unicodedata.category(ch) not in _DROPPED_CATEGORIES)
    text = text.upper().replace("Ё", "Е")
    return _SEPARATORS.sub(" ", text).split()


def _fold_script(word: str) -> str:
    """A mixed-script word written in one script: look-alikes follow the majority of the
    letters that only one script has; with no majority, any Cyrillic letter decides."""
    cyrillic = len(_CYRILLIC.findall(word.translate(_TO_LATIN)))
    latin = len(_LATIN.findall(word.translate(_TO_CYRILLIC)))
    if cyrillic > latin or (cyrillic == latin and _CYRILLIC.search(word)):
        return word.translate(_TO_CYRILLIC)
    return word.translate(_TO_LATIN)


def _match(text: str | None) -> tuple[Keyword, str] | None:
    """The keyword ``text`` is, and its language (``"en"`` or ``"ru"``), or None."""
    if text is None:
        return None
    if not isinstance(text, str):
        raise ConsentError(f"reply text must be str or None, got {type(text).__name__}: {text!r:.40}")
    words = _words(text)
    if not words:
        return None
    # Read the whole message once in each script, so a Latin STOP stays Latin and a Cyrillic
    # word typed with Latin look-alikes ("CTOП", "cтoп", even all-Latin "CTAPT") is Cyrillic.
    for table, keywords, language in (
        (_TO_LATIN, _LATIN_KEYWORDS, "en"),
        (_TO_CYRILLIC, _CYRILLIC_KEYWORDS, "ru"),
    ):
        reading = [word.translate(table) for word in words]
        if len(set(reading)) == 1:  # "СТОП СТОП" is still СТОП
            reading = reading[:1]
        keyword = keywords.get(" ".join(reading))
        if keyword is not None:
            return keyword, language
    return None


def classify_reply(text: str | None) -> Keyword | None:
    """``"stop"``, ``"start"`` or ``"help"`` when the whole reply is such a keyword, else None.

    Case, surrounding punctuation and emoji, extra spaces, ``ё`` and Latin look-alike letters
    in Russian words do not matter; a sentence that merely contains a keyword is not one.
    """
    match = _match(text)
    return match[0] if match is not None else None


# Free-text revocations, matched from the start of a word; "*" lets the last word go on
# ("не пиши*" is also "не пишите"), otherwise the phrase ends at a word end.
_OPT_OUT_PHRASES = (
    # Russian
    "не пиши*",
    "не присылай*",
    "не присылать",
    "не отправляй*",
    "не надо писать",
    "не надо присылать",
    "не беспокой*",
    "не хочу получать",
    "отпиши*",
    "отписат*",
    "отписыва*",
    "отписк*",
    "отказываюсь от",
    "отказ от рассылки",
    "удалите мой номер",
    "удалите номер",
    "удалите меня",
    "уберите мой номер",
    "уберите меня",
    "исключите меня",
    "хватит слать",
    "хватит писать",
    "хватит присылать",
    "хватит спам*",
    "прекратит*",
    "перестаньте писать",
    "перестаньте присылать",
    "перестаньте слать",
    # English
    "unsubscrib*",
    "stop texting",
    "stop sending",
    "stop messag*",
    "stop contact*",
    "stop spam*",
    "stop all",
    "remove me",
    "remove my number",
    "take me off",
    "don't text",
    "dont text",
    "do not text",
    "don't message",
    "dont message",
    "do not message",
    "don't send",
    "dont send",
    "do not send",
    "don't contact",
    "dont contact",
    "do not contact",
    "leave me alone",
    "opt me out",
    "opt out",
    "no more texts",
    "no more messages",
)


def _folded(text: str) -> str:
    return " ".join(_fold_script(word) for word in _words(text))


def _phrase_pattern(phrase: str) -> str:
    words = re.escape(_folded(phrase.removesuffix("*")))
    return words if phrase.endswith("*") else words + "(?![^ ])"


_OPT_OUT = re.compile("(?<![^ ])(?:" + "|".join(map(_phrase_pattern, _OPT_OUT_PHRASES)) + ")")


def looks_like_opt_out(text: str | None) -> bool:
    """True when a reply that is not a keyword reads as a request to stop ("не пишите мне",
    "please stop texting me"): such a reply must be reviewed by a person."""
    if text is None or _match(text) is not None:
        return False
    return _OPT_OUT.search(_folded(text)) is not None


# ---------------------------------------------------------------------------------------
# Validation (pure)

_E164 = re.compile(r"\+[1-9]\d{7,14}")


def _phone(value: object, field: str = "phone_e164") -> str:
    if not isinstance(value, str) or _E164.fullmatch(value) is None:
        raise ConsentError(
            f"{field} must be an E.164 number such as '+79123456789', got {value!r:.40}; "
            "normalise it with smsops.phones.normalize first"
        )
    return value


def _choice(value: object, field: str, allowed: frozenset[str]) -> str:
    if value not in allowed:
        raise ConsentError(f"{field} must be one of {', '.join(sorted(allowed))}; got {value!r:.40}")
    return value


def _optional_text(value: object, field: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ConsentError(f"{field} must be text or None, got {type(value).__name__}: {value!r:.40}")
    return value


def _required_text(value: object, field: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConsentError(f"{field} must be non-empty text, got {value!r:.40}")
    return value


def _optional_id(value: object, field: str) -> int | None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ConsentError(f"{field} must be a positive integer id or None, got {value!r:.40}")
    return value


def _store_time(value: object, field: str, now: datetime) -> str:
    """``value`` (datetime, naive = UTC, or ISO 8601 text) as the store's UTC text."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.strip())
        except ValueError:
            raise ConsentError(
                f"{field} must be an ISO 8601 time such as '2025-03-01 12:00:00+03:00', got {value!r:.40}"
            ) from None
    if not isinstance(value, datetime):
        raise ConsentError(
            f"{field} must be a datetime (naive means UTC) or ISO 8601 text, got {type(value).__name__}"
        )
    if value.tzinfo is not None:
        value = value.astimezone(UTC)
    utc = datetime(*value.timetuple()[:6], value.microsecond)
    if utc > now + MAX_CLOCK_SKEW:
        raise ConsentError(
            f"{field} {utc.isoformat(sep=' ')} UTC is in the future; check the clock or the input"
        )
    return utc.isoformat(sep=" ")


def _proof_json(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ConsentError(
            f"proof must be a dict (form URL, IP, message id …) or None, got {type(value).__name__}"
        )
    try:
        return json.dumps(
            dict(value), ensure_ascii=False, sort_keys=True, separators=(",", ":"), allow_nan=False
        )
    except (TypeError, ValueError) as exc:
        raise ConsentError(f"proof must hold only JSON values (text, numbers, lists, dicts): {exc}") from None


def _now() -> datetime:
    """The current time in UTC, naive, as the store keeps it."""
    return datetime.now(UTC).replace(tzinfo=None)


# ---------------------------------------------------------------------------------------
# Writing the ledger


@dataclass(frozen=True, slots=True)
class ConsentEvent:
    """One opt-in or opt-out to append to the ledger."""

    phone_e164: str
    purpose: Purpose
    action: Action
    source: str
    occurred_at: datetime | str
    consent_text: str | None = None
    proof: Mapping[str, Any] | None = None
    contact_id: int | None = None
    event_key: str | None = None


_INSERT_EVENT = """
    insert into consent_events (
        event_key, phone_e164, contact_id, purpose, action, source,
        consent_text, proof, occurred_at, recorded_at
    )
    values (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
    on conflict (event_key) do nothing
"""


def _row(event: ConsentEvent, now: datetime) -> tuple[object, ...]:
    """The table row for ``event``, validated; the default key is a hash of what the event
    says, so recording the same event twice is a no-op."""
    phone = _phone(event.phone_e164)
    purpose = _choice(event.purpose, "purpose", PURPOSES)
    action = _choice(event.action, "action", ACTIONS)
    source = _choice(event.source, "source", SOURCES)
    occurred_at = _store_time(event.occurred_at, "occurred_at", now)
    consent_text = _optional_text(event.consent_text, "consent_text")
    proof = _proof_json(event.proof)
    contact_id = _optional_id(event.contact_id, "contact_id")
    key = event.event_key
    if key is None:
        identity = json.dumps([source, phone, purpose, action, occurred_at, proof], ensure_ascii=False)
        key = "auto:" + hashlib.sha256(identity.encode()).hexdigest()[:40]
    else:
        key = _required_text(key, "event_key")
    recorded_at = now.isoformat(sep=" ")
    return (key, phone, contact_id, purpose, action, source, consent_text, proof, occurred_at, recorded_at)


def record(
    conn: sqlite3.Connection,
    *,
    phone_e164: str,
    purpose: Purpose,
    action: Action,
    source: str,
    occurred_at: datetime | str,
    consent_text: str | None = None,
    proof: Mapping[str, Any] | None = None,
    contact_id: int | None = None,
    event_key: str | None = None,
) -> bool:
    """Append one consent event; True when it was new, False when its key was already there."""
    event = ConsentEvent(
        phone_e164, purpose, action, source, occurred_at, consent_text, proof, contact_id, event_key
    )
    return record_many(conn, [event]) == 1


def record_many(conn: sqlite3.Connection, events: Iterable[ConsentEvent]) -> int:
    """Append many consent events in one transaction (all or nothing); the number of new rows."""
    now = _now()
    rows = [_row(event, now) for event in events]
    before = conn.total_changes
    with store.transaction(conn):
        conn.executemany(_INSERT_EVENT, rows)
    return conn.total_changes - before


# ---------------------------------------------------------------------------------------
# Current state


@dataclass(frozen=True, slots=True)
class ConsentState:
    """A number's current consent for one purpose, and the ledger event that decided it."""

    phone_e164: str
    purpose: Purpose
    opted_in: bool
    last_action: Action | None
    last_source: str | None
    changed_at: datetime | None
    proof: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class _Entry:
    """One ledger row, as the state rule needs it."""

    event_id: int
    purpose: str
    action: str
    source: str
    occurred_at: str
    proof: str | None


def _applies(entry: _Entry, purpose: str) -> bool:
    """An event counts for its own purpose; a keyword opt-out (STOP) counts for every purpose."""
    return entry.purpose == purpose or (entry.action == "opt_out" and entry.source == "keyword_reply")


def _precedence(entry: _Entry) -> tuple[str, bool, int]:
    """Sort key, highest wins: the latest event, then an opt-out, then the later-written row."""
    return (entry.occurred_at, entry.action == "opt_out", entry.event_id)


def _state(phone: str, purpose: str, last: _Entry | None) -> ConsentState:
    if last is None:
        return ConsentState(phone, purpose, False, None, None, None, None)
    return ConsentState(
        phone_e164=phone,
        purpose=purpose,
        opted_in=last.action == "opt_in",
        last_action=last.action,
        last_source=last.source,
        changed_at=datetime.fromisoformat(last.occurred_at).replace(tzinfo=UTC),
        proof=_parse_proof(last.proof),
    )


def _decide(phone: str, purpose: str, entries: Iterable[_Entry]) -> ConsentState:
    """The current state of ``phone`` for ``purpose`` given all its ledger entries."""
    relevant = [entry for entry in entries if _applies(entry, purpose)]
    return _state(phone, purpose, max(relevant, key=_precedence) if relevant else None)


def _send_verdict(kind: str, marketing: ConsentState, service: ConsentState) -> tuple[bool, str | None]:
    """Whether a message of ``kind`` may go, and why not: promotions need a current marketing
    opt-in; service messages need no opt-in and stop only on an opt-out that covers service."""
    if kind == "service":
        return (False, "opted_out") if service.last_action == "opt_out" else (True, None)
    if marketing.opted_in:
        return True, None
    return False, "opted_out" if marketing.last_action == "opt_out" else "no_consent"


def _start_restores(entries: Iterable[_Entry]) -> tuple[Purpose, ...]:
    """The purposes a START reply gives back: marketing when its opt-in was revoked by keyword
    STOP and by nothing else since; service when a keyword STOP is what blocks it. A START
    never creates a marketing consent that was not given before."""
    entries = list(entries)
    restored: list[Purpose] = []
    history = sorted((e for e in entries if _applies(e, "marketing")), key=_precedence, reverse=True)
    stops = 0
    for entry in history:
        if entry.action == "opt_out" and entry.source == "keyword_reply":
            stops += 1
            continue
        if stops and entry.action == "opt_in":
            restored.append("marketing")
        break
    service = max((e for e in entries if _applies(e, "service")), key=_precedence, default=None)
    if service is not None and service.action == "opt_out" and service.source == "keyword_reply":
        restored.append("service")
    return tuple(restored)


def _parse_proof(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return {"text": text}  # written by hand or by another tool: keep it readable
    return value if isinstance(value, dict) else {"value": value}


def _entries(conn: sqlite3.Connection, phone: str) -> list[_Entry]:
    rows = conn.execute(
        "select event_id, purpose, action, source, occurred_at, proof from consent_events where phone_e164 = ?",
        (phone,),
    ).fetchall()
    return [_Entry(*row) for row in rows]


def state(conn: sqlite3.Connection, phone_e164: str, purpose: Purpose) -> ConsentState:
    """The current consent of one number for ``purpose``, from the operational store."""
    phone = _phone(phone_e164)
    purpose = _choice(purpose, "purpose", PURPOSES)
    return _decide(phone, purpose, _entries(conn, phone))


_CHUNK = 899  # phone numbers per query: with the purpose, 900 parameters

_STATES_SQL = """
    with

    ledger as (
        select event_id, phone_e164, purpose, action, source, occurred_at, proof
        from consent_events
        where phone_e164 in ({marks})
            and (purpose = ? or (action = 'opt_out' and source = 'keyword_reply'))
    ),

    ranked as (
        select
            *,
            row_number() over (
                partition by phone_e164
                order by
                    occurred_at desc,
                    case when action = 'opt_out' then 0 else 1 end,
                    event_id desc
            ) as recency_rank
        from ledger
    )

    select event_id, phone_e164, purpose, action, source, occurred_at, proof
    from ranked
    where recency_rank = 1
"""


def states(conn: sqlite3.Connection, phones: Iterable[str], purpose: Purpose) -> dict[str, ConsentState]:
    """The current consent of many numbers for ``purpose`` (one entry per distinct number),
    decided in SQL by the same rule as :func:`state`."""
    purpose = _choice(purpose, "purpose", PURPOSES)
    wanted = list(dict.fromkeys(_phone(phone, "phones") for phone in phones))
    result = {phone: _state(phone, purpose, None) for phone in wanted}
    for start in range(0, len(wanted), _CHUNK):
        chunk = wanted[start : start + _CHUNK]
        sql = _STATES_SQL.format(marks=", ".join("?" * len(chunk)))
        for event_id, phone, *fields in conn.execute(sql, (*chunk, purpose)):
            result[phone] = _state(phone, purpose, _Entry(event_id, *fields))
    return result


def may_send(conn: sqlite3.Connection, phone_e164: str, kind: MessageKind) -> tuple[bool, str | None]:
    """``(True, None)`` when a ``"promo"`` or ``"service"`` message may go to the number now,
    else ``(False, reason)`` with reason ``"no_consent"``, ``"opted_out"`` or ``"erased"``."""
    from smsops import erasure  # erasure builds on this module

    phone = _phone(phone_e164)
    kind = _choice(kind, "kind", frozenset({"promo", "service"}))
    if erasure.is_erased_number(conn, phone):
        return False, "erased"  # the person asked to be forgotten: their ledger holds a pseudonym
    entries = _entries(conn, phone)
    return _send_verdict(kind, _decide(phone, "marketing", entries), _decide(phone, "service", entries))


# ---------------------------------------------------------------------------------------
# Inbound replies


@dataclass(frozen=True, slots=True)
class InboundResult:
    """What became of one inbound message, and the auto-reply the provider should send."""

    inbound_id: int
    keyword: Keyword | None
    flagged: bool
    opted_out: bool
    opted_in: bool
    duplicate: bool
    reply_text: str | None


def _reply_text(match: tuple[Keyword, str] | None, opted_in: bool) -> str | None:
    if match is None or (match[0] == "start" and not opted_in):
        return None  # a START that restored nothing claims nothing
    if match[0] == "help":
        return config.help_text(match[1]) or _REPLIES[match]
    return _REPLIES[match]


def auto_reply(
    conn: sqlite3.Connection, *, from_e164: str, body: str, received_at: datetime | str
) -> str | None:
    """The auto-reply :func:`handle_inbound` gives ``body``, found by reading the ledger only.

    The webhook answers a reply before it is applied (it is journaled first, and applying may
    wait on the store's write lock), so the answer is decided from what the ledger holds now:
    STOP and HELP need nothing, START answers only when it will restore a marketing opt-in.
    Raises :class:`ConsentError` for what :func:`handle_inbound` would refuse."""
    phone = _phone(from_e164, "from_e164")
    if not isinstance(body, str):
        raise ConsentError(f"body must be text, got {type(body).__name__}")
    received = _store_time(received_at, "received_at", _now())
    match = _match(body)
    if match is None or match[0] != "start":
        return _reply_text(match, False)
    history = [entry for entry in _entries(conn, phone) if entry.occurred_at <= received]
    return _reply_text(match, "marketing" in _start_restores(history))


def handle_inbound(
    conn: sqlite3.Connection,
    *,
    provider: str,
    provider_message_id: str,
    from_e164: str,
    body: str,
    received_at: datetime | str,
    to_number: str | None = None,
    in_reply_to: int | None = None,
) -> InboundResult:
    """Store an inbound message and apply it, in one transaction: STOP opts the number out of
    everything (with the message as proof); START gives back what a STOP took (a marketing
    opt-in that was given before, service messages). Without ``in_reply_to`` the reply is tied
    to the latest message sent to the number within :data:`REPLY_WINDOW`, if any. Delivering the same message again writes
    nothing and returns the first result with ``duplicate=True``."""
    now = _now()
    provider = _required_text(provider, "provider")
    provider_message_id = _required_text(provider_message_id, "provider_message_id")
    phone = _phone(from_e164, "from_e164")
    if not isinstance(body, str):
        raise ConsentError(f"body must be text, got {type(body).__name__}")
    received = _store_time(received_at, "received_at", now)
    to_number = _optional_text(to_number, "to_number")
    in_reply_to = _optional_id(in_reply_to, "in_reply_to")

    with store.transaction(conn):
        match = _match(body)
        keyword = match[0] if match is not None else None
        (contact_id,) = conn.execute(
            "select min(contact_id) from contacts where phone_e164 = ?", (phone,)
        ).fetchone()
        if in_reply_to is None:
            in_reply_to = _replied_message(conn, phone, received)
        inserted = conn.execute(
            _INSERT_INBOUND,
            (
                provider,
                provider_message_id,
                phone,
                to_number,
                body,
                keyword,
                contact_id,
                in_reply_to,
                received,
            ),
        ).fetchone()
        if inserted is None:
            return _replay(conn, provider, provider_message_id)
        (inbound_id,) = inserted
        if keyword == "stop":
            changes = [("marketing", "opt_out")]  # a keyword opt-out covers every purpose (see _applies)
        elif keyword == "start":
            history = [entry for entry in _entries(conn, phone) if entry.occurred_at <= received]
            changes = [(purpose, "opt_in") for purpose in _start_restores(history)]
        else:
            changes = []
        proof = {"inbound_id": inbound_id, "provider": provider, "provider_message_id": provider_message_id}
        record_many(
            conn,
            [
                ConsentEvent(
                    phone,
                    purpose,
                    action,
                    "keyword_reply",
                    received,
                    consent_text=body,
                    proof=proof,
                    contact_id=contact_id,
                    event_key=_inbound_event_key(provider, provider_message_id, purpose),
                )
                for purpose, action in changes
            ],
        )
        opted_in = ("marketing", "opt_in") in changes and _decide(
            phone, "marketing", _entries(conn, phone)
        ).opted_in
    return InboundResult(
        inbound_id=inbound_id,
        keyword=keyword,
        flagged=looks_like_opt_out(body),
        opted_out=keyword == "stop",
        opted_in=opted_in,
        duplicate=False,
        reply_text=_reply_text(match, opted_in),
    )


REPLY_WINDOW = timedelta(hours=72)
"""A reply belongs to the latest message sent to its number at most this long before it
(providers do not say which message an SMS answers); the marts attribute opt-outs the same way."""


def _replied_message(conn: sqlite3.Connection, phone: str, received: str) -> int | None:
    since = (datetime.fromisoformat(received) - REPLY_WINDOW).isoformat(sep=" ")
    row = conn.execute(
        """
        select message_id from messages
        where phone_e164 = ? and submitted_at is not null and submitted_at <= ? and submitted_at >= ?
        order by submitted_at desc, message_id desc
        limit 1
        """,
        (phone, received, since),
    ).fetchone()
    return None if row is None else row[0]


_INSERT_INBOUND = """
    insert into inbound_messages (
        provider, provider_message_id, from_e164, to_number, body,
        keyword, contact_id, in_reply_to, received_at
    )
    values (?, ?, ?, ?, ?, ?, ?, ?, ?)
    on conflict (provider, provider_message_id) do nothing
    returning inbound_id
"""


def _inbound_event_key(provider: str, provider_message_id: str, purpose: str) -> str:
    """The ledger key of what an inbound message did to one purpose: the provider's id is
    stable, unlike our row id, which a deleted row could hand out again."""
    return f"inbound:{provider}:{provider_message_id}:{purpose}"


def _replay(conn: sqlite3.Connection, provider: str, provider_message_id: str) -> InboundResult:
    """The result the first delivery of an inbound message had, rebuilt from the store."""
    inbound_id, keyword, body = conn.execute(
        "select inbound_id, keyword, body from inbound_messages where provider = ? and provider_message_id = ?",
        (provider, provider_message_id),
    ).fetchone()
    keys = [_inbound_event_key(provider, provider_message_id, purpose) for purpose in sorted(PURPOSES)]
    changes = set(
        conn.execute("select purpose, action from consent_events where event_key in (?, ?)", keys).fetchall()
    )
    opted_in = ("marketing", "opt_in") in changes
    return InboundResult(
        inbound_id=inbound_id,
        keyword=keyword,
        flagged=looks_like_opt_out(body),
        opted_out=keyword == "stop",
        opted_in=opted_in,
        duplicate=True,
        reply_text=_reply_text(_match(body), opted_in),
    )


# ---------------------------------------------------------------------------------------
# Proof


_PROOF_COLUMNS: Sequence[str] = (
    "event_id",
    "event_key",
    "phone_e164",
    "contact_id",
    "purpose",
    "action",
    "source",
    "consent_text",
    "proof",
    "occurred_at",
    "recorded_at",
)


def export_proof(conn: sqlite3.Connection, phone_e164: str) -> list[dict[str, Any]]:
    """Every ledger event for a number in time order, with the text agreed to and its proof
    (times are UTC text): the sender's evidence under 38-FZ art. 18."""
    return ledger_of(conn, _phone(phone_e164))


def ledger_of(conn: sqlite3.Connection, stored_number: str) -> list[dict[str, Any]]:
    """The ledger rows whose number is exactly ``stored_number`` (an E.164 number, or the
    pseudonym an erased number became), in time order, proof parsed."""
    rows = conn.execute(
        f"select {', '.join(_PROOF_COLUMNS)} from consent_events"
        " where phone_e164 = ? order by occurred_at, event_id",
        (stored_number,),
    ).fetchall()
    events = [dict(zip(_PROOF_COLUMNS, row, strict=True)) for row in rows]
    for event in events:
        event["proof"] = _parse_proof(event["proof"])
    return events


record_inbound = handle_inbound
"""The name issue 4 gives: apply an inbound reply (an opt-out takes effect for every send
that starts after it is recorded)."""
