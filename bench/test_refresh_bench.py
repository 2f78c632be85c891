"""Refreshing the warehouse after a 100,000-recipient campaign on the 1M demo base.

Run with `flock /tmp/bench.lock pytest -m bench -s bench/test_refresh_bench.py -p no:cacheprovider`
after `SMSOPS_HOME=/tmp/big smsops demo --contacts 1000000 && SMSOPS_HOME=/tmp/big smsops build`
(or point SMSOPS_BENCH_HOME at another built home). The operational store and the published
snapshot are copied to a temporary home first (the big home is left as it was). There a
campaign to about 100,000 contacts (whole regions) is planned, its messages are marked
submitted and receipts, clicks, replies and orders are added in SQL, as if the dispatcher
and the webhooks had run; then the refresh is timed. Target (DESIGN.md): an incremental refresh after a 100k
campaign ≤ 10 s.

Before the campaign the copy gets one refresh of its own, as a running install has had: the big home's
snapshot may come from an older smsops (then that refresh reads the store whole once) and dbt's
partial-parse state lives in the home's ``dbt/`` folder, which is not copied. Both are timed.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import copy_big_home

from smsops import campaigns, segments, warehouse
from smsops.campaigns import Variant

pytestmark = pytest.mark.bench

RECIPIENTS = 100_000
TARGET_SECONDS = 10.0
NOW = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
TEXT = "{{ first_name | default('клиент') }}, −20% на всё до воскресенья: {{ link('https://shop.example.ru/sale') }}"


@pytest.fixture(scope="module")
def bench_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A copy of the big home's operational store and published snapshot, removed afterwards."""
    home = copy_big_home(tmp_path_factory.mktemp("refresh"), snapshot=True)
    started = time.perf_counter()
    snapshot = warehouse.refresh(home)
    print(f"a refresh before the campaign: {time.perf_counter() - started:.1f} s")
    loaded(snapshot)
    yield home
    shutil.rmtree(home, ignore_errors=True)


def send_a_campaign(home: Path) -> int:
    """Plan a promotion to about 100,000 contacts (whole regions), then record in SQL what sending it
    brings back: every planned message submitted, receipts (93% delivered, out of order),
    clicks (4%), replies (0.3%) and orders (2% of recipients). Returns the campaign id."""
    regions = warehouse.query(
        "select region, count(*) as n from dim_contacts where region is not null group by 1 order by 2, 1",
        home=home,
    )
    chosen, total = [], 0
    for region, n in zip(regions["region"], regions["n"], strict=True):
        if total + n <= RECIPIENTS * 1.05:
            chosen.append(region)
            total += int(n)
    segment = segments.Segment("about 100k", segments.all_of(segments.Rule("region", "in", chosen)))
    campaign = campaigns.create(
        "Bench refresh",
        "promo",
        segment,
        [Variant("A", TEXT, "SHOPMARKET")],
        holdout_fraction=0.05,
        home=home,
    )
    started = time.perf_counter()
    result = campaigns.plan(campaign.campaign_id, home=home, now=NOW - timedelta(hours=6))
    print(f"planned {result.audience:,} recipients in {time.perf_counter() - started:.1f} s: {result.states}")
    sent_at = (NOW - timedelta(hours=6)).strftime("%Y-%m-%d %H:%M:%S")
    started = time.perf_counter()
    conn = sqlite3.connect(home / "ops.sqlite")
    with conn:
        conn.execute(
            "update messages set state = 'submitted', submitted_at = ?, attempts = 1, provider = 'sandbox',"
            " provider_message_id = 'bench-' || message_id where campaign_id = ? and state = 'planned'",
            (sent_at, campaign.campaign_id),
        )
        sent = "select message_id, contact_id, phone_e164 from messages where campaign_id = {} and state = 'submitted'"
        sent = sent.format(campaign.campaign_id)
        # 'sent' arrives after 'delivered' for some: receipts are out of order
        conn.execute(
            f"insert into message_status_events (message_id, provider, status, occurred_at, received_at)"
            f" select message_id, 'sandbox', 'sent', datetime(?1, '+2 seconds'),"
            f" datetime(?1, '+' || (message_id % 90) || ' seconds') from ({sent})",
            (sent_at,),
        )
        conn.execute(
            f"insert into message_status_events (message_id, provider, status, error_code, occurred_at, received_at)"
            f" select message_id, 'sandbox', case when message_id % 100 < 93 then 'delivered' else 'undelivered' end,"
            f" case when message_id % 100 < 93 then null else '30003' end, datetime(?1, '+20 seconds'),"
            f" datetime(?1, '+21 seconds') from ({sent})",
            (sent_at,),
        )
        conn.execute(
            f"insert into clicks (token, message_id, clicked_at, user_agent) select 'bench' || message_id, message_id,"
            f" datetime(?1, '+' || (message_id % 180) || ' minutes'), 'bench' from ({sent}) where message_id % 25 = 0",
            (sent_at,),
        )
        conn.execute(
            f"insert into inbound_messages (provider, provider_message_id, from_e164, body, keyword, contact_id,"
            f" in_reply_to, received_at) select 'sandbox', 'bench-in-' || message_id, phone_e164,"
            f" case when (message_id / 300) % 2 = 0 then 'STOP' else 'не пишите мне больше' end,"
            f" case when (message_id / 300) % 2 = 0 then 'stop' end, contact_id, message_id, datetime(?1, '+1 hour')"
            f" from ({sent}) where message_id % 300 = 7",
            (sent_at,),
        )
        conn.execute(
            "insert into orders (external_id, contact_id, ordered_at, amount, currency, category, status)"
            " select 'bench-' || message_id, contact_id, datetime(?1, '+3 hours'), 1500 + message_id % 5000, 'RUB',"
            " 'shoes', 'paid' from messages where campaign_id = ?2 and message_id % 50 = 3",
            (sent_at, campaign.campaign_id),
        )
    counts = conn.execute(
        "select (select count(*) from messages where campaign_id = ?1),"
        " (select count(*) from message_status_events where provider_message_id is null and message_id in"
        "   (select message_id from messages where campaign_id = ?1)),"
        " (select count(*) from clicks where token like 'bench%'),"
        " (select count(*) from orders where external_id like 'bench-%')",
        (campaign.campaign_id,),
    ).fetchone()
    conn.close()
    print(
        f"recorded the send in {time.perf_counter() - started:.1f} s: {counts[0]:,} outbox rows,"
        f" {counts[1]:,} receipts, {counts[2]:,} clicks, {counts[3]:,} orders"
    )
    return campaign.campaign_id


