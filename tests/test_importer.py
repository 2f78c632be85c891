"""Contact import: every encoding and delimiter CRMs use, rejects with reasons, idempotence."""

from __future__ import annotations

import csv
import json
import sqlite3
import subprocess
import sys
from datetime import datetime

import pytest
from stores import import_digest

from smsops import i18n, importer, store, warehouse

HEADER_RU = ["Телефон", "Имя", "Фамилия", "Город", "Пол", "Дата рождения", "Карта лояльности"]
ROWS_RU = [
    ["8 (912) 345-67-89", "Анна", "Иванова", "Москва", "ж", "12.03.1990", "gold"],
    ["+7 912 000 00 01", "Пётр", "", "Казань", "м", "", ""],
    ["79123456789", "Анна", "Иванова-Смирнова", "Москва", "ж", "", "silver"],
    ["нет", "Олег", "Петров", "", "", "", ""],
    ["8 (495) 123-45-67", "Офис", "", "Москва", "", "", ""],
    ['=HYPERLINK("http://x")', "Хакер", "", "", "", "", ""],
    ["9161234567", "Ирина", "Ли", "Новосибирск", "F", "1985-07-01", ""],
]


@pytest.fixture(autouse=True)
def english():
    """The rejects file explains each reason in the current language: these tests read English."""
    with i18n.language("en"):
        yield


def write_csv(path, header, rows, *, encoding="utf-8", delimiter=","):
    with open(path, "w", encoding=encoding, newline="") as fh:
        writer = csv.writer(fh, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def contacts(home) -> list[tuple]:
    conn = sqlite3.connect(store.store_path(home))
    try:
        return conn.execute(
            "select external_id, first_name, last_name, phone_e164, city, time_zone, gender, birth_date, attributes"
            " from contacts order by contact_id"
        ).fetchall()
    finally:
        conn.close()


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "cp1251"])
@pytest.mark.parametrize("delimiter", [",", ";", "\t", "|"])
def test_every_encoding_and_delimiter_reads_the_same(home, tmp_path, encoding, delimiter):
    path = write_csv(tmp_path / "in.csv", HEADER_RU, ROWS_RU, encoding=encoding, delimiter=delimiter)
    result = importer.run(path, home=home)
    assert result.format.delimiter == delimiter
    assert result.format.encoding == encoding
    assert (result.new, result.rejected_total) == (3, 4)
    assert contacts(home)[1][1:4] == ("Анна", "Иванова-Смирнова", "+79123456789")


def test_english_headers_and_full_names_are_mapped(home, tmp_path):
    path = write_csv(
        tmp_path / "en.csv",
        ["Customer ID", "Full name", "Mobile phone", "E-mail", "Birthday", "Favourite store"],
        [
            [
                "C-1",
                "Иванова Анна Сергеевна",
                "+7 (912) 111-22-33",
                "ANNA@Example.ru",
                "1990-03-12",
                "Tverskaya",
            ],
            ["C-2", "John Smith", "+44 7400 123456", "not an email", "", ""],
        ],
    )
    fmt = importer.sniff(path)
    assert fmt.mapping == {
        "Customer ID": "external_id",
        "Full name": "full_name",
        "Mobile phone": "phone",
        "E-mail": "email",
        "Birthday": "birth_date",
        "Favourite store": "attribute",
    }
    importer.run(path, home=home)
    rows = contacts(home)
    assert rows[0][:4] == ("C-1", "Анна", "Иванова", "+79121112233")
    assert json.loads(rows[0][8]) == {"middle_name": "Сергеевна", "Favourite store": "Tverskaya"}
    assert rows[1][:4] == ("C-2", "John", "Smith", "+447400123456")
    assert json.loads(rows[1][8]) == {"email_as_given": "not an email"}


def test_cities_fill_region_and_time_zone_for_quiet_hours(home, tmp_path):
    importer.run(write_csv(tmp_path / "c.csv", HEADER_RU, ROWS_RU), home=home)
    by_name = {r[1]: r for r in contacts(home)}
    assert by_name["Ирина"][5] == "Asia/Novosibirsk"
    assert by_name["Ирина"][6] == "f" and by_name["Ирина"][7] == "1985-07-01"


