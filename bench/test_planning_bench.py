"""Planning (launching) a campaign to 1,000,000 recipients: policy, split, rendering,
encoding, cost and the outbox write, end to end.

Run with `pytest -m bench -s bench/test_planning_bench.py -p no:cacheprovider` after
`SMSOPS_HOME=/tmp/big smsops demo --contacts 1000000 && SMSOPS_HOME=/tmp/big smsops build`
(or point SMSOPS_BENCH_HOME at another built home). The operational store is copied to a
temporary home first (the big home is left as it was); the copy reads the big home's
published snapshot. Target (DESIGN.md): ≥ 100,000 recipients per second.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import copy_big_home

from smsops import campaigns, segments
from smsops.campaigns import Variant

pytestmark = pytest.mark.bench

TARGET = 100_000
NOW = datetime.now(UTC).replace(hour=12, minute=0, second=0, microsecond=0)
TEXT_A = (
    "{{ first_name | default('клиент') }}, скидка 20% на {{ favourite_category | default('всё') }}"
    " до воскресенья: {{ link('https://shop.example.ru/sale') }}"
)
TEXT_B = "{{ first_name | default('клиент') }}, только до воскресенья −20%: {{ link('https://shop.example.ru/sale') }}"


@pytest.fixture(scope="module")
def bench_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A copy of the big home's operational store (~3 GB), removed afterwards."""
    home = copy_big_home(tmp_path_factory.mktemp("planning"), snapshot=False)
    yield home
    shutil.rmtree(home, ignore_errors=True)


def report(label: str, result: campaigns.PlanResult, seconds: float) -> float:
    rate = result.audience / seconds
    print(f"\n{label}: {result.audience:,} recipients in {seconds:.2f} s = {rate:,.0f} recipients/s")
    print("  phases (s): " + ", ".join(f"{k} {v:.2f}" for k, v in result.timings.items()))
    print("  waterfall: " + " → ".join(f"{s.reason} {s.remaining:,}" for s in result.waterfall))
    print(
        f"  states {result.states}; variants {result.variants}; deferred {result.deferred:,}"
        f" (first due {result.earliest_not_before}); {result.segments:,} segments, cost {result.cost}"
    )
    return rate


def test_plan_an_ab_test_to_a_million_recipients(bench_home: Path) -> None:
    campaign = campaigns.create(
        "Bench A/B", "promo", segments.Segment("everyone"),
        [Variant("A", TEXT_A, "SHOPMARKET"), Variant("B", TEXT_B, "SHOPMARKET")],
        test_fraction=0.2, holdout_fraction=0.05, home=bench_home,
    )  # fmt: skip
    started = time.perf_counter()
    preview = campaigns.plan(campaign.campaign_id, home=bench_home, now=NOW, dry_run=True)
    report(
        "dry run (the launch dialog), 2 variants, 20% test, 5% holdout",
        preview,
        time.perf_counter() - started,
    )
    started = time.perf_counter()
    result = campaigns.plan(campaign.campaign_id, home=bench_home, now=NOW)
    rate = report("launch, 2 variants, 20% test, 5% holdout", result, time.perf_counter() - started)
    assert result.audience == result.written >= 1_000_000
    assert rate >= TARGET


def test_plan_one_variant_to_everyone_rendering_every_message(bench_home: Path) -> None:
    campaign = campaigns.create(
        "Bench one",
        "promo",
        segments.Segment("everyone"),
        [Variant("A", TEXT_A, "SHOPMARKET")],
        home=bench_home,
    )
    started = time.perf_counter()
    # a day after the A/B launch: its messages count toward the weekly cap, not the daily one
    result = campaigns.plan(campaign.campaign_id, home=bench_home, now=NOW + timedelta(days=1))
    rate = report(
        "launch, one variant, no holdout (caps see the first launch)", result, time.perf_counter() - started
    )
    assert result.audience == result.written >= 1_000_000
    assert rate >= TARGET
