import itertools
import json
import random
import re
import sqlite3
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path

import duckdb
import pytest
from hypothesis import given
from hypothesis import strategies as st

from smsops import consent, store
from smsops.consent import ConsentError, ConsentEvent

T0 = datetime(2025, 3, 1, 12, 0, 0)
PHONE = "+79123456789"
OTHER = "+79990001122"
INT_CONSENT_STATE = Path(__file__).parents[1] / "dbt_project/models/intermediate/int_consent_state.sql"


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


@pytest.fixture
def conn(home):
    connection = store.open_store(home)
    yield connection
    connection.close()


def rows(conn, table: str) -> list[tuple]:
    return conn.execute(f"select * from {table} order by 1").fetchall()


def opt(conn, action, *, minutes=0, purpose="marketing", source="web_form", phone=PHONE, **extra) -> bool:
    return consent.record(
        conn,
        phone_e164=phone,
        purpose=purpose,
        action=action,
        source=source,
        occurred_at=at(minutes),
        **extra,
    )


def reply(conn, body, *, pmid="SM1", minutes=10, phone=PHONE, **extra) -> consent.InboundResult:
    return consent.handle_inbound(
        conn,
        provider="sandbox",
        provider_message_id=pmid,
        from_e164=phone,
        body=body,
        received_at=at(minutes),
        **extra,
    )


# ---------------------------------------------------------------------------------------
# classify_reply


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # the carriers' English keywords, whole message only
        ("STOP", "stop"),
        ("stop", "stop"),
        ("Stop", "stop"),
        ("  stop  ", "stop"),
        ("STOP!!!", "stop"),
        ("stop.", "stop"),
        ("STOPALL", "stop"),
        ("stop all", "stop"),
        ("STOP  ALL", "stop"),
        ("Stop\tall", "stop"),
        ("UNSUBSCRIBE", "stop"),
        ("Unsubscribe.", "stop"),
        ("cancel", "stop"),
        ("END", "stop"),
        ("quit!", "stop"),
        ("OPTOUT", "stop"),
        ("opt out", "stop"),
        ("Opt-Out", "stop"),
        ("revoke", "stop"),
        ("START", "start"),
        ("start!", "start"),
        ("UNSTOP", "start"),
        ("Yes", "start"),
        ("HELP", "help"),
        ("help?", "help"),
        ("Info", "help"),
        # Russian keywords
        ("СТОП", "stop"),
        ("стоп", "stop"),
        ("Стоп.", "stop"),
        ("🛑 СТОП", "stop"),
        ("СТОП🛑🛑", "stop"),
        ("«стоп»", "stop"),
        ("ОТПИСКА", "stop"),
        ("отписаться", "stop"),
        ("Отписаться!", "stop"),
        ("ОТМЕНА", "stop"),
        ("хватит", "stop"),
        ("Хватит!!!", "stop"),
        ("СТАРТ", "start"),
        ("старт", "start"),
        ("Подписка", "start"),
        ("ПОМОЩЬ", "help"),
        ("помощь?", "help"),
        # ё is е
        ("ОТМЁНА", "stop"),
        ("отмёна!", "stop"),
        ("отме\u0308на", "stop"),  # е and a combining diaeresis
        # Latin look-alike letters inside Russian words
        ("подпискa", "start"),  # Latin "a" at the end
        ("CTOП", "stop"),  # Latin C, T, O
        ("cтoп", "stop"),  # Latin c and o
        ("стoп", "stop"),  # Latin o
        ("сTOП", "stop"),
        ("OTMEHA", "stop"),  # every letter a Latin look-alike
        ("CTAPT", "start"),
        ("XBATИT", "stop"),
        # and Russian look-alikes inside a Latin word
        ("ЕND", "stop"),  # Cyrillic Е
        ("HЕLP", "help"),  # Cyrillic Е
        # Unicode forms, invisible characters
        ("ｓｔｏｐ", "stop"),  # full-width
        ("S\u200bTOP", "stop"),  # zero-width space
        ("\ufeffstop\u200d", "stop"),
        ("сто\u0301п", "stop"),  # a combining accent
        ("stop\u00a0all", "stop"),  # no-break space
        ("стоп стоп", "stop"),  # the same keyword twice
        # sentences that merely contain a keyword are not keywords
        ("please stop sending", None),
        ("stop me", None),
        ("Стоп, а где мой заказ?", None),
        ("Не стоп", None),
        ("stop 1", None),
        ("stop start", None),
        ("START STOP", None),
        ("stopp", None),
        ("стопка", None),
        ("yes please", None),
        ("Спасибо!", None),
        ("Когда будет доставка?", None),
        ("S T O P", None),
        ("CTON", None),  # all Latin, not a word in either script
        # nothing at all
        (None, None),
        ("", None),
        ("   ", None),
        ("\n\t", None),
        ("!!!", None),
        ("🛑", None),
        ("\u200b", None),
    ],
)
def test_classify_reply_reads_whole_message_keywords(text, expected):
    assert consent.classify_reply(text) == expected


