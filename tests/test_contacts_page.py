"""The Contacts page (AppTest) and the smsops.contacts functions behind it."""

from __future__ import annotations

import csv
import os
import signal

import apptest
import pytest
from apptest import APP, clear_caches
from streamlit.testing.v1 import AppTest

from smsops import consent, contacts, i18n, importer, store


def open_page(page: str, timeout: float = 60) -> AppTest:
    return apptest.open_in_app(page, timeout)


@pytest.fixture(autouse=True)
def fresh_caches():
    clear_caches()
    yield
    clear_caches()


@pytest.fixture(autouse=True)
def english():
    """What smsops.contacts says follows the current language: these tests read it in English."""
    with i18n.language("en"):
        yield


@pytest.fixture
def base(home, tmp_path):
    path = tmp_path / "crm.csv"
    with open(path, "w", encoding="cp1251", newline="") as fh:
        writer = csv.writer(fh, delimiter=";")
        writer.writerow(["Код клиента", "Телефон", "Имя", "Фамилия", "Город"])
        writer.writerow(["K-1", "8 (912) 345-67-89", "Анна", "Иванова", "Москва"])
        writer.writerow(["K-2", "+7 926 111 22 33", "Борис", "Петров", "Казань"])
        writer.writerow(["K-3", "нет", "Вера", "Сидорова", ""])
    importer.run(path, importer.Options(consent_source="signup form"), home=home)
    return home


def test_search_finds_by_name_number_and_id(base):
    assert list(contacts.search("иван", home=base)["name"]) == ["Анна Иванова"]
    assert list(contacts.search("8 912 345", home=base)["name"]) == ["Анна Иванова"]
    assert list(contacts.search("89123456789", home=base)["name"]) == ["Анна Иванова"]
    assert list(contacts.search("K-2", home=base)["name"]) == ["Борис Петров"]
    assert len(contacts.search("", home=base)) == 2


def test_search_by_full_name_in_either_order_and_an_id_that_holds_digits(base):
    assert list(contacts.search("анна иванова", home=base)["name"]) == ["Анна Иванова"]
    assert list(contacts.search("Иванова Анна", home=base)["name"]) == ["Анна Иванова"]
    assert list(contacts.search("ИВАНОВА", home=base)["name"]) == ["Анна Иванова"]
    assert contacts.search("Анна Петрова", home=base).empty
    # mostly digits, yet an id: letters make it one, not a piece of a phone number
    assert contacts.Query.parse("K-2000123").is_number is False
    assert contacts.Query.parse("+7 (912) 345").is_number is True


def test_numbers_are_masked_unless_revealed(base):
    masked = contacts.search("Анна", home=base)["phone"].iloc[0]
    assert masked == "+7 912 ***-**-89"
    assert contacts.search("Анна", reveal=True, home=base)["phone"].iloc[0] == "+79123456789"


def test_card_shows_consent_history_with_proof(base):
    found = contacts.search("Борис", home=base)
    card = contacts.card(int(found["contact_id"].iloc[0]), home=base)
    assert card.marketing.opted_in and contacts.consent_label(card.marketing) == "opted in"
    assert card.consent_history["source"].tolist() == ["import"]
    assert card.consent_history["proof"].iloc[0]["file"] == "crm.csv"


def test_manual_opt_out_needs_a_reason_and_takes_effect(base):
    cid = int(contacts.search("Анна", home=base)["contact_id"].iloc[0])
    with pytest.raises(ValueError, match="reason"):
        contacts.opt_out(cid, reason=" ", requested_by="Олег", home=base)
    assert contacts.opt_out(cid, reason="asked by phone", requested_by="Олег", home=base) == 1
    conn = store.connect(store.store_path(base))
    assert consent.may_send(conn, "+79123456789", "promo") == (False, "opted_out")
    assert contacts.card(cid, home=base).consent_history["source"].tolist() == ["import", "admin"]


def test_export_neutralises_formulas():
    import pandas as pd

    data = contacts.export_csv(
        pd.DataFrame({"name": ["=cmd()", "Анна"], "phone": ["+7 912 ***-**-89", None]})
    )
    text = data.decode("utf-8-sig")
    assert "'=cmd()" in text and "'+7 912" in text


