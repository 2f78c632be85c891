"""The Contacts page (AppTest) and the smsops.contacts functions behind it."""

from __future__ import annotations

import csv

import pytest
from apptest import clear_caches, open_page

from smsops import consent, contacts, importer, store


@pytest.fixture(autouse=True)
def fresh_caches():
    clear_caches()
    yield
    clear_caches()


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