def test_classify_reply_refuses_what_is_not_text():
    with pytest.raises(ConsentError, match="reply text must be str"):
        consent.classify_reply(b"STOP")


KEYWORDS = [
    *[(word, "stop") for word in ("STOP", "STOP ALL", "UNSUBSCRIBE", "QUIT", "СТОП", "ОТПИСАТЬСЯ", "ХВАТИТ")],
    *[(word, "start") for word in ("START", "UNSTOP", "СТАРТ", "ПОДПИСКА")],
    *[(word, "help") for word in ("HELP", "INFO", "ПОМОЩЬ")],
]
DECORATION = st.text(alphabet=" \t\n.,!?…«»\"'()-🛑🙏\u200b\u00a0", max_size=6)


@given(
    keyword=st.sampled_from(KEYWORDS),
    cases=st.lists(st.booleans(), min_size=12, max_size=12),
    before=DECORATION,
    after=DECORATION,
)
def test_any_case_and_surrounding_punctuation_keep_a_keyword(keyword, cases, before, after):
    word, kind = keyword
    cased = "".join(ch.lower() if lower else ch for ch, lower in zip(word, cases, strict=False))
    assert consent.classify_reply(before + cased + after) == kind


# ---------------------------------------------------------------------------------------
# looks_like_opt_out


@pytest.mark.parametrize(
    "text",
    [
        "не пишите мне больше",
        "НЕ ПИШИТЕ!",
        "Пожалуйста, не присылайте мне рекламу",
        "отпишите меня",
        "Отпишите меня от рассылки",
        "удалите мой номер из базы",
        "Удалите мой номер",
        "хватит слать эту ерунду",
        "Хватит слать!",
        "хочу отписаться",
        "не беспокойте",
        "прекратите рассылку",
        "unsubscribe me",
        "Please stop texting me",
        "please stop sending",
        "remove me from your list",
        "Don't text me again",
        "dont text me",
        "Leave me alone!",
        "opt me out",
        "не пишитe мне",  # Latin е
        "нe присылайтe",
    ],
)
def test_free_text_revocations_are_flagged(text):
    assert consent.classify_reply(text) is None
    assert consent.looks_like_opt_out(text)


@pytest.mark.parametrize(
    "text",
    [
        "Стоп, а где мой заказ?",
        "Спасибо!",
        "Когда будет доставка?",
        "А на детские товары скидка есть?",
        "Ок",
        "Почему вы не пишете, где мой заказ?",
        "remove measurements please",  # "remove me" must end at a word end
        "опт оут",
        "STOP",  # a keyword is handled as a keyword, not flagged
        "СТОП",
        "unsubscribe",
        "",
        None,
    ],
)
def test_ordinary_replies_and_keywords_are_not_flagged(text):
    assert not consent.looks_like_opt_out(text)


# ---------------------------------------------------------------------------------------
# record: validation, idempotency, storage format


def test_sources_are_the_ones_the_table_accepts(conn):
    declared = re.search(r"source in \(([^)]*)\)", store.TABLES["consent_events"]).group(1)
    assert {value.strip().strip("'") for value in declared.split(",")} == consent.SOURCES


def test_record_writes_one_row_in_the_store_format(conn):
    moscow = timezone(timedelta(hours=3))
    assert consent.record(
        conn,
        phone_e164=PHONE,
        purpose="marketing",
        action="opt_in",
        source="web_form",
        occurred_at=datetime(2025, 3, 1, 15, 0, 0, 250000, tzinfo=moscow),
        consent_text="Согласен получать рекламные SMS.",
        proof={"form_url": "https://shop.example/signup", "ip": "198.51.100.7"},
        contact_id=42,
    )
    row = conn.execute(
        "select event_key, phone_e164, contact_id, purpose, action, source, consent_text, proof, occurred_at,"
        " recorded_at from consent_events"
    ).fetchone()
    key, phone, contact_id, purpose, action, source, text, proof, occurred_at, recorded_at = row
    assert key.startswith("auto:")
    assert (phone, contact_id, purpose, action, source) == (PHONE, 42, "marketing", "opt_in", "web_form")
    assert text == "Согласен получать рекламные SMS."
    assert json.loads(proof) == {"form_url": "https://shop.example/signup", "ip": "198.51.100.7"}
    assert occurred_at == "2025-03-01 12:00:00.250000"  # UTC
    recorded = datetime.fromisoformat(recorded_at).replace(tzinfo=UTC)
    assert abs(datetime.now(UTC) - recorded) < timedelta(minutes=1)
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(\.\d{6})?", recorded_at)


