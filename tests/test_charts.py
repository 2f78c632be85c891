"""The chart builders as functions (AppTest cannot look into a chart): every quantitative axis has
a format, so an axis over zeros never reads "0.000000"; a chart with nothing to draw is a note;
the time-to-click axis is marked with short, spaced waits in the locale; every chart speaks the
current language."""

from __future__ import annotations

import itertools
import math
import re

import pandas as pd
import pytest

from smsops import charts, i18n, metrics, results


def days(n: int = 30, **counts: int) -> pd.DataFrame:
    frame = pd.DataFrame({"day": pd.date_range("2026-11-01", periods=n, name="day")})
    for column in ("messages_sent", "delivered", "clicks", "conversions"):
        frame[column] = counts.get(column, 0)
    frame["revenue"] = 0.0
    return frame


def rates(rate: str, values: list[float | None], key: str = "variant") -> pd.DataFrame:
    frame = pd.DataFrame({key: [f"v{i}" for i in range(len(values))], rate: values})
    frame[f"{rate}_low"] = [None if v is None else v / 2 for v in values]
    frame[f"{rate}_high"] = [None if v is None else v * 2 for v in values]
    return frame


def stages(sent: int, delivered: int = 0, clicked: int = 0, converted: int = 0) -> pd.DataFrame:
    return results.Funnel(
        campaign_id=1, campaign_name="x", campaign_status="finished", launched_at=None, audience=sent,
        holdout=0, suppressed=0, rejected=0, pending=0, sent=sent, delivered=delivered, undelivered=0,
        failed=0, settled=delivered, awaiting_receipt=sent - delivered, clicked=clicked, total_clicks=clicked,
        prefetch_clicks=0, replies=0, opt_outs=0, converted=converted, conversions=converted, revenue=0.0,
        cost=0.0,
    ).stages()  # fmt: skip


def clicks(minutes: list[int]) -> pd.DataFrame:
    n = len(minutes)
    return pd.DataFrame(
        {
            "minutes": minutes,
            "clickers": [1] * n,
            "cumulative_clickers": list(range(1, n + 1)),
            "cumulative_share": [(i + 1) / n for i in range(n)],
        }
    )


def mix(*counts: int) -> pd.DataFrame:
    return pd.DataFrame({"consent_state": list(metrics.CONSENT_ORDER), "contacts": list(counts)})


EMPTY = {
    "daily activity, nothing sent": lambda: charts.daily_activity_chart(days()),
    "daily activity, no days": lambda: charts.daily_activity_chart(days().iloc[:0]),
    "consent mix, no contacts": lambda: charts.consent_mix_chart(mix(0, 0, 0, 0, 0)),
    "funnel, nothing sent": lambda: charts.funnel_chart(stages(0)),
    "variants, nothing delivered": lambda: charts.variants_chart(rates("click_through_rate", [None, None])),
    "time to click, nobody clicked": lambda: charts.time_to_click_chart(clicks([])),
    "breakdown, nothing delivered": lambda: charts.breakdown_chart(
        rates("click_through_rate", [None], key="value").assign(delivered=0), "Country"
    ),
}
DRAWN = {
    "daily activity": lambda: charts.daily_activity_chart(days(messages_sent=3, delivered=2, clicks=1)),
    "daily activity, zeros in the window": lambda: charts.daily_activity_chart(
        pd.concat([days(29), days(1, messages_sent=1)], ignore_index=True)
    ),
    "consent mix": lambda: charts.consent_mix_chart(mix(10, 5, 0, 1, 2)),
    "funnel": lambda: charts.funnel_chart(stages(100, 90, 9, 1)),
    "funnel, nothing delivered yet": lambda: charts.funnel_chart(stages(100)),
    "variants, all at zero": lambda: charts.variants_chart(rates("click_through_rate", [0.0, 0.0])),
    "variants, one without a rate": lambda: charts.variants_chart(rates("conversion_rate", [0.05, None]), "conversion_rate"),
    "time to click": lambda: charts.time_to_click_chart(clicks([0, 1, 3, 40, 200, 3000])),
    "breakdown, all at zero": lambda: charts.breakdown_chart(
        rates("click_through_rate", [0.0, 0.0], key="value").assign(delivered=[5, 3]),
        i18n.label(results.ATTRIBUTES, "country"),
    ),
}  # fmt: skip


def specs(spec: dict) -> list[dict]:
    """The spec and its layers."""
    return [spec, *spec.get("layer", [])]


def quantitative_axes(spec: dict) -> list[tuple[str, dict]]:
    found = []
    for part in specs(spec):
        for channel, encoding in part.get("encoding", {}).items():
            if channel in ("x", "y") and encoding.get("type") == "quantitative":
                found.append((channel, encoding))
    return found


@pytest.mark.parametrize("build", EMPTY.values(), ids=EMPTY.keys())
@pytest.mark.parametrize("language", ["en", "ru"])
def test_a_chart_with_nothing_to_draw_is_a_note_under_its_title(build, language):
    with i18n.language(language):
        spec = build().to_dict()
    assert spec["title"]
    assert spec["mark"]["type"] == "text" and "layer" not in spec
    assert set(spec["encoding"]) == {"text"}, "no axes to show a lone 0 (or 0.000000) on"
    (note,) = next(iter(spec["datasets"].values()))
    assert note["note"].endswith(".")
    assert bool(re.search(r"[A-Za-z]", note["note"])) == (language == "en"), note["note"]


