"""The dbt build over a demo base: marts agree with the raw data, snapshots publish atomically."""

from __future__ import annotations

import csv
import io
import sqlite3
import subprocess
import sys
import threading
import time
from collections import defaultdict

import duckdb
import pytest

from smsops import dbt_plugin, metrics, store, warehouse

RANK = {"accepted": 1, "queued": 2, "sending": 3, "sent": 4, "delivered": 5, "undelivered": 5, "failed": 5}


@pytest.fixture(scope="module")
def ops(built_home):
    conn = sqlite3.connect(store.store_path(built_home))
    yield conn
    conn.close()


def scalar(sql: str, home) -> object:
    return warehouse.query(sql, home=home).iloc[0, 0]


def test_marts_have_one_row_per_raw_entity(built_home, ops):
    assert (
        scalar("select count(*) from dim_contacts", built_home)
        == ops.execute("select count(*) from contacts").fetchone()[0]
    )
    assert (
        scalar("select count(*) from fct_messages", built_home)
        == ops.execute("select count(*) from messages").fetchone()[0]
    )
    assert (
        scalar("select count(*) from fct_campaign_performance", built_home)
        == ops.execute(
            "select count(*) from (select distinct campaign_id, variant from messages)"
        ).fetchone()[0]
    )


def test_final_status_follows_precedence_not_arrival_order(built_home, ops):
    """Recompute each message's final status from the raw receipts in Python."""
    best: dict[int, tuple[int, str, str]] = {}
    for message_id, status, occurred in ops.execute(
        "select message_id, status, occurred_at from message_status_events order by received_at"
    ):
        key = (RANK[status], occurred, status)
        if message_id not in best or key > best[message_id]:
            best[message_id] = key
    expected = defaultdict(int)
    for _, _, status in best.values():
        expected[status] += 1
    frame = warehouse.query(
        "select status, count(*) as n from fct_messages where outbox_state = 'submitted'"
        " and status not in ('queued') group by 1",
        home=built_home,
    )
    assert dict(zip(frame["status"], frame["n"], strict=True)) == dict(expected)


def test_contact_consent_matches_the_latest_ledger_event(built_home, ops):
    latest: dict[str, tuple[str, str]] = {}
    for phone, action, _occurred, source in ops.execute(
        "select phone_e164, action, occurred_at, source from consent_events"
        " where purpose = 'marketing' or (action = 'opt_out' and source = 'keyword_reply')"
        " order by occurred_at, case action when 'opt_in' then 0 else 1 end, event_id"
    ):
        latest[phone] = (action, source)
    opted_in = {p for p, (action, _) in latest.items() if action == "opt_in"}
    frame = warehouse.query(
        "select phone_e164 from dim_contacts where marketing_opt_in and phone_e164 is not null",
        home=built_home,
    )
    assert set(frame["phone_e164"]) == opted_in


def test_campaign_totals_add_up(built_home, ops):
    perf = warehouse.query(
        "select sum(audience) a, sum(sent) s, sum(suppressed) x, sum(holdout) h, sum(cost) c"
        " from fct_campaign_performance",
        home=built_home,
    ).iloc[0]
    raw = ops.execute(
        "select count(*), sum(state = 'submitted'), sum(state = 'suppressed'), sum(state = 'holdout'),"
        " sum(case when state = 'submitted' then price else 0 end) from messages"
    ).fetchone()
    assert (int(perf.a), int(perf.s), int(perf.x), int(perf.h)) == raw[:4]
    assert perf.c == pytest.approx(raw[4])
    # every message that was not sent says why
    assert scalar("select count(*) from fct_messages where sent_at is null and skip_reason is null"
                  " and status not in ('planned', 'sending')", built_home) == 0  # fmt: skip


def test_holdout_conversions_are_measured_but_not_counted_as_revenue(built_home):
    holdout = warehouse.query(
        "select sum(audience) audience, sum(converted_recipients) converted from fct_campaign_performance"
        " where variant = 'holdout'",
        home=built_home,
    ).iloc[0]
    assert holdout.audience > 0
    ov = metrics.overview(days=90, home=built_home)
    total = scalar("select sum(conversions) from fct_messages where not is_holdout and planned_at >= "
                   "current_date - interval 90 day", built_home)  # fmt: skip
    assert ov.conversions == pytest.approx(total, abs=50)
    assert ov.sent > ov.delivered > ov.clicked > 0


def test_service_messages_attract_no_conversions(built_home):
    assert (
        scalar("select sum(conversions) from fct_messages where campaign_kind = 'service'", built_home) == 0
    )