def test_naive_times_are_utc_and_whole_seconds_have_no_fraction(conn):
    opt(conn, "opt_in")
    consent.record(
        conn,
        phone_e164=OTHER,
        purpose="service",
        action="opt_in",
        source="api",
        occurred_at="2025-03-01T12:00:00Z",
    )
    assert [r[0] for r in conn.execute("select occurred_at from consent_events")] == [
        "2025-03-01 12:00:00",
        "2025-03-01 12:00:00",
    ]


def test_recording_the_same_event_twice_is_a_no_op(conn):
    event = dict(
        phone_e164=PHONE,
        purpose="marketing",
        action="opt_in",
        source="import",
        proof={"import_batch": "b1", "file_sha256": "ab12"},
    )
    assert consent.record(conn, occurred_at=T0, **event)
    assert not consent.record(conn, occurred_at=T0, **event)
    # the same instant written another way, the same proof in another key order
    assert not consent.record(
        conn,
        occurred_at="2025-03-01 15:00:00+03:00",
        **{**event, "proof": {"file_sha256": "ab12", "import_batch": "b1"}},
    )
    assert conn.execute("select count(*) from consent_events").fetchone()[0] == 1
    # a different proof is a different event
    assert consent.record(conn, occurred_at=T0, **{**event, "proof": {"import_batch": "b2"}})


def test_an_explicit_event_key_decides_identity(conn):
    assert opt(conn, "opt_in", event_key="crm:1")
    assert not opt(conn, "opt_in", minutes=5, event_key="crm:1")
    assert conn.execute("select count(*) from consent_events").fetchone()[0] == 1


GOOD = dict(phone_e164=PHONE, purpose="marketing", action="opt_in", source="web_form", occurred_at=T0)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("phone_e164", "89123456789"),
        ("phone_e164", "+7 912 345-67-89"),
        ("phone_e164", "+0123456789"),
        ("phone_e164", "+1234567"),
        ("phone_e164", "+1234567890123456"),
        ("phone_e164", 79123456789),
        ("phone_e164", None),
        ("purpose", "promo"),
        ("purpose", ""),
        ("purpose", None),
        ("action", "optin"),
        ("action", "opt-out"),
        ("source", "sms"),
        ("source", "Web_Form"),
        ("occurred_at", "yesterday"),
        ("occurred_at", 1740830400),
        ("occurred_at", date(2025, 3, 1)),
        ("occurred_at", None),
        ("occurred_at", datetime.now(UTC) + timedelta(days=2)),
        ("consent_text", 5),
        ("proof", "ip=198.51.100.7"),
        ("proof", ["inbound", 1]),
        ("proof", {"when": object()}),
        ("proof", {"score": float("nan")}),
        ("contact_id", "12"),
        ("contact_id", 0),
        ("contact_id", True),
        ("event_key", ""),
        ("event_key", "   "),
        ("event_key", 7),
    ],
)
def test_record_refuses_each_bad_field_by_name(conn, field, value):
    with pytest.raises(ConsentError, match=field):
        consent.record(conn, **{**GOOD, field: value})
    assert rows(conn, "consent_events") == []


def test_record_many_is_all_or_nothing(conn):
    events = [ConsentEvent(f"+7912000000{i}", "marketing", "opt_in", "import", at(i)) for i in range(5)]
    conn.execute(
        "create temp trigger fail_third before insert on consent_events when new.phone_e164 = '+79120000002'"
        " begin select raise(abort, 'disk full'); end"
    )
    with pytest.raises(sqlite3.IntegrityError, match="disk full"):
        consent.record_many(conn, events)
    assert rows(conn, "consent_events") == []
    conn.execute("drop trigger fail_third")
    assert consent.record_many(conn, events) == 5
    assert consent.record_many(conn, events) == 0  # a re-import changes nothing


def test_record_many_validates_every_event_before_writing(conn):
    events = [
        ConsentEvent(PHONE, "marketing", "opt_in", "import", T0),
        ConsentEvent(OTHER, "marketing", "opt_in", "csv", T0),
    ]
    with pytest.raises(ConsentError, match="source"):
        consent.record_many(conn, events)
    assert rows(conn, "consent_events") == []


