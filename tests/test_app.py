"""Pages through Streamlit's AppTest, over the session's built demo warehouse."""

from __future__ import annotations

import json
import re

import pyarrow as pa
import pytest
from apptest import clear_caches, metric_values, open_page

from smsops import charts, i18n, metrics, store, warehouse


@pytest.fixture(autouse=True)
def fresh_caches():
    clear_caches()
    yield
    clear_caches()


@pytest.fixture(autouse=True)
def english():
    """The charts speak the current language: these tests read them in English."""
    with i18n.language("en"):
        yield


def test_overview_shows_the_base_and_messaging_figures(built_env):
    at = open_page()
    values = metric_values(at)
    ov = metrics.overview(30)
    assert values["Contacts"] == f"{ov.contacts:,}"
    assert values["Reachable for marketing"] == f"{ov.reachable:,}"
    assert values["Messages sent"] == f"{ov.sent:,}"
    assert values["Delivery rate"].endswith("%")
    assert {"CTR", "Opt-out rate", "Conversions", "Revenue attributed", "Cost"} <= set(values)
    assert ov.contacts > ov.reachable > 0


def test_overview_period_changes_the_window(built_env):
    at = open_page()
    thirty = metric_values(at)["Messages sent"]
    at.button_group(key="days").set_value(90).run()
    ninety = metric_values(at)["Messages sent"]
    assert int(ninety.replace(",", "")) > int(thirty.replace(",", ""))
    assert any("last 90 days" in s.value for s in at.subheader)


def test_overview_before_the_first_build_says_what_to_do(home):
    at = open_page()
    assert not at.metric
    assert any("smsops build" in i.value for i in at.info)


def test_chart_builders_title_and_label_their_axes(built_env):
    daily = charts.daily_activity_chart(metrics.daily_activity(90)).to_dict()
    assert daily["title"] == "Messages per day"
    assert daily["encoding"]["x"]["title"] and daily["encoding"]["y"]["title"] == "Messages"
    mix = metrics.consent_mix()
    assert list(mix["consent_state"]) == list(metrics.CONSENT_ORDER)
    assert mix["contacts"].sum() == metrics.overview().contacts
    assert charts.consent_mix_chart(mix).to_dict()["encoding"]["x"]["title"] == "Contacts"


def test_overview_reads_the_newest_published_build(built_env):
    at = open_page()
    caption = " ".join(c.value for c in at.caption)
    assert warehouse.current().build_id in caption


# --- the screens in Russian -------------------------------------------------------------------

MISSING_MARKERS = re.compile(r"\b(None|nan|NaN|NaT|null)\b")
SNAKE_CASE = re.compile(r"\b[a-z]+_[a-z_]+\b")
ICON = re.compile(r":material/[a-z_]+:")
TECHNICAL = {"api_id"}  # SMS.ru's own name for its key, in an error code's advice
LATIN_WORDS = re.compile(r"\b[A-Za-z]{2,}\b")
NOT_ENGLISH = {"CTR", "ROI", "RFM", "SMS", "CSV", "UTC", "HEAD", "dbt"}
"""Latin words a Russian screen may show: abbreviations and names."""


def visible_texts(at) -> dict[str, list[str]]:
    """What a person reads on the page (the main area: the sidebar's language switch is
    bilingual on purpose), by kind: ``words`` (titles, labels, headers, captions, messages,
    metric values and help, chart titles) and ``cells`` (what the tables show)."""
    page = at.main
    words: list[str] = []
    for kind in (
        "title",
        "header",
        "subheader",
        "caption",
        "markdown",
        "info",
        "success",
        "warning",
        "error",
    ):
        words += [e.value for e in page.get(kind)]
    for m in page.metric:
        words += [m.label, m.value, m.proto.help]
    for kind in ("selectbox", "toggle", "button", "download_button", "button_group"):
        for w in page.get(kind):
            words.append(w.proto.label)
            words += [getattr(o, "content", o) for o in getattr(w.proto, "options", [])]
    for chart in page.get("vega_lite_chart"):
        words += charts_titles(json.loads(chart.proto.spec))
    cells: list[str] = []
    for frame in page.dataframe:
        columns = json.loads(frame.proto.columns)
        words += [c["label"] for c in columns.values() if c.get("label")]
        shown = frame.proto.arrow_data.styler.display_values
        assert shown, "a table's values are formatted for the locale (results.shown)"
        cells += [str(v) for v in pa.ipc.open_stream(shown).read_pandas().to_numpy().ravel()]
    return {"words": [w for w in words if w], "cells": cells}


def charts_titles(spec: dict) -> list[str]:
    found = []
    if isinstance(spec, dict):
        for key, value in spec.items():
            if key == "title" and isinstance(value, str):
                found.append(value)
            elif key not in ("datasets", "data"):
                found += charts_titles(value)
    elif isinstance(spec, list):
        for item in spec:
            found += charts_titles(item)
    return found


def assert_reads_as_russian(texts: dict[str, list[str]], data: set[str] = frozenset()) -> None:
    """No None/nan, no raw snake_case code, and no English word outside ``data`` (names of
    things the user typed, such as campaign names) and the abbreviations Russian screens use."""
    for text in texts["words"] + texts["cells"]:
        assert not MISSING_MARKERS.search(text), f"a missing value shown raw in {text!r}"
        codes = set(SNAKE_CASE.findall(ICON.sub("", text))) - TECHNICAL
        assert not codes, f"raw code {codes} in {text!r}"
    for text in texts["words"]:
        for name in data:
            text = text.replace(name, "")
        english = set(LATIN_WORDS.findall(ICON.sub("", text))) - NOT_ENGLISH
        assert not english, f"English {english} left in {text!r}"


@pytest.fixture
def russian(monkeypatch):
    """The deployment speaks Russian; so does the test's own thread, where AppTest formats a
    widget's options to set its value."""
    monkeypatch.setenv("SMSOPS_LANGUAGE", "ru")
    with i18n.language("ru"):
        yield


def test_overview_speaks_russian_without_codes_or_missing_markers(built_env, russian):
    at = open_page()
    assert at.title[0].value == "Обзор"
    for days in (7, 30, 90):
        at.button_group(key="days").set_value(days).run()
        assert not at.exception, at.exception
        texts = visible_texts(at)
        assert_reads_as_russian(texts)
        values = metric_values(at)
        ov = metrics.overview(days)
        assert values["Контакты"] == i18n.number(ov.contacts) == f"{ov.contacts:,}".replace(",", " ")
        assert values["Стоимость"] == i18n.money(ov.cost, digits=0) and values["Стоимость"].endswith(" ₽")
        assert values["Доставляемость"].endswith(" %")
    assert any(s.value == "Рассылки за последние 90 дней" for s in at.subheader)


def test_overview_of_an_empty_base_in_russian_shows_dashes_and_notes(home, russian):
    store.open_store(home).close()
    warehouse.build(home)
    at = open_page()
    texts = visible_texts(at)
    assert_reads_as_russian(texts)
    values = metric_values(at)
    assert values["Контакты"] == "0" and values["Доставляемость"] == "—" and values["CTR"] == "—"
    notes = [json.loads(c.proto.spec).get("mark", {}) for c in at.get("vega_lite_chart")]
    assert [n.get("type") for n in notes] == ["text", "text"], "empty charts are notes, not bare axes"
