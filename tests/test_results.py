"""The Results page's readers (smsops.results) and chart builders, against a real warehouse build
of the session's demo base (campaigns with A/B variants, holdouts, failures, clicks, replies,
STOP opt-outs and attributed orders)."""

from __future__ import annotations

import io
import shutil
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pandas as pd
import pytest
from test_marts import add_settling_campaign, copy_home

from smsops import abtest, charts, i18n, results, warehouse
from smsops.policy import HOLDOUT

UNKNOWN = "39999"  # an error code no provider uses


def need(home: Path, table: str, *columns: str) -> None:
    """Skip when the published build lacks marts that are still being delivered."""
    missing = results.missing_columns({table: columns}, home)
    if missing:
        pytest.skip(f"the warehouse does not have {', '.join(missing)} yet (the marts' half of issue 7)")


def messages(home: Path, campaign_id: int) -> pd.DataFrame:
    return results.export_frame(campaign_id, reveal=True, home=home)


def campaign_ids(home: Path) -> list[int]:
    return [int(c) for c in results.campaigns_with_results(home)["campaign_id"]]


def ab_campaign(home: Path) -> int:
    """A demo campaign that tested two variants and kept a holdout, some of whom bought anyway."""
    for cid in campaign_ids(home):
        rows = messages(home, cid)
        if {"A", "B", HOLDOUT} <= set(rows["variant"]) and rows[rows["is_holdout"]]["converted"].any():
            return cid
    raise AssertionError("the demo has no A/B campaign with a holdout")


@pytest.fixture(autouse=True)
def english():
    """What smsops.results says follows the current language: these tests read it in English."""
    with i18n.language("en"):
        yield