def test_record_many_inside_a_callers_transaction_rolls_back_with_it(conn):
    events = [ConsentEvent(PHONE, "marketing", "opt_in", "import", T0)]
    with pytest.raises(RuntimeError), store.transaction(conn):
        assert consent.record_many(conn, events) == 1
        raise RuntimeError("the import failed after the ledger write")
    assert rows(conn, "consent_events") == []
    with store.transaction(conn):
        assert consent.record_many(conn, events) == 1
    assert len(rows(conn, "consent_events")) == 1


def test_the_ledger_is_append_only(conn):
    statements: list[str] = []
    conn.set_trace_callback(statements.append)
    conn.execute(
        "insert into contacts (contact_id, phone_e164, created_at, updated_at) values (1, ?, 'a', 'a')",
        (PHONE,),
    )
    history = [rows(conn, "consent_events")]
    steps = [
        lambda: opt(conn, "opt_in", minutes=0),
        lambda: opt(conn, "opt_in", minutes=0),
        lambda: opt(conn, "opt_out", minutes=5, source="link"),
        lambda: opt(conn, "opt_in", minutes=6, source="admin"),
        lambda: reply(conn, "STOP", pmid="SM1", minutes=10),
        lambda: reply(conn, "STOP", pmid="SM1", minutes=10),
        lambda: reply(conn, "START", pmid="SM2", minutes=11),
        lambda: reply(conn, "СТОП", pmid="SM3", minutes=12),
        lambda: consent.record_many(conn, [ConsentEvent(PHONE, "service", "opt_out", "admin", at(13))]),
    ]
    for step in steps:
        step()
        history.append(rows(conn, "consent_events"))
    for before, after in itertools.pairwise(history):
        assert after[: len(before)] == before  # earlier rows untouched, new ones only appended
    assert len(history[-1]) == 8
    written = [s for s in statements if re.search(r"\b(update|delete|replace)\b", s, re.IGNORECASE)]
    assert written == []


# ---------------------------------------------------------------------------------------
# Current state


def test_a_number_without_events_is_not_opted_in(conn):
    assert consent.state(conn, PHONE, "marketing") == consent.ConsentState(
        PHONE, "marketing", False, None, None, None, None
    )
    assert consent.may_send(conn, PHONE, "promo") == (False, "no_consent")
    assert consent.may_send(conn, PHONE, "service") == (True, None)


def test_the_latest_event_wins(conn):
    opt(conn, "opt_in", minutes=0, proof={"form_url": "https://shop.example/signup"})
    opt(conn, "opt_out", minutes=10, source="link", proof={"link": "u1"})
    opt(conn, "opt_in", minutes=20, source="api", proof={"request": "r1"})
    # recorded later, happened earlier: does not win
    opt(conn, "opt_out", minutes=15, source="admin")
    current = consent.state(conn, PHONE, "marketing")
    assert current.opted_in
    assert (current.last_action, current.last_source) == ("opt_in", "api")
    assert current.changed_at == at(20).replace(tzinfo=UTC)
    assert current.proof == {"request": "r1"}


def test_an_opt_out_wins_a_tie(conn):
    opt(conn, "opt_out", minutes=5, source="admin")
    opt(conn, "opt_in", minutes=5, source="import")
    current = consent.state(conn, PHONE, "marketing")
    assert not current.opted_in
    assert (current.last_action, current.last_source) == ("opt_out", "admin")


def test_a_keyword_stop_covers_every_purpose(conn):
    opt(conn, "opt_in", purpose="service", minutes=0)
    opt(conn, "opt_in", purpose="marketing", minutes=0)
    opt(conn, "opt_out", purpose="marketing", source="keyword_reply", minutes=10)
    service = consent.state(conn, PHONE, "service")
    assert (service.opted_in, service.last_action, service.last_source) == (False, "opt_out", "keyword_reply")
    assert consent.may_send(conn, PHONE, "service") == (False, "opted_out")
    assert consent.may_send(conn, PHONE, "promo") == (False, "opted_out")


def test_other_marketing_opt_outs_leave_service_messages_alone(conn):
    opt(conn, "opt_in", purpose="marketing", minutes=0)
    opt(conn, "opt_out", purpose="marketing", source="link", minutes=10)
    assert consent.state(conn, PHONE, "service").last_action is None
    assert consent.may_send(conn, PHONE, "service") == (True, None)
    assert consent.may_send(conn, PHONE, "promo") == (False, "opted_out")


