"""An ambiguous send is never repeated while the provider may still accept it (invariant 9)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from smsops import dispatch, unsettled
from smsops.dispatch import DispatchSettings
from smsops.providers.sandbox import run_in_thread
from tests.test_dispatch import FAST, make_campaign, numbers, outbox, provider_at, rows, status_of

# the provider takes 1.5 s to accept; the client gives up after 0.5 s and asks at once
SLOW_PROVIDER = replace(FAST, latency=(1.5, 1.5))
IMPATIENT = DispatchSettings(
    rate_per_second=100, concurrency=4, clients=2, timeout=0.5, unknown_grace=0.0, linger=15,
    backoff_base=0.05,
)  # fmt: skip


@pytest.fixture
def slow_sandbox():
    with run_in_thread(SLOW_PROVIDER) as server:
        yield server


def sent_counts(home, cid) -> dict[str, int]:
    return {
        r["phone_e164"]: r["n"]
        for r in rows(
            home,
            "select m.phone_e164, count(*) as n from send_attempts a join messages m using (message_id)"
            " where m.campaign_id = ? group by 1",
            cid,
        )
    }


def test_a_lookup_that_finds_nothing_before_the_settle_window_is_not_believed(home, slow_sandbox):
    phones = numbers(4)
    cid = make_campaign(home, phones)
    settings = replace(IMPATIENT, settle_window=3.0)
    report = dispatch.run_sync(home, provider_at(slow_sandbox.url), settings, campaign_id=cid)
    out = outbox(home, cid)
    # every request timed out, the first lookup found nothing (not accepted yet); the row waited
    # as unknown and the second lookup, after the window, found what the provider accepted late
    assert all((r["state"], r["attempts"]) == ("submitted", 1) for r in out), [tuple(r) for r in out]
    assert sent_counts(home, cid) == dict.fromkeys(phones, 1)
    assert report.reconciled == {"found": 4}
    assert status_of(home, cid) == "finished"


def test_without_a_settle_window_the_late_acceptance_would_be_a_duplicate(home, slow_sandbox):
    """The failure the window prevents, shown: "nothing found" believed at once sends again."""
    phones = numbers(2)
    cid = make_campaign(home, phones)
    dispatch.run_sync(
        home,
        provider_at(slow_sandbox.url),
        replace(IMPATIENT, settle_window=0.0, max_attempts=2),
        campaign_id=cid,
    )
    assert all(n == 2 for n in sent_counts(home, cid).values())  # two requests each, both accepted


def test_rows_awaiting_their_lookup_keep_the_campaign_open_and_are_not_resent(home, slow_sandbox):
    phones = numbers(3)
    cid = make_campaign(home, phones)
    settings = replace(IMPATIENT, settle_window=60.0, linger=1.0)
    dispatch.run_sync(home, provider_at(slow_sandbox.url), settings, campaign_id=cid)
    out = outbox(home, cid)
    assert {(r["state"], r["skip_reason"]) for r in out} == {("unknown", "awaiting_lookup")}
    assert status_of(home, cid) == "running"
    assert unsettled.count(cid, home).awaiting_lookup == 3
    again = dispatch.run_sync(home, provider_at(slow_sandbox.url), settings, campaign_id=cid)
    assert again.requests == 0  # never re-sent while the window is open
