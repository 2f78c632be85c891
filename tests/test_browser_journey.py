"""A new user's whole path in Chromium, from an empty install: import a CRM export, build a
segment of the imported contacts, compose a text with a field and a tracked link from the
palette, create the campaign from Compose, test-send it to a seed number, launch it, let
`smsops serve` send it through the sandbox, refresh the metrics, and read on the Results page a
delivery that agrees with what the sandbox itself delivered (issue 15, item 8).

The sandbox runs as `smsops serve` starts it for a user, faults and all: receipts come late,
twice or out of order, and a simulated outage may answer 5xx for a message it accepted (the
outbox then learns its fate only from a lookup). So Results may count fewer deliveries than the
sandbox's own record: at most those whose receipt was late for the build, which the sandbox's
journal of every receipt it posted says, message by message. The tolerance is that count."""

from __future__ import annotations

import csv
import io
import os
import re
import sqlite3
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from browser import CHROMIUM, chromium_page, free_port, smsops_serve, streamlit_server, wait_for_script
from playwright.sync_api import expect

from smsops import store
from smsops.providers import SANDBOX_ACCOUNT_SID, SANDBOX_AUTH_TOKEN

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not os.path.exists(CHROMIUM), reason="Debian's chromium is not installed (make chromium)"
    ),
]

SEED = "+79990000001"
SEGMENT = "Spring fair visitors"
CAMPAIGN = "Spring fair sale"
SOURCE = "Весенняя ярмарка"
SHOP = "https://shop.example.ru/sale"
NAMES = ("Анна", "Борис", "Вера", "Глеб", "Дарья", "Егор", "Жанна", "Зоя", "Иван", "Кира")


def crm_export() -> bytes:
    """A CRM's export as a Russian shop has it: semicolons, Windows-1251, a custom column
    («Источник»), a contact without a first name, a number that cannot be a phone. Among the
    fair's visitors, two numbers the sandbox refuses (…13 unsubscribed there, …14 not a mobile)
    and three it does not deliver to (…97, …98, …99)."""
    rows = [("Имя", "Фамилия", "Телефон", "Город", "Источник")]
    for i in range(24):
        ending = {21: "97", 22: "98", 23: "99"}.get(i, f"{i + 10:02d}")
        first = "" if i == 5 else NAMES[i % len(NAMES)]
        rows.append((first, "Петрова" if i % 2 else "Смирнов", f"8 (916) 555-{i + 10:02d}-{ending}",
                     "Казань", SOURCE))  # fmt: skip
    for i in range(6):  # from the website: not in the segment
        rows.append(("Олег", "Сайтов", f"+7 926 444-{i + 10:02d}-{i + 20:02d}", "Москва", "Сайт"))
    rows.append(("Пётр", "Ошибкин", "12345", "Казань", SOURCE))  # rejected: not a phone number
    out = io.StringIO()
    csv.writer(out, delimiter=";", lineterminator="\r\n").writerows(rows)
    return out.getvalue().encode("cp1251")


FAIR_VISITORS = 24  # in the segment: every visitor of the fair with a valid number
BUILD_TIMEOUT = 240  # seconds a warehouse build may take on a busy machine


def query(home: Path, sql: str, *params) -> list[tuple]:
    conn = sqlite3.connect(store.store_path(home))
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def main_text(page) -> str:
    return page.locator("[data-testid=stMain]").inner_text()


def no_exception(page, where: str) -> None:
    errors = page.locator("[data-testid=stException]")
    assert not errors.count(), f"{where}: {errors.first.inner_text()[:500]}"


def metric(page, label: str, first: bool = False) -> str:
    """The value of the metric labelled exactly ``label`` (the first of them with ``first``)."""
    label_el = page.locator("[data-testid=stMetricLabel]", has_text=re.compile(f"^{re.escape(label)}$"))
    values = (
        page.locator("[data-testid=stMetric]").filter(has=label_el).locator("[data-testid=stMetricValue]")
    ).all_inner_texts()
    if first:
        return values[0]
    (value,) = values
    return value