@pytest.mark.parametrize("build", DRAWN.values(), ids=DRAWN.keys())
def test_every_quantitative_axis_has_a_format_so_zeros_never_read_0_000000(build):
    spec = build().to_dict()
    axes = quantitative_axes(spec)
    assert axes, "a drawn chart has a quantitative axis"
    for channel, encoding in axes:
        axis = encoding.get("axis", {})
        assert axis.get("format") or axis.get("labelExpr"), f"{channel} of {spec['title']!r} has no format"
        assert "%" in axis.get("format", "~%") or axis.get("labelExpr") or axis["format"] == charts.COUNT
        assert encoding.get("title"), f"{channel} of {spec['title']!r} has no title"
    assert spec["title"]
    for part in specs(spec):  # counts and shares in tooltips are formatted too
        for tip in part.get("encoding", {}).get("tooltip", []):
            assert tip.get("title"), f"a tooltip of {spec['title']!r} has no title"
            if tip.get("type") == "quantitative":
                assert tip.get("format"), f"tooltip {tip['title']!r} of {spec['title']!r} has no format"


def test_a_variant_or_group_without_a_rate_is_left_out_not_drawn_at_nan():
    spec = charts.variants_chart(rates("conversion_rate", [0.05, None]), "conversion_rate").to_dict()
    (rows,) = spec["datasets"].values()
    assert [r["variant"] for r in rows] == ["v0"]


def symlog(minutes: float) -> float:
    return math.copysign(math.log1p(abs(minutes)), minutes)  # Vega's symlog with constant 1


@pytest.mark.parametrize(
    ("language", "expected"),
    [
        ("en", ["1 min", "5 min", "15 min", "1 hr", "4 hr", "1 day", "3 days"]),
        ("ru", ["1 мин", "5 мин", "15 мин", "1 ч", "4 ч", "1 дн.", "3 дн."]),
    ],
)
def test_time_to_click_axis_reads_short_waits_that_do_not_overlap(language, expected):
    with i18n.language(language):
        spec = charts.time_to_click_chart(clicks([0, 2, 30, 90, 5000])).to_dict()
    axis = spec["encoding"]["x"]["axis"]
    ticks = axis["values"]
    assert ticks == [t for t in charts.CLICK_TICKS if t <= 5000]
    labels = re.findall(r"datum\.value == (\d+) \? '([^']*)'", axis["labelExpr"])
    assert [int(t) for t, _ in labels] == ticks
    assert [label for _, label in labels] == expected
    assert not any("mins" in label for label in expected)
    # far enough apart on the log-like axis for their labels (1,440 / 2,880 / 4,320 were 0.4 apart)
    gaps = [symlog(b) - symlog(a) for a, b in itertools.pairwise(ticks)]
    assert min(gaps) > 0.8
    assert axis["labelOverlap"] == "greedy"


def test_time_to_click_tooltip_says_the_wait_in_words():
    with i18n.language("en"):
        spec = charts.time_to_click_chart(clicks([0, 4, 61, 150])).to_dict()
    (rows,) = spec["datasets"].values()
    assert [r["after"] for r in rows] == ["1 minute", "5 minutes", "62 minutes", "3 hours"]


def chart_texts(spec: dict) -> list[str]:
    """Every title in a spec (chart, axes, legends, tooltips), at any depth."""
    found: list[str] = []

    def walk(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "title" and isinstance(value, str):
                    found.append(value)
                elif key != "datasets":
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(spec)
    return found


@pytest.mark.parametrize("build", DRAWN.values(), ids=DRAWN.keys())
def test_charts_speak_russian_with_russian_numbers_and_months(build):
    with i18n.language("ru"):
        spec = build().to_dict()
    texts = chart_texts(spec)
    assert texts
    for text in texts:
        latin = {w for w in re.findall(r"[A-Za-z]{2,}", text) if w not in {"CTR", "UTC"}}
        assert not latin, f"English left in {text!r}"
    locale = spec["config"]["locale"]
    assert locale["number"]["decimal"] == "," and locale["number"]["thousands"] == " "
    assert locale["number"]["currency"] == ["", " ₽"]
    assert locale["time"]["shortMonths"][10] == "нояб." and locale["time"]["shortDays"][0] == "вс"


def test_consent_states_are_codes_shown_as_labels():
    with i18n.language("ru"):
        spec = charts.consent_mix_chart(mix(10, 5, 0, 1, 2)).to_dict()
    (rows,) = spec["datasets"].values()
    assert [r["consent_state"] for r in rows] == list(metrics.CONSENT_ORDER)
    assert rows[0]["state"] == "Согласие на рекламу"
    for row in rows:
        assert row["state"] != row["consent_state"] and not re.search(r"[A-Za-z]", row["state"])


def test_breakdown_title_names_the_attribute_as_written_inside_a_sentence():
    frame = rates("click_through_rate", [0.1], key="value").assign(delivered=[10])
    with i18n.language("en"):
        assert charts.breakdown_chart(frame, "Country").to_dict()["title"] == "CTR by country"
        assert charts.breakdown_chart(frame, "RFM group").to_dict()["title"] == "CTR by RFM group"
    with i18n.language("ru"):
        title = charts.breakdown_chart(frame, i18n.label(results.ATTRIBUTES, "rfm_segment")).to_dict()[
            "title"
        ]
        assert title == "CTR по группам: RFM-группа"