def test_rejects_file_has_every_rejected_row_its_reason_and_no_live_formulas(home, tmp_path):
    path = write_csv(tmp_path / "in.csv", HEADER_RU, ROWS_RU)
    out = tmp_path / "rejects.csv"
    result = importer.run(path, home=home, rejects=out)
    assert result.rejected == {"invalid_phone": 2, "duplicate_in_file": 1, "not_mobile": 1}
    with open(out, encoding="utf-8-sig", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["line"]) for r in rows] == [2, 5, 6, 7]
    assert rows[0]["reason"] == "duplicate_in_file" and "kept line 4" in rows[0]["explanation"]
    assert rows[2]["reason"] == "not_mobile" and rows[2]["Телефон"] == "8 (495) 123-45-67"
    assert rows[3]["Телефон"].startswith("'=")  # neutralised for spreadsheets
    assert all(not cell.startswith(("=", "+", "-", "@")) for r in rows for cell in r.values())


def test_a_row_with_the_wrong_number_of_cells_is_rejected_not_guessed(home, tmp_path):
    path = tmp_path / "broken.csv"
    path.write_text("phone,first_name\n+79120000001,Анна\n+79120000002,Борис,лишнее\n", encoding="utf-8")
    result = importer.run(path, home=home)
    assert result.new == 1 and result.rejected == {"malformed_row": 1}


def test_reimporting_the_same_file_changes_nothing(home, tmp_path):
    path = write_csv(tmp_path / "in.csv", HEADER_RU, ROWS_RU)
    options = importer.Options(consent_source="форма на сайте", consent_proof="https://shop.example.ru/form")
    first = importer.run(path, options, home=home, now=datetime(2026, 1, 1))
    before = import_digest(home)
    again = importer.run(path, options, home=home, now=datetime(2026, 2, 1))
    assert import_digest(home) == before
    assert (again.new, again.updated, again.unchanged) == (0, 0, first.new)
    assert again.already_imported and again.consent_recorded == 0


def test_a_dry_run_writes_nothing(home, tmp_path):
    store.open_store(home).close()
    before = import_digest(home)
    result = importer.run(write_csv(tmp_path / "in.csv", HEADER_RU, ROWS_RU), home=home, dry_run=True)
    assert result.new == 3 and result.dry_run
    assert import_digest(home) == before


def test_updates_fill_and_replace_but_never_erase(home, tmp_path):
    importer.run(write_csv(tmp_path / "a.csv", HEADER_RU, ROWS_RU), home=home)
    update = write_csv(
        tmp_path / "b.csv",
        ["Телефон", "Имя", "Фамилия", "Город", "Email", "Tier"],
        [["+7 912 345-67-89", "Анна", "", "Санкт-Петербург", "anna@example.ru", "platinum"]],
    )
    result = importer.run(update, home=home)
    assert (result.new, result.updated) == (0, 1)
    anna = next(r for r in contacts(home) if r[3] == "+79123456789")
    assert anna[2] == "Иванова-Смирнова"  # the empty cell did not erase the surname
    assert anna[4] == "Санкт-Петербург"
    assert json.loads(anna[8]) == {"Карта лояльности": "silver", "Tier": "platinum"}


def test_external_id_wins_over_phone_when_matching(home, tmp_path):
    header = ["id", "phone", "first_name"]
    importer.run(write_csv(tmp_path / "a.csv", header, [["A1", "+79120000001", "Анна"]]), home=home)
    # same person, new number: matched by id; another person on Anna's old number: new contact
    result = importer.run(
        write_csv(
            tmp_path / "b.csv", header, [["A1", "+79120000002", "Анна"], ["B7", "+79120000001", "Борис"]]
        ),
        home=home,
    )
    assert (result.new, result.updated) == (1, 1)
    assert [(r[0], r[3]) for r in contacts(home)] == [("A1", "+79120000002"), ("B7", "+79120000001")]


def test_without_a_declared_basis_no_marketing_consent_is_recorded(home, tmp_path):
    importer.run(write_csv(tmp_path / "in.csv", HEADER_RU, ROWS_RU), home=home)
    conn = store.connect(store.store_path(home))
    assert conn.execute("select count(*) from consent_events").fetchone()[0] == 0