def test_query_cli_prints_csv_with_a_header(built_env):
    out = subprocess.run(
        [sys.executable, "-m", "smsops.cli", "query", "select rfm_segment, count(*) as n from dim_contacts group by 1"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    rows = list(csv.DictReader(io.StringIO(out.stdout)))
    assert rows and set(rows[0]) == {"rfm_segment", "n"}
    assert sum(int(r["n"]) for r in rows) == scalar("select count(*) from dim_contacts", built_env)


def test_query_refuses_to_write(built_env):
    with pytest.raises(warehouse.WarehouseError, match="read-only"):
        warehouse.query("create table x as select 1")
    out = subprocess.run(
        [sys.executable, "-m", "smsops.cli", "query", "drop table dim_contacts"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 1 and "read-only" in out.stderr


def test_a_failed_build_leaves_the_published_snapshot_in_place(home, monkeypatch, tmp_path):
    store.open_store(home).close()
    first = warehouse.build(home)
    work = home / "warehouse" / warehouse.WORK_FILE
    assert first.path.name == f"wh_{first.build_id}.duckdb" and not work.exists()  # renamed on success
    assert [(load.table, load.how) for load in first.loads] == [(t, "full") for t in dbt_plugin.SOURCES]
    broken = tmp_path / "broken_project"
    subprocess.run(["cp", "-r", str(warehouse.dbt_project_dir()), str(broken)], check=True)
    (broken / "models" / "marts" / "fct_daily_kpis.sql").write_text("select nonsense from nowhere")
    monkeypatch.setenv("SMSOPS_DBT_PROJECT", str(broken))
    with pytest.raises(warehouse.BuildError) as failure:
        warehouse.build(home)
    assert "nowhere" in failure.value.log_tail
    assert warehouse.current(home) == first
    assert not work.exists()
    assert len(list((home / "warehouse").glob("wh_*.duckdb"))) == 1


def test_a_build_whose_load_fails_stops_dbt_and_publishes_nothing(home):
    store.open_store(home).close()
    first = warehouse.build(home)
    conn = store.connect(store.store_path(home))
    conn.execute("alter table clicks add column screenshot blob")
    conn.close()
    with pytest.raises(ValueError, match=r"clicks\.screenshot is declared 'blob'"):
        warehouse.refresh(home)
    assert warehouse.current(home) == first
    assert not (home / "warehouse" / warehouse.WORK_FILE).exists()
    assert len(list((home / "warehouse").glob("wh_*.duckdb"))) == 1


def test_readers_keep_answering_while_a_build_runs(built_home, tmp_path):
    """The app's reads (short read-only connections to the published snapshot) go on while
    `smsops build` runs in another process; the build publishes a new snapshot at the end."""
    before = warehouse.current(built_home)
    env = {**__import__("os").environ, "SMSOPS_HOME": str(built_home)}
    build = subprocess.Popen(
        [sys.executable, "-m", "smsops.cli", "build"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    answers, errors = 0, []
    stop = threading.Event()

    def read_like_the_app() -> None:
        nonlocal answers
        while not stop.is_set():
            try:
                metrics.overview(30, home=built_home)
                metrics.consent_mix(home=built_home)
                answers += 1
            except Exception as exc:
                errors.append(exc)
            time.sleep(0.05)

    reader = threading.Thread(target=read_like_the_app)
    reader.start()
    try:
        output, _ = build.communicate(timeout=300)
    finally:
        stop.set()
        reader.join()
    assert build.returncode == 0, output
    assert not errors, errors[:3]
    assert answers >= 10
    after = warehouse.current(built_home)
    assert after.build_id != before.build_id
    assert metrics.overview(30, home=built_home).build_id == after.build_id


def test_plain_dbt_build_runs_beside_the_app(built_home):
    """An analytics engineer's `dbt build` from dbt_project/ builds a development copy and
    never touches the snapshot the app reads."""
    published = warehouse.current(built_home)
    env = {**__import__("os").environ, "SMSOPS_HOME": str(built_home)}
    env.pop("SMSOPS_WAREHOUSE_PATH", None)
    dbt = [sys.executable, "-m", "dbt.cli.main", "build", "--profiles-dir", ".", "--target-path",
           str(built_home / "dev-target"), "--log-path", str(built_home / "dev-logs")]  # fmt: skip
    with warehouse.connect(built_home) as held:  # the app holding a read connection meanwhile
        proc = subprocess.run(dbt, cwd=warehouse.dbt_project_dir(), env=env, capture_output=True, text=True)
        assert held.execute("select count(*) from dim_contacts").fetchone()[0] > 0
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert (built_home / "warehouse" / "dev.duckdb").exists()
    assert warehouse.current(built_home) == published
    # nothing preloaded: the plugin read every table whole from the live store
    ops = sqlite3.connect(store.store_path(built_home))
    with duckdb.connect(str(built_home / "warehouse" / "dev.duckdb"), read_only=True) as dev:
        for table in dbt_plugin.SOURCES:
            want = ops.execute(f"select count(*) from {table}").fetchone()[0]
            assert dev.execute(f"select count(*) from ops.{table}").fetchall() == [(want,)], table
        assert dev.execute(
            "select count(*) from information_schema.tables where table_name = '_loads'"
        ).fetchall() == [(0,)]
    ops.close()


def test_a_selective_build_always_brings_fct_messages_along(built_home, tmp_path):
    """The loads of any build move ops._loads on; a selection without fct_messages would leave
    the rows it loaded out of the marts for good."""
    import shutil
    import sqlite3

    home = tmp_path / "home"
    shutil.copytree(built_home, home)
    conn = sqlite3.connect(home / "ops.sqlite")
    try:
        (message_id,) = conn.execute(
            "select min(message_id) from messages where state = 'submitted'"
            " and message_id not in (select message_id from clicks)"
        ).fetchone()
        conn.execute(
            "insert into clicks (token, message_id, clicked_at, user_agent) values ('selective1', ?, ?, 'test')",
            (message_id, "2030-01-01 00:00:00"),
        )
        conn.commit()
    finally:
        conn.close()
    warehouse.build(home, select=["fct_daily_kpis"], tests=False)
    clicks = warehouse.query("select clicks from fct_messages where message_id = ?", [message_id], home=home)
    assert clicks["clicks"].tolist() == [1]
