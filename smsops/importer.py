"""Contact import from the CSV files CRMs export: nothing lost, nothing half-written.

A file goes through four steps:

1. **Read**: the encoding (UTF-8, UTF-8 with BOM, Windows-1251) and the delimiter (comma,
   semicolon, tab, pipe) are detected; the header is mapped onto contact fields from Russian
   or English names (`Телефон`, `Моб. телефон`, `Имя`, `phone`, `first_name`, …), and the
   caller may correct the mapping. Unknown columns become custom attributes.
2. **Stage**: rows stream into a temporary table in chunks, each phone normalised with
   `smsops.phones`, so memory stays flat however long the file is. A large file is read and
   built by worker processes (see `_stage_in_workers`).
3. **Plan** (set-based, in SQL): duplicates inside the file, matches with stored contacts and
   the outcome of every row (new, updated, unchanged, rejected with a reason).
4. **Apply**, in one transaction, unless it is a dry run.

Merge rule. A row matches the stored contact with the same external id; a row without an
external id (or whose external id is not stored yet) matches the stored contact with the same
normalised phone that has no external id of its own, or the same one. Within the file, rows
for the same contact are merged: the last row wins and the earlier ones are reported as
`duplicate_in_file` with the line that was kept. When a row updates a contact, its non-empty
cells replace stored values; empty cells never erase anything; attributes merge key by key.

Consent. An import brings contacts in *without* marketing consent unless the caller declares
the basis (`consent_source`, optionally `consent_proof`); then each imported number gets an
opt-in in the ledger with the batch and file hash as proof. An import never overrides a later
opt-out: numbers whose latest marketing event is an opt-out are skipped and counted.

Re-importing the same file with the same options changes nothing: contacts come out
unchanged, and the batch and its consent events have keys derived from the file's hash.

Hostile files. No file ends an import in a traceback: either the whole file is refused with an
:class:`ImportFailed` that names the file, the line and what to do (and nothing is written: rows
are staged in a temporary table and applied in one transaction), or a row is rejected with its
reason. Refused: a binary file (a NUL byte, control characters, a workbook's or an archive's
signature), a first line wider than ``max_columns`` columns or longer than a header can be, and
a quote that opens and never closes (named by the line where it opens: everything after it
would be one cell). Rejected rows: a row in another encoding than the rest of the file
(``wrong_encoding``), a quote that runs over several lines into a contact field or across
delimiters (``unclosed_quote``: a quote left open that swallowed the next rows; a note in a
custom column may hold line breaks), more than ``max_columns`` cells (``too_many_cells``) and
a cell longer than ``max_cell_chars`` (``cell_too_long``).

Mixed encodings. A file is read in one encoding: UTF-8 when all of it decodes as UTF-8 (or it
starts with a UTF-8 BOM); otherwise Windows-1251, unless more of its non-ASCII lines are valid
UTF-8 than not. The lines that are not in that encoding are rejected as ``wrong_encoding``
("line N is not in <encoding>") instead of refusing the whole file or reading each line in
the encoding it seems to be in: the marketer whose export got a few lines pasted in from
another tool gets the rest imported and those lines back, readable, in the rejects file, and
no guessed decoding can put a garbled name into an SMS.

The rejects file is written in the input's encoding (with its BOM, if it had one) and
delimiter, so a spreadsheet opens it the way it opened the export; every cell a spreadsheet
would run, the header's included, is neutralised (:func:`neutralise`).
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import gc
import hashlib
import io
import itertools
import json
import mmap
import os
import re
import sqlite3
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import BinaryIO, Literal

from smsops import i18n, phones, store
from smsops.i18n import N_, _
from smsops.reference import City, cities

CHUNK_ROWS = 20_000
SAMPLE_BYTES = 64 * 1024
"""How much of a file's start is read to detect its delimiter."""
HEADER_CHARS = 1024 * 1024
"""The longest first line (the header) a file may have."""
DELIMITERS = ",;\t|"
MAX_COLUMNS = 1_000
"""The most cells a row may have (``Options.max_columns``): a wider first line refuses the file,
a wider row is rejected as ``too_many_cells``. A CRM export has tens of columns; thousands mean
a wrong delimiter or a file that is not a contact export."""
MAX_CELL_CHARS = 32_767
"""The longest a cell may be (``Options.max_cell_chars``): what an Excel cell holds. A longer
cell rejects its row as ``cell_too_long``."""

# Contact fields a column can map to. `full_name` is split into first and last name;
# `attribute` keeps the column as a custom attribute under its header; `ignore` drops it.
FIELDS = (
    "external_id",
    "phone",
    "first_name",
    "last_name",
    "middle_name",
    "full_name",
    "email",
    "city",
    "region",
    "time_zone",
    "gender",
    "birth_date",
)
Target = str  # a name in FIELDS, "attribute" or "ignore"

TARGET_LABELS: dict[str, str] = {
    "external_id": N_("CRM id"),
    "phone": N_("Phone number"),
    "first_name": N_("First name"),
    "last_name": N_("Last name"),
    "middle_name": N_("Middle name"),
    "full_name": N_("Full name"),
    "email": N_("Email"),
    "city": N_("City"),
    "region": N_("Region"),
    "time_zone": N_("Time zone"),
    "gender": N_("Gender"),
    "birth_date": N_("Birth date"),
    "attribute": N_("Keep as a custom attribute"),
    "ignore": N_("Ignore"),
}
"""What a column can hold, as a person reads it (English; shown with ``i18n.label``)."""

ENCODING_LABELS: dict[str, str] = {
    "utf-8": "UTF-8",
    "utf-8-sig": "UTF-8 (BOM)",
    "utf-16": "UTF-16",
    "cp1251": "Windows-1251",
}
DELIMITER_LABELS: dict[str, str] = {
    ",": N_("comma"),
    ";": N_("semicolon"),
    "\t": N_("tab"),
    "|": N_("vertical bar"),
}

_SYNONYMS: dict[str, tuple[str, ...]] = {
    "external_id": (
        "id", "external id", "externalid", "crm id", "client id", "customer id", "contact id",
        "id клиента", "код клиента", "код", "номер клиента", "идентификатор", "ид",
    ),
    "phone": (
        "phone", "phone number", "mobile", "mobile phone", "cell", "cell phone", "msisdn", "tel",
        "telephone", "телефон", "моб телефон", "мобильный телефон", "мобильный", "моб", "сотовый",
        "номер телефона", "телефон мобильный", "тел", "контактный телефон", "номер",
    ),
    "first_name": ("first name", "firstname", "given name", "имя"),
    "last_name": ("last name", "lastname", "surname", "family name", "фамилия"),
    "middle_name": ("middle name", "patronymic", "отчество"),
    "full_name": ("name", "full name", "fullname", "contact", "client", "customer", "фио", "ф и о",
                  "клиент", "имя клиента", "покупатель", "контакт"),
    "email": ("email", "e mail", "mail", "почта", "эл почта", "электронная почта", "емейл"),
    "city": ("city", "town", "город", "населенный пункт"),
    "region": ("region", "state", "province", "регион", "область", "субъект"),
    "time_zone": ("time zone", "timezone", "tz", "часовой пояс"),
    "gender": ("gender", "sex", "пол"),
    "birth_date": ("birth date", "birthdate", "birthday", "date of birth", "dob", "дата рождения",
                   "день рождения", "др"),
}  # fmt: skip
_GENDER = {
    "m": "m", "male": "m", "man": "m", "м": "m", "муж": "m", "мужской": "m", "мужчина": "m",
    "f": "f", "female": "f", "woman": "f", "ж": "f", "жен": "f", "женский": "f", "женщина": "f",
}  # fmt: skip
_DATE_FORMATS = ("%Y-%m-%d", "%d.%m.%Y", "%d/%m/%Y", "%d-%m-%Y", "%d.%m.%y", "%Y.%m.%d", "%m/%d/%Y")
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_PLAIN_NUMBER = re.compile(r"[+-][0-9 \u00a0().,\-]*")  # +7 912 345-67-89, -5, -: arithmetic at most