@pytest.fixture(scope="module")
def odd_home(built_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo base plus one receipt with an error code no reference table knows, rebuilt."""
    home = tmp_path_factory.mktemp("odd")
    shutil.copy(built_home / "ops.sqlite", home / "ops.sqlite")
    conn = sqlite3.connect(home / "ops.sqlite")
    with conn:
        message_id, provider, occurred = conn.execute(
            "select message_id, provider, max(occurred_at) from message_status_events "
            "where status = 'delivered' group by message_id, provider order by message_id limit 1"
        ).fetchone()
        later = (datetime.fromisoformat(occurred) + timedelta(hours=1)).isoformat(sep=" ")
        conn.execute(
            "insert into message_status_events (message_id, provider, status, error_code, occurred_at, "
            "received_at) values (?, ?, 'undelivered', ?, ?, ?)",
            (message_id, provider, UNKNOWN, later, later),
        )
    conn.close()
    warehouse.build(home)
    return home


@pytest.fixture(scope="module")
def settling(built_home: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The demo base plus a campaign with 10 delivered, 5 awaiting their receipt and link
    previews beside people's clicks (tests/test_marts.py, ``add_settling_campaign``), rebuilt."""
    home = copy_home(built_home, tmp_path_factory.mktemp("settling"), with_snapshot=False)
    ids = add_settling_campaign(home / "ops.sqlite", datetime.now(UTC).replace(microsecond=0, tzinfo=None))
    warehouse.build(home)
    return home, ids


# --- campaigns and the funnel ---------------------------------------------------------------


def test_campaigns_with_results_lists_every_launched_campaign_newest_first(built_home):
    listing = results.campaigns_with_results(built_home)
    assert len(listing) > 1
    assert listing["launched_at"].notna().all()
    assert listing["launched_at"].is_monotonic_decreasing
    for row in listing.itertuples(index=False):
        assert row.sent == int(messages(built_home, row.campaign_id)["sent_at"].notna().sum())


def test_funnel_counts_each_recipient_once_and_leaves_the_holdout_out(built_home):
    cid = ab_campaign(built_home)
    rows = messages(built_home, cid)
    treated = rows[~rows["is_holdout"]]
    funnel = results.funnel(cid, built_home)
    assert funnel.audience == len(rows)
    assert funnel.holdout == int(rows["is_holdout"].sum()) > 0
    assert funnel.sent == int(treated["sent_at"].notna().sum()) > 0
    assert funnel.delivered == int((treated["status"] == "delivered").sum())
    assert funnel.clicked == int((treated["clicks"] > 0).sum()) > 0
    assert funnel.total_clicks == int(treated["clicks"].sum())
    assert funnel.prefetch_clicks == int(treated["prefetch_clicks"].sum()) > 0  # the demo's link previews
    settled = treated["status"].isin(["delivered", "undelivered", "failed"])
    assert funnel.settled == int(settled.sum())
    assert funnel.awaiting_receipt == int((treated["sent_at"].notna() & ~settled).sum())
    assert funnel.converted == int(treated["converted"].sum()) > 0
    assert funnel.converted < int(rows["converted"].sum())  # the holdout converted too: not counted
    assert funnel.revenue == pytest.approx(treated["revenue"].sum())
    assert funnel.cost == pytest.approx(rows["cost"].sum())


def test_funnel_stages_are_shares_of_sent_and_of_the_stage_before(built_home):
    funnel = results.funnel(ab_campaign(built_home), built_home)
    stages = funnel.stages()
    assert list(stages["stage"]) == ["Sent", "Delivered", "Clicked", "Converted"]
    assert list(stages["recipients"]) == [funnel.sent, funnel.delivered, funnel.clicked, funnel.converted]
    assert stages["share_of_sent"].iloc[0] == 1
    assert stages["share_of_sent"].iloc[2] == pytest.approx(funnel.clicked / funnel.sent)
    assert stages["share_of_previous"].iloc[2] == pytest.approx(funnel.clicked / funnel.delivered)
    assert funnel.click_through_rate == pytest.approx(funnel.clicked / funnel.delivered)


def test_delivery_rate_is_over_settled_messages_and_awaiting_receipts_stand_apart(settling):
    """10 delivered, 5 awaiting their receipt, 0 failed: 100% delivered of the settled, 5 awaiting."""
    home, ids = settling
    funnel = results.funnel(ids["campaign_id"], home)
    assert (funnel.sent, funnel.delivered, funnel.not_delivered) == (15, 10, 0)
    assert (funnel.settled, funnel.awaiting_receipt) == (10, 5)
    assert funnel.delivery_rate == 1.0
    variant = results.variants(ids["campaign_id"], home).iloc[0]
    assert (variant.awaiting_receipt, variant.delivery_rate) == (5, 1.0)


def test_link_previews_are_counted_apart_and_left_out_of_ctr(settling):
    """A HEAD, a Slackbot and a WhatsApp preview beside two people's clicks: CTR 2 of 10."""
    home, ids = settling
    funnel = results.funnel(ids["campaign_id"], home)
    assert (funnel.clicked, funnel.total_clicks, funnel.prefetch_clicks) == (2, 2, 3)
    assert funnel.click_through_rate == pytest.approx(0.2)
    assert results.variants(ids["campaign_id"], home).iloc[0].prefetch_clicks == 3
    curve = results.time_to_click(ids["campaign_id"], home)
    assert curve["clickers"].sum() == 2 and curve["minutes"].min() == 20  # not the preview's second
    exported = messages(home, ids["campaign_id"]).set_index("message_id")
    assert exported.loc[ids["preview_only"], ["clicks", "prefetch_clicks"]].tolist() == [0, 1]


def test_funnel_of_a_build_from_before_receipts_and_previews_were_counted_apart(built_home, tmp_path):
    """A snapshot published by the previous dbt project still shows its funnel: settled and
    awaiting follow from the statuses, link previews are unknown (None)."""
    home = copy_home(built_home, tmp_path / "old", with_snapshot=True)
    with duckdb.connect(str(warehouse.current(home).path)) as conn:
        for column in ("settled", "awaiting_receipt", "prefetch_clicks"):
            conn.execute(f"alter table fct_campaign_performance drop column {column}")
    cid = ab_campaign(built_home)
    old, new = results.funnel(cid, home), results.funnel(cid, built_home)
    assert old.prefetch_clicks is None and new.prefetch_clicks is not None
    assert (old.settled, old.awaiting_receipt, old.delivery_rate) == (
        new.settled, new.awaiting_receipt, new.delivery_rate)  # fmt: skip
    with pytest.raises(results.MartMissing, match="awaiting_receipt"):
        results.variants(cid, home)


def test_funnel_of_a_campaign_missing_from_the_build_says_to_refresh(built_home):
    with pytest.raises(
        results.CampaignNotInBuild, match=r"campaign 9999 is not in warehouse build .*refresh"
    ):
        results.funnel(9999, built_home)


# --- the verdict ----------------------------------------------------------------------------


def test_verdict_names_the_winner_and_the_confidence():
    result = abtest.compare({"A": (30, 1000), "B": (50, 1000)}, metric="CTR")
    message = results.verdict_message(result, "CTR")
    assert message == "B beats A on CTR with 98% confidence (5.0% against 3.0% for A)."
    sure = abtest.compare({"A": (30, 1000), "B": (90, 1000)}, metric="CTR")
    assert results.verdict_message(sure, "CTR").startswith("B beats A on CTR with over 99% confidence")


def test_verdict_without_a_winner_says_how_many_more_recipients_are_needed():
    result = abtest.compare({"A": (30, 1000), "B": (36, 1000)}, metric="CTR")
    assert result.winner is None
    more = result.needed_per_arm - 1000
    message = results.verdict_message(result, "CTR")
    assert message.startswith("No significant difference on CTR yet")
    assert f"about {more:,} more recipients per variant needed" in message


def test_verdict_with_nothing_delivered_does_not_pretend_to_compare():
    result = abtest.compare({"A": (0, 0), "B": (0, 0)})
    assert results.verdict_message(result, "CTR") == "Not enough delivered messages to compare CTR yet."


def test_verdict_of_a_demo_test_uses_the_variants_delivered_and_clicks(built_home):
    cid = ab_campaign(built_home)
    rows = messages(built_home, cid)
    verdict = results.verdict(cid, "ctr", built_home)
    assert verdict is not None and {a.name for a in verdict.arms} == {"A", "B"}
    for arm in verdict.arms:
        mine = rows[rows["variant"] == arm.name]
        assert arm.trials == int((mine["status"] == "delivered").sum())
        assert arm.successes == int((mine["clicks"] > 0).sum())
    assert "CTR" in verdict.message and "confidence" in verdict.message
    conversion = results.verdict(cid, "conversion", built_home)
    assert "conversion rate" in conversion.message


def test_verdict_is_none_for_a_single_variant_and_refuses_unknown_metrics(built_home):
    single = next(c for c in campaign_ids(built_home) if set(messages(built_home, c)["variant"]) == {"A"})
    assert results.verdict(single, "ctr", built_home) is None
    with pytest.raises(ValueError, match="metric must be one of ctr, conversion; got 'opens'"):
        results.verdict(single, "opens", built_home)


# --- time to click and export ---------------------------------------------------------------


def test_time_to_click_rises_to_every_clicker(built_home):
    cid = ab_campaign(built_home)
    curve = results.time_to_click(cid, built_home)
    funnel = results.funnel(cid, built_home)
    assert curve["clickers"].sum() == funnel.clicked
    assert curve["cumulative_share"].is_monotonic_increasing
    assert curve["cumulative_share"].iloc[-1] == pytest.approx(1.0)
    assert curve["minutes"].is_monotonic_increasing and (curve["minutes"] >= 0).all()
    rows = messages(built_home, cid)
    clicked = rows[rows["first_clicked_at"].notna() & ~rows["is_holdout"]]
    waited = (
        pd.to_datetime(clicked["first_clicked_at"]) - pd.to_datetime(clicked["sent_at"])
    ).dt.total_seconds()
    assert results.minutes_until(curve, 1.0) == int(waited.max() // 60) + 1
    half = results.minutes_until(curve, 0.5)
    assert (waited < half * 60).mean() >= 0.5


def test_time_to_click_of_a_campaign_without_clicks_is_empty(built_home):
    assert results.time_to_click(9999, built_home).empty
    assert results.minutes_until(results.time_to_click(9999, built_home)) is None


def test_export_has_one_row_per_recipient_with_phones_masked_unless_asked(built_home):
    cid = ab_campaign(built_home)
    data = results.export_csv(cid, home=built_home)
    assert data.startswith(b"\xef\xbb\xbf")  # spreadsheet programs then read Cyrillic right
    masked = pd.read_csv(io.BytesIO(data), encoding="utf-8-sig", dtype={"phone": str})
    assert len(masked) == results.funnel(cid, built_home).audience
    assert "phone_e164" not in masked.columns
    shown = pd.read_csv(
        io.BytesIO(results.export_csv(cid, reveal=True, home=built_home)), dtype={"phone": str}
    )
    has_number = shown["phone"].notna()  # an invalid number was never stored: nothing to show
    assert has_number.sum() > len(shown) / 2
    assert shown["phone"][has_number].str.fullmatch(r"\+\d{10,15}").all()
    assert masked["phone"][has_number].str.contains(r"\*\*\*").all()
    assert (masked["phone"][~has_number] == "—").all()
    assert set(masked["status"]) >= {"delivered", "holdout"}


# --- sections that read the newer marts -----------------------------------------------------


def test_variants_carry_intervals_around_each_rate(built_home):
    need(built_home, "fct_campaign_performance", *results.VARIANT_COLUMNS)
    cid = ab_campaign(built_home)
    frame = results.variants(cid, built_home)
    assert list(frame["variant"]) == ["A", "B"]
    for rate in ("delivery_rate", "click_through_rate", "conversion_rate"):
        assert (frame[f"{rate}_low"] <= frame[rate]).all() and (frame[rate] <= frame[f"{rate}_high"]).all()
    verdict = results.verdict(cid, "ctr", built_home)
    for arm in verdict.arms:
        row = frame[frame["variant"] == arm.name].iloc[0]
        assert row["click_through_rate_low"] == pytest.approx(arm.low, abs=1e-6)
        assert row["click_through_rate_high"] == pytest.approx(arm.high, abs=1e-6)


def test_uplift_compares_the_messaged_with_the_holdout(built_home):
    need(built_home, "fct_campaign_uplift", *results.UPLIFT_COLUMNS)
    cid = ab_campaign(built_home)
    lift = results.uplift(cid, built_home)
    assert lift is not None
    rows = messages(built_home, cid)
    assert lift.holdout_recipients == int(rows["is_holdout"].sum())
    assert lift.holdout_converted == int(rows[rows["is_holdout"]]["converted"].sum())
    assert lift.uplift == pytest.approx(lift.treatment_conversion_rate - lift.holdout_conversion_rate)
    assert lift.uplift_low <= lift.uplift <= lift.uplift_high
    assert "holdout" in lift.message
    no_holdout = next(
        c for c in campaign_ids(built_home) if HOLDOUT not in set(messages(built_home, c)["variant"])
    )
    assert results.uplift(no_holdout, built_home) is None


def test_breakdown_by_country_adds_up_to_the_campaign(built_home):
    need(
        built_home, "fct_campaign_segment_performance", "campaign_id", "attribute", *results.BREAKDOWN_COLUMNS
    )
    cid = ab_campaign(built_home)
    funnel = results.funnel(cid, built_home)
    for attribute in ("country", "rfm_segment"):
        parts = results.breakdown(cid, attribute, built_home)
        assert not parts.empty and parts["value"].notna().all()
        assert parts["sent"].sum() == funnel.sent
        assert parts["delivered"].sum() == funnel.delivered
        assert parts["delivered"].is_monotonic_decreasing


def test_breakdown_refuses_an_unknown_attribute_by_name(built_home):
    with pytest.raises(ValueError, match=r"attribute must be one of country, .*; got 'shoe_size'"):
        results.breakdown(1, "shoe_size", built_home)


def test_failures_explain_each_code_and_admit_unknown_ones(odd_home):
    need(odd_home, "sms_error_codes", "provider", "error_code", "meaning", "is_permanent", "what_to_do")
    failed = pd.concat([results.failures(cid, odd_home) for cid in campaign_ids(odd_home)])
    assert not failed.empty
    unknown = failed[failed["error_code"] == UNKNOWN]
    assert len(unknown) == 1 and unknown["meaning"].iloc[0] == results.UNKNOWN_CODE
    assert unknown["undelivered"].iloc[0] == 1
    known = failed[failed["error_code"] != UNKNOWN]
    assert not known.empty
    assert (known["meaning"] != results.UNKNOWN_CODE).all() and known["what_to_do"].notna().all()
    spam = known[known["error_code"] == "30007"]  # the sandbox answers with Twilio's codes
    assert spam.empty or spam["meaning"].str.contains("spam").all()
    total = sum(
        results.funnel(cid, odd_home).rejected
        + results.funnel(cid, odd_home).undelivered
        + results.funnel(cid, odd_home).failed
        for cid in campaign_ids(odd_home)
    )
    assert failed["messages"].sum() == total


def test_replies_show_the_stop_keyword_with_phones_masked(built_home):
    need(built_home, "fct_replies", "inbound_id", "campaign_id", *results.REPLY_COLUMNS)
    frames = {cid: results.replies(cid, home=built_home) for cid in campaign_ids(built_home)}
    everything = pd.concat(frames.values())
    assert not everything.empty
    assert everything["phone"].str.contains(r"\*\*\*").all()
    stop = everything[everything["keyword"].fillna("").str.upper().isin(["STOP", "СТОП"])]
    assert not stop.empty
    cid = next(c for c, f in frames.items() if not f.empty)
    assert len(frames[cid]) == results.funnel(cid, built_home).replies
    revealed = results.replies(cid, reveal=True, home=built_home)
    assert revealed["phone"].str.fullmatch(r"\+\d{10,15}").all()


def test_a_section_whose_mart_is_missing_says_which_and_what_to_do(built_home):
    missing = results.missing_columns(
        {"fct_no_such_mart": ("x",), "fct_messages": ("no_such_column",)}, built_home
    )
    assert missing == ["fct_no_such_mart", "fct_messages.no_such_column"]
    with pytest.raises(
        results.MartMissing, match=r"needs fct_no_such_mart, which warehouse build \S+ does not"
    ):
        results.require_columns({"fct_no_such_mart": ("x",)}, "Testing", built_home)


# --- charts ---------------------------------------------------------------------------------


def layers(spec: dict) -> list[dict]:
    return spec.get("layer", [spec])


def test_funnel_chart_has_a_title_axes_and_the_share_of_sent_as_labels(built_home):
    spec = charts.funnel_chart(results.funnel(ab_campaign(built_home), built_home).stages()).to_dict()
    assert "Funnel" in spec["title"]
    bars, labels = layers(spec)
    assert bars["mark"]["type"] == "bar" and labels["mark"]["type"] == "text"
    encoding = {**spec.get("encoding", {}), **bars.get("encoding", {})}
    assert encoding["x"]["title"] == "Recipients"
    assert encoding["y"]["sort"] == ["Sent", "Delivered", "Clicked", "Converted"]
    assert labels["encoding"]["text"]["format"] == ".1%"


def test_variants_chart_draws_interval_bars_around_each_rate():
    frame = pd.DataFrame(
        {
            "variant": ["A", "B"],
            "conversion_rate": [0.03, 0.05],
            "conversion_rate_low": [0.02, 0.04],
            "conversion_rate_high": [0.045, 0.065],
        }
    )
    spec = charts.variants_chart(frame, "conversion_rate").to_dict()
    assert "95% intervals" in spec["title"]
    marks = [
        layer["mark"]["type"] if isinstance(layer["mark"], dict) else layer["mark"] for layer in layers(spec)
    ]
    assert marks == ["errorbar", "point"]
    errors = layers(spec)[0]["encoding"]
    assert errors["x"]["field"] == "low" and errors["x2"]["field"] == "high"
    assert errors["x"]["title"].startswith("Conversion rate") and errors["x"]["axis"]["format"] == "~%"
    with pytest.raises(ValueError, match=r"rate must be one of .*; got 'roi'"):
        charts.variants_chart(frame, "roi")


def test_time_to_click_chart_is_a_cumulative_share_over_minutes(built_home):
    spec = charts.time_to_click_chart(results.time_to_click(ab_campaign(built_home), built_home)).to_dict()
    assert spec["title"] == "Time to first click"
    assert spec["encoding"]["x"]["title"] == "Time after sending (log scale)"
    assert spec["encoding"]["x"]["scale"]["type"] == "symlog"
    assert spec["encoding"]["y"]["axis"]["format"] == "~%"
    assert spec["mark"]["interpolate"] == "step-after"


def test_breakdown_chart_titles_the_attribute_and_draws_intervals():
    frame = pd.DataFrame(
        {
            "value": ["RU", "KZ"],
            "delivered": [900, 40],
            "click_through_rate": [0.06, 0.1],
            "click_through_rate_low": [0.045, 0.04],
            "click_through_rate_high": [0.075, 0.23],
        }
    )
    spec = charts.breakdown_chart(frame, "Country").to_dict()
    assert spec["title"] == "CTR by country"
    bars, errors = layers(spec)
    assert bars["encoding"]["y"]["title"] == "Country"
    assert errors["mark"]["type"] == "errorbar"
    tooltip_fields = [t["field"] for t in bars["encoding"]["tooltip"]]
    assert "delivered" in tooltip_fields


# --- what the page shows, in both languages -------------------------------------------------


@pytest.mark.parametrize(
    ("minutes", "en", "ru"),
    [
        (1, "within 1 minute", "в течение 1 минуты"),
        (2, "within 2 minutes", "в течение 2 минут"),
        (21, "within 21 minutes", "в течение 21 минуты"),
        (119, "within 119 minutes", "в течение 119 минут"),
        (121, "within 3 hours", "в течение 3 часов"),
        (60 * 21, "within 21 hours", "в течение 21 часа"),
        (60 * 49, "within 3 days", "в течение 3 дней"),
    ],
)
def test_waits_are_pluralised_in_both_languages(minutes, en, ru):
    with i18n.language("en"):
        assert results.within(minutes) == en
    with i18n.language("ru"):
        assert results.within(minutes) == ru


def clicks(minutes: list[int]) -> pd.DataFrame:
    """A ``time_to_click`` frame of one clicker per entry of ``minutes`` (sorted)."""
    n = len(minutes)
    return pd.DataFrame(
        {"minutes": minutes, "cumulative_share": [(i + 1) / n for i in range(n)]}, dtype="float64"
    ).astype({"minutes": "int64"})


def test_time_to_click_summary_reads_as_a_sentence():
    frame = clicks([0] * 5 + [3] * 4 + [200])
    with i18n.language("en"):
        assert results.time_to_click_summary(frame) == (
            "Half of the clickers clicked within 1 minute of sending; 90% within 4 minutes."
        )
    with i18n.language("ru"):
        assert results.time_to_click_summary(frame) == (
            "Половина перешедших перешла по ссылке в течение 1 минуты после отправки; "
            "90 % — в течение 4 минут."
        )
    assert results.time_to_click_summary(clicks([])) is None


def lift(incremental: float, low: float, high: float, recipients: int = 1000) -> results.Uplift:
    return results.Uplift(
        campaign_id=1, treatment_recipients=recipients, treatment_converted=100, treatment_conversion_rate=0.1,
        holdout_recipients=50, holdout_converted=2, holdout_conversion_rate=0.04, uplift=incremental / recipients,
        uplift_low=low, uplift_high=high, incremental_conversions=incremental, incremental_revenue=1234.5,
    )  # fmt: skip


def test_incremental_conversions_are_a_whole_signed_estimate_with_their_interval():
    with i18n.language("en"):
        value, help_ = results.incremental_conversions_text(lift(62.6, 0.01, 0.115))
        assert value == "+63"
        assert help_.startswith("An estimate") and "95% interval +10 to +115" in help_
        assert results.incremental_conversions_text(lift(-2.21, -0.2, 0.045))[0] == "−2"
    with i18n.language("ru"):
        value, help_ = results.incremental_conversions_text(lift(62.6, 0.01, 0.115))
        assert value == "+63" and "95%-й интервал: от +10 до +115" in help_


def test_every_error_code_meaning_and_advice_has_its_russian_text():
    seed = pd.read_csv(Path(__file__).resolve().parent.parent / "dbt_project/seeds/sms_error_codes.csv")
    catalogue = i18n._catalogue("ru")
    texts = {*seed["meaning"], *seed["what_to_do"], results.UNKNOWN_CODE, results.NO_CODE}
    assert not [t for t in texts if t not in catalogue]


def test_failure_table_shows_meanings_providers_and_flags_in_russian(odd_home):
    cid = next(
        c for c in campaign_ids(odd_home) if (results.failures(c, odd_home)["error_code"] == UNKNOWN).any()
    )
    failed = results.failures(cid, odd_home)
    with i18n.language("ru"):
        shown = results.labelled(failed)
        unknown = shown[failed["error_code"] == UNKNOWN].iloc[0]
        assert unknown["meaning"] == "Неизвестный код: его нет в справочнике кодов ошибок"
        assert pd.isna(unknown["is_permanent"]) and pd.isna(unknown["what_to_do"])  # shown as "—"
        assert set(shown["provider"]) <= {"Песочница (симулятор)", "Twilio", "SMS.ru"}
        assert set(shown["is_permanent"].dropna()) <= {"да", "нет"}
        cells = results.shown(failed).to_html()
        assert "None" not in cells and "nan" not in cells and "—" in cells


def test_breakdown_values_read_as_names_in_the_current_language():
    with i18n.language("ru"):
        assert results.value_label("country", "RU") == "Россия"
        assert results.value_label("rfm_segment", "needs_attention") == "Требуют внимания"
        assert results.value_label("region", "Москва") == "Москва"
        assert results.value_label("age_band", results.UNKNOWN_VALUE) == "Неизвестно"
    with i18n.language("en"):
        assert results.value_label("country", "KZ") == "Kazakhstan"
        assert results.value_label("gender", "f") == "female"


def test_campaign_picker_names_status_and_date_in_the_current_language():
    row = pd.DataFrame(
        {"campaign_id": [7], "campaign_name": ["Осень"], "campaign_status": ["running"],
         "launched_at": [pd.Timestamp("2026-12-05 08:00")]}
    ).iloc[0]  # fmt: skip
    with i18n.language("en"):
        assert results.campaign_label(row) == "Осень (id 7, sending, launched Dec 5, 2026)"
    with i18n.language("ru"):
        assert results.campaign_label(row).startswith("Осень (№ 7, ")
        assert "sending" not in results.campaign_label(row) and "2026" in results.campaign_label(row)
