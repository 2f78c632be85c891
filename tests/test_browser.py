"""The main journeys in a real browser: Debian's Chromium driven by Playwright."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from browser import CHROMIUM, chromium_page, streamlit_server, wait_for_script

from smsops import metrics, warehouse

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not os.path.exists(CHROMIUM), reason="Debian's chromium is not installed (make chromium)"
    ),
]


def test_overview_answers_in_a_browser_while_a_build_runs(built_home, tmp_path):
    ov = metrics.overview(30, home=built_home)
    before = warehouse.current(built_home)
    with streamlit_server(built_home) as url, chromium_page() as page:
        env = {**os.environ, "SMSOPS_HOME": str(built_home)}
        build = subprocess.Popen(
            [sys.executable, "-m", "smsops.cli", "build"], env=env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        try:
            time.sleep(1.5)  # let dbt start and take the new snapshot file
            page.goto(url)
            wait_for_script(page)
            page.wait_for_selector("[data-testid=stMetric]")
            contacts = page.locator("[data-testid=stMetric]", has_text="Contacts").first
            assert f"{ov.contacts:,}" in contacts.inner_text()
            assert page.locator("[data-testid=stMetric]", has_text="Messages sent").count() == 1
            page.locator("[data-testid=stVegaLiteChart]").nth(1).wait_for()
            page.screenshot(path=str(tmp_path / "overview.png"), full_page=True)
            assert build.poll() is None, (
                "the build finished before the page was checked: not a concurrency test"
            )
        finally:
            output, _ = build.communicate(timeout=300)
        assert build.returncode == 0, output
        assert warehouse.current(built_home).build_id != before.build_id
        # the next visit shows the new build
        page.reload()
        wait_for_script(page)
        page.wait_for_selector("[data-testid=stMetric]")
        assert (
            warehouse.current(built_home).build_id
            in page.locator("[data-testid=stCaptionContainer]").first.inner_text()
        )


def test_a_new_user_imports_a_messy_csv_and_sees_rejects_then_finds_a_contact(home, tmp_path):
    crm = tmp_path / "crm_export.csv"
    crm.write_bytes(
        "Телефон;ФИО;Город;Email\n"
        "8 (912) 345-67-89;Иванова Анна Сергеевна;Казань;anna@example.ru\n"
        "+7 926 111 22 33;Петров Борис;Москва;\n"
        "нет;Сидорова Вера;;\n"
        "8 (495) 123-45-67;Офис;Москва;\n".encode("cp1251")
    )
    with streamlit_server(home) as url, chromium_page() as page:
        page.goto(f"{url}/contacts")  # a first visit straight to a page gets the app's navigation
        wait_for_script(page)
        nav = page.locator("[data-testid=stSidebarNav]").inner_text()
        assert "Overview" in nav and "Contacts" in nav and "Compose" in nav  # app.py's navigation, not pages/
        page.get_by_role("tab", name="Import a file").click()
        page.locator("[data-testid=stFileUploaderDropzoneInput]").set_input_files(str(crm))
        page.locator("[data-testid=stMetric]", has_text="Rejected").wait_for()
        wait_for_script(page)
        assert "2" in page.locator("[data-testid=stMetric]", has_text="New").inner_text()
        assert "2" in page.locator("[data-testid=stMetric]", has_text="Rejected").inner_text()
        assert page.get_by_text("landline").count() >= 1
        page.locator(".st-key-import_start button").click()
        page.locator(".st-key-import_confirmed button").click()
        page.get_by_text("Imported crm_export.csv: 2 new").wait_for()
        page.get_by_role("tab", name="Find a contact").click()
        page.locator(".st-key-contact_search input").fill("Иванова")
        page.locator(".st-key-contact_search input").press("Enter")
        wait_for_script(page)
        page.get_by_role("heading", name="Анна Иванова").wait_for()
        wait_for_script(page)  # the card's metrics come after its heading in the same run
        page.locator("[data-testid=stMetric]", has_text="+7 912").wait_for()
        number = page.locator("[data-testid=stMetric]", has_text="Number").inner_text()
        assert "+7 912 ***-**-89" in number
        assert (
            "+79123456789" not in page.locator("[data-testid=stMain]").inner_text()
        )  # masked until revealed


def test_a_marketer_saves_a_segment_and_composes_a_message_for_it(built_home):
    with streamlit_server(built_home) as url, chromium_page() as page:
        page.goto(f"{url}/segments")
        wait_for_script(page)
        page.locator("[data-testid=stMetric]", has_text="Reachable for promotions").wait_for()
        page.locator(".st-key-seg_start").click()
        page.get_by_role("option", name="Ready-made: Bought before, not in the last 180 days").click()
        wait_for_script(page)
        page.locator("[data-testid=stMetric]", has_text="Contacts").first.wait_for()
        contacts = page.locator("[data-testid=stMetric]", has_text="Contacts").first.inner_text()
        assert int(contacts.split()[-1].replace(",", "")) > 0
        page.locator(".st-key-seg_name input").fill("Lapsed for the browser test")
        page.get_by_role("button", name="Save segment").click()
        page.get_by_text("version 1").wait_for()

        page.get_by_role("link", name="Compose").click()
        wait_for_script(page)
        page.locator(".st-key-compose_audience").click()
        page.get_by_role("option", name="Lapsed for the browser test (v1)").click()
        wait_for_script(page)
        box = page.locator(".st-key-compose_text textarea")
        box.fill("{{ first_name | default('Здравствуйте') }}, мы скучаем! Скидка 20% до воскресенья")
        box.press("Control+Enter")
        wait_for_script(page)
        page.get_by_text("мы скучаем! Скидка 20% до воскресенья Отказ: СТОП").first.wait_for()
        recipients = page.locator("[data-testid=stMetric]", has_text="Recipients").inner_text()
        assert int(recipients.split()[-1].replace(",", "")) > 0
        assert "RUB" in page.locator("[data-testid=stMetric]", has_text="Cost").inner_text()