def test_a_service_opt_out_blocks_service_and_not_promotions(conn):
    opt(conn, "opt_in", purpose="marketing", minutes=0)
    opt(conn, "opt_out", purpose="service", source="admin", minutes=10)
    assert consent.may_send(conn, PHONE, "service") == (False, "opted_out")
    assert consent.may_send(conn, PHONE, "promo") == (True, None)


def test_may_send_a_promotion_needs_a_current_marketing_opt_in(conn):
    opt(conn, "opt_in", purpose="service", minutes=0)
    assert consent.may_send(conn, PHONE, "promo") == (False, "no_consent")
    opt(conn, "opt_in", purpose="marketing", minutes=1)
    assert consent.may_send(conn, PHONE, "promo") == (True, None)


def test_queries_refuse_bad_arguments_by_name(conn):
    with pytest.raises(ConsentError, match="kind"):
        consent.may_send(conn, PHONE, "marketing")
    with pytest.raises(ConsentError, match="purpose"):
        consent.state(conn, PHONE, "promo")
    with pytest.raises(ConsentError, match="phone_e164"):
        consent.state(conn, "8 912 345-67-89", "marketing")
    with pytest.raises(ConsentError, match="phones"):
        consent.states(conn, [PHONE, "nope"], "marketing")


def random_ledger(rng: random.Random, phones: list[str]) -> list[ConsentEvent]:
    """A few events per number, many of them at the same instant so that ties are common."""
    instants = [at(minutes) for minutes in range(0, 60, 10)] + [at(30).replace(microsecond=500)]
    sources = sorted(consent.SOURCES)
    events = []
    for phone in phones:
        for _ in range(rng.choice((0, 0, 1, 2, 3, 5))):
            events.append(
                ConsentEvent(
                    phone,
                    rng.choice(("marketing", "service")),
                    rng.choice(("opt_in", "opt_out")),
                    rng.choice(sources),
                    rng.choice(instants),
                    proof={"n": len(events)},
                    event_key=f"random:{len(events)}",
                )
            )
    rng.shuffle(events)  # written out of time order
    return events


@pytest.fixture
def random_store(conn):
    rng = random.Random(20250301)
    phones = [f"+7912{n:07d}" for n in rng.sample(range(10_000_000), 2_000)]
    events = random_ledger(rng, phones)
    assert consent.record_many(conn, events) == len(events)
    return conn, phones, events


def test_states_agrees_with_state_for_many_numbers(random_store):
    conn, phones, _ = random_store
    for purpose in ("marketing", "service"):
        bulk = consent.states(conn, [*phones, phones[0], "+15550100000"], purpose)
        assert list(bulk) == [*phones, "+15550100000"]
        assert bulk["+15550100000"].last_action is None
        for phone in phones:
            assert bulk[phone] == consent.state(conn, phone, purpose)
    decided = [s for s in bulk.values() if s.last_action is not None]
    assert len(decided) > 1_000 and any(s.opted_in for s in decided) and any(not s.opted_in for s in decided)


def test_states_matches_the_dbt_model(random_store):
    """int_consent_state.sql, run as written on DuckDB over the same ledger."""
    conn, phones, _ = random_store
    model = re.sub(r"\{\{\s*ref\('stg_ops__consent_events'\)\s*\}\}", "stg", INT_CONSENT_STATE.read_text())
    assert "{{" not in model
    duck = duckdb.connect()
    try:
        duck.execute(
            "create table stg (consent_event_id bigint, phone_e164 varchar, purpose varchar, action varchar,"
            " consent_source varchar, occurred_at timestamp)"
        )
        duck.executemany(
            "insert into stg values (?, ?, ?, ?, ?, cast(? as timestamp))",
            conn.execute(
                "select event_id, phone_e164, purpose, action, source, occurred_at from consent_events"
            ).fetchall(),
        )
        modelled = {
            (phone, purpose): (action, source, changed_at)
            for phone, purpose, action, source, changed_at in duck.execute(
                f"select phone_e164, purpose, last_action, last_source, last_changed_at from ({model})"
            ).fetchall()
        }
    finally:
        duck.close()
    for purpose in ("marketing", "service"):
        for phone, current in consent.states(conn, phones, purpose).items():
            expected = modelled.get((phone, purpose))
            if expected is None:
                assert current.last_action is None
            else:
                assert (
                    current.last_action,
                    current.last_source,
                    current.changed_at.replace(tzinfo=None),
                ) == expected