Reason = Literal[
    "missing_phone", "invalid_phone", "not_mobile", "malformed_row", "duplicate_in_file", "wrong_encoding",
    "unclosed_quote", "too_many_cells", "cell_too_long",
]  # fmt: skip
REASON_TEXT: dict[str, str] = {
    "missing_phone": N_("no phone number in the row"),
    "invalid_phone": N_("the phone number is not a valid number"),
    "not_mobile": N_("the phone number is a landline or another number that cannot receive SMS"),
    "malformed_row": N_("the row has a different number of cells than the header"),
    "duplicate_in_file": N_("another row of the file is the same contact; the later row was kept"),
    "wrong_encoding": N_("the line is not in the encoding of the rest of the file"),
    "unclosed_quote": N_(
        "a quote in the row runs over several lines, so the lines after it were read into one of its cells"
    ),
    "too_many_cells": N_("the row has far more cells than a contact export has columns"),
    "cell_too_long": N_("a cell of the row is longer than any contact field can be"),
}
"""What each reject reason means (English; shown with ``i18n.label`` or :func:`explain`)."""

_DETAIL_TEXT: dict[str, str] = {
    "duplicate_in_file": N_("kept line {line}"),
    "malformed_row": N_("{cells} cells, the header has {columns}"),
    "wrong_encoding": N_("line {line} is not in {encoding}; save the file again in one encoding"),
    "unclosed_quote": N_("the quote opens on line {opened} and closes on line {closed}"),
    "too_many_cells": N_("{cells} cells; at most {max} are read"),
    "cell_too_long": N_("a cell of {chars} characters or more; at most {max} are read"),
}
"""How a reason's detail reads: the detail is a line number, or a JSON object of the values."""


class ImportFailed(ValueError):
    """The file cannot be read as contacts at all (nothing was written).

    ``str()`` is the English message (the CLI, logs); :meth:`translated` is the same message in
    the current language (a page)."""

    def __init__(self, text: str, **values: object) -> None:
        self.text, self.values = text, values
        super().__init__(text.format(**values))

    def __reduce__(self):  # keyword values: pickled (from a worker process) by hand
        return _import_failed, (self.text, self.values)

    def translated(self) -> str:
        return _(self.text).format(**self.values)


def _import_failed(text: str, values: dict[str, object]) -> ImportFailed:
    return ImportFailed(text, **values)


@dataclass(frozen=True, slots=True)
class Options:
    """What the caller declares about a file."""

    default_region: str = "RU"
    consent_source: str | None = None  # the basis for marketing consent, e.g. "signup form, 2024"
    consent_proof: str | None = None  # where the proof is kept, e.g. a form URL or document id
    purpose: Literal["marketing", "service"] = "marketing"
    mapping: Mapping[str, Target] | None = None  # header -> field, overriding the guesses
    max_columns: int = MAX_COLUMNS  # cells a row may have: more refuses the header, rejects a row
    max_cell_chars: int = MAX_CELL_CHARS  # characters a cell may have: more rejects its row

    def as_json(self) -> str:
        data = {
            "default_region": self.default_region,
            "consent_source": self.consent_source,
            "consent_proof": self.consent_proof,
            "purpose": self.purpose,
            "mapping": dict(sorted((self.mapping or {}).items())),
        }
        # the limits only when changed: a batch imported before they existed keeps its key
        if self.max_columns != MAX_COLUMNS:
            data["max_columns"] = self.max_columns
        if self.max_cell_chars != MAX_CELL_CHARS:
            data["max_cell_chars"] = self.max_cell_chars
        return json.dumps(data, ensure_ascii=False, sort_keys=True)


@dataclass(frozen=True, slots=True)
class FileFormat:
    """How a file is written: detected, then shown to the user."""

    encoding: str
    delimiter: str
    header: tuple[str, ...]
    mapping: dict[str, Target]  # header -> target, guessed and then overridden
    mixed: bool = False  # some lines are not in `encoding`: each line is decoded on its own

    @property
    def unmapped_phone(self) -> bool:
        return "phone" not in self.mapping.values()


@dataclass(frozen=True, slots=True)
class Rejected:
    line: int
    reason: str
    detail: str | None
    cells: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Result:
    """What an import did (or, for a dry run, would do)."""

    file_name: str
    file_sha256: str
    format: FileFormat
    rows_read: int
    new: int
    updated: int
    unchanged: int
    rejected: dict[str, int]
    consent_recorded: int
    consent_skipped_opted_out: int
    dry_run: bool
    batch_id: int | None
    already_imported: bool
    seconds: float
    sample_rejects: tuple[Rejected, ...] = field(default=())

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())


# ---------------------------------------------------------------------------------------
# Reading


def _key(text: str) -> str:
    """Header text reduced for matching: lower case, ё→е, punctuation as single spaces."""
    text = unicodedata.normalize("NFKC", text).lower().replace("ё", "е")
    return " ".join(re.sub(r"[^\w]+", " ", text).split())


_BY_KEY = {_key(name): target for target, names in _SYNONYMS.items() for name in names}
_BY_KEY.update({_key(f): f for f in FIELDS})


def guess_mapping(header: tuple[str, ...]) -> dict[str, Target]:
    """Map each header cell onto a contact field; unknown columns become attributes.
    A field is taken by the first column that names it; later ones become attributes."""
    mapping: dict[str, Target] = {}
    taken: set[str] = set()
    for name in header:
        target = _BY_KEY.get(_key(name))
        if target is None or target in taken:
            mapping[name] = "attribute" if _key(name) else "ignore"
        else:
            mapping[name] = target
            taken.add(target)
    return mapping


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


_CONTROL_BYTES = bytes(b for b in range(32) if b not in b"\t\n\r\x0c")  # NUL included
_CONTROL = re.compile(b"[" + re.escape(_CONTROL_BYTES) + b"]")
_NOT_CSV = (
    (
        b"PK\x03\x04",
        N_(
            "{file} is an Excel workbook (.xlsx) or another ZIP archive, not a CSV file. Save it as CSV (in Excel: File → Save As → CSV) and import that file."
        ),
    ),
    (
        b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1",
        N_(
            "{file} is an Excel 97-2003 workbook (.xls), not a CSV file. Save it as CSV (in Excel: File → Save As → CSV) and import that file."
        ),
    ),
    (
        b"%PDF",
        N_(
            "{file} is a PDF document, not a CSV file. Export the contacts from your CRM as CSV and import that file."
        ),
    ),
)
# Each byte as its part in UTF-8 (ASCII but the line feed left out), to find lines that may be
# UTF-8 in a file that is not: C a continuation, 2/3/4 a lead of that many bytes, X neither.
_UTF8_ROLE = bytes(
    10
    if b == 10
    else ord("C")
    if b < 0xC0
    else ord("2")
    if b < 0xE0
    else ord("3")
    if b < 0xF0
    else ord("4")
    if b < 0xF5
    else ord("X")
    if b >= 0x80
    else 0
    for b in range(256)
)
_ASCII_BUT_LINE_FEED = bytes(b for b in range(128) if b != 10)
_UTF8_ROLES = re.compile(rb"(?:2C|3CC|4CCC)+")  # a line's non-ASCII bytes, all in UTF-8 sequences
_LINE_BREAK = re.compile(r"\r\n?|\n")


def _encoding_label(encoding: str) -> str:
    return "UTF-8" if encoding.startswith("utf-8") else ENCODING_LABELS.get(encoding, encoding)


def detect_encoding(path: Path) -> str:
    """``utf-8-sig`` for a BOM, ``utf-8`` when the file is UTF-8, else ``cp1251`` (see :func:`_detect_text`)."""
    return _detect_text(path)[0]


