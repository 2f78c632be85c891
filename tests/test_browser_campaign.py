"""The campaign journey in a real browser, against a real `smsops serve` (sandbox, webhooks,
dispatcher, scheduler): create an A/B campaign, test-send it to a seed number and see it
delivered, launch it with a 20% test and a 5% holdout, watch the test portion go out, and see
the winner picked and sent to the rest."""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from browser import CHROMIUM, chromium_page, smsops_serve, streamlit_server, wait_for_script

from smsops import campaigns, segments, store

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not os.path.exists(CHROMIUM), reason="Debian's chromium is not installed (make chromium)"
    ),
]

SEED = "+79990000001"
TEXT = "{{ first_name | default('Здравствуйте') }}, {} скидка 15% до воскресенья: {{ link('https://shop.example.ru/sale') }}"


@pytest.fixture
def own_home(built_home: Path, tmp_path: Path) -> Path:
    """A copy of the session's built home: the journey writes to its outbox."""
    home = tmp_path / "home"
    shutil.copytree(built_home, home)
    return home


@pytest.fixture
def served(own_home: Path) -> Iterator[str]:
    """`smsops serve` over ``own_home`` with a calm sandbox; the webhook app's URL."""
    with smsops_serve(own_home) as url:
        yield url


def largest_ready_made(home: Path) -> str:
    sizes = {name: segments.count(seg, home) for name, seg in segments.ready_made().items()}
    return max(sizes, key=sizes.get)