def metric_shows(page, label: str, value: str, timeout: float = 30_000) -> None:
    """Wait until the metric labelled exactly ``label`` shows ``value`` (a click's run may not
    have started yet when the page says its script is not running)."""
    label_el = page.locator("[data-testid=stMetricLabel]", has_text=re.compile(f"^{re.escape(label)}$"))
    shown = page.locator("[data-testid=stMetric]").filter(has=label_el).locator("[data-testid=stMetricValue]")
    expect(shown).to_have_text(value, timeout=timeout)


def number(text: str) -> int:
    return int(re.sub(r"[^\d]", "", text))


def wait_until(check, timeout: float, what: str, every: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)


def choose(page, key: str, option: str) -> None:
    """Pick ``option`` in the select box with ``key`` (typed, as the list may scroll)."""
    page.locator(f".st-key-{key}").click()
    page.keyboard.type(option)
    page.get_by_role("option", name=option, exact=True).click()
    wait_for_script(page)


def click(page, key: str) -> None:
    """Click the button with ``key`` (not a copy of it that a rerun is about to remove, nor the
    hidden copy Streamlit draws of a button with help to measure it)."""
    page.locator(f".st-key-{key}:not([data-stale=true]) button:visible").click()


def type_into(page, key: str, text: str, commit: bool = True) -> None:
    """Type ``text`` into the text input with ``key``, and press Enter (applies it) if ``commit``."""
    box = page.locator(f".st-key-{key} input")
    box.wait_for()
    box.fill(text)
    if commit:
        box.press("Enter")
        wait_for_script(page)


def until_text(page, text: str, timeout: float, what: str, failed: str | None = None) -> None:
    """Wait until the page shows ``text`` (fail at once if it shows ``failed``)."""
    deadline = time.monotonic() + timeout
    while text not in (shown := main_text(page)):
        assert not (failed and failed in shown), shown[-2000:]
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {shown[-2000:]}"
        time.sleep(0.5)


def until(page, check, refresh: str | None, timeout: float, what: str) -> None:
    """Click the ``refresh`` button until ``check()`` holds."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {main_text(page)[-2000:]}"
        if refresh:
            click(page, refresh)
        time.sleep(0.5)
        wait_for_script(page)


def seed_table(page) -> str:
    """The test send's table, as shown."""
    return page.locator("[data-testid=stTable]").first.inner_text()


def outstanding(home: Path, campaign_id: int) -> int:
    """The campaign's messages still to be sent, or being sent."""
    return query(home, "select count(*) from messages where campaign_id = ? and state in ('planned', 'sending')",
                 campaign_id)[0][0]  # fmt: skip


def unrecorded(home: Path, sandbox: str, campaign_id: int) -> set[str]:
    """The sids of the campaign's messages that the sandbox settled (delivered or not) and the
    outbox knows, whose final status is not in the store yet."""
    final = {
        sid
        for (sid,) in query(
            home,
            "select m.provider_message_id from messages as m join message_status_events as e using (message_id)"
            " where m.campaign_id = ? and e.status in ('delivered', 'undelivered', 'failed')",
            campaign_id,
        )
    }
    known = {sid for (sid,) in query(home, "select provider_message_id from messages where campaign_id = ?",
                                     campaign_id)}  # fmt: skip
    settled = {
        m["sid"]
        for m in sandbox_record(sandbox, fair_numbers(home))
        if m["status"] in ("delivered", "undelivered", "failed")
    }
    return (settled & known) - final


def percent(text: str) -> float:
    return float(text.replace("%", "").replace(",", ".").strip()) / 100


def sandbox_get(sandbox: str, path: str):
    answer = httpx.get(f"{sandbox}{path}", auth=(SANDBOX_ACCOUNT_SID, SANDBOX_AUTH_TOKEN), timeout=10)
    answer.raise_for_status()
    return answer.json()


def receipts_pending(sandbox: str) -> int:
    return sandbox_get(sandbox, "/sandbox/health")["receipts"]["pending"]