def _detect_text(path: Path) -> tuple[str, bool]:
    """(encoding, mixed) of a text file: ``utf-16`` or ``utf-8-sig`` by its BOM; ``utf-8`` when it
    all decodes as UTF-8; else ``cp1251``, or UTF-8 when more of its non-ASCII lines are valid
    UTF-8 than not. ``mixed`` says that some lines are not in that encoding (they are rejected).
    Raises :class:`ImportFailed` for a file that is not text."""
    try:
        with open(path, "rb") as fh:
            stat = os.fstat(fh.fileno())
            if stat.st_size == 0:
                return "utf-8", False
            # the same file is looked at twice (to show its columns, then to import it): once is enough
            key = (str(path), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
            if key not in _DETECTED:
                with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
                    if len(_DETECTED) >= 64:
                        _DETECTED.clear()
                    _DETECTED[key] = _inspect(path, fh, data)
            return _DETECTED[key]
    except OSError as exc:
        raise ImportFailed(
            N_("{file}: cannot read the file ({reason})"), file=path.name, reason=exc.strerror
        ) from None


_DETECTED: dict[tuple, tuple[str, bool]] = {}


def _inspect(path: Path, fh: BinaryIO, data: mmap.mmap) -> tuple[str, bool]:
    if data[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE):
        if _invalid_at(data, 0, "utf-16") is not None:
            raise ImportFailed(
                N_(
                    "{file}: the file starts as UTF-16 text but is not UTF-16 further on; save it again as CSV and import that file"
                ),
                file=path.name,
            )
        return "utf-16", False
    _refuse_binary(path, data)
    bom = data[:3] == codecs.BOM_UTF8
    start = 3 if bom else 0
    if _invalid_at(data, start, "utf-8") is None:
        return ("utf-8-sig" if bom else "utf-8"), False
    if not _may_hold_utf8_lines(data, start):  # Windows-1251 throughout, but for a byte it has no letter for
        return "cp1251", data.find(b"\x98", start) >= 0
    utf8 = other = 0
    fh.seek(start)
    for line in fh:
        if not line.isascii():
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                other += 1
            else:
                utf8 += 1
    if utf8 == 0:
        return "cp1251", data.find(b"\x98", start) >= 0
    return ("utf-8-sig" if bom else "utf-8") if bom or utf8 > other else "cp1251", True


def _may_hold_utf8_lines(data: mmap.mmap, start: int) -> bool:
    """Whether a line of ``data[start:]`` may be UTF-8 with non-ASCII letters: one whose non-ASCII
    bytes all form UTF-8 sequences. In Windows-1251 text that takes a line whose every Cyrillic
    letter is followed by one of ё, №, «, » and the like: rare, and then each line is checked."""
    roles = b"\n" + data[start:].translate(_UTF8_ROLE, _ASCII_BUT_LINE_FEED)
    for lead in (b"\n2C", b"\n3CC", b"\n4CCC"):
        at = roles.find(lead)
        while at >= 0:
            end = roles.find(b"\n", at + 1)
            if _UTF8_ROLES.fullmatch(roles, at + 1, len(roles) if end < 0 else end):
                return True
            at = roles.find(lead, at + 1)
    return False


def _invalid_at(data: mmap.mmap, start: int, encoding: str) -> int | None:
    """Where ``data[start:]`` stops being ``encoding``, or None when it is that throughout."""
    decoder = codecs.getincrementaldecoder(encoding)()
    for at in range(start, len(data), 1 << 20):
        try:
            decoder.decode(data[at : at + (1 << 20)])
        except UnicodeDecodeError as exc:
            return at + exc.start
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return len(data)
    return None


def _refuse_binary(path: Path, data: mmap.mmap) -> None:
    """Raise :class:`ImportFailed` for a file that is not text: a known binary format, a NUL byte
    anywhere, or control characters in more than 1% of its first bytes."""
    for signature, message in _NOT_CSV:
        if data[: len(signature)] == signature:
            raise ImportFailed(message, file=path.name)
    at = data.find(b"\x00")
    if at < 0:
        head = data[:SAMPLE_BYTES]
        if len(head) - len(head.translate(None, _CONTROL_BYTES)) <= len(head) // 100:
            return
        at = _CONTROL.search(head).start()
    raise ImportFailed(
        N_(
            "{file}: line {line} holds bytes that text never has: this is a binary file, not a CSV "
            "export. Export the contacts from your CRM as CSV (or save the workbook as CSV) and import that file."
        ),
        file=path.name,
        line=data[:at].count(b"\n") + 1,
    )


def detect_delimiter(sample: str) -> str:
    """The delimiter that splits the sample's lines into the most, equally many, cells."""
    lines = [line for line in sample.splitlines()[:50] if line.strip()]
    if not lines:
        return ","
    try:
        return csv.Sniffer().sniff("\n".join(lines[:20]), delimiters=DELIMITERS).delimiter
    except csv.Error:
        pass
    best, best_score = ",", -1.0
    for delimiter in DELIMITERS:
        counts = [len(next(csv.reader([line], delimiter=delimiter))) for line in lines[:20]]
        if counts[0] < 2:
            continue
        consistent = sum(c == counts[0] for c in counts) / len(counts)
        score = consistent * 100 + counts[0]
        if score > best_score:
            best, best_score = delimiter, score
    return best


def sniff(
    path: str | os.PathLike[str],
    mapping: Mapping[str, Target] | None = None,
    *,
    max_columns: int = MAX_COLUMNS,
) -> FileFormat:
    """Detect how ``path`` is written and guess its column mapping (``mapping`` overrides).
    Raises :class:`ImportFailed` for a file that cannot be read as a CSV with a header."""
    path = Path(path)
    if not path.is_file():
        raise ImportFailed(N_("{path}: no such file"), path=str(path))
    encoding, mixed = _detect_text(path)
    with _text_lines(path, encoding, mixed) as (lines, _strays):
        sample = _sample(lines)
    if not sample.strip():
        raise ImportFailed(N_("{file}: the file is empty"), file=path.name)
    delimiter = detect_delimiter(sample)
    first = sample
    if _LINE_BREAK.search(sample) is None and len(sample) >= SAMPLE_BYTES:  # a first line past the sample
        with _text_lines(path, encoding, mixed) as (lines, _strays):
            first = lines.readline(HEADER_CHARS) if hasattr(lines, "readline") else next(lines)[:HEADER_CHARS]
    header = _header(path, first, delimiter, max_columns)
    if len(header) < 1 or not any(header):
        raise ImportFailed(N_("{file}: the first line should name the columns, it is empty"), file=path.name)
    guessed = guess_mapping(header)
    for name, target in (mapping or {}).items():
        if name not in guessed:
            raise ImportFailed(
                N_("mapping names column {name!r}, which the file does not have ({columns})"),
                name=name,
                columns=", ".join(header),
            )
        if target not in (*FIELDS, "attribute", "ignore"):
            raise ImportFailed(
                N_("column {name!r} cannot map to {target!r}; choose one of {fields}"),
                name=name,
                target=target,
                fields=", ".join(FIELDS),
            )
        guessed[name] = target
    return FileFormat(encoding=encoding, delimiter=delimiter, header=header, mapping=guessed, mixed=mixed)


def _header(path: Path, text: str, delimiter: str, max_columns: int) -> tuple[str, ...]:
    """The cells of the first line of ``text`` (the file's start); :class:`ImportFailed` when it is
    no header a CSV export has."""
    if _LINE_BREAK.search(text) is None and len(text) >= HEADER_CHARS:
        raise ImportFailed(
            N_(
                "{file}: the first line is longer than {chars} characters, far longer than a header naming "
                "the columns; check that the file is a contact export whose first line names its columns"
            ),
            file=path.name,
            chars=HEADER_CHARS,
        )
    # a line break after the text: a quote still open at its end takes it in
    reader = csv.reader(itertools.chain(io.StringIO(text, newline=""), ["\n"]), delimiter=delimiter)
    try:
        row = next(reader, [])
    except csv.Error as exc:
        raise ImportFailed(
            N_("{file}: cannot read the first line: {reason}"), file=path.name, reason=str(exc)
        ) from None
    if reader.line_num > 1:
        raise ImportFailed(
            N_(
                "{file}: a quote opens on line 1 and does not close on it; a header names its columns on "
                "one line. Close the quote (or remove it) and import again."
            ),
            file=path.name,
        )
    if len(row) > max_columns:
        raise ImportFailed(
            N_(
                "{file}: the first line has {columns} columns, more than the {max} an import reads; check "
                "that it is a contact export and that its columns are separated by {delimiter}"
            ),
            file=path.name,
            columns=len(row),
            max=max_columns,
            delimiter=repr(delimiter),
        )
    return tuple(cell.strip() for cell in row)


def _sample(lines) -> str:
    """The first ``SAMPLE_BYTES`` characters of a file's text."""
    if hasattr(lines, "read"):
        return lines.read(SAMPLE_BYTES)
    parts, size = [], 0
    for line in lines:
        parts.append(line)
        size += len(line)
        if size >= SAMPLE_BYTES:
            break
    return "".join(parts)[:SAMPLE_BYTES]


@contextlib.contextmanager
def _text_lines(path: Path, encoding: str, mixed: bool) -> Iterator[tuple[Iterator[str], list[int]]]:
    """The file's lines as text, and a list that collects the numbers of the lines not in
    ``encoding`` (when ``mixed``) as they are read; the caller empties it."""
    strays: list[int] = []
    if not mixed:
        with open(path, encoding=encoding, newline="") as fh:
            yield fh, strays
        return
    with open(path, "rb") as fh:
        yield _mixed_lines(fh, encoding, strays), strays


def _mixed_lines(fh: BinaryIO, encoding: str, strays: list[int]) -> Iterator[str]:
    """Each line of a file in two encodings, decoded in ``encoding`` when it is in it, else as well
    as it can be (in the other one) and its number put in ``strays``."""
    utf8 = encoding != "cp1251"
    number = 0
    for block in fh:
        if block.startswith(codecs.BOM_UTF8) and number == 0:
            block = block[3:]
        parts = block.splitlines(keepends=True) if b"\r" in block.rstrip(b"\r\n") else (block,)
        for raw in parts:
            number += 1
            if raw.isascii():
                yield raw.decode("ascii")
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                if utf8:
                    strays.append(number)
                    yield raw.decode("cp1251", "replace")
                    continue
                try:
                    yield raw.decode("cp1251")
                except UnicodeDecodeError:  # a byte Windows-1251 has no letter for
                    strays.append(number)
                    yield raw.decode("cp1251", "replace")
                continue
            if not utf8:
                strays.append(number)
            yield text


# ---------------------------------------------------------------------------------------
# Rows


_ISO_DATE = re.compile(r"(\d{4})-(\d\d)-(\d\d)")
_RU_DATE = re.compile(r"(\d\d)\.(\d\d)\.(\d{4})")


def _date(value: str | None) -> str | None:
    """A birth date as ISO text, from the forms CRMs write; None when it is not a plausible date."""
    if not value:
        return None
    text = value.strip().split(" ")[0]
    quick = _ISO_DATE.fullmatch(text) or _RU_DATE.fullmatch(text)
    if quick is not None:  # the two usual forms, without strptime's cost
        a, b, c = (int(g) for g in quick.groups())
        year, month, day = (a, b, c) if a > 31 else (c, b, a)
        try:
            parsed = date(year, month, day)
        except ValueError:
            return None
        return parsed.isoformat() if date(1900, 1, 1) <= parsed <= date.today() else None
    for fmt in _DATE_FORMATS:
        try:
            parsed = datetime.strptime(text, fmt).date()
        except ValueError:
            continue
        if date(1900, 1, 1) <= parsed <= date.today():
            return parsed.isoformat()
    return None


def _split_full_name(value: str) -> tuple[str | None, str | None, str | None]:
    """(first, last, middle) from a full name: «Фамилия Имя Отчество» for Cyrillic, «First Last»."""
    parts = value.split()
    if not parts:
        return None, None, None
    if len(parts) == 1:
        return parts[0], None, None
    if re.search("[А-Яа-яЁё]", value):
        return parts[1], parts[0], " ".join(parts[2:]) or None
    return parts[0], " ".join(parts[1:]), None


_SEP = "\x1f"  # the ASCII unit separator: never in a CSV cell a person typed


def _pack(cells: list[str]) -> str:
    """The original cells, kept for the rejects file (JSON only when a cell holds the separator)."""
    joined = _SEP.join(cells)
    return joined if joined.count(_SEP) == len(cells) - 1 else "\x00" + json.dumps(cells, ensure_ascii=False)


def _unpack(packed: str) -> tuple[str, ...]:
    return tuple(json.loads(packed[1:])) if packed.startswith("\x00") else tuple(packed.split(_SEP))


_CITY_INDEX = {_key(c.city): c for c in cities()}

STAGING_COLUMNS = (
    "line", "external_id", "first_name", "last_name", "email", "city", "region", "time_zone", "gender",
    "birth_date", "phone_raw", "phone_e164", "phone_valid", "phone_reason", "number_type", "phone_country",
    "phone_time_zones", "attributes", "cells", "reject_reason", "outcome", "reject_detail",
)  # fmt: skip
# The fields a row builder reads, in the order it unpacks them.
_BUILT_FIELDS = (
    "external_id", "first_name", "last_name", "middle_name", "full_name", "email", "city", "region",
    "time_zone", "gender", "birth_date",
)  # fmt: skip
_MALFORMED_GAP = (None,) * 17  # external_id … attributes of a row with the wrong number of cells
_MEMO_SIZE = 50_000  # entries per memo of a row builder: cleared when full, so memory stays flat


class _Broken(list):
    """The cells of a row rejected while it was read, with the reason and its detail (JSON)."""

    def __init__(self, cells: list[str], reason: str, **detail: object) -> None:
        super().__init__(cells)
        self.reason, self.detail = reason, json.dumps(detail, ensure_ascii=False)


class _RowBuilder:
    """Turns one CSV row into a staging row. Built once per file, called per row.

    Values that repeat across rows (cities, genders, birth dates, attribute sets, time zone
    lists) are worked out once and remembered in small memos."""

    def __init__(
        self,
        fmt: FileFormat,
        default_region: str,
        max_columns: int = MAX_COLUMNS,
        max_cell_chars: int = MAX_CELL_CHARS,
    ) -> None:
        self.width = len(fmt.header)
        self.region = default_region
        self.max_columns, self.max_cell_chars = max_columns, max_cell_chars
        self.index: dict[str, int] = {}
        self.attributes: list[tuple[int, str]] = []
        for i, name in enumerate(fmt.header):
            target = fmt.mapping.get(name, "ignore")
            if target == "attribute":
                self.attributes.append((i, name))
            elif target != "ignore":
                self.index[target] = i
        self.positions = tuple(self.index.get(name, -1) for name in _BUILT_FIELDS)
        self._cities: dict[str, City | None] = {}
        self._genders: dict[str, str | None] = {}
        self._dates: dict[str, str | None] = {}
        self._zones: dict[tuple[str, ...], str | None] = {}
        self._attributes: dict[tuple, str | None] = {}

    def chunk(self, chunk: list[tuple[int, list[str]]]) -> list[tuple]:
        """Staging rows for a chunk of CSV rows (numbers normalised as a batch, repeats cached)."""
        at = self.index["phone"]
        raws = [cells[at] if at < len(cells) else None for _, cells in chunk]
        numbers = phones.normalize_many(raws, default_region=self.region)
        for memo in (self._cities, self._genders, self._dates, self._zones, self._attributes):
            if len(memo) > _MEMO_SIZE:
                memo.clear()
        return [
            self(line, cells, number if raw and raw.strip() else None)
            for (line, cells), raw, number in zip(chunk, raws, numbers, strict=True)
        ]

    def __call__(self, line: int, cells: list[str], phone: phones.PhoneNumber | None) -> tuple:
        raw_cells = _pack(cells)
        # a row longer than a cell may be, or one read as broken, is looked at closer
        if len(cells) != self.width or len(raw_cells) > self.max_cell_chars or cells.__class__ is _Broken:
            rejected = self._rejected(line, cells, raw_cells)
            if rejected is not None:
                return rejected
        external_id, first, last, middle, full, email, city, region, zone, gender, birth = (
            (cells[i].strip() or None) if i >= 0 else None for i in self.positions
        )
        if full and not (first or last):
            first, last, split_middle = _split_full_name(full)
            middle = middle or split_middle
        email_as_given = None
        if email and not _EMAIL.fullmatch(email):
            email_as_given, email = email, None
        if self.attributes or middle or email_as_given:
            values = tuple(cells[i].strip() for i, _ in self.attributes)
            memo_key = (values, middle, email_as_given)
            attributes = self._attributes.get(memo_key, _MISSING)
            if attributes is _MISSING:
                attributes = self._attributes[memo_key] = _attributes_json(
                    self.attributes, values, middle, email_as_given
                )
        else:
            attributes = None
        if city:
            known = self._cities.get(city, _MISSING)
            if known is _MISSING:
                known = self._cities[city] = _CITY_INDEX.get(_key(city))
            if known is not None:
                region = region or known.region
                zone = zone or known.time_zone
        gender_key = gender or ""
        gender = self._genders.get(gender_key, _MISSING)
        if gender is _MISSING:
            gender = self._genders[gender_key] = _GENDER.get(_key(gender_key))
        if birth:
            birth_date = self._dates.get(birth, _MISSING)
            if birth_date is _MISSING:
                birth_date = self._dates[birth] = _date(birth)
        else:
            birth_date = None
        if phone is None:
            return (
                line, external_id, first, last, email and email.lower(), city, region, zone, gender, birth_date,
                None, None, 0, "empty", None, None, None, attributes, raw_cells, "missing_phone", None, None,
            )  # fmt: skip
        if phone.valid:
            reason = None
        elif phone.reason == "not_mobile":
            reason = "not_mobile"
        else:
            reason = "missing_phone" if phone.reason == "empty" else "invalid_phone"
        zones = self._zones.get(phone.time_zones, _MISSING)
        if zones is _MISSING:
            zones = self._zones[phone.time_zones] = ",".join(phone.time_zones) or None
        return (
            line, external_id, first, last, email and email.lower(), city, region, zone, gender, birth_date,
            phone.raw, phone.e164, int(phone.valid), phone.reason, phone.number_type, phone.country, zones,
            attributes, raw_cells, reason, None if reason else "new", None,
        )  # fmt: skip

    def _rejected(self, line: int, cells: list[str], raw_cells: str) -> tuple | None:
        """The staging row of a row rejected for its shape, or None when its shape is fine."""
        if cells.__class__ is _Broken:
            reason, detail = cells.reason, cells.detail
        elif len(cells) > self.max_columns:
            reason, detail = "too_many_cells", {"cells": len(cells), "max": self.max_columns}
        elif len(cells) != self.width:
            reason, detail = "malformed_row", {"cells": len(cells), "columns": self.width}
        else:
            longest = max(map(len, cells))
            if longest <= self.max_cell_chars:
                return None
            reason, detail = "cell_too_long", {"chars": longest, "max": self.max_cell_chars}
        if not isinstance(detail, str):
            detail = json.dumps(detail)
        return (line, *_MALFORMED_GAP, raw_cells, reason, None, detail)


_MISSING = object()


def _attributes_json(
    columns: list[tuple[int, str]], values: tuple[str, ...], middle: str | None, email_as_given: str | None
) -> str | None:
    attributes = {name: value for (_, name), value in zip(columns, values, strict=True) if value}
    if middle:
        attributes["middle_name"] = middle
    if email_as_given:
        attributes["email_as_given"] = email_as_given
    return json.dumps(attributes, ensure_ascii=False, sort_keys=True) if attributes else None


def _rows(
    path: Path, fmt: FileFormat, max_cell_chars: int = MAX_CELL_CHARS
) -> Iterator[tuple[int, list[str]]]:
    """(line number, cells) for each data row; blank lines are skipped."""
    with _text_lines(path, fmt.encoding, fmt.mixed) as (lines, strays):
        yield from _records(path, lines, fmt, strays, max_cell_chars)


def _records(
    path: Path,
    lines: Iterable[str],
    fmt: FileFormat,
    strays: list[int],
    max_cell_chars: int,
    *,
    header: bool = True,
    before: int = 0,
) -> Iterator[tuple[int, list[str]]]:
    """(line number, cells) for each data row of ``lines`` (after the header, when ``header``;
    ``before`` lines precede them). A row that cannot be a contact is given as :class:`_Broken`;
    a quote that never closes raises :class:`ImportFailed`. Blank lines are skipped."""
    ended: list[bool] = []

    def end_of_file() -> Iterator[str]:  # a quote still open takes this line break in
        ended.append(True)
        yield "\n"

    reader = csv.reader(itertools.chain(lines, end_of_file()), delimiter=fmt.delimiter)
    if header:
        next(reader, None)
        strays.clear()
    end = reader.line_num
    while True:
        try:
            for cells in reader:
                start, end = end + 1, reader.line_num
                if end > start:  # a quoted cell holds a line break
                    cells = _over_lines(path, fmt, cells, before + start, before + end, bool(ended))
                if strays:
                    cells = _Broken(
                        cells,
                        "wrong_encoding",
                        line=before + strays[0],
                        encoding=_encoding_label(fmt.encoding),
                    )
                    strays.clear()
                if not cells or not any(c.strip() for c in cells):
                    continue
                yield before + start, cells
            return
        except csv.Error as exc:
            start, end = end + 1, reader.line_num
            strays.clear()
            if end > start:
                raise _quote_never_closes(path, before + start) from None
            if "field larger than field limit" not in str(exc):
                raise
            # the reader goes on with the next line: only this row is lost (its cells too long to keep)
            yield (
                before + start,
                _Broken([], "cell_too_long", chars=csv.field_size_limit(), max=max_cell_chars),
            )


def _over_lines(
    path: Path, fmt: FileFormat, cells: list[str], start: int, end: int, at_end: bool
) -> list[str]:
    """A row whose quoted cells hold line breaks: kept when they are notes in custom columns,
    rejected as ``unclosed_quote`` when a quote left open seems to have swallowed the next rows."""
    broken = [i for i, cell in enumerate(cells) if "\n" in cell or "\r" in cell]
    if not broken:
        return cells
    first = len(cells) - 1 if at_end else broken[0]
    opened = start + sum(len(_LINE_BREAK.findall(cell)) for cell in cells[:first])
    if at_end:
        raise _quote_never_closes(path, opened)
    fields = {i for i, name in enumerate(fmt.header) if fmt.mapping.get(name) in FIELDS}
    if any(i in fields or i >= len(fmt.header) or fmt.delimiter in cells[i] for i in broken):
        return _Broken(cells, "unclosed_quote", opened=opened, closed=end)
    return cells


def _quote_never_closes(path: Path, line: int) -> ImportFailed:
    return ImportFailed(
        N_(
            "{file}: the quote that opens on line {line} never closes, so every line after it would be "
            "read into one cell. Close the quote (or remove it) and import again."
        ),
        file=path.name,
        line=line,
    )


# ---------------------------------------------------------------------------------------
# Import


# `line` is the rowid: rows go in (and come out for the contacts and the rejects file) in file order.
_STAGING_DDL = f"""
create temp table if not exists import_staging (
    line integer primary key,
    {", ".join(c + (" integer" if c == "phone_valid" else " text") for c in STAGING_COLUMNS[1:])},
    match_id integer
)
"""


def run(
    path: str | os.PathLike[str],
    options: Options | None = None,
    *,
    dry_run: bool = False,
    home: str | os.PathLike[str] | None = None,
    rejects: str | os.PathLike[str] | BinaryIO | None = None,
    now: datetime | None = None,
    processes: int | None = None,
) -> Result:
    """Import the contacts in ``path`` (or, with ``dry_run``, report what an import would do).

    Everything is written in one transaction or not at all. ``rejects`` receives a CSV of
    every rejected row: the original cells, the line number and the reason. Files over
    8 MB are read by two worker processes unless ``processes`` says otherwise.
    """
    import time

    started = time.perf_counter()
    options = options or Options()
    path = Path(path)
    fmt = sniff(path, options.mapping, max_columns=options.max_columns)
    if fmt.unmapped_phone:
        raise ImportFailed(
            N_(
                "{file}: no column is mapped to the phone number (columns: {columns}); "
                "name the phone column in the mapping"
            ),
            file=path.name,
            columns=", ".join(fmt.header),
        )
    sha = file_sha256(path)
    batch_key = hashlib.sha256(f"{sha}\n{options.as_json()}".encode()).hexdigest()
    stamp = _stamp(now or datetime.now(UTC))
    conn = store.connect(store.store_path(home))
    checkpoint = None
    try:
        store.create_schema(conn)
        # a larger page cache for this connection: staging and index maintenance of a big
        # file otherwise thrash SQLite's 2 MB default
        conn.execute("pragma cache_size = -262144")
        conn.execute("drop table if exists temp.import_staging")
        conn.execute("drop table if exists temp.import_duplicates")
        conn.execute(_STAGING_DDL)
        rows_read = _stage(conn, path, fmt, options, processes)
        if rows_read == 0:
            raise ImportFailed(N_("{file}: the header was read but no data rows follow it"), file=path.name)
        conn.execute("begin immediate")
        try:
            counts = _plan(conn)
            previous = conn.execute(
                "select batch_id from import_batches where batch_key = ?", (batch_key,)
            ).fetchone()
            consent = (0, 0)
            batch_id = previous[0] if previous else None
            if not dry_run:
                _apply(conn, stamp, counts)
                if options.consent_source:
                    consent = _record_consent(conn, options, sha, batch_key, path.name, stamp)
                if previous is None:
                    batch_id = conn.execute(
                        "insert into import_batches (batch_key, file_name, file_sha256, options, rows_read, new,"
                        " updated, unchanged, rejected, imported_at) values (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (batch_key, path.name, sha, options.as_json(), rows_read, counts["new"],
                         counts["updated"], counts["unchanged"], sum(counts["rejected"].values()), stamp),
                    ).lastrowid  # fmt: skip
            elif options.consent_source:
                consent = _consent_counts(conn, options)
        except BaseException:
            conn.execute("rollback")
            raise
        if dry_run:
            # the plan (duplicates found in the file) lives in this transaction: report it first
            sample = _write_rejects(conn, fmt, rejects)
            conn.execute("rollback")
        else:
            conn.execute("pragma wal_autocheckpoint = 0")
            conn.execute("commit")
            checkpoint = store.checkpoint_in_background(store.store_path(home))  # overlaps the rejects file
            sample = _write_rejects(conn, fmt, rejects)
    finally:  # closing the connection discards its temporary tables
        conn.close()
        if checkpoint is not None:
            checkpoint.join()
    return Result(
        file_name=path.name,
        file_sha256=sha,
        format=fmt,
        rows_read=rows_read,
        new=counts["new"],
        updated=counts["updated"],
        unchanged=counts["unchanged"],
        rejected=counts["rejected"],
        consent_recorded=consent[0],
        consent_skipped_opted_out=consent[1],
        dry_run=dry_run,
        batch_id=batch_id,
        already_imported=previous is not None,
        seconds=time.perf_counter() - started,
        sample_rejects=sample,
    )


