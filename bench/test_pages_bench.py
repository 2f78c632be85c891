"""Every page's script run and every main click, on the 1,000,000-contact demo base.

Run with `pytest -m bench -s bench/test_pages_bench.py -p no:cacheprovider` after
`SMSOPS_HOME=/tmp/big smsops demo --contacts 1000000 && SMSOPS_HOME=/tmp/big smsops build`
(or point SMSOPS_BENCH_HOME at another built home). The demo base has campaigns running.

Targets (issue 15, DESIGN.md): every page's script run ≤ 0.5 s warm and ≤ 1.5 s cold, every
button or tab ≤ 1 s, a launch dialog ≤ 2 s. Each page is run in Streamlit's AppTest, in this
process, as a browser session would run it (app.py first, then the page, Russian):

- **cold**: the first run of the page after every Streamlit cache was cleared and the pooled
  warehouse connections closed (a server that has just started);
- **warm**: the median (and the slowest) of ``ROUNDS`` reruns of the same page with nothing
  changed (what every widget interaction costs at least);
- **actions**: the rerun a click or an input causes, each timed from the interaction to the end
  of the script run, repeated ``ROUNDS`` times where it can be repeated.

The figures include AppTest's own work (a few ms per run: measured here as the run of an empty
script, the ``baseline`` row) and are written as a table to stdout for docs/performance.md.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import copy_big_home  # bench/conftest.py
from streamlit.testing.v1 import AppTest

from smsops import campaigns, i18n, jobs, segments, warehouse

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import apptest

pytestmark = pytest.mark.bench

ROUNDS = int(os.environ.get("SMSOPS_BENCH_PAGE_ROUNDS", "5"))
PAGES = ["overview", "segments", "compose", "contacts", "campaigns", "results"]
TARGET_WARM, TARGET_COLD, TARGET_CLICK, TARGET_DIALOG = 0.5, 1.5, 1.0, 2.0
TARGET_BACKGROUND = float("inf")  # work off the page: measured, with progress shown meanwhile

rows: list[tuple[str, str, float, float, float]] = []
"""(page, what, median s, slowest s, target s) for the table."""


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    target = copy_big_home(tmp_path_factory.mktemp("pages"), snapshot=False)
    saved = {k: os.environ.get(k) for k in ("SMSOPS_HOME", "SMSOPS_LANGUAGE")}
    os.environ["SMSOPS_HOME"] = str(target)
    os.environ["SMSOPS_LANGUAGE"] = "ru"
    with i18n.language("ru"):
        yield target
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    segments.close_connections()


def timed(run: Callable[[], object]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def record(page: str, what: str, seconds: list[float], target: float) -> None:
    rows.append((page, what, statistics.median(seconds), max(seconds), target))
    print(f"{page:>10} {what:<48} median {statistics.median(seconds):6.3f} s  slowest {max(seconds):6.3f} s")


def fresh(page: str) -> tuple[AppTest, float]:
    """The page opened as a new browser session on a server that has just started."""
    apptest.clear_caches()
    at = AppTest.from_file(str(apptest.APP), default_timeout=300)
    at.run()
    at.switch_page(f"pages/{page}.py")
    cold = timed(at.run)
    assert not at.exception, at.exception
    return at, cold


def repeat(at: AppTest, act: Callable[[AppTest], object], rounds: int = ROUNDS) -> list[float]:
    seconds = []
    for _ in range(rounds):
        seconds.append(timed(lambda: act(at)))
        assert not at.exception, at.exception
    return seconds


def choose_each(at: AppTest, key: str, values: list) -> list[float]:
    """Choose each of ``values`` (the widget's own values, not their labels) in turn, up to
    ``ROUNDS``, timing each rerun."""
    seconds = []
    for value in values[:ROUNDS]:
        seconds.append(timed(lambda v=value: at.selectbox(key=key).set_value(v).run()))
        assert not at.exception, at.exception
    return seconds


def test_baseline_an_empty_script(tmp_path):
    script = tmp_path / "empty.py"
    script.write_text("import streamlit as st\nst.write('x')\n")
    at = AppTest.from_file(str(script))
    at.run()
    record("—", "baseline: AppTest running an empty script", repeat(at, lambda a: a.run()), TARGET_WARM)


@pytest.mark.parametrize("page", PAGES)
def test_page_cold_and_warm(home, page):
    at, cold = fresh(page)
    record(page, "cold", [cold], TARGET_COLD)
    record(page, "warm rerun", repeat(at, lambda a: a.run()), TARGET_WARM)


def test_overview_actions(home):
    at, _ = fresh("overview")
    seconds = [timed(lambda d=d: at.button_group(key="days").set_value(d).run()) for d in (7, 90, 30)]
    record("overview", "choose the period", seconds, TARGET_CLICK)


def test_segments_actions(home):
    at, _ = fresh("segments")
    record(
        "segments",
        "add a rule (count shown again)",
        repeat(at, lambda a: a.button(key="seg_add_rule").click().run(), 3),
        TARGET_CLICK,
    )
    seconds = choose_each(at, "seg_start", [f"ready:{key}" for key in segments.ready_made()])
    record("segments", "start from a ready-made segment", seconds, TARGET_CLICK)


def test_compose_actions(home):
    at, _ = fresh("compose")
    texts = [
        f"{{{{ first_name }}}}, скидка {n}% только сегодня по ссылке {{{{ link('https://shop.example.ru/sale') }}}}"
        for n in range(10, 10 + ROUNDS)
    ]
    seconds = [timed(lambda t=t: at.text_area(key="compose_text").input(t).run()) for t in texts]
    record("compose", "type a text (preview and bill)", seconds, TARGET_CLICK)
    seconds = choose_each(at, "compose_audience", list(campaigns.audiences())[1:])
    record("compose", "choose another audience", seconds, TARGET_CLICK)


def test_contacts_actions(home):
    at, _ = fresh("contacts")
    queries = ["Иван", "Смирнова", "+7 912", "CRM-0001234", "Анна Петрова"][:ROUNDS]
    seconds = [timed(lambda q=q: at.text_input(key="contact_search").input(q).run()) for q in queries]
    record("contacts", "search", seconds, TARGET_CLICK)


def launched_campaigns() -> list[int]:
    listing = campaigns.list_all()
    return [
        int(c)
        for c, status in zip(listing["campaign_id"], listing["status"], strict=True)
        if status != "draft"
    ]


def test_campaigns_actions(home):
    draft = campaigns.create(
        "Bench: everyone reachable",
        "promo",
        segments.Segment("everyone", segments.all_of()),
        [
            campaigns.Variant(
                "A", "{{ first_name | default('Здравствуйте') }}, скидка 15% для вас", "SHOPMARKET"
            )
        ],
    )
    launched = launched_campaigns()
    at, _ = fresh("campaigns")
    seconds = [timed(lambda: at.selectbox(key="launch_pick").set_value(draft.campaign_id).run())]
    record("campaigns", "pick a 1M-contact draft (the page answers)", seconds, TARGET_CLICK)
    # its dry run goes on in the background; the page shows progress and reruns when it is done
    started = time.perf_counter()
    background = until_done(jobs.key("preview", draft.campaign_id, warehouse.current().build_id))
    record(
        "campaigns",
        "… its waterfall and bill, in the background",
        [background + seconds[0]],
        TARGET_BACKGROUND,
    )
    record("campaigns", "… the page with them", [timed(at.run)], TARGET_CLICK)
    print(f"(waited {time.perf_counter() - started:.1f} s for the dry run)")
    record(
        "campaigns",
        "open the launch dialog",
        [timed(lambda: at.button(key="launch_start").click().run())],
        TARGET_DIALOG,
    )
    for box in at.checkbox:  # the bill of a million messages asks for a yes
        if box.key and box.key.startswith("launch_confirm_"):
            box.check()
    at.run()
    record(
        "campaigns",
        "launch (the page answers)",
        [timed(lambda: at.button(key="launch_confirmed").click().run())],
        TARGET_CLICK,
    )
    background = until_done(jobs.key("launch", draft.campaign_id))
    record("campaigns", "… the launch of 1M recipients, in the background", [background], TARGET_BACKGROUND)
    record("campaigns", "… the page saying it launched", [timed(at.run)], TARGET_CLICK)
    assert any("запущена" in s.value or "launched" in s.value for s in at.success), [
        s.value for s in at.success
    ]
    seconds = choose_each(at, "follow_pick", launched)
    if seconds:
        record("campaigns", "follow a campaign", seconds, TARGET_CLICK)


def until_done(key: str, timeout: float = 600) -> float:
    """Seconds until the background job ``key`` finished."""
    started = time.perf_counter()
    while (status := jobs.get(key)) is not None and status.running:
        assert time.perf_counter() - started < timeout
        time.sleep(0.05)
    return time.perf_counter() - started


def test_results_actions(home):
    launched = launched_campaigns()[1:]
    at, _ = fresh("results")
    seconds = choose_each(at, "results_pick", launched)
    record("results", "pick a campaign", seconds, TARGET_CLICK)


def test_zz_table():
    """The table for docs/performance.md (runs last: pytest keeps the file's order)."""
    print("\n| Page | What | Median | Slowest | Target |\n|---|---|---|---|---|")
    for page, what, median, slowest, target in rows:
        mark = "" if slowest <= target else " **over**"
        bound = "in the background, with progress" if target == TARGET_BACKGROUND else f"≤ {target:g} s"
        print(f"| {page} | {what} | {median:.3f} s | {slowest:.3f} s{mark} | {bound} |")
