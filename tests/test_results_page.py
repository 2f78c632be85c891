"""The Results page (AppTest): pick a campaign, see its funnel and verdict; refresh the metrics in
the background, once however often the button is clicked."""

from __future__ import annotations

import re
import shutil
import time

import apptest
import pytest
from apptest import clear_caches, metric_values
from streamlit.testing.v1 import AppTest
from test_app import assert_reads_as_russian, visible_texts

from smsops import campaigns, config, i18n, results, segments, store, warehouse

TEXT = "{{ first_name | default('Здравствуйте') }}, новая коллекция уже в магазине"


def open_page(page: str, timeout: float = 60) -> AppTest:
    return apptest.open_in_app(page, timeout)


def offered(at, campaign_id: int) -> int:
    """``campaign_id``, once the campaign picker offers it (its options are ids shown as labels)."""
    assert any(re.search(rf"\((id|№) {campaign_id},", o) for o in at.selectbox(key="results_pick").options)
    return campaign_id


def messages_shown(at) -> list[str]:
    return [e.value for e in [*at.success, *at.info]]


@pytest.fixture(autouse=True)
def english():
    """What smsops.results says follows the current language: these tests read it in English."""
    with i18n.language("en"):
        yield


@pytest.fixture
def shown_env(built_env):
    clear_caches()
    yield built_env
    clear_caches()


@pytest.fixture
def own_home(built_home, tmp_path, monkeypatch):
    """A copy of the session's built home: this test plans a campaign and builds."""
    home = tmp_path / "home"
    shutil.copytree(built_home, home)
    monkeypatch.setenv("SMSOPS_HOME", str(home))
    clear_caches()
    yield home
    clear_caches()


def test_without_a_build_the_page_says_how_to_make_one(home):
    clear_caches()
    at = open_page("results")
    assert any("has not been built yet" in i.value for i in at.info)


def test_a_build_without_launched_campaigns_says_where_to_launch_one(home):
    store.open_store(home).close()
    warehouse.build(home)
    clear_caches()
    at = open_page("results")
    assert any("No launched campaign in this build yet" in i.value for i in at.info)
    assert not at.get("selectbox")


def test_the_page_shows_the_funnel_and_verdict_of_the_picked_campaign(shown_env):
    cid = next(
        int(c)
        for c in results.campaigns_with_results()["campaign_id"]
        if results.verdict(int(c), "ctr") is not None
    )
    funnel = results.funnel(cid)
    at = open_page("results", timeout=120)
    assert any(warehouse.current().build_id in c.value for c in at.caption)
    assert any("sandbox" in c.value for c in at.caption)
    at.selectbox(key="results_pick").set_value(offered(at, cid)).run()
    assert not at.exception, at.exception
    shown = metric_values(at)
    assert shown["Sent"] == f"{funnel.sent:,}"
    assert shown["Delivered"] == f"{funnel.delivered:,}"
    assert shown["Clicked"] == f"{funnel.clicked:,}"
    assert shown["Converted"] == f"{funnel.converted:,}"
    # receipts still to come stand apart from "not delivered"; link previews apart from people
    assert shown["Awaiting receipt"] == f"{funnel.awaiting_receipt:,}"
    assert shown["Not delivered"] == f"{funnel.undelivered + funnel.failed:,}"
    assert shown["Delivery rate"] == f"{funnel.delivered / funnel.settled:.1%}"
    assert funnel.prefetch_clicks > 0 and shown["Link previews"] == f"{funnel.prefetch_clicks:,}"
    helps = {m.label: m.proto.help for m in at.metric}
    assert "may still come" in helps["Awaiting receipt"] and "settled" in helps["Delivery rate"]
    assert "left out of the clicks and the CTR" in helps["Link previews"]
    assert results.verdict(cid, "ctr").message in messages_shown(at)
    at.segmented_control(key="results_metric").set_value("conversion").run()
    assert results.verdict(cid, "conversion").message in messages_shown(at)
    assert at.get("download_button"), "the CSV export is offered"