def _stamp(when: datetime) -> str:
    return when.astimezone(UTC).replace(tzinfo=None).isoformat(sep=" ", timespec="seconds")


# Staging. A small file is read and built here. From PARALLEL_BYTES on, worker processes build
# the rows, each task into a SQLite file of its own that this process then copies into the
# staging table, in file order, while the workers go on. When the file can be cut into byte
# ranges at line ends (an encoding where byte 10 is always a line feed, no quote characters, so
# no cell spans lines, and no bare carriage returns) the workers read their ranges themselves;
# otherwise this process parses the CSV and hands the workers chunks of rows.
PARALLEL_BYTES = 8 * 1024 * 1024
TASK_BYTES = 4 * 1024 * 1024
_SPLITTABLE_ENCODINGS = ("utf-8", "utf-8-sig", "cp1251")
_STAGING_INSERT = (
    f"insert into {{table}} ({', '.join(STAGING_COLUMNS)}) values ({', '.join('?' * len(STAGING_COLUMNS))})"
)
_PART_DDL = f"create table rows ({', '.join(STAGING_COLUMNS)})"
_worker_state: tuple[_RowBuilder, Path, FileFormat] | None = None


def _unreadable(path: Path, row: int, reason: object) -> ImportFailed:
    return ImportFailed(
        N_("{file}: cannot read the file after row {row}: {reason}"),
        file=path.name,
        row=row,
        reason=str(reason),
    )