def test_states_of_no_numbers_is_empty(conn):
    assert consent.states(conn, [], "marketing") == {}


# ---------------------------------------------------------------------------------------
# Inbound replies


def add_contacts(conn, *ids: int, phone: str = PHONE) -> None:
    conn.executemany(
        "insert into contacts (contact_id, phone_e164, created_at, updated_at) values (?, ?, 'a', 'a')",
        [(i, phone) for i in ids],
    )


def test_a_stop_reply_opts_the_number_out_of_everything(conn):
    add_contacts(conn, 7, 3)
    opt(conn, "opt_in", purpose="marketing", minutes=0)
    assert consent.may_send(conn, PHONE, "promo") == (True, None)

    result = reply(conn, "СТОП", pmid="SMin1", minutes=10, to_number="SHOPMARKET", in_reply_to=99)

    assert result == consent.InboundResult(
        inbound_id=result.inbound_id,
        keyword="stop",
        flagged=False,
        opted_out=True,
        opted_in=False,
        duplicate=False,
        reply_text=consent.STOP_REPLY,
    )
    # the next send, of either kind, is refused
    assert consent.may_send(conn, PHONE, "promo") == (False, "opted_out")
    assert consent.may_send(conn, PHONE, "service") == (False, "opted_out")
    inbound = conn.execute(
        "select provider, provider_message_id, from_e164, to_number, body, keyword, contact_id, in_reply_to,"
        " received_at from inbound_messages"
    ).fetchall()
    assert inbound == [
        ("sandbox", "SMin1", PHONE, "SHOPMARKET", "СТОП", "stop", 3, 99, "2025-03-01 12:10:00"),
    ]
    event = consent.export_proof(conn, PHONE)[-1]
    assert (
        event["action"] == "opt_out"
        and event["source"] == "keyword_reply"
        and event["purpose"] == "marketing"
    )
    assert event["consent_text"] == "СТОП"
    assert event["contact_id"] == 3
    assert event["proof"] == {
        "inbound_id": result.inbound_id,
        "provider": "sandbox",
        "provider_message_id": "SMin1",
    }
    assert event["occurred_at"] == "2025-03-01 12:10:00"


def test_a_reply_is_tied_to_the_latest_message_sent_to_the_number_within_the_window(conn):
    def sent(message_id: int, minutes: int, phone: str = PHONE) -> None:
        conn.execute(
            "insert into messages (message_id, idempotency_key, campaign_id, variant, contact_id, phone_e164,"
            " state, planned_at, submitted_at) values (?, ?, 1, 'A', 1, ?, 'submitted', 'a', ?)",
            (message_id, f"k{message_id}", phone, at(minutes)),
        )

    sent(1, -5 * 24 * 60)  # five days before: too old
    sent(2, -60)
    sent(3, -30)  # the latest before the reply
    sent(4, 30)  # after the reply
    sent(5, -10, phone="+79990000000")  # another number
    first = reply(conn, "Спасибо, а до какого числа?", pmid="r1", minutes=0)
    late = reply(conn, "STOP", pmid="r2", minutes=4 * 24 * 60 + 60)  # 4 days after message 4
    linked = dict(conn.execute("select inbound_id, in_reply_to from inbound_messages").fetchall())
    assert linked == {first.inbound_id: 3, late.inbound_id: None}


def test_a_latin_keyword_gets_the_english_auto_reply(conn):
    assert reply(conn, "STOP", pmid="a").reply_text == consent.STOP_REPLY_EN
    assert reply(conn, "help", pmid="b").reply_text == consent.HELP_REPLY_EN
    assert reply(conn, "Помощь", pmid="c").reply_text == consent.HELP_REPLY


def test_help_gets_the_configured_text_in_its_language(conn, monkeypatch):
    monkeypatch.setenv(
        "SMSOPS_HELP_TEXT", "ШопМаркет: скидки раз в неделю. Вопросы: 8 800 000-00-00. Отказ: СТОП"
    )
    assert reply(conn, "Помощь", pmid="h1").reply_text.startswith("ШопМаркет")
    assert reply(conn, "HELP", pmid="h2").reply_text == consent.HELP_REPLY_EN  # no English text set
    monkeypatch.setenv("SMSOPS_HELP_TEXT_EN", "ShopMarket deals weekly. Reply STOP to opt out.")
    assert reply(conn, "info", pmid="h3").reply_text == "ShopMarket deals weekly. Reply STOP to opt out."
    assert reply(conn, "STOP", pmid="h4").reply_text == consent.STOP_REPLY_EN  # only HELP changes


