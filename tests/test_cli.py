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
