"""Every page and every tab in Chromium, in both languages, over the demo base: no exception,
no raw None/nan on screen, and nothing requested from outside the machine (issue 15, items 1,
5 and 7). One browser for all of it."""

from __future__ import annotations

import re

import pytest
from browser import chromium_page, streamlit_server, wait_for_script

pytestmark = pytest.mark.browser

PAGES = ("", "contacts", "segments", "compose", "campaigns", "results")
RAW = re.compile(r"(?<![\w.])(None|nan|NaN|NaT|<NA>)(?![\w.])")


def visible_text(page) -> str:
    return page.locator("[data-testid=stMain]").inner_text()


def check(page, where: str, problems: list[str]) -> None:
    wait_for_script(page)
    if page.locator("[data-testid=stException]").count():
        problems.append(
            f"{where}: exception: {page.locator('[data-testid=stException]').first.inner_text()[:300]}"
        )
    for match in RAW.finditer(visible_text(page)):
        text = visible_text(page)
        problems.append(
            f"{where}: {match.group(0)!r} on screen near {text[max(0, match.start() - 60) : match.end() + 60]!r}"
        )
        break


@pytest.mark.parametrize("language", ["ru", "en"])
def test_every_page_and_tab_opens_cleanly_and_loads_nothing_from_outside(
    built_home, language, tmp_path, monkeypatch
):
    monkeypatch.setenv("SMSOPS_LANGUAGE", language)
    problems: list[str] = []
    outside: set[str] = set()
    with streamlit_server(built_home) as url, chromium_page() as page:
        page.on(
            "request",
            lambda r: outside.add(r.url) if not r.url.startswith((url, "data:", "blob:", "about:")) else None,
        )
        for name in PAGES:
            page.goto(f"{url}/{name}")
            wait_for_script(page)
            check(page, name or "overview", problems)
            tabs = page.get_by_role("tab")
            for i in range(tabs.count()):
                tab = tabs.nth(i)
                if not tab.is_visible():
                    continue
                label = tab.inner_text().strip()
                tab.click()
                check(page, f"{name or 'overview'} › {label}", problems)
            page.screenshot(path=str(tmp_path / f"{language}-{name or 'overview'}.png"), full_page=True)
    assert not problems, "\n".join(problems)
    assert not outside, f"requests to other hosts: {sorted(outside)}"