def test_an_import_never_overrides_a_later_opt_out(home, tmp_path):
    conn = store.open_store(home)
    conn.execute(
        "insert into consent_events (event_key, phone_e164, purpose, action, source, occurred_at, recorded_at)"
        " values ('stop-1', '+79123456789', 'marketing', 'opt_out', 'keyword_reply',"
        " '2025-06-01 10:00:00', '2025-06-01 10:00:00')"
    )
    result = importer.run(
        write_csv(tmp_path / "in.csv", HEADER_RU, ROWS_RU),
        importer.Options(consent_source="old CRM consent"),
        home=home,
        now=datetime(2026, 1, 1),
    )
    assert (result.consent_recorded, result.consent_skipped_opted_out) == (2, 1)
    opted_in = {r[0] for r in conn.execute("select phone_e164 from consent_events where action = 'opt_in'")}
    assert "+79123456789" not in opted_in and "+79120000001" in opted_in


def test_a_failure_while_applying_leaves_nothing_half_written(home, tmp_path, monkeypatch):
    store.open_store(home).close()
    before = import_digest(home)

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(importer, "_record_consent", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        importer.run(
            write_csv(tmp_path / "in.csv", HEADER_RU, ROWS_RU),
            importer.Options(consent_source="x"),
            home=home,
        )
    assert import_digest(home) == before


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty"),
        (b"phone,first_name\n", "no data rows"),
        (b"first_name,city\nAnna,Moscow\n", "no column is mapped to the phone"),
    ],
)
def test_a_file_that_cannot_be_read_fails_clearly(home, tmp_path, content, message):
    path = tmp_path / "bad.csv"
    path.write_bytes(content)
    with pytest.raises(importer.ImportFailed, match=message):
        importer.run(path, home=home)


def test_the_mapping_can_be_corrected(home, tmp_path):
    path = write_csv(tmp_path / "in.csv", ["Контакт", "Примечание"], [["+79120000001", "VIP"]])
    with pytest.raises(importer.ImportFailed, match="phone"):
        importer.run(path, home=home)
    result = importer.run(
        path, importer.Options(mapping={"Контакт": "phone", "Примечание": "ignore"}), home=home
    )
    assert result.new == 1 and contacts(home)[0][8] is None
    with pytest.raises(importer.ImportFailed, match="does not have"):
        importer.run(path, importer.Options(mapping={"Телефон": "phone"}), home=home)


def test_cli_prints_counts_and_exits_zero_with_rejects(home, tmp_path):
    path = write_csv(tmp_path / "in.csv", HEADER_RU, ROWS_RU, encoding="cp1251", delimiter=";")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "smsops.cli",
            "import",
            "contacts",
            str(path),
            "--rejects",
            str(tmp_path / "r.csv"),
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert "new                 3" in out.stdout and "invalid_phone" in out.stdout
    assert (tmp_path / "r.csv").exists()
    missing = subprocess.run(
        [sys.executable, "-m", "smsops.cli", "import", "contacts", str(tmp_path / "nope.csv")],
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 2 and "no such file" in missing.stderr


def test_imported_contacts_reach_the_marts_after_a_build(home, tmp_path):
    importer.run(
        write_csv(tmp_path / "in.csv", HEADER_RU, ROWS_RU),
        importer.Options(consent_source="web form"),
        home=home,
    )
    warehouse.build(home)
    frame = warehouse.query(
        "select first_name, phone_valid, marketing_opt_in, is_reachable_marketing, time_zone from dim_contacts"
        " order by contact_id",
        home=home,
    )
    assert list(frame["first_name"]) == ["Пётр", "Анна", "Ирина"]
    assert frame["is_reachable_marketing"].all()


def test_a_dry_run_reports_every_reject_the_import_would(home, tmp_path):
    path = write_csv(tmp_path / "in.csv", HEADER_RU, ROWS_RU)
    dry, dry_rejects = importer.run_with_rejects(path, home=home, dry_run=True)
    real, real_rejects = importer.run_with_rejects(path, home=home)
    assert dry.rejected == real.rejected == {"invalid_phone": 2, "duplicate_in_file": 1, "not_mobile": 1}
    assert dry_rejects == real_rejects