def test_contacts_page_lists_masked_contacts_and_opens_a_card(base):
    at = open_page("contacts")
    table = at.dataframe[0].value
    assert set(table["name"]) == {"Анна Иванова", "Борис Петров"}
    assert all("***" in phone for phone in table["phone"])
    at.text_input(key="contact_search").input("Борис").run()
    assert list(at.dataframe[0].value["name"]) == ["Борис Петров"]
    assert any(s.value == "Борис Петров" for s in at.subheader)
    assert any(m.label == "Marketing" and m.value == "opted in" for m in at.metric)
    at.toggle(key="reveal_numbers").set_value(True).run()
    assert at.dataframe[0].value["phone"].iloc[0] == "+79261112233"


def test_contacts_page_records_an_opt_out(base):
    at = open_page("contacts")
    at.text_input(key="contact_search").input("Анна").run()
    at.text_input(key="opt_out_reason").input("asked in the shop")
    at.text_input(key="opt_out_by").input("Олег")
    submit = next(b for b in at.button if b.label == "Record opt-out")
    submit.click().run()
    assert not at.exception
    assert any("Opt-out recorded" in s.value for s in at.success)
    conn = store.connect(store.store_path(base))
    assert consent.may_send(conn, "+79123456789", "promo") == (False, "opted_out")


# --- Contacts with gaps: what a CRM leaves empty is NULL in the store --------------------

NOW = "2025-03-01 10:00:00"
GAPS = {  # contact_id: (external_id, first_name, last_name, phone_e164, phone_valid, city)
    11: (None, None, None, None, 0, None),  # nothing but the row itself
    12: (None, None, None, "+79161234567", 1, None),  # a number and nothing else
    13: (None, "Галина", None, None, 0, None),  # a first name and nothing else
    14: ("K-14", None, "Орлова", "+79031112233", 1, "Тверь"),  # no first name
}


@pytest.fixture
def gaps(home):
    """A store holding contacts whose number, names, city and CRM id are NULL, and a number
    with a consent event, messages and a reply whose optional columns are NULL too."""
    conn = store.connect(store.store_path(home))
    store.create_schema(conn)
    conn.executemany(
        "insert into contacts (contact_id, external_id, first_name, last_name, phone_e164, phone_valid,"
        " city, created_at, updated_at) values (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [(cid, *row, NOW, NOW) for cid, row in GAPS.items()],
    )
    conn.execute(
        "insert into consent_events (event_key, phone_e164, contact_id, purpose, action, source,"
        " consent_text, proof, occurred_at, recorded_at)"
        " values ('k1', '+79161234567', null, 'marketing', 'opt_in', 'import', null, null, ?, ?)",
        (NOW, NOW),
    )
    conn.execute(
        "insert into campaigns (campaign_id, name, kind, status, created_at)"
        " values (1, 'Spring', 'promo', 'finished', ?)",
        (NOW,),
    )
    conn.executemany(
        "insert into messages (idempotency_key, campaign_id, variant, contact_id, phone_e164, body,"
        " segments, price, state, skip_reason, planned_at) values (?, 1, 'A', 12, ?, ?, ?, ?, ?, ?, ?)",
        [
            ("1:12", "+79161234567", "Весна: -20%", 1, 0.5, "submitted", None, NOW),
            ("1:12b", None, None, None, None, "suppressed", "quiet_hours", NOW),
        ],
    )
    conn.execute(
        "insert into inbound_messages (provider, provider_message_id, from_e164, body, keyword,"
        " contact_id, received_at) values ('sandbox', 'in-1', '+79161234567', 'спасибо', null, 12, ?)",
        (NOW,),
    )
    conn.close()
    return home


def _shows_no_raw_gap(at) -> None:
    """Every table and metric on the page has "—" where a value is missing, never None or nan."""
    assert not at.exception, at.exception
    assert at.dataframe, "the page shows its tables"
    for table in at.dataframe:
        frame = table.value
        assert not frame.isna().any().any(), frame
        cells = {str(v) for v in frame.to_numpy().ravel()} | {str(c) for c in frame.columns}
        assert not cells & {"None", "nan", "NaN", "<NA>", "NaT"}, frame
    for metric in at.metric:
        assert metric.value not in ("None", "nan", "NaN", "<NA>"), metric
    for header in at.subheader:
        assert header.value not in ("None", "nan"), header