class _Unreadable(Exception):
    """Raised in a worker: (rows read before the failure, what failed)."""


def _stage(
    conn: sqlite3.Connection, path: Path, fmt: FileFormat, options: Options, processes: int | None
) -> int:
    build = _RowBuilder(fmt, options.default_region, options.max_columns, options.max_cell_chars)
    if processes is None:
        processes = min(2, os.cpu_count() or 1) if path.stat().st_size >= PARALLEL_BYTES else 1
    if processes > 1:
        return _stage_in_workers(conn, path, fmt, build, processes)
    insert = _STAGING_INSERT.format(table="temp.import_staging")
    total = 0
    try:
        for chunk in _chunks(_rows(path, fmt, build.max_cell_chars), CHUNK_ROWS):
            rows = build.chunk(chunk)
            conn.executemany(insert, rows)
            total += len(rows)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise _unreadable(path, total + 1, exc) from None
    return total


def _chunks(rows: Iterator[tuple[int, list[str]]], size: int) -> Iterator[list[tuple[int, list[str]]]]:
    chunk: list[tuple[int, list[str]]] = []
    for item in rows:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _byte_ranges(path: Path, fmt: FileFormat, size: int) -> list[tuple[int, int, int]] | None:
    """(start, end, lines before start) of pieces of about ``size`` bytes that each begin at a
    row, or None when the file cannot be cut safely by bytes."""
    if fmt.encoding not in _SPLITTABLE_ENCODINGS or fmt.mixed:
        return None
    with open(path, "rb") as fh:
        if os.fstat(fh.fileno()).st_size == 0:
            return None
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
            if data.find(b'"') >= 0 or re.search(rb"\r(?!\n)", data) is not None:
                return None
            start = data.find(b"\n") + 1  # after the header
            if start == 0:
                return []
            ranges = []
            line = 1
            while start < len(data):
                cut = data.find(b"\n", min(start + size, len(data)) - 1)
                end = len(data) if cut < 0 else cut + 1
                ranges.append((start, end, line))
                line += data[start:end].count(b"\n")
                start = end
            return ranges


