"""Guards before a send: each says why and the way out, the pages show them, and the launch path
refuses what the pages refuse (an API or CLI caller cannot bypass them)."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from smsops import campaigns, composer, config, erasure, i18n, segments, store
from smsops.campaigns import CampaignError, Refused, Variant

NOW = datetime.now(UTC).replace(hour=12, minute=0, second=0, microsecond=0)
SENDER = "SHOPMARKET"
TEXT = "{{ first_name | default('клиент') }}, скидка 20% до воскресенья"
NOBODY = segments.Segment("nobody", segments.all_of(segments.Rule("city", "eq", "Нигдешний")))


@pytest.fixture(autouse=True)
def english():
    """These tests read the guards in English unless they say otherwise."""
    with i18n.language("en"):
        yield


@pytest.fixture
def home(built_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of the demo store, reading the session's published snapshot."""
    target = tmp_path / "home"
    (target / "warehouse").mkdir(parents=True)
    source = sqlite3.connect(built_home / "ops.sqlite")
    copy = sqlite3.connect(target / "ops.sqlite")
    source.backup(copy)
    source.close()
    copy.close()
    (target / "warehouse" / "current.json").write_text(
        (built_home / "warehouse" / "current.json").read_text()
    )
    monkeypatch.setenv("SMSOPS_HOME", str(target))
    monkeypatch.delenv(erasure.SECRET_ENV, raising=False)
    monkeypatch.delenv("SMSOPS_SENDERS", raising=False)
    return target


def draft(home: Path, text: str = TEXT, segment: segments.Segment | None = None) -> campaigns.Campaign:
    segment = segment or segments.Segment("everyone")
    return campaigns.create("Guarded", "promo", segment, [Variant("A", text, SENDER)], home=home)


def outbox_rows(home: Path, campaign_id: int) -> int:
    conn = store.open_store(home)
    try:
        return conn.execute("select count(*) from messages where campaign_id = ?", (campaign_id,)).fetchone()[
            0
        ]
    finally:
        conn.close()


# -- the guards, one by one (no store, no Streamlit) ----------------------------------------------


@pytest.mark.parametrize("body", ["", "   ", "\n\t "])
def test_an_empty_or_blank_message_is_refused_with_the_way_out(body):
    guard = composer.empty_text(body, "promo")
    assert guard is not None and guard.severity == "refuse"
    assert "empty" in guard.reason and "opt-out footer" in guard.reason  # what it would have cost
    assert guard.way_out == "Write the text of the message."
    assert composer.empty_text(body, "service").reason == "The message is empty: there is nothing to send."
    assert composer.empty_text("Скидка 15%", "promo") is None


def test_a_long_message_or_a_large_bill_needs_a_yes_that_names_both(monkeypatch):
    monkeypatch.delenv("SMSOPS_MAX_PARTS", raising=False)
    monkeypatch.delenv("SMSOPS_MAX_COST", raising=False)
    assert config.max_parts() == 6
    assert composer.large_send(6, {"RUB": 500.0}) is None
    long = composer.large_send(31, {"RUB": 292166.0})
    assert long is not None and long.severity == "confirm"
    assert "31 segments" in long.reason and "the limit is 6" in long.reason
    assert "31 segments" in long.confirmation and "RUB 292,166.00" in long.confirmation
    costly = composer.large_send(2, {"RUB": 150000.0}, max_cost=100000)
    assert costly is not None and "RUB 150,000.00" in costly.reason and "RUB 100,000.00" in costly.reason
    assert "2 segments" in costly.confirmation and "RUB 150,000.00" in costly.confirmation
    monkeypatch.setenv("SMSOPS_MAX_PARTS", "2")
    monkeypatch.setenv("SMSOPS_MAX_COST", "off")
    assert composer.large_send(3, {"RUB": 10**9}).code == "large_send"
    assert composer.large_send(2, {"RUB": 10**9}) is None


@pytest.mark.parametrize(("name", "value"), [("SMSOPS_MAX_PARTS", "0"), ("SMSOPS_MAX_PARTS", "six"),
                                             ("SMSOPS_MAX_COST", "-5"), ("SMSOPS_MAX_COST", "a lot")])  # fmt: skip
def test_a_limit_that_is_not_a_number_is_named(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=name):
        config.max_parts() if name == "SMSOPS_MAX_PARTS" else config.max_cost()