def test_search_reads_missing_numbers_and_names_as_none_never_nan(gaps):
    found = contacts.search("", home=gaps).set_index("contact_id")
    assert sorted(found.index) == sorted(GAPS)
    assert not any(isinstance(v, float) for v in found.to_numpy().ravel())  # NaN is a float
    assert found.loc[11, "name"] == "—" and found.loc[11, "phone"] == "—"
    assert found.loc[12, "name"] == "—" and found.loc[12, "phone"] == "+7 916 ***-**-67"
    assert found.loc[13, "name"] == "Галина" and found.loc[14, "name"] == "Орлова"
    assert found.loc[11, "city"] is None and found.loc[11, "external_id"] is None
    assert found.loc[12, "marketing"] == "opted_in" and found.loc[11, "marketing"] == "no_consent"
    assert contacts.search("", reveal=True, home=gaps).set_index("contact_id").loc[11, "phone"] == "—"
    assert list(contacts.search("галина", home=gaps)["contact_id"]) == [13]
    assert list(contacts.search("орлова", home=gaps)["contact_id"]) == [14]
    assert list(contacts.search("916 123", home=gaps)["contact_id"]) == [12]


def test_missing_values_read_as_a_dash_on_screen_and_empty_in_the_export(gaps):
    found = contacts.search("", home=gaps)
    shown = contacts.shown(found)
    assert (shown.set_index("contact_id").loc[11, ["name", "phone", "city", "external_id"]] == "—").all()
    assert not {str(v) for v in shown.to_numpy().ravel()} & {"None", "nan"}
    rows = list(csv.reader(contacts.export_csv(found).decode("utf-8-sig").splitlines()))
    row = dict(zip(rows[0], next(r for r in rows[1:] if r[0] == "11"), strict=True))
    assert row["city"] == "" and row["external_id"] == ""


def test_card_of_a_contact_with_gaps_holds_no_nan(gaps):
    card = contacts.card(12, home=gaps)
    assert card.name == "—" and card.phone_e164 == "+79161234567"
    assert contacts.consent_label(card.marketing) == "opted in"
    assert card.consent_history["consent_text"].tolist() == [None]
    assert sorted(card.messages["segments"], key=str) == [1, None]
    assert card.replies["keyword"].tolist() == [None]
    for frame in (card.consent_history, card.messages, card.replies):
        shown = contacts.shown(frame)
        assert not {str(v) for v in shown.to_numpy().ravel()} & {"None", "nan"}, shown
    assert contacts.card(11, home=gaps).name == "—"


def test_contacts_page_opens_on_contacts_without_number_or_name(gaps):
    at = open_page("contacts")  # an empty search: the newest contacts, gaps and all
    _shows_no_raw_gap(at)
    assert set(at.dataframe[0].value["name"]) == {"—", "Галина", "Орлова"}
    assert at.get("file_uploader"), "the Import tab is drawn"
    for cid, (*_, phone, _valid, _city) in GAPS.items():  # open each card
        at.selectbox(key="contact_pick").set_value(cid).run()
        _shows_no_raw_gap(at)
        number = next(m.value for m in at.metric if m.label == "Number")
        assert (number == "—") == (phone is None), (cid, number)


def test_contacts_page_search_that_finds_contacts_with_gaps(gaps):
    at = open_page("contacts")
    for text in ("галина", "+7 916 123", "K-14", "Орлова"):
        at.text_input(key="contact_search").input(text).run()
        _shows_no_raw_gap(at)
        assert len(at.dataframe[0].value) == 1
    at.text_input(key="contact_search").input("+7 916 123").run()
    at.toggle(key="reveal_numbers").set_value(True).run()
    _shows_no_raw_gap(at)
    assert any(m.label == "Number" and m.value == "+79161234567" for m in at.metric)
    assert any(m.label == "Messages" and m.value == "2" for m in at.metric)


def test_a_failing_search_leaves_the_import_tab_usable(home):
    store.store_path(home).write_bytes(b"this is not a database, it was damaged")
    at = AppTest.from_file(str(APP), default_timeout=60)
    at.switch_page("pages/contacts.py")
    at.run()
    assert at.exception  # the Find tab reports the damaged store: nothing hides it
    assert at.get("file_uploader"), "the Import tab is still drawn"


# --- In Russian: labels, not codes -----------------------------------------------------------

CODES = {
    "opted_in", "opted_out", "no_consent", "marketing", "service", "opt_in", "opt_out", "import", "admin",
    "promo", "planned", "submitted", "suppressed", "quiet_hours", "delivered", "stop", "mobile", "m", "f",
}  # fmt: skip
RAW = {"None", "nan", "NaN", "<NA>", "NaT", "null"}