def test_refresh_builds_in_the_background_once_and_shows_a_campaign_with_nothing_sent(own_home):
    created = campaigns.create(
        "Only planned",
        "promo",
        segments.ready_made()["champions"],
        [campaigns.Variant("A", TEXT, config.senders()[0])],
    )
    campaigns.plan(created.campaign_id)  # no dispatcher runs here: nothing is sent
    before = warehouse.current().build_id
    at = open_page("results", timeout=120)
    assert not any(f"(id {created.campaign_id}," in o for o in at.selectbox(key="results_pick").options)

    at.button(key="refresh_metrics").click().run()
    assert not at.exception, at.exception
    at.button(key="refresh_metrics").click().run()  # a second click while it runs starts nothing
    assert not at.exception, at.exception
    assert at.button(key="refresh_metrics").disabled

    deadline = time.monotonic() + 240
    while (
        warehouse.current().build_id == before or warehouse.build_running()
    ) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert warehouse.current().build_id != before, "the refresh published a new build"
    log = (config.paths().dbt_artifacts / "background-build.log").read_text()
    assert log.count("refreshing campaign results") == 1, log
    assert "already running" not in log

    at.run()
    idle_by = time.monotonic() + 30  # the build process exits moments after it publishes
    while at.button(key="refresh_metrics").disabled and time.monotonic() < idle_by:
        time.sleep(0.5)
        at.run()
    assert not at.button(key="refresh_metrics").disabled
    assert any(warehouse.current().build_id in c.value for c in at.caption)
    at.selectbox(key="results_pick").set_value(offered(at, created.campaign_id)).run()
    assert not at.exception, at.exception
    assert any("Nothing sent yet for «Only planned»" in i.value for i in at.info)


@pytest.fixture
def russian(monkeypatch):
    """The deployment speaks Russian; so does the test's own thread, where AppTest formats a
    widget's options to set its value."""
    monkeypatch.setenv("SMSOPS_LANGUAGE", "ru")
    with i18n.language("ru"):
        yield


def test_every_campaign_section_and_table_reads_in_russian_without_codes_or_none(shown_env, russian):
    listing = results.campaigns_with_results()
    names = set(listing["campaign_name"])
    at = open_page("results", timeout=120)
    assert at.title[0].value == "Результаты"
    ab = next(int(c) for c in listing["campaign_id"] if results.verdict(int(c), "ctr") is not None)
    for cid in listing["campaign_id"]:
        at.selectbox(key="results_pick").set_value(offered(at, int(cid))).run()
        assert not at.exception, at.exception
        assert_reads_as_russian(visible_texts(at), names)
    at.selectbox(key="results_pick").set_value(ab).run()
    at.segmented_control(key="results_metric").set_value("conversion").run()
    at.toggle(key="results_reveal").set_value(True).run()
    for attribute in results.ATTRIBUTES:
        at.segmented_control(key="results_attribute").set_value(attribute).run()
        assert not at.exception, at.exception
        assert_reads_as_russian(visible_texts(at), names)
    shown = metric_values(at)
    funnel = results.funnel(ab)
    assert shown["Отправлено"] == i18n.number(funnel.sent)
    assert shown["Выручка"] == i18n.money(funnel.revenue, digits=0) and shown["Выручка"].endswith(" ₽")
    assert shown["Доставляемость"].endswith(" %")
    extra = next(m for m in at.metric if m.label.startswith("Доп. покупатели"))
    assert re.fullmatch(r"[+−]?\d+", extra.value), "extra buyers: a whole, signed estimate"
    assert "95%-й интервал" in extra.proto.help
    assert all(len(m.label) <= 26 for m in at.metric), "metric labels short enough not to be cut"
    assert any("в течение" in c.value for c in at.caption), "how soon people clicked, in words"