def fair_numbers(home: Path) -> set[str]:
    """The numbers of the fair's visitors, as stored by the import."""
    return {phone for (phone,) in query(home, "select phone_e164 from contacts where attributes like ?",
                                        f"%{SOURCE}%")}  # fmt: skip


def sandbox_record(sandbox: str, numbers: set[str]) -> list[dict]:
    """What the sandbox accepted for ``numbers``: each message with its status and the journal of
    its receipts."""
    return [m for m in sandbox_get(sandbox, "/sandbox/messages") if m["to"] in numbers]


def late_for_build(message: dict, known: set[str], build_started: datetime) -> bool:
    """Whether the sandbox's final receipt of ``message`` was late for a build started at
    ``build_started``: the receiver had not taken it by then, or the outbox did not know the
    message's sid (the sandbox accepted it while answering with a simulated outage, so only a
    lookup at the provider can match its receipt)."""
    if message["sid"] not in known:
        return True
    final = [r for r in message["receipts"] if r["status"] == message["status"]]
    taken = [r for r in final if r["outcome"] == "delivered"]
    return not taken or min(datetime.fromisoformat(r["attempts"][-1]["at"]) for r in taken) >= build_started


class Shots:
    """Screenshots of each step, numbered, into one folder."""

    def __init__(self, page, folder: Path) -> None:
        self.page, self.folder, self.n = page, folder, 0
        folder.mkdir(parents=True, exist_ok=True)

    def __call__(self, name: str) -> None:
        self.n += 1
        self.page.screenshot(path=str(self.folder / f"{self.n:02d}-{name}.png"), full_page=True)