def _init_worker(build: _RowBuilder, path: Path, fmt: FileFormat) -> None:
    global _worker_state
    _worker_state = (build, path, fmt)


def _range_rows(
    path: Path, fmt: FileFormat, max_cell_chars: int, start: int, end: int, line: int
) -> Iterator[tuple[int, list[str]]]:
    """(line number, cells) for each data row in bytes ``start:end`` (``line`` lines precede them)."""
    with open(path, "rb") as fh:
        fh.seek(start)
        data = fh.read(end - start)
    encoding = "utf-8" if fmt.encoding == "utf-8-sig" else fmt.encoding  # the BOM is before the header
    lines = io.StringIO(data.decode(encoding), newline="")
    yield from _records(path, lines, fmt, [], max_cell_chars, header=False, before=line)


def _stage_task(task: tuple[int, int, int] | list[tuple[int, list[str]]], part: str) -> int:
    """Worker side: build the rows of one task (a byte range or parsed rows) into ``part``."""
    assert _worker_state is not None
    build, path, fmt = _worker_state
    rows = _range_rows(path, fmt, build.max_cell_chars, *task) if isinstance(task, tuple) else iter(task)
    conn = sqlite3.connect(part, isolation_level=None)
    total = 0
    gc.disable()  # a task makes ~10^6 short-lived objects and no cycles: the collector only costs (~25%)
    try:
        conn.execute("pragma journal_mode = off")
        conn.execute("pragma synchronous = off")
        conn.execute(_PART_DDL)
        conn.execute("begin")
        insert = _STAGING_INSERT.format(table="rows")
        try:
            for chunk in _chunks(rows, CHUNK_ROWS):
                built = build.chunk(chunk)
                conn.executemany(insert, built)
                total += len(built)
        except (UnicodeDecodeError, csv.Error) as exc:
            raise _Unreadable(total, str(exc)) from None
        conn.execute("commit")
    finally:
        conn.close()
        gc.enable()
    phones.clear_cache()  # each task's numbers are mostly new: keep the worker's memory flat
    return total