def until(check, page, refresh: str | None, timeout: float = 60.0, what: str = "") -> None:
    """Click ``refresh`` until ``check()`` holds."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        if refresh:
            page.locator(f".st-key-{refresh} button").click()
        time.sleep(0.5)
        wait_for_script(page)


def query(home: Path, sql: str, *params) -> list[tuple]:
    conn = sqlite3.connect(store.store_path(home))
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def click_links_of_variant(home: Path, webhook_url: str, campaign_id: int, variant: str) -> int:
    """Follow the tracked link in every sent message of ``variant`` through the click route."""
    rows = query(
        home,
        "select m.body, l.token from messages as m left join links as l on l.message_id = m.message_id"
        " where m.campaign_id = ? and m.variant = ? and m.state = 'submitted'",
        campaign_id, variant,
    )  # fmt: skip
    assert rows and all(token and token in body for body, token in rows), rows[:3]
    for _, token in rows:
        answer = httpx.get(f"{webhook_url}/l/{token}", follow_redirects=False, timeout=5)
        assert answer.status_code == 302 and answer.headers["location"] == "https://shop.example.ru/sale"
    return len(rows)


def test_a_marketer_tests_launches_and_sees_the_winner_of_an_ab_campaign(own_home, served):
    audience = campaigns.audience_label(campaigns.READY_MADE + largest_ready_made(own_home))
    with streamlit_server(own_home) as url, chromium_page() as page:
        page.goto(f"{url}/campaigns")
        wait_for_script(page)
        page.locator("[data-testid=stSidebarNav]").wait_for()

        # create: two variants, 20% test, 5% holdout, no quiet hours so the test runs any time
        page.locator(".st-key-new_variants input").fill("2")
        page.locator(".st-key-new_variants input").press("Enter")
        wait_for_script(page)
        page.locator(".st-key-new_text_B textarea").wait_for()
        page.locator(".st-key-new_name input").fill("Browser A/B")
        page.locator(".st-key-new_audience").click()
        page.keyboard.type(audience)  # filters the list: the option may be below its fold
        page.get_by_role("option", name=audience).click()
        page.locator(".st-key-new_text_A textarea").fill(TEXT.replace("{}", "A:"))
        page.locator(".st-key-new_text_B textarea").fill(TEXT.replace("{}", "B:"))
        page.locator(".st-key-new_test input").fill("20")
        page.locator(".st-key-new_holdout input").fill("5")
        page.locator(".st-key-new_quiet input").fill("off")
        page.get_by_role("button", name="Create draft").click()
        page.get_by_text("Draft «Browser A/B» created").wait_for(timeout=60_000)
        (campaign_id,) = query(own_home, "select max(campaign_id) from campaigns where name = 'Browser A/B'")[
            0
        ]

        # test-send to a seed number and see it delivered
        page.get_by_role("tab", name="Test and launch").click()
        wait_for_script(page)
        page.locator(".st-key-launch_pick").click()
        page.keyboard.type(f"(id {campaign_id})")
        page.get_by_role("option", name=f"Browser A/B (id {campaign_id})").click()
        wait_for_script(page)
        page.locator(".st-key-seed_numbers input").fill(SEED)
        page.locator(".st-key-seed_numbers input").press("Enter")
        wait_for_script(page)
        page.locator(".st-key-test_send button").click()
        page.get_by_text("personalised with the data of contact").wait_for(timeout=30_000)
        main = page.locator("[data-testid=stMain]")
        until(
            lambda: main.inner_text().count("delivered") >= 2,
            page,
            "test_refresh",
            what="the test's receipts",
        )
        text = main.inner_text()
        assert "+7 999 ***-**-01" in text and SEED not in text, text[text.find("Seed") :][:1500]
        assert query(own_home, "select count(*) from messages where campaign_id = ?", campaign_id) == [(0,)]
        assert query(own_home, "select count(*) from campaigns where test_of = ?", campaign_id) == [(1,)]

        # launch, once, after the dialog with the waterfall and the bill
        assert "RUB" in page.locator("[data-testid=stMetric]", has_text="Cost").inner_text()
        page.locator(".st-key-launch_start button").click()
        page.locator(".st-key-launch_confirmed button").click()
        page.get_by_text(f"Campaign {campaign_id} launched").wait_for(timeout=60_000)
        audience_rows = query(own_home, "select count(*), count(distinct contact_id) from messages where campaign_id = ?",
                              campaign_id)[0]  # fmt: skip
        assert audience_rows[0] == audience_rows[1] > 0

        # the test portion goes out
        page.get_by_role("tab", name="Follow").click()
        wait_for_script(page)
        page.locator(".st-key-follow_pick").click()
        page.keyboard.type(f"(id {campaign_id},")
        page.get_by_role("option").filter(has_text=f"Browser A/B (id {campaign_id},").click()
        wait_for_script(page)

        def test_portion_done() -> bool:
            (pending,) = query(
                own_home,
                "select count(*) from messages where campaign_id = ? and (state = 'sending'"
                " or (state = 'planned' and coalesce(skip_reason, '') <> 'awaiting_winner'))",
                campaign_id,
            )[0]
            due = page.locator("[data-testid=stMetric]", has_text="Due now").inner_text()
            return pending == 0 and re.search(r"\b0\b", due.split("\n")[-1]) is not None

        until(test_portion_done, page, "follow_refresh", timeout=90, what="the test portion to be sent")

        def submitted_shown() -> int:
            return int(page.locator("[data-testid=stMetric]", has_text="Submitted").inner_text().split()[-1])

        (submitted,) = query(own_home, "select count(*) from messages where campaign_id = ? and state = 'submitted'",
                             campaign_id)[0]  # fmt: skip
        assert submitted > 0
        until(lambda: submitted_shown() == submitted, page, "follow_refresh", timeout=30, what="the progress")

        # readers click B's link, not A's: the verdict names B and the rest gets it
        assert click_links_of_variant(own_home, served, campaign_id, "B") > 0
        winner = page.get_by_text("B wins on CTR")
        try:
            until(lambda: winner.count() > 0, page, "follow_refresh", what="the verdict")
        except AssertionError:
            raise AssertionError(main.inner_text()[-3000:]) from None
        page.locator(".st-key-release_winner button").click()
        page.get_by_text("messages of B planned").wait_for(timeout=30_000)
    waiting = query(own_home, "select count(*) from messages where campaign_id = ? and variant = 'remainder'",
                    campaign_id)  # fmt: skip
    assert waiting == [(0,)]