def test_a_new_user_imports_targets_composes_tests_launches_and_reads_the_delivery(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("SMSOPS_HOME", str(home))
    port = free_port()
    link_base = f"http://127.0.0.1:{port}/l/"
    monkeypatch.setenv("SMSOPS_LINK_BASE", link_base)  # the app plans, serve sends: the same base
    monkeypatch.setenv("SMSOPS_SEED_NUMBERS", SEED)  # the team's own phones, as deployed
    sandbox = f"http://127.0.0.1:{free_port()}"
    export = tmp_path / "crm-export.csv"
    export.write_bytes(crm_export())
    with (
        streamlit_server(home) as url,
        smsops_serve(home, port, SMSOPS_SANDBOX_FAULTS="on", SANDBOX_URL=sandbox),
        chromium_page() as page,
    ):
        page.set_viewport_size({"width": 1400, "height": 1800})
        shot = Shots(page, tmp_path / "journey")
        journey(page, shot, url, sandbox, home, export)


def journey(page, shot, url: str, sandbox: str, home: Path, export: Path) -> None:
    # -- import the CRM export, with marketing consent ------------------------------------------
    page.goto(f"{url}/contacts")
    wait_for_script(page)
    page.get_by_role("tab", name="Import a file").click()
    page.locator(".st-key-import_upload input[type=file]").set_input_files(str(export))
    page.locator(".st-key-consent_declared").wait_for()
    wait_for_script(page)
    page.locator(".st-key-consent_declared label").click()
    type_into(page, "consent_source", "анкета на весенней ярмарке")
    type_into(page, "consent_proof", "бумажные анкеты, папка 2025-04")
    no_exception(page, "import preview")
    metric_shows(page, "New", "30")
    metric_shows(page, "Rejected", "1")
    assert "the phone number is not a valid number" in main_text(page)
    shot("import-preview")
    click(page, "import_start")
    click(page, "import_confirmed")
    page.get_by_text("Imported crm-export.csv: 30 new").wait_for(timeout=30_000)
    assert "Marketing consent recorded for 30 numbers" in main_text(page)
    shot("import-done")
    until_text(page, "The new contacts can be targeted now", BUILD_TIMEOUT, "the build after the import",
               failed="The warehouse build failed")  # fmt: skip
    no_exception(page, "import")
    shot("import-built")

    # a look at Compose before there is a segment to send to (its list must not stay so)
    page.goto(f"{url}/compose")
    wait_for_script(page)
    no_exception(page, "compose before a segment")

    # -- a segment of the fair's visitors, from the custom column -------------------------------
    page.goto(f"{url}/segments")
    wait_for_script(page)
    first_rule = page.locator("[class*='st-key-r'][class*='_field']").first
    rule = re.search(r"st-key-(r[0-9a-f]{8})_field", first_rule.get_attribute("class")).group(1)
    first_rule.click()
    page.keyboard.type("Источник")
    page.get_by_role("option", name="Источник").click()
    wait_for_script(page)
    page.locator(f"[class*='st-key-{rule}_value_custom']").click()
    page.get_by_role("option", name=SOURCE, exact=True).click()
    wait_for_script(page)
    no_exception(page, "segments")
    metric_shows(page, "Contacts that match the segment", str(FAIR_VISITORS))
    metric_shows(page, "Reachable for promotions now", str(FAIR_VISITORS))
    type_into(page, "seg_name", SEGMENT, commit=False)
    page.get_by_role("button", name="Save segment").click()
    page.get_by_text(f"Saved «{SEGMENT}», version 1").wait_for()
    shot("segment")

    # -- compose: a field and a tracked link from the palette, no template syntax typed ---------
    page.goto(f"{url}/compose")
    wait_for_script(page)
    choose(page, "compose_audience", f"{SEGMENT} (v1)")
    text = page.locator(".st-key-compose_text textarea")
    text.fill("")
    text.press("Control+Enter")
    wait_for_script(page)
    choose(page, "compose_field", "First name")
    type_into(page, "compose_if_empty", "Здравствуйте")
    click(page, "compose_insert_field")
    expect(text).to_have_value("{{ first_name | default('Здравствуйте') }}")
    wait_for_script(page)
    text.fill(text.input_value() + ", на ярмарке вы просили сообщить о распродаже: скидка 20% до воскресенья")
    text.press("Control+Enter")
    wait_for_script(page)
    type_into(page, "compose_link", SHOP)
    click(page, "compose_insert_link")
    expect(text).to_have_value(re.compile(re.escape(f"{{{{ link('{SHOP}') }}}}") + "$"))
    wait_for_script(page)
    no_exception(page, "compose")
    body = text.input_value()
    assert body == ("{{ first_name | default('Здравствуйте') }}, на ярмарке вы просили сообщить о распродаже: "
                    f"скидка 20% до воскресенья {{{{ link('{SHOP}') }}}}"), body  # fmt: skip
    metric_shows(page, "Recipients reachable now", str(FAIR_VISITORS))
    shown = main_text(page)
    parts = metric(page, "Segments", first=True)  # of the message as sent, as a rewrite's button counts
    assert all(before == parts for before in re.findall(r"(?:look-alikes|Transliterate) \((\d+) →", shown)), (
        shown
    )
    personalised = re.findall(
        r"^(\w+), на ярмарке вы просили .* http://127\.0\.0\.1:\d+/l/\w+ Отказ: СТОП$", shown, re.M
    )
    assert "Здравствуйте" in personalised and set(personalised) & set(NAMES), shown  # no name: the fallback
    shot("compose")
    click(page, "compose_to_campaign")

    # -- the campaign, created from Compose: only a name and the quiet hours to give ------------
    page.locator(".st-key-new_name input").wait_for()
    wait_for_script(page)
    assert page.locator(".st-key-new_text_A textarea").input_value() == body
    assert "From Compose" in main_text(page) and "No campaigns yet" in main_text(page)
    type_into(page, "new_name", CAMPAIGN)
    type_into(page, "new_quiet", "off")  # the test runs at any hour
    shot("campaign-form")
    click(page, "new_create")
    page.get_by_text(f"Draft «{CAMPAIGN}» created").wait_for(timeout=30_000)
    (campaign_id,) = query(home, "select campaign_id from campaigns where name = ?", CAMPAIGN)[0]

    # -- a test send to the team's seed number, delivered -----------------------------------
    page.get_by_role("tab", name="Test and launch").click()
    wait_for_script(page)
    assert page.locator(".st-key-seed_numbers input").input_value() == SEED  # as deployed
    assert "Quiet hours off ·" in main_text(page)
    click(page, "test_send")
    page.get_by_text("personalised with the data of contact").wait_for(timeout=30_000)
    until(page, lambda: "delivered" in seed_table(page), "test_refresh", 60, "the test's receipt")
    assert "+7 999 ***-**-01" in seed_table(page) and SEED not in main_text(page)
    shot("test-send")

    # -- launch, through the dialog ---------------------------------------------------------
    metric_shows(page, "Planned", str(FAIR_VISITORS))
    click(page, "launch_start")
    dialog = page.get_by_role("dialog")
    dialog.wait_for()
    for box in dialog.locator("[data-testid=stCheckbox] label").all():  # what needs a person's yes
        box.click()
    shot("launch-dialog")
    click(page, "launch_confirmed")
    page.get_by_text(f"Campaign {campaign_id} launched: {FAIR_VISITORS} messages planned").wait_for(
        timeout=60_000
    )

    # -- smsops serve sends it; the receipts come back ----------------------------------------
    page.get_by_role("tab", name="Follow").click()
    wait_for_script(page)
    # the progress updates itself while the campaign sends: nothing to click
    until_text(
        page, f"{FAIR_VISITORS} of {FAIR_VISITORS} planned messages done", 90, "the progress to show it sent"
    )
    assert outstanding(home, campaign_id) == 0
    wait_until(lambda: receipts_pending(sandbox) == 0, 60, "the sandbox's receipts to be posted")
    wait_until(lambda: not unrecorded(home, sandbox, campaign_id), 60, "the receipts to be recorded")
    shot("follow")

    # -- the metrics refreshed as the app does it; Results against the sandbox's own record -----
    page.goto(f"{url}/results")
    wait_for_script(page)
    caption = page.get_by_text("Figures from warehouse build").inner_text()
    known = {sid for (sid,) in query(home, "select provider_message_id from messages where campaign_id = ?"
                                     " and provider_message_id is not null", campaign_id)}  # fmt: skip
    build_started = datetime.now(UTC)
    click(page, "refresh_metrics")
    page.wait_for_function(
        "old => !document.body.innerText.includes(old) && document.body.innerText.includes('Figures from')",
        arg=caption,
        timeout=BUILD_TIMEOUT * 1000,
    )
    wait_for_script(page)
    no_exception(page, "results")
    picked = page.locator(".st-key-results_pick input").input_value()
    assert picked.startswith(f"{CAMPAIGN} (id {campaign_id},"), picked
    shot("results")

    record = sandbox_record(sandbox, fair_numbers(home))
    delivered = [m for m in record if m["status"] == "delivered"]
    settled = [m for m in record if m["status"] in ("delivered", "undelivered", "failed")]
    late = [m for m in settled if late_for_build(m, known, build_started)]
    late_delivered = [m for m in late if m["status"] == "delivered"]
    shown_delivered = number(metric(page, "Delivered"))
    shown_rate = percent(metric(page, "Delivery rate"))
    said = (f"Results: {shown_delivered} delivered ({shown_rate:.1%}); the sandbox: {len(delivered)} of "
            f"{len(settled)} settled, {len(late)} of them late for the build")  # fmt: skip
    assert len(settled) == len(record) == len({m["to"] for m in record}), said  # all settled, none twice
    assert 0 < len(delivered) <= FAIR_VISITORS - 3, said  # the …97, …98 and …99 never arrive
    assert len(delivered) - len(late_delivered) <= shown_delivered <= len(delivered), said
    low = (len(delivered) - len(late_delivered)) / len(settled)
    high = len(delivered) / max(1, len(settled) - len(late))
    rounding = 0.0005  # the page shows a rate to a tenth of a percent
    assert low - rounding <= shown_rate <= min(1.0, high) + rounding, said
    accepted, sent = {m["sid"] for m in record}, number(metric(page, "Sent"))
    assert len(accepted & known) <= sent <= len(accepted), said  # sent: what the outbox knows was
