"""The feedback loop in a real browser, against a real `smsops serve`: a launched campaign's
receipts come back from the sandbox, a recipient follows their tracked link in Chromium, another
replies STOP to the inbound route, a third buys something; after «Refresh metrics» the Results
page shows all of it, and the STOPped number is left out of the next campaign."""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from browser import CHROMIUM, chromium_page, free_port, smsops_serve, streamlit_server, wait_for_script

from smsops import campaigns, segments, store
from smsops.providers import SANDBOX_AUTH_TOKEN
from smsops.providers.twilio import request_signature

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not os.path.exists(CHROMIUM), reason="Debian's chromium is not installed (make chromium)"
    ),
]

NAME = "Feedback journey"


@pytest.fixture
def own_home(built_home: Path, tmp_path: Path) -> Path:
    """A copy of the session's built home: the journey writes to its outbox."""
    home = tmp_path / "home"
    shutil.copytree(built_home, home)
    return home


def query(home: Path, sql: str, *params) -> list[tuple]:
    conn = sqlite3.connect(store.store_path(home))
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def smallest_ready_made(home: Path, at_least: int = 40) -> segments.Segment:
    sizes = {name: segments.count(seg, home) for name, seg in segments.ready_made().items()}
    name = min((n for n, size in sizes.items() if size >= at_least), key=sizes.get)
    return segments.ready_made()[name]


def wait_until(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.25)


def stop_reply(webhook_url: str, phone: str) -> httpx.Response:
    """A signed STOP, as the sandbox (speaking Twilio's protocol) posts it to the inbound route."""
    url = f"{webhook_url}/webhooks/sandbox/inbound"
    form = {"MessageSid": "SMjourney0001", "From": phone, "To": "SHOPMARKET", "Body": "STOP"}
    signature = request_signature(SANDBOX_AUTH_TOKEN, url, form)
    return httpx.post(url, data=form, headers={"X-Twilio-Signature": signature}, timeout=10)


def metric(page, label: str) -> str:
    """The value of the metric labelled exactly ``label``."""
    label_el = page.locator("[data-testid=stMetricLabel]", has_text=re.compile(f"^{re.escape(label)}$"))
    (value,) = (
        page.locator("[data-testid=stMetric]").filter(has=label_el).locator("[data-testid=stMetricValue]")
    ).all_inner_texts()
    return value


def test_receipts_clicks_replies_and_orders_reach_the_results_page(own_home, monkeypatch):
    monkeypatch.setenv("SMSOPS_HOME", str(own_home))
    # tracked links point at the webhook app on loopback: the same base for planning (here)
    # and for the dispatcher (in serve)
    port = free_port()
    base = f"http://127.0.0.1:{port}/l/"
    monkeypatch.setenv("SMSOPS_LINK_BASE", base)
    with streamlit_server(own_home) as app_url, smsops_serve(own_home, port, SMSOPS_LINK_BASE=base) as hooks:
        _journey(own_home, app_url, hooks, base)


def _journey(home: Path, app_url: str, hooks: str, base: str) -> None:
    segment = smallest_ready_made(home)
    campaign = campaigns.create(
        NAME,
        "promo",
        segment,
        [campaigns.Variant("A", f"Скидка 20% до воскресенья: {{{{ link('{app_url}/') }}}}", "SHOPMARKET")],
        holdout_fraction=0.2,
        home=home,
        quiet="off",
    )
    planned = campaigns.plan(campaign.campaign_id, home=home)
    cid = campaign.campaign_id
    assert planned.to_send > 3

    def delivered() -> int:
        return query(
            home,
            "select count(distinct e.message_id) from message_status_events as e join messages as m"
            " using (message_id) where m.campaign_id = ? and e.status = 'delivered'",
            cid,
        )[0][0]

    wait_until(lambda: delivered() >= planned.to_send - 2, 90, "the receipts")  # a few numbers bounce
    sent = query(
        home,
        "select m.contact_id, m.phone_e164, m.body, l.token from messages as m join links as l using (message_id)"
        " where m.campaign_id = ? and m.state = 'submitted' order by m.message_id",
        cid,
    )
    assert all(re.search(re.escape(base) + r"[0-9A-Za-z]{8}", body) for _, _, body, _ in sent)
    (clicker, _, clicker_body, _), (stopper, stopper_phone, _, _), (buyer, _, _, _) = sent[:3]

    with chromium_page() as page:
        # a recipient follows the link in their message: recorded, then redirected to the shop
        page.goto(re.search(re.escape(base) + r"[0-9A-Za-z]{8}", clicker_body).group(0))
        page.wait_for_url(f"{app_url}/**")
        assert query(home, "select count(*) from clicks join messages using (message_id)"
                     " where campaign_id = ? and contact_id = ?", cid, clicker) == [(1,)]  # fmt: skip

        # another replies STOP; a third buys something the next minute
        assert stop_reply(hooks, stopper_phone).status_code == 200
        now = datetime.now(UTC).replace(tzinfo=None).isoformat(sep=" ", timespec="seconds")
        conn = store.open_store(home)
        try:
            with store.transaction(conn):
                conn.execute(
                    "insert into orders (external_id, contact_id, ordered_at, amount, currency, status)"
                    " values ('journey-1', ?, ?, 4990.0, 'RUB', 'paid')",
                    (buyer, now),
                )
        finally:
            conn.close()

        # the Results page, after a refresh of the metrics
        page.goto(f"{app_url}/results")
        wait_for_script(page)
        caption = page.get_by_text("Figures from warehouse build").inner_text()
        page.locator(".st-key-refresh_metrics button").click()
        page.wait_for_function(
            "old => !document.body.innerText.includes(old) && document.body.innerText.includes('Figures from')",
            arg=caption,
            timeout=180_000,
        )
        # a fresh visit opens on the newest campaign: ours, read in one clean run of the page
        page.goto(f"{app_url}/results")
        wait_for_script(page)
        assert page.locator(".st-key-results_pick input").input_value().startswith(f"{NAME} (id {cid},")
        assert metric(page, "Sent").replace(",", "") == str(len(sent))
        assert int(metric(page, "Delivered").replace(",", "")) >= len(sent) - 2
        assert metric(page, "Clicked") == "1"
        assert metric(page, "Converted") == "1"
        main = page.locator("[data-testid=stMain]").inner_text()
        assert "4,990" in main  # the order's revenue, attributed
        # opt-outs: every sent message whose number opted out after it (the STOP among them)
        later = query(
            home,
            "select distinct m.message_id, m.phone_e164 from messages as m join consent_events as c"
            " on c.phone_e164 = m.phone_e164 and c.action = 'opt_out' and c.occurred_at >= m.submitted_at"
            " where m.campaign_id = ?",
            cid,
        )
        assert stopper_phone in {phone for _, phone in later}
        assert metric(page, "Opt-outs") == str(len(later)), later
        assert metric(page, "Replies") == "1"
        assert stopper_phone not in main
        assert metric(page, "Holdout: conversion").endswith("%")  # the uplift section had a holdout to show

    # the STOPped number is left out of the next campaign, with the reason shown
    again = campaigns.create(NAME + " 2", "promo", segment,
                             [campaigns.Variant("A", "Снова скидка", "SHOPMARKET")], home=home, quiet="off")  # fmt: skip
    campaigns.plan(again.campaign_id, home=home)
    (state, reason) = query(
        home, "select state, skip_reason from messages where campaign_id = ? and contact_id = ?",
        again.campaign_id, stopper,
    )[0]  # fmt: skip
    assert (state, reason) == ("suppressed", "opted_out")