def test_a_help_reply_changes_no_consent(conn):
    opt(conn, "opt_in")
    result = reply(conn, "HELP")
    assert (result.keyword, result.opted_out, result.opted_in) == ("help", False, False)
    assert len(rows(conn, "consent_events")) == 1
    assert consent.may_send(conn, PHONE, "promo") == (True, None)


def test_a_webhook_delivered_twice_is_applied_once(conn):
    opt(conn, "opt_in")
    first = reply(conn, "stop", pmid="SMdup")
    counts = store.table_counts(conn)
    again = reply(conn, "stop", pmid="SMdup", minutes=11)
    assert again.duplicate
    assert again == consent.InboundResult(
        first.inbound_id, "stop", False, True, False, True, consent.STOP_REPLY_EN
    )
    assert store.table_counts(conn) == counts
    assert counts["inbound_messages"] == 1 and counts["consent_events"] == 2


def test_start_after_a_keyword_stop_resubscribes(conn):
    opt(conn, "opt_in", minutes=0)
    reply(conn, "СТОП", pmid="SM1", minutes=10)
    assert consent.may_send(conn, PHONE, "promo") == (False, "opted_out")

    result = reply(conn, "Старт", pmid="SM2", minutes=20)

    assert (result.keyword, result.opted_in, result.reply_text) == ("start", True, consent.START_REPLY)
    assert consent.may_send(conn, PHONE, "promo") == (True, None)
    assert consent.may_send(conn, PHONE, "service") == (True, None)
    current = consent.state(conn, PHONE, "marketing")
    assert (current.last_action, current.last_source) == ("opt_in", "keyword_reply")
    # a repeated START delivery replays the result and writes nothing
    assert reply(conn, "Старт", pmid="SM2", minutes=20) == consent.InboundResult(
        result.inbound_id, "start", False, False, True, True, consent.START_REPLY
    )
    # STOP and START again, twice over
    reply(conn, "stop", pmid="SM3", minutes=30)
    reply(conn, "stop", pmid="SM4", minutes=31)
    assert reply(conn, "start", pmid="SM5", minutes=40).opted_in
    assert consent.may_send(conn, PHONE, "promo") == (True, None)


def test_start_without_prior_consent_does_not_opt_in(conn):
    result = reply(conn, "START")
    assert (result.keyword, result.opted_in, result.reply_text) == ("start", False, None)
    assert rows(conn, "consent_events") == []
    assert conn.execute("select keyword from inbound_messages").fetchall() == [("start",)]
    assert consent.may_send(conn, PHONE, "promo") == (False, "no_consent")


def test_start_after_a_stop_gives_back_service_messages_but_no_marketing_never_given(conn):
    reply(conn, "STOP", pmid="SM1", minutes=10)
    assert consent.may_send(conn, PHONE, "service") == (False, "opted_out")
    result = reply(conn, "START", pmid="SM2", minutes=20)
    assert (result.opted_in, result.reply_text) == (False, None)
    assert consent.may_send(conn, PHONE, "promo") == (False, "opted_out")
    assert consent.may_send(conn, PHONE, "service") == (True, None)
    restored = consent.export_proof(conn, PHONE)[-1]
    assert (restored["purpose"], restored["action"], restored["source"]) == (
        "service",
        "opt_in",
        "keyword_reply",
    )
    assert restored["event_key"] == "inbound:sandbox:SM2:service"


def test_start_does_not_undo_an_opt_out_made_another_way(conn):
    opt(conn, "opt_in", minutes=0)
    reply(conn, "STOP", pmid="SM1", minutes=10)
    opt(conn, "opt_out", minutes=15, source="admin")
    assert not reply(conn, "START", pmid="SM2", minutes=20).opted_in
    assert consent.may_send(conn, PHONE, "promo") == (False, "opted_out")


def test_start_does_not_override_a_later_stop(conn):
    opt(conn, "opt_in", minutes=0)
    reply(conn, "STOP", pmid="SM1", minutes=30)
    # a START that was sent before the STOP, delivered after it
    assert not reply(conn, "START", pmid="SM0", minutes=20).opted_in
    assert consent.may_send(conn, PHONE, "promo") == (False, "opted_out")
    assert consent.may_send(conn, PHONE, "service") == (False, "opted_out")


