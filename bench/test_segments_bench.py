"""Live segment counts on the 1,000,000-contact demo base, against the same filters by hand.

Run with `pytest -m bench -s bench/test_segments_bench.py -p no:cacheprovider` after
`SMSOPS_HOME=/tmp/big smsops demo --contacts 1000000 && SMSOPS_HOME=/tmp/big smsops build`
(or point SMSOPS_BENCH_HOME at another built home). Targets (docs/performance.md): p50 of
``segments.count`` ≤ 100 ms, and within 1.5x of the hand-written SQL measured in the same
run, round by round, on a connection that is already open (the best case for the
hand-written query).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import duckdb
import pytest

from smsops import segments, warehouse
from smsops.config import duckdb_settings
from smsops.segments import Rule, Segment, all_of, any_of, negate

pytestmark = pytest.mark.bench

HOME = os.environ.get("SMSOPS_BENCH_HOME", "/tmp/big")
ROUNDS = 40
NOW = datetime.now(UTC).replace(tzinfo=None)


def _ts(days: int) -> str:
    return f"timestamp '{(NOW - timedelta(days=days)).isoformat(sep=' ')}'"


# Each case: the segment, and the same filter as an analyst would write it by hand.
CASES: dict[str, tuple[Segment, str]] = {
    "simple: city is Москва": (
        Segment("simple", all_of(Rule("city", "eq", "Москва"))),
        "city = 'Москва'",
    ),
    "nested any/all with dates": (
        Segment(
            "nested",
            all_of(
                any_of(
                    Rule("last_order_at", "within_last_days", 90),
                    all_of(
                        Rule("last_clicked_at", "within_last_days", 30), Rule("messages_clicked", "gte", 2)
                    ),
                ),
                Rule("orders_count", "gte", 2),
                negate(any_of(Rule("city", "in", ("Москва", "Санкт-Петербург")))),
            ),
        ),
        f"""(last_order_at >= {_ts(90)} or (last_clicked_at >= {_ts(30)} and messages_clicked >= 2))
            and orders_count >= 2
            and (city not in ('Москва', 'Санкт-Петербург') or city is null)""",
    ),
    "RFM + city + consent": (
        Segment(
            "rfm",
            all_of(
                Rule("rfm_segment", "in", ("champions", "loyal")),
                Rule("city", "in", ("Москва", "Санкт-Петербург", "Казань")),
                Rule("marketing_opt_in", "is_true"),
                Rule("opted_out", "is_false"),
                Rule("phone_valid", "is_true"),
            ),
        ),
        """rfm_segment in ('champions', 'loyal')
            and city in ('Москва', 'Санкт-Петербург', 'Казань')
            and marketing_opt_in and not opted_out and phone_valid""",
    ),
    "custom attribute + age + gender": (
        Segment(
            "custom",
            all_of(
                Rule("custom.loyalty_tier", "in", ("gold", "silver")),
                Rule("age", "between", (25, 45)),
                Rule("gender", "eq", "f"),
            ),
        ),
        """json_extract_string(attributes, '$.loyalty_tier') in ('gold', 'silver')
            and age between 25 and 45 and gender = 'f'""",
    ),
}


@pytest.fixture(scope="module")
def big_home() -> str:
    snapshot = warehouse.current(HOME)
    if snapshot is None or not snapshot.path.exists():
        pytest.skip(
            f"no built warehouse at {HOME}: run `SMSOPS_HOME={HOME} smsops demo --contacts 1000000`"
            f" and `SMSOPS_HOME={HOME} smsops build`, or set SMSOPS_BENCH_HOME"
        )
    return HOME


def timings(call: Callable[[], object], rounds: int = ROUNDS) -> list[float]:
    call()  # warm up: caches, the pool, DuckDB's buffers
    out = []
    for _ in range(rounds):
        started = time.perf_counter()
        call()
        out.append((time.perf_counter() - started) * 1000)
    return out


def interleaved(a: Callable[[], object], b: Callable[[], object]) -> tuple[list[float], list[float]]:
    """Both timed round by round, alternately, so that other load on the machine hits both alike."""
    a(), b()
    out: tuple[list[float], list[float]] = ([], [])
    for _ in range(ROUNDS):
        for call, times in ((a, out[0]), (b, out[1])):
            started = time.perf_counter()
            call()
            times.append((time.perf_counter() - started) * 1000)
    return out


def p(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if q < 100 else max(values)


def test_count_is_live_on_a_million_contacts(big_home: str) -> None:
    snapshot = warehouse.current(big_home)
    assert snapshot is not None
    hand = duckdb.connect(str(snapshot.path), read_only=True, config=duckdb_settings())
    total = hand.execute("select count(*) from dim_contacts").fetchone()[0]
    print(f"\nsegment counts on {total:,} contacts ({snapshot.path.name}), {ROUNDS} rounds each, ms")
    print(f"{'case':34} {'count':>9} {'p50':>7} {'p95':>7} {'hand p50':>9} {'hand p95':>9} {'ratio':>6}")
    try:
        for name, (segment, sql) in CASES.items():
            expected = hand.execute(f"select count(*) from dim_contacts where {sql}").fetchone()[0]
            assert segments.count(segment, big_home, now=NOW) == expected, name
            ours, by_hand = interleaved(
                lambda segment=segment: segments.count(segment, big_home),
                lambda sql=sql: hand.execute(f"select count(*) from dim_contacts where {sql}").fetchone(),
            )
            ratio = statistics.median(ours) / statistics.median(by_hand)
            print(
                f"{name:34} {expected:>9,} {statistics.median(ours):7.1f} {p(ours, 95):7.1f}"
                f" {statistics.median(by_hand):9.1f} {p(by_hand, 95):9.1f} {ratio:6.2f}"
            )
            assert statistics.median(ours) <= 100, name
            assert ratio <= 1.5, name
    finally:
        hand.close()


def test_what_a_fresh_connection_would_cost(big_home: str) -> None:
    """Why counts reuse pooled connections: open + close per call against the count itself."""
    segment = CASES["simple: city is Москва"][0]

    def cold() -> None:
        segments.close_connections()
        segments.count(segment, big_home)

    fresh = timings(cold, rounds=15)
    pooled = timings(lambda: segments.count(segment, big_home), rounds=15)
    print(
        f"\nsimple count, p50: {statistics.median(fresh):.1f} ms opening a connection per call,"
        f" {statistics.median(pooled):.1f} ms from the pool"
    )


def test_breakdown_and_sample_on_a_million_contacts(big_home: str) -> None:
    segment = CASES["RFM + city + consent"][0]
    shares = timings(lambda: segments.breakdown(segment, big_home), rounds=15)
    rows = timings(lambda: segments.sample(segment, 20, home=big_home), rounds=15)
    print(
        f"\nbreakdown p50 {statistics.median(shares):.1f} ms, p95 {p(shares, 95):.1f} ms;"
        f" sample of 20 p50 {statistics.median(rows):.1f} ms, p95 {p(rows, 95):.1f} ms"
    )