def _stage_in_workers(
    conn: sqlite3.Connection, path: Path, fmt: FileFormat, build: _RowBuilder, processes: int
) -> int:
    import multiprocessing
    import tempfile
    from collections import deque
    from concurrent.futures import ProcessPoolExecutor

    ranges = _byte_ranges(path, fmt, TASK_BYTES)
    tasks = (
        iter(ranges) if ranges is not None else _chunks(_rows(path, fmt, build.max_cell_chars), CHUNK_ROWS)
    )
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    columns = ", ".join(STAGING_COLUMNS)
    total = 0

    def take(future, part: str) -> None:
        nonlocal total
        try:
            total += future.result()
        except _Unreadable as exc:
            read, reason = exc.args
            raise _unreadable(path, total + read + 1, reason) from None
        conn.execute("attach database ? as part", (part,))
        try:
            conn.execute(f"insert into temp.import_staging ({columns}) select {columns} from part.rows")
        finally:
            conn.execute("detach database part")
        os.remove(part)

    with tempfile.TemporaryDirectory(prefix="smsops-import-") as folder:
        pool = ProcessPoolExecutor(
            processes,
            mp_context=multiprocessing.get_context(method),
            initializer=_init_worker,
            initargs=(build, path, fmt),
        )
        try:
            pending: deque = deque()
            for number, task in enumerate(tasks):
                part = os.path.join(folder, f"part-{number}.sqlite")
                pending.append((pool.submit(_stage_task, task, part), part))
                if len(pending) >= 2 * processes:
                    take(*pending.popleft())
            while pending:
                take(*pending.popleft())
        except (UnicodeDecodeError, csv.Error) as exc:  # parsing here, for a file read in rows
            pool.shutdown(wait=True, cancel_futures=True)
            raise _unreadable(path, total + 1, exc) from None
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
    return total


def _plan(conn: sqlite3.Connection) -> dict:
    """Duplicates in the file, matches with stored contacts, the outcome of every row.

    Staging leaves every row without a reject reason marked ``new``; only the duplicates and
    the rows that match a stored contact are rewritten here."""
    # rows for the same contact within the file: the last one wins
    conn.execute("""
        create temp table import_duplicates as
        with keyed as (
            select line, coalesce('x:' || external_id, 'p:' || phone_e164) as contact_key
            from import_staging where reject_reason is null
        )
        select line, kept_line from (
            select line, max(line) over (partition by contact_key) as kept_line
            from keyed
            -- only keys seen more than once (a grouping is cheaper than a window over every row)
            where contact_key in (select contact_key from keyed group by 1 having count(*) > 1)
        )
        where line <> kept_line
    """)
    conn.execute("""
        update import_staging
        set reject_reason = 'duplicate_in_file', reject_detail = d.kept_line, outcome = null
        from import_duplicates as d
        where import_staging.line = d.line
    """)
    # rows that match no stored contact stay `new`
    if conn.execute("select exists (select 1 from contacts)").fetchone()[0]:
        _match(conn)
    # one pass for every count (a reason this list does not know falls back to a grouping)
    counts = conn.execute(f"""
        select {", ".join(f"count(*) filter (where outcome = '{o}')" for o in ("new", "updated", "unchanged"))},
            {", ".join(f"count(*) filter (where reject_reason = '{r}')" for r in _REASONS)},
            count(*) filter (where reject_reason is not null)
        from import_staging
    """).fetchone()
    rejected = {reason: n for reason, n in zip(_REASONS, counts[3:-1], strict=True) if n}
    if sum(rejected.values()) != counts[-1]:
        rejected = dict(
            conn.execute(
                "select reject_reason, count(*) from import_staging where reject_reason is not null group by 1"
            )
        )
    return {
        "new": counts[0],
        "updated": counts[1],
        "unchanged": counts[2],
        "rejected": dict(sorted(rejected.items(), key=lambda kv: -kv[1])),
    }


_REASONS = tuple(sorted(REASON_TEXT))  # in the order a grouping by reason gives


def _match(conn: sqlite3.Connection) -> None:
    """Rows that match a stored contact: which one, and whether the row changes it."""
    # the stored contact with the same external id, else one with the same number (and no
    # other external id)
    match = """coalesce(
        (select contact_id from contacts where contacts.external_id = import_staging.external_id),
        (select min(contact_id) from contacts
         where contacts.phone_e164 = import_staging.phone_e164
            and (contacts.external_id is null or import_staging.external_id is null))
    )"""
    conn.execute(
        f"update import_staging set match_id = {match} where reject_reason is null and {match} is not null"
    )
    conn.execute("""
        update import_staging set outcome = case
            when exists (
                select 1 from contacts c where c.contact_id = import_staging.match_id and (
                    (import_staging.external_id is not null and c.external_id is not import_staging.external_id)
                    or (import_staging.first_name is not null and c.first_name is not import_staging.first_name)
                    or (import_staging.last_name is not null and c.last_name is not import_staging.last_name)
                    or (import_staging.email is not null and c.email is not import_staging.email)
                    or (import_staging.city is not null and c.city is not import_staging.city)
                    or (import_staging.region is not null and c.region is not import_staging.region)
                    or (import_staging.time_zone is not null and c.time_zone is not import_staging.time_zone)
                    or (import_staging.gender is not null and c.gender is not import_staging.gender)
                    or (import_staging.birth_date is not null and c.birth_date is not import_staging.birth_date)
                    or c.phone_e164 is not import_staging.phone_e164
                    or (import_staging.attributes is not null
                        and json_patch(coalesce(c.attributes, '{}'), import_staging.attributes)
                            is not json(coalesce(c.attributes, '{}')))
                )
            ) then 'updated'
            else 'unchanged'
        end
        where match_id is not null
    """)


# Adding at least this many contacts, and no fewer than are stored, rebuilds the contacts'
# secondary indexes after the insert instead of updating them row by row (in the same
# transaction; about twice as fast for a large first import).
REINDEX_ROWS = 100_000


def _apply(conn: sqlite3.Connection, stamp: str, counts: dict) -> None:
    indexes: list[tuple[str, str]] = []
    if counts["new"] >= REINDEX_ROWS:
        stored = conn.execute("select count(*) from contacts").fetchone()[0]
        if counts["new"] >= stored:
            indexes = conn.execute(
                "select name, sql from sqlite_master where type = 'index' and tbl_name = 'contacts'"
                " and sql is not null"
            ).fetchall()
    for name, _sql in indexes:
        conn.execute(f'drop index "{name}"')
    conn.execute(
        """
        insert into contacts (
            external_id, first_name, last_name, gender, birth_date, email, city, region, time_zone,
            phone_raw, phone_e164, phone_valid, phone_reason, number_type, phone_country,
            phone_time_zones, attributes, created_at, updated_at
        )
        select
            external_id, first_name, last_name, gender, birth_date, email, city, region, time_zone,
            phone_raw, phone_e164, phone_valid, phone_reason, number_type, phone_country,
            phone_time_zones, attributes, ?, ?
        from import_staging
        where outcome = 'new'
        order by line
        """,
        (stamp, stamp),
    )
    for _name, sql in indexes:
        conn.execute(sql)
    if not counts["updated"]:
        return
    conn.execute(
        """
        update contacts set
            external_id = coalesce(s.external_id, contacts.external_id),
            first_name = coalesce(s.first_name, contacts.first_name),
            last_name = coalesce(s.last_name, contacts.last_name),
            gender = coalesce(s.gender, contacts.gender),
            birth_date = coalesce(s.birth_date, contacts.birth_date),
            email = coalesce(s.email, contacts.email),
            city = coalesce(s.city, contacts.city),
            region = coalesce(s.region, contacts.region),
            time_zone = coalesce(s.time_zone, contacts.time_zone),
            phone_raw = s.phone_raw,
            phone_e164 = s.phone_e164,
            phone_valid = s.phone_valid,
            phone_reason = s.phone_reason,
            number_type = s.number_type,
            phone_country = s.phone_country,
            phone_time_zones = s.phone_time_zones,
            attributes = case when s.attributes is null then contacts.attributes
                              else json_patch(coalesce(contacts.attributes, '{}'), s.attributes) end,
            updated_at = ?
        from import_staging as s
        where s.outcome = 'updated' and contacts.contact_id = s.match_id
        """,
        (stamp,),
    )