def test_an_opt_out_footer_that_adds_a_segment_says_what_it_costs_and_how_to_fit_it():
    body = "Привет " * 9 + "ab"  # 65 characters: one UCS-2 segment, 77 with the footer
    guard = composer.footer_fit(body, "Отказ: СТОП", "promo", messages=1000, per_segment=3.95)
    assert guard is not None and guard.severity == "warn"
    assert "1 → 2 segments per message" in guard.reason
    assert "RUB 3,950.00 more for 1,000 recipients" in guard.reason
    assert "by 7 characters" in guard.way_out
    # a footer that fits, service messages (no footer) and a text already ending in it
    assert composer.footer_fit("Привет", "Отказ: СТОП", "promo", messages=10, per_segment=3.95) is None
    assert composer.footer_fit(body, "Отказ: СТОП", "service", messages=10, per_segment=3.95) is None
    again = composer.footer_fit(body + " Отказ: СТОП", "Отказ: СТОП", "promo", messages=1, per_segment=1)
    assert again is not None and "1 → 2" in again.reason


def test_a_footer_that_switches_the_message_to_ucs2_is_flagged():
    body = "Sale: 20% off everything until Sunday at the shop near you. " * 2  # GSM-7, one segment
    guard = composer.footer_fit(body, "Отказ: СТОП", "promo", messages=10, per_segment=3.95)
    assert guard is not None and "UCS-2" in guard.reason and "1 → 2 segments" in guard.reason
    assert "SMSOPS_OPT_OUT_TEXT" in guard.way_out
    over = composer.footer_fit("x" * 150, "Отказ: СТОП", "promo", messages=1, per_segment=1, max_parts=2)
    assert over is not None and "over the limit of 2 segments" in over.reason


def test_a_launch_to_nobody_is_refused_with_the_reason():
    empty = composer.no_recipients(0, 0)
    assert empty.severity == "refuse" and "Nobody is in this campaign's audience" in empty.reason
    all_out = composer.no_recipients(0, 412, "promo", "no_consent")
    assert "412 contacts" in all_out.reason and "no current marketing opt-in" in all_out.reason
    assert "opt-in" in all_out.way_out
    assert composer.no_recipients(1, 412) is None


def test_a_test_send_without_seed_numbers_says_how_to_add_them():
    for nothing in ("", " , ", [], ["  "]):
        guard = composer.no_seed_numbers(nothing)
        assert guard is not None and guard.severity == "refuse"
        assert "SMSOPS_SEED_NUMBERS" in guard.way_out
    assert composer.no_seed_numbers("+79990000001") is None


def test_tracked_links_to_the_placeholder_address_warn_and_say_what_to_set(monkeypatch):
    linked = ["Скидка {{ link('https://shop.example.ru/sale') }}"]
    monkeypatch.delenv("SMSOPS_LINK_BASE", raising=False)
    guard = composer.placeholder_links(linked)
    assert guard is not None and guard.severity == "warn"
    assert config.PLACEHOLDER_LINK_BASE in guard.reason and "SMSOPS_LINK_BASE" in guard.way_out
    assert composer.placeholder_links(["Скидка без ссылки"]) is None
    monkeypatch.setenv("SMSOPS_LINK_BASE", "https://go.shop.ru/l/")
    assert composer.placeholder_links(linked) is None


def test_the_guards_read_in_russian_with_money_and_counts_as_russian_writes_them():
    with i18n.language("ru"):
        long = composer.large_send(31, {"RUB": 292166.0}, max_parts=6)
        assert "31 сегмент" in long.confirmation and "292 166,00 ₽" in long.confirmation
        fit = composer.footer_fit("Привет " * 9 + "ab", "Отказ: СТОП", messages=1000, per_segment=3.95)
        assert "3 950,00 ₽" in fit.reason and "1 000 получателей" in fit.reason
        assert composer.empty_text("").way_out == "Напишите текст сообщения."
        for guard in (long, fit, composer.no_recipients(0, 3), composer.no_seed_numbers("")):
            assert not any(word in guard.message for word in ("message", "segment", "recipient", "None"))
    assert str(long).startswith("Each message has up to 31 segments")  # logs and the CLI read English


# -- the launch path refuses what the pages refuse ------------------------------------------------


def test_a_draft_with_no_text_cannot_be_created(home):
    for blank in ("", "   \n"):
        with pytest.raises(Refused, match="empty") as refused:
            draft(home, blank)
        assert refused.value.guard.code == "empty_text" and refused.value.variant == "A"
    assert not any(c.name == "Guarded" for c in campaigns.drafts(home))


def test_an_api_caller_cannot_launch_schedule_or_test_an_empty_message(home):
    campaign = draft(home)
    conn = store.open_store(home)
    try:  # an older draft, or one written by another tool
        conn.execute(
            "update campaign_variants set template = '  ' where campaign_id = ?", (campaign.campaign_id,)
        )
    finally:
        conn.close()
    cid = campaign.campaign_id
    with pytest.raises(Refused, match="empty"):
        campaigns.plan(cid, home=home, now=NOW)
    with pytest.raises(Refused, match="empty"):
        campaigns.plan(cid, home=home, now=NOW, dry_run=True)
    with pytest.raises(Refused, match="empty"):
        campaigns.schedule(cid, datetime.now(UTC) + timedelta(days=1), home=home)
    with pytest.raises(Refused, match="empty"):
        campaigns.test_send(cid, "+79990000001", home=home)
    assert campaigns.get(cid, home).status == "draft" and outbox_rows(home, cid) == 0