def test_a_sentence_with_stop_is_stored_but_not_an_opt_out(conn):
    opt(conn, "opt_in")
    result = reply(conn, "Стоп, а где мой заказ?")
    assert (result.keyword, result.flagged, result.opted_out, result.reply_text) == (None, False, False, None)
    assert conn.execute("select body, keyword from inbound_messages").fetchall() == [
        ("Стоп, а где мой заказ?", None)
    ]
    assert len(rows(conn, "consent_events")) == 1
    assert consent.may_send(conn, PHONE, "promo") == (True, None)


def test_a_free_text_revocation_is_stored_and_flagged_for_a_person(conn):
    opt(conn, "opt_in")
    result = reply(conn, "не пишите мне больше")
    assert (result.keyword, result.flagged, result.opted_out) == (None, True, False)
    assert conn.execute("select keyword from inbound_messages").fetchall() == [(None,)]
    assert len(rows(conn, "consent_events")) == 1
    assert reply(conn, "не пишите мне больше").flagged  # the replayed result keeps the flag


def test_a_failure_mid_way_leaves_nothing_half_written(conn):
    conn.execute(
        "create temp trigger ledger_down before insert on consent_events"
        " begin select raise(abort, 'ledger unavailable'); end"
    )
    with pytest.raises(sqlite3.IntegrityError, match="ledger unavailable"):
        reply(conn, "STOP", pmid="SMfail")
    assert rows(conn, "inbound_messages") == []
    assert rows(conn, "consent_events") == []
    # the provider retries the webhook: now it is applied, once
    conn.execute("drop trigger ledger_down")
    assert reply(conn, "STOP", pmid="SMfail").opted_out
    assert len(rows(conn, "inbound_messages")) == len(rows(conn, "consent_events")) == 1


def test_handle_inbound_inside_a_callers_transaction_rolls_back_with_it(conn):
    with pytest.raises(RuntimeError), store.transaction(conn):
        assert reply(conn, "STOP").opted_out
        raise RuntimeError("the webhook handler failed after applying the reply")
    assert rows(conn, "inbound_messages") == rows(conn, "consent_events") == []


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("provider", ""),
        ("provider_message_id", None),
        ("from_e164", "8 912 345 67 89"),
        ("body", None),
        ("received_at", "soon"),
        ("to_number", 7),
        ("in_reply_to", "SM1"),
    ],
)
def test_handle_inbound_refuses_a_malformed_message_by_field(conn, field, value):
    message = dict(
        provider="sandbox", provider_message_id="SM1", from_e164=PHONE, body="STOP", received_at=T0
    )
    with pytest.raises(ConsentError, match=field):
        consent.handle_inbound(conn, **{**message, field: value})
    assert rows(conn, "inbound_messages") == rows(conn, "consent_events") == []


def test_an_opt_out_recorded_mid_campaign_stops_the_next_send(conn):
    audience = [f"+7912000000{i}" for i in range(6)]
    consent.record_many(conn, [ConsentEvent(p, "marketing", "opt_in", "import", T0) for p in audience])
    sent = []
    for i, phone in enumerate(audience):
        if i == 2:  # a STOP from a later recipient arrives while the campaign is running
            reply(conn, "СТОП", phone=audience[4], minutes=5)
        if consent.may_send(conn, phone, "promo")[0]:
            sent.append(phone)
    assert sent == [p for p in audience if p != audience[4]]


# ---------------------------------------------------------------------------------------
# Proof


def test_export_proof_lists_every_event_in_time_order(conn):
    opt(conn, "opt_out", minutes=30, source="link", proof={"link": "u1"})
    opt(
        conn,
        "opt_in",
        minutes=0,
        consent_text="Согласен получать рекламные SMS.",
        proof={"form_url": "https://shop.example/signup", "ip": "198.51.100.7"},
    )
    opt(conn, "opt_in", minutes=5, purpose="service", phone=OTHER)
    reply(conn, "СТОП", minutes=40)
    exported = consent.export_proof(conn, PHONE)
    assert [(e["occurred_at"], e["purpose"], e["action"], e["source"]) for e in exported] == [
        ("2025-03-01 12:00:00", "marketing", "opt_in", "web_form"),
        ("2025-03-01 12:30:00", "marketing", "opt_out", "link"),
        ("2025-03-01 12:40:00", "marketing", "opt_out", "keyword_reply"),
    ]
    assert exported[0]["consent_text"] == "Согласен получать рекламные SMS."
    assert exported[0]["proof"] == {"form_url": "https://shop.example/signup", "ip": "198.51.100.7"}
    assert set(exported[0]) >= {"event_id", "event_key", "phone_e164", "contact_id", "recorded_at"}
    json.dumps(exported)  # ready to hand over as a file
    assert consent.export_proof(conn, "+15550100000") == []