_LATEST_MARKETING_OPT_OUT = """
    select 1 from consent_events e
    where e.phone_e164 = import_staging.phone_e164
        and (e.purpose = ? or (e.source = 'keyword_reply' and e.action = 'opt_out'))
        and e.occurred_at = (
            select max(occurred_at) from consent_events x
            where x.phone_e164 = e.phone_e164
                and (x.purpose = ? or (x.source = 'keyword_reply' and x.action = 'opt_out'))
        )
        and e.action = 'opt_out'
"""


def _consent_counts(conn: sqlite3.Connection, options: Options) -> tuple[int, int]:
    row = conn.execute(
        f"""
        select
            count(*) filter (where not exists ({_LATEST_MARKETING_OPT_OUT})),
            count(*) filter (where exists ({_LATEST_MARKETING_OPT_OUT}))
        from import_staging where outcome is not null
        """,
        (options.purpose, options.purpose, options.purpose, options.purpose),
    ).fetchone()
    return int(row[0]), int(row[1])


def _record_consent(
    conn: sqlite3.Connection, options: Options, sha: str, batch_key: str, file_name: str, stamp: str
) -> tuple[int, int]:
    """An opt-in per imported number, proven by the batch; never over a later opt-out."""
    recorded, skipped = _consent_counts(conn, options)
    proof = json.dumps(
        {
            "import_batch": batch_key[:16],
            "file": file_name,
            "file_sha256": sha,
            "proof": options.consent_proof,
        },
        ensure_ascii=False,
    )
    cur = conn.execute(
        f"""
        insert into consent_events (
            event_key, phone_e164, contact_id, purpose, action, source, consent_text, proof,
            occurred_at, recorded_at
        )
        select
            'import:' || ? || ':' || ? || ':' || phone_e164,
            phone_e164,
            (select min(contact_id) from contacts where contacts.phone_e164 = import_staging.phone_e164),
            ?, 'opt_in', 'import', ?, json_insert(?, '$.line', line), ?, ?
        from import_staging
        where outcome is not null and not exists ({_LATEST_MARKETING_OPT_OUT})
        on conflict (event_key) do nothing
        """,
        (sha, options.purpose, options.purpose, options.consent_source, proof, stamp, stamp,
         options.purpose, options.purpose),
    )  # fmt: skip
    del recorded  # what the insert wrote is the truth (a re-import writes nothing)
    return max(cur.rowcount, 0), skipped


def neutralise(cell: str) -> str:
    """A cell a spreadsheet would run made inert, as OWASP advises against CSV injection: one
    that starts with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return gets a leading ``'``.
    A number written with a sign stays as it is (``+7 912 345-67-89``, ``-5``, ``-``): digits,
    spaces, brackets, dots, commas and dashes make arithmetic at most, never a call."""
    if cell.startswith(_FORMULA_START) and not (cell[0] in "+-" and _PLAIN_NUMBER.fullmatch(cell)):
        return "'" + cell
    return cell


def explain(reason: str, detail: str | None = None) -> str:
    """What a reject reason (and its detail) means, in the current language."""
    text = _(REASON_TEXT[reason]) if reason in REASON_TEXT else reason
    if detail and reason in _DETAIL_TEXT:
        values = json.loads(detail) if detail.startswith("{") else {"line": detail}
        shown = {k: i18n.number(v) if isinstance(v, int) and k in _COUNTS else v for k, v in values.items()}
        detail = _(_DETAIL_TEXT[reason]).format(**shown)
    return f"{text} ({detail})" if detail else text


_COUNTS = frozenset({"cells", "columns", "max", "chars"})  # detail values shown as numbers (not lines)


def _write_rejects(
    conn: sqlite3.Connection,
    fmt: FileFormat,
    target: str | os.PathLike[str] | BinaryIO | None,
    sample: int = 20,
) -> tuple[Rejected, ...]:
    rows = conn.execute(
        "select line, reject_reason, reject_detail, cells from import_staging where reject_reason is not null order by line"
    )
    kept: list[Rejected] = []
    out = None
    handle = None
    if target is not None:
        # as the input was written (its encoding, BOM and delimiter), so that a spreadsheet opens
        # it as it opened the export; a character the encoding lacks (from a line in another
        # encoding) becomes "?"
        if isinstance(target, str | os.PathLike):
            handle = open(target, "w", encoding=fmt.encoding, errors="replace", newline="")  # noqa: SIM115 — closed below
        else:
            handle = io.TextIOWrapper(
                target, encoding=fmt.encoding, errors="replace", newline="", write_through=True
            )
        out = csv.writer(handle, delimiter=fmt.delimiter)
        out.writerow([neutralise(c) for c in ("line", "reason", "explanation", *fmt.header)])
    try:
        for line, reason, detail, cells_json in rows:
            cells = _unpack(cells_json)
            if len(kept) < sample:
                kept.append(Rejected(line, reason, detail, cells))
            if out is not None:
                explanation = neutralise(explain(reason, detail))
                out.writerow([line, reason, explanation, *(neutralise(c) for c in cells)])
    finally:
        if handle is not None:
            if isinstance(target, str | os.PathLike):
                handle.close()
            else:
                handle.detach()
    return tuple(kept)


def run_with_rejects(
    path: str | os.PathLike[str], options: Options | None = None, **kwargs
) -> tuple[Result, bytes]:
    """:func:`run`, returning the rejects file's bytes with the result (for a download button)."""
    buffer = io.BytesIO()
    result = run(path, options, rejects=buffer, **kwargs)
    return result, buffer.getvalue()


def save_upload(name: str, data: bytes, *, home: str | os.PathLike[str] | None = None) -> Path:
    """Keep an uploaded file under ``$SMSOPS_HOME/uploads`` (named by its hash) and return the path."""
    digest = hashlib.sha256(data).hexdigest()
    safe = re.sub(r"[^\w.\-]+", "_", Path(name).name)[:80] or "upload.csv"
    folder = store.store_path(home).parent / "uploads" / digest[:16]
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / safe
    if not target.exists():
        tmp = target.with_suffix(target.suffix + ".part")
        tmp.write_bytes(data)
        os.replace(tmp, target)
    return target


def summary_lines(result: Result) -> list[str]:
    """The counts as a person reads them (used by the CLI)."""
    verb = "would import" if result.dry_run else "imported"
    lines = [
        f"{result.file_name}: {result.rows_read:,} rows ({result.format.encoding}, "
        f"delimiter {result.format.delimiter!r})",
        f"  new        {result.new:>10,}",
        f"  updated    {result.updated:>10,}",
        f"  unchanged  {result.unchanged:>10,}",
        f"  rejected   {result.rejected_total:>10,}",
    ]
    lines += [
        f"    {reason:<18} {count:>8,}  {REASON_TEXT.get(reason, '')}"
        for reason, count in result.rejected.items()
    ]
    if result.consent_recorded or result.consent_skipped_opted_out:
        lines.append(
            f"  marketing consent recorded for {result.consent_recorded:,} numbers"
            + (
                f"; {result.consent_skipped_opted_out:,} skipped: they opted out"
                if result.consent_skipped_opted_out
                else ""
            )
        )
    if result.already_imported:
        lines.append("  this file was imported before with the same options")
    lines.append(
        f"{verb} in {result.seconds:.1f} s" + ("  (dry run: nothing written)" if result.dry_run else "")
    )
    return lines


def column_report(fmt: FileFormat) -> list[str]:
    counts = Counter(fmt.mapping.values())
    out = []
    for name in fmt.header:
        target = fmt.mapping.get(name, "ignore")
        note = " (more than one column)" if counts[target] > 1 and target in FIELDS else ""
        out.append(f"  {name!r:<28} → {target}{note}")
    return out
