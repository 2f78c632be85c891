"""Contact import benchmark: a 1,000,000-row CRM export (Windows-1251, semicolons).

Run with `make bench` or `.venv/bin/pytest -m bench -s -p no:cacheprovider bench/test_import_bench.py`.
The file is exported from a demo base (SMSOPS_BENCH_CONTACTS, default 1,000,000), so it holds
the demo's messy numbers, foreign numbers, landlines and invalid values. The import runs in a
child process so that its peak memory is its own. Target (issue 4): ≥ 50,000 rows/s, flat memory.
"""

from __future__ import annotations

import csv
import os
import resource
import sqlite3
import subprocess
import sys
import time
from datetime import date

import pytest

from smsops import demo

CONTACTS = int(os.environ.get("SMSOPS_BENCH_CONTACTS", "1000000"))
pytestmark = pytest.mark.bench


def test_import_a_million_row_crm_export(tmp_path):
    source = demo.generate(CONTACTS, 42, as_of=date(2026, 11, 1), home=tmp_path / "source")
    export = tmp_path / "crm.csv"
    conn = sqlite3.connect(source.path)
    with open(export, "w", encoding="cp1251", errors="replace", newline="") as fh:
        writer = csv.writer(fh, delimiter=";")
        writer.writerow(
            ["Код клиента", "Моб. телефон", "Имя", "Фамилия", "Город", "Пол", "Дата рождения", "Уровень"]
        )
        for row in conn.execute(
            "select external_id, phone_raw, first_name, last_name, city, gender, birth_date,"
            " json_extract(attributes, '$.loyalty_tier') from contacts"
        ):
            writer.writerow(["" if v is None else v for v in row])
    conn.close()
    env = {**os.environ, "SMSOPS_HOME": str(tmp_path / "target")}
    started = time.perf_counter()
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "smsops.cli",
            "import",
            "contacts",
            str(export),
            "--rejects",
            str(tmp_path / "r.csv"),
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(out.stdout)
    print(
        f"import: {CONTACTS:,} rows, {export.stat().st_size / 1e6:.0f} MB in {seconds:.1f} s"
        f" = {CONTACTS / seconds:,.0f} rows/s; peak RSS of the largest child {peak:.0f} MB"
    )