def _cells(at) -> set[str]:
    cells = set()
    for table in [*at.dataframe, *at.table]:
        frame = table.value
        cells |= {str(v).strip() for v in frame.to_numpy().ravel()}
    return cells


def test_contacts_page_reads_in_russian_with_labels_not_codes(gaps, monkeypatch):
    monkeypatch.setenv("SMSOPS_LANGUAGE", "ru")
    at = open_page("contacts")
    assert [t.value for t in at.title] == ["Контакты"]
    assert {"Найти контакт", "Импорт файла"} <= {t.label for t in at.tabs}
    assert any(c.value.startswith("4 контакта") for c in at.caption)
    listed = at.dataframe[0].value.set_index("name")
    assert listed.loc["Орлова", "marketing"] == "согласие не записано"
    assert listed.loc["Орлова", "created_at"] == "01.03.2025, 13:00"  # 10:00 UTC in Moscow
    at.selectbox(key="contact_pick").set_value(12).run()  # a number with consent, messages, a reply
    assert not at.exception, at.exception
    metrics = {m.label: m.value for m in at.metric}
    assert metrics == {
        "Номер": "+7 916 \\*\\*\\*-\\*\\*-67",
        "Согласие на рекламу": "согласие есть",
        "Сообщения": "2",
    }
    messages = next(t.value for t in at.dataframe if "state" in t.value.columns)
    assert set(messages["state"]) == {"передано оператору", "не отправлено"}
    assert set(messages["kind"]) == {"реклама"} and "0,50 ₽" in set(messages["price"])
    history = next(t.value for t in at.dataframe if "action" in t.value.columns)
    assert history.iloc[0][["purpose", "action", "source"]].tolist() == [
        "рекламные рассылки",
        "дал согласие",
        "импорт",
    ]
    cells = _cells(at)
    assert not cells & RAW, cells & RAW
    assert not cells & CODES, cells & CODES
    assert "quiet_hours" not in " ".join(cells)
    assert [b.label for b in at.button if b.label.startswith("Записать")] == ["Записать отписку"]
    at.selectbox(key="contact_pick").set_value(11).run()  # nothing but the row itself
    assert not at.exception, at.exception
    assert any(w.value == "На этот номер нельзя отправить SMS: недействительный номер." for w in at.warning)
    assert not _cells(at) & (RAW | CODES)


# --- Import: the outcome, the build that brings the contacts to segments, the consent choice ----

CRM = (
    "Код клиента;Телефон;Имя;Фамилия;Город\r\n"
    "K-7;+7 915 000 11 22;Дарья;Котова;Тула\r\n"
    "K-8;+7 916 222 33 44;Егор;Лисин;Москва\r\n"
    "K-9;нет;Жанна;Ли;\r\n"
).encode("cp1251")


def upload(at, data: bytes = CRM, name: str = "crm.csv"):
    at.file_uploader(key="import_upload").set_value((name, data, "text/csv")).run()
    assert not at.exception, at.exception
    return at


def said(at) -> list[str]:
    return [e.value for e in [*at.success, *at.info, *at.warning, *at.error, *at.markdown, *at.caption]]


def test_an_import_shows_its_outcome_and_builds_the_warehouse_in_the_background(home):
    at = upload(open_page("contacts"))
    assert {m.label: m.value for m in at.metric} == {
        "New": "2",
        "Updated": "0",
        "Unchanged": "0",
        "Rejected": "1",
    }
    at.checkbox(key="consent_declared").check().run()
    at.text_input(key="consent_source").input("signup form on the site").run()
    assert any("Marketing consent will be recorded for 2 numbers." in s for s in said(at))
    at.button(key="import_start").click().run()
    at.button(key="import_confirmed").click().run()
    assert not at.exception, at.exception

    # the outcome of this import, not "imported before" about it
    assert any(s.startswith("Imported crm.csv: 2 new, 0 updated, 0 unchanged, 1 rejected.") for s in said(at))
    assert any("Marketing consent recorded for 2 numbers." in s for s in said(at))
    assert not any("imported before" in s for s in said(at))
    assert "import_start" not in [b.key for b in at.button]
    # the build started by itself, and its progress says when the contacts can be targeted
    assert [s.label for s in at.status] == ["Rebuilding the warehouse with the new contacts…"]
    assert any(
        "can be targeted in segments and campaigns when this build is published" in s for s in said(at)
    )
    build = at.session_state["last_import"]["build"]
    try:
        assert build.wait(timeout=300) == 0
    finally:
        if build.poll() is None:
            build.kill()
    at.run()
    assert not at.exception, at.exception
    assert not at.status
    assert any(s.startswith("The new contacts can be targeted now") for s in said(at))
    assert not any("imported before" in s for s in said(at))
    from smsops import warehouse

    marts = warehouse.query("select first_name, is_reachable_marketing from dim_contacts order by first_name")
    assert marts.values.tolist() == [["Дарья", True], ["Егор", True]]