def test_a_launch_to_nobody_is_refused_and_writes_nothing(home):
    campaign = draft(home, segment=NOBODY)
    preview = campaigns.plan(campaign.campaign_id, home=home, now=NOW, dry_run=True)
    assert preview.to_send == 0
    refusals = [g for g in campaigns.launch_guards(campaign, preview) if g.severity == "refuse"]
    assert [g.code for g in refusals] == ["no_recipients"]
    with pytest.raises(Refused, match="Nobody") as refused:
        campaigns.plan(campaign.campaign_id, home=home, now=NOW)
    assert refused.value.guard.code == "no_recipients"
    assert campaigns.get(campaign.campaign_id, home).status == "draft"  # not "finished" with 0 planned
    assert outbox_rows(home, campaign.campaign_id) == 0


def test_a_promotion_whose_audience_the_checks_empty_is_refused_with_the_step_that_did_it(home):
    no_opt_in = segments.Segment("no opt-in", segments.all_of(segments.Rule("marketing_opt_in", "is_false")))
    campaign = draft(home, segment=no_opt_in)
    preview = campaigns.plan(campaign.campaign_id, home=home, now=NOW, dry_run=True)
    assert preview.audience > 0 and preview.to_send == 0
    with pytest.raises(Refused) as refused:
        campaigns.plan(campaign.campaign_id, home=home, now=NOW)
    assert "no current marketing opt-in" in str(refused.value)
    assert "Promotions go only to contacts with a marketing opt-in" in str(refused.value)
    assert outbox_rows(home, campaign.campaign_id) == 0


def test_a_scheduled_campaign_with_nobody_to_send_to_stays_scheduled_and_says_why(home):
    campaign = draft(home, segment=NOBODY)
    campaigns.schedule(campaign.campaign_id, NOW + timedelta(hours=1), home=home, now=NOW)
    started = campaigns.start_due(now=NOW + timedelta(hours=2), home=home)
    assert "Nobody" in started[campaign.campaign_id]
    assert campaigns.get(campaign.campaign_id, home).status == "scheduled"
    assert outbox_rows(home, campaign.campaign_id) == 0


def test_a_test_send_without_numbers_is_refused_with_the_way_out(home):
    campaign = draft(home)
    with pytest.raises(Refused, match="SMSOPS_SEED_NUMBERS") as refused:
        campaigns.test_send(campaign.campaign_id, "", home=home)
    assert refused.value.guard.code == "no_seed_numbers"


def test_launch_guards_name_a_long_message_its_bill_and_placeholder_links(home, monkeypatch):
    monkeypatch.delenv("SMSOPS_LINK_BASE", raising=False)
    monkeypatch.setenv("SMSOPS_MAX_PARTS", "1")
    text = TEXT + ", подробности: {{ link('https://shop.example.ru/sale') }} " + "и ещё больше скидок " * 4
    campaign = draft(home, text)
    preview = campaigns.plan(campaign.campaign_id, home=home, now=NOW, dry_run=True)
    found = {g.code: g for g in campaigns.launch_guards(campaign, preview)}
    assert set(found) >= {"large_send", "placeholder_link_base"}
    assert found["large_send"].severity == "confirm"
    assert f"{preview.longest} segments" in found["large_send"].confirmation
    assert i18n.money(preview.cost["RUB"]) in found["large_send"].confirmation
    assert not any(g.severity == "refuse" for g in found.values())
    result = campaigns.plan(campaign.campaign_id, home=home, now=NOW)  # a yes is the page's to ask
    assert result.to_send == preview.to_send > 0 and result.longest == preview.longest > 1


def test_campaign_errors_read_in_english_for_logs_and_in_the_persons_language_on_a_page(home):
    with pytest.raises(CampaignError) as caught:
        campaigns.create("  ", "promo", segments.Segment("everyone"), [Variant("A", TEXT, SENDER)], home=home)
    assert str(caught.value) == "name: a campaign needs a name"
    with i18n.language("ru"):
        assert caught.value.localized() == "Название: у рассылки должно быть название"
    with pytest.raises(CampaignError) as caught:
        campaigns.test_send(draft(home).campaign_id, "12", home=home)
    assert str(caught.value).startswith("seed number '12'")
    with i18n.language("ru"):
        assert caught.value.localized().startswith("Тестовый номер '12'")
