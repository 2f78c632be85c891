"""Foundation benchmarks: the 1M-contact demo base and a full `smsops build` over it.

Run with `make bench` (or `pytest -m bench -s bench/test_foundation.py`). The size comes
from SMSOPS_BENCH_CONTACTS (default 1,000,000). Figures go to docs/performance.md.
"""

from __future__ import annotations

import os
import time
from datetime import date

import pytest

from smsops import demo, warehouse

CONTACTS = int(os.environ.get("SMSOPS_BENCH_CONTACTS", "1000000"))
AS_OF = date(2026, 11, 1)

pytestmark = pytest.mark.bench


@pytest.fixture(scope="module")
def big_home(tmp_path_factory):
    return tmp_path_factory.mktemp("bench")


def test_demo_base_of_a_million_contacts(big_home):
    started = time.perf_counter()
    summary = demo.generate(CONTACTS, 42, as_of=AS_OF, home=big_home)
    seconds = time.perf_counter() - started
    print(f"\ndemo: {CONTACTS:,} contacts in {seconds:.1f} s")
    for table, count in summary.counts.items():
        print(f"  {table:<22} {count:>12,}")
    assert summary.counts["contacts"] == CONTACTS


def test_full_build(big_home):
    started = time.perf_counter()
    snapshot = warehouse.build(big_home, full_refresh=True)
    print(f"\nfull build: {time.perf_counter() - started:.1f} s (dbt {snapshot.seconds:.1f} s)")


def test_rebuild_from_the_previous_snapshot(big_home):
    started = time.perf_counter()
    snapshot = warehouse.build(big_home)
    print(f"\nrebuild: {time.perf_counter() - started:.1f} s (dbt {snapshot.seconds:.1f} s)")
