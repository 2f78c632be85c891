"""The command line, run as a user runs it."""

from __future__ import annotations

import subprocess
import sys


def smsops(*args: str, env=None, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "smsops.cli", *args], capture_output=True, text=True, env=env, input=stdin
    )


def test_segments_counts_a_russian_message_and_prices_it():
    out = smsops("segments", "Привет! " * 10, "--country", "RU")
    assert out.returncode == 0, out.stderr
    assert "UCS-2" in out.stdout
    assert "segments   2" in out.stdout
    assert "transliteration    1 segment(s)" in out.stdout
    assert "RUB to RU" in out.stdout


def test_segments_reads_standard_input_and_prints_parts():
    text = "x" * 158 + "{}"  # 160 characters, but the two extension characters count double
    out = smsops("segments", "-", "--parts", stdin=text + "\n")
    assert out.returncode == 0, out.stderr
    assert "GSM-7" in out.stdout and "162 septets" in out.stdout and "segments   2" in out.stdout
    assert "part 1:" in out.stdout and "part 2:" in out.stdout


def test_status_on_an_empty_home_says_what_to_do(home):
    out = smsops("status")
    assert out.returncode == 0
    assert "not built yet" in out.stdout


def test_demo_if_empty_leaves_an_existing_base_alone(home):
    first = smsops("demo", "--contacts", "30", "--seed", "1")
    assert first.returncode == 0, first.stderr
    again = smsops("demo", "--contacts", "40", "--if-empty")
    assert again.returncode == 0 and "already holds contacts" in again.stdout
    refused = smsops("demo", "--contacts", "40")
    assert refused.returncode == 2 and "--force" in refused.stderr


def test_query_before_any_build_fails_with_a_hint(home):
    out = smsops("query", "select 1")
    assert out.returncode == 1 and "smsops build" in out.stderr


def test_campaign_schedule_test_send_and_start_due_from_a_terminal(built_home, tmp_path):
    import os
    import shutil
    from datetime import UTC, datetime, timedelta

    from smsops import campaigns, segments

    home = tmp_path / "home"
    shutil.copytree(built_home, home)
    env = {**os.environ, "SMSOPS_HOME": str(home), "SMSOPS_TIME_ZONE": "Asia/Vladivostok"}
    draft = campaigns.create(
        "CLI promo", "promo", segments.Segment("everyone"),
        [campaigns.Variant("A", "Скидка 10% до воскресенья", "SHOPMARKET")], home=home,
    )  # fmt: skip
    cid = str(draft.campaign_id)
    past = smsops("campaign", "schedule", cid, "--at", "2020-01-01 10:00", env=env)
    assert past.returncode == 2 and "has passed" in past.stderr
    later = datetime.now(UTC) + timedelta(days=1)
    local = later.astimezone(campaigns.zone_info("Asia/Vladivostok"))
    ok = smsops("campaign", "schedule", cid, "--at", f"{local:%Y-%m-%d %H:%M}", env=env)
    assert ok.returncode == 0, ok.stderr
    assert f"{later:%Y-%m-%d %H:%M} UTC" in ok.stdout  # entered in the team's zone, stored in UTC
    assert campaigns.get(draft.campaign_id, home).status == "scheduled"
    due = smsops("campaign", "start-due", env=env)
    assert due.returncode == 0 and "no scheduled campaign is due" in due.stdout
    bad = smsops("campaign", "test-send", cid, "--to", "12", env=env)
    assert bad.returncode == 2 and "seed number '12'" in bad.stderr
    sent = smsops("campaign", "test-send", cid, "--to", "+79990000001", env=env)
    assert sent.returncode == 0 and "1 message(s) to 1 number(s)" in sent.stdout, sent.stderr


def test_run_sets_up_an_empty_home_and_serves_the_app(tmp_path):
    """What `make run` does on a fresh clone: demo base, build, app (`smsops serve`, which
    listens on fixed ports, is left out here)."""
    import os

    import httpx
    from browser import _running, free_port

    home, port = tmp_path / "home", free_port()
    env = {**os.environ, "SMSOPS_HOME": str(home)}
    argv = [
        sys.executable,
        "-m",
        "smsops.cli",
        "run",
        "--port",
        str(port),
        "--demo-contacts",
        "1500",
        "--no-serve",
    ]
    with (
        open(tmp_path / "run.log", "wb") as log,
        _running(argv, env, f"http://127.0.0.1:{port}/_stcore/health", 180, log),
    ):
        assert httpx.get(f"http://127.0.0.1:{port}/", timeout=10).status_code == 200
    output = (tmp_path / "run.log").read_text()
    assert "published build" in output and "smsops is starting on" in output, output[-2000:]