def loaded(snapshot: warehouse.Snapshot) -> None:
    """Print how the build loaded each operational table."""
    for load in snapshot.loads:
        why = f" ({load.reason})" if load.reason else ""
        print(f"  {load.seconds:6.2f} s  ops.{load.table}: {load.how}, {load.rows:,} rows read{why}")


def slowest(home: Path, n: int = 12) -> None:
    """Print the slowest dbt nodes of the last build in ``home``."""
    results = json.loads((home / "dbt" / "target" / "run_results.json").read_text())["results"]
    for node in sorted(results, key=lambda r: -r["execution_time"])[:n]:
        print(f"  {node['execution_time']:6.2f} s  {node['unique_id']}")


def test_refresh_after_a_100k_campaign(bench_home: Path) -> None:
    campaign_id = send_a_campaign(bench_home)
    started = time.perf_counter()
    snapshot = warehouse.refresh(bench_home)
    seconds = time.perf_counter() - started
    print(
        f"warehouse.refresh (select {' '.join(warehouse.REFRESH_SELECT)}): {seconds:.1f} s"
        f" (load and dbt {snapshot.seconds} s)"
    )
    perf = warehouse.query(
        "select variant, audience, sent, delivered, clicks, converted_recipients, complaints"
        f" from fct_campaign_performance where campaign_id = {campaign_id} order by variant",
        home=bench_home,
    )
    print(perf.to_string(index=False))
    loaded(snapshot)
    slowest(bench_home)
    assert RECIPIENTS * 0.9 <= int(perf["audience"].sum()) <= RECIPIENTS * 1.05
    assert int(perf["delivered"].sum()) > 0
    assert seconds <= TARGET_SECONDS


def test_whole_build_after_the_campaign(bench_home: Path) -> None:
    """For comparison: `smsops build` (every model; fct_messages still incremental)."""
    started = time.perf_counter()
    snapshot = warehouse.build(bench_home)
    print(f"warehouse.build: {time.perf_counter() - started:.1f} s")
    loaded(snapshot)
    slowest(bench_home)