def test_a_file_imported_in_an_earlier_session_is_still_said_to_change_nothing(home, tmp_path):
    path = tmp_path / "crm.csv"
    path.write_bytes(CRM)
    importer.run(path, importer.Options(mapping=importer.sniff(path).mapping), home=home)
    at = upload(open_page("contacts"))
    assert any("This file was imported before with the same settings" in s for s in said(at))
    assert "import_start" not in [b.key for b in at.button]


def test_the_consent_choice_says_what_it_means_where_it_is_made(home):
    at = upload(open_page("contacts"))
    explained = " ".join(c.value for c in at.caption)
    assert "get service messages only" in explained and "left out of promotions" in explained
    assert "where the proof is kept are stored with it" in explained and "38-FZ" in explained
    assert any("will get service messages only" in c.value for c in at.caption)  # unticked: what it means
    at.checkbox(key="consent_declared").check().run()
    assert any("Say where they agreed" in w.value for w in at.warning)
    assert "import_start" not in [b.key for b in at.button]  # no source: nothing to record it with
    at.text_input(key="consent_source").input("loyalty card form").run()
    assert not at.warning and "import_start" in [b.key for b in at.button]


def stop(build) -> None:
    """End a build a test started and does not need (its whole process group: the CLI and dbt)."""
    if build.poll() is None:
        os.killpg(build.pid, signal.SIGTERM)
    build.wait()


def test_consent_can_be_recorded_for_a_file_imported_without_it(home):
    at = upload(open_page("contacts"))
    at.button(key="import_start").click().run()
    at.button(key="import_confirmed").click().run()
    stop(at.session_state["last_import"]["build"])
    assert any(
        "No marketing consent was declared: these contacts get service messages only." in s for s in said(at)
    )
    at.checkbox(key="consent_declared").check().run()
    at.text_input(key="consent_source").input("loyalty card form").run()
    counts = {m.label: m.value for m in at.metric if m.label in ("New", "Updated", "Unchanged")}
    assert counts == {"New": "0", "Updated": "0", "Unchanged": "2"}
    assert at.button(key="import_start").label == "Record marketing consent for 2 numbers"
    at.button(key="import_start").click().run()
    at.button(key="import_confirmed").click().run()
    stop(at.session_state["last_import"]["build"])
    assert any("Marketing consent recorded for 2 numbers." in s for s in said(at))
    conn = store.connect(store.store_path(home))
    assert consent.may_send(conn, "+79150001122", "promo") == (True, None)


# --- Import: a hostile file is said to be unreadable, never shown as a traceback (issue 16, item 4) ----


@pytest.mark.parametrize(
    ("data", "said_"),
    [
        (b"phone;name\n\x00\x01\x02\x03\x04", "export.csv: line 2 holds bytes that text never has"),
        (b"PK\x03\x04\x14\x00\x06\x00" + bytes(range(256)), "export.csv is an Excel workbook (.xlsx)"),
        (
            'Телефон;Имя\n+79150001122;"Дарья\n+79162223344;Егор\n'.encode("cp1251"),
            "export.csv: the quote that opens on line 2 never closes",
        ),
        (
            b"phone," + b",".join(b"c%d" % i for i in range(100_000)) + b"\n",
            "the first line has 100001 columns",
        ),
    ],
)
def test_the_import_tab_says_why_a_hostile_file_cannot_be_imported(home, data, said_):
    at = upload(open_page("contacts"), data, "export.csv")
    assert [e.value for e in at.error if said_ in e.value], [e.value for e in at.error]
    assert "import_start" not in [b.key for b in at.button]


def test_the_import_tab_lists_lines_in_another_encoding_as_rejected(home):
    data = CRM + "K-10;+7 917 555 66 77;Злата;Ёжикова;Омск\r\n".encode()
    at = upload(open_page("contacts"), data)
    assert {m.label: m.value for m in at.metric}["Rejected"] == "2"
    reasons = at.table[0].value.iloc[:, 0].tolist()
    assert "the line is not in the encoding of the rest of the file" in reasons
