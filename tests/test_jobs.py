"""Background work for the pages (smsops.jobs): one run per key, progress, stale results served
while fresh ones are made, errors kept for the page."""

from __future__ import annotations

import threading
import time

import pytest

from smsops import jobs


@pytest.fixture
def key(request, home):
    name = jobs.key("test", request.node.name)
    yield name
    deadline = time.monotonic() + 10
    while (status := jobs.get(name)) is not None and status.running and time.monotonic() < deadline:
        time.sleep(0.01)
    jobs.forget(name)


def test_a_key_runs_once_at_a_time_and_its_result_is_kept(key):
    release, calls = threading.Event(), []

    def work(report):
        calls.append(1)
        report(0.5, "half way")
        release.wait(5)
        return 42

    first = jobs.start(key, work)
    second = jobs.start(key, work)  # a double click
    assert first.running and second.running and not second.ready
    assert jobs.wait(key, 0.05).step == "half way"
    release.set()
    done = jobs.wait(key, 5)
    assert done.ready and not done.running and done.result == 42 and done.fraction == 1.0
    assert jobs.start(key, work).result == 42  # kept: no second run without fresh_for
    assert len(calls) == 1


def test_a_stale_result_is_served_while_the_next_one_is_made(key):
    values, release = iter([1, 2]), threading.Event()

    def work(report):
        value = next(values)
        if value == 2:
            release.wait(5)
        return value

    assert jobs.run(key, work, fresh_for=0.05, timeout=5).result == 1
    time.sleep(0.1)
    again = jobs.start(key, work, fresh_for=0.05)
    assert again.running and again.result == 1 and again.age >= 0.1  # the old one, not a blank
    release.set()
    assert jobs.wait(key, 5).result == 2


def test_run_waits_a_moment_then_returns_a_job_still_running(key):
    release = threading.Event()
    started = time.monotonic()
    status = jobs.run(key, lambda report: release.wait(5), timeout=0.1)
    assert 0.1 <= time.monotonic() - started < 2
    assert status.running and not status.ready
    release.set()
    assert jobs.wait(key, 5).ready


def test_an_error_is_kept_for_the_page_and_the_next_start_tries_again_only_when_stale(key):
    def fails(report):
        raise ValueError("the audience is empty")

    status = jobs.run(key, fails, timeout=5)
    assert isinstance(status.error, ValueError) and status.result is None
    assert jobs.start(key, lambda report: 1).error is status.error  # kept, like a result
    jobs.forget(key)
    assert jobs.run(key, lambda report: 1, timeout=5).result == 1


def test_the_same_work_on_another_home_is_another_job(monkeypatch, tmp_path):
    monkeypatch.setenv("SMSOPS_HOME", str(tmp_path / "a"))
    first = jobs.key("campaign list")
    monkeypatch.setenv("SMSOPS_HOME", str(tmp_path / "b"))
    assert jobs.key("campaign list") != first
