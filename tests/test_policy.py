"""The sending policy, one recipient at a time: quiet hours, caps, the order of checks, the split."""

from __future__ import annotations

import random
from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest

from smsops import i18n, policy
from smsops.policy import FrequencyCaps, PolicyError, QuietHours

RUSSIAN_MOBILE_ZONES = (
    "Asia/Almaty", "Asia/Anadyr", "Asia/Aqtobe", "Asia/Irkutsk", "Asia/Kamchatka", "Asia/Krasnoyarsk",
    "Asia/Magadan", "Asia/Novosibirsk", "Asia/Omsk", "Asia/Sakhalin", "Asia/Vladivostok", "Asia/Yakutsk",
    "Asia/Yekaterinburg", "Europe/Bucharest", "Europe/Moscow", "Europe/Samara",
)  # fmt: skip
"""What phonenumbers gives for a Russian mobile number: 16 candidates."""

NOON = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
DEFAULT = QuietHours()


def allowed_everywhere(moment: datetime, zones, quiet: QuietHours = DEFAULT) -> bool:
    return all(not quiet.is_quiet(moment.astimezone(ZoneInfo(z)).time()) for z in zones)


def brute_force(now: datetime, zones, quiet: QuietHours) -> datetime | None:
    """The earliest minute allowed in every zone, found by trying each minute."""
    if allowed_everywhere(now, zones, quiet):
        return None
    moment = now.replace(second=0, microsecond=0)
    if moment < now:
        moment += timedelta(minutes=1)
    for _ in range(3 * 24 * 60):
        if allowed_everywhere(moment, zones, quiet):
            return moment
        moment += timedelta(minutes=1)
    raise AssertionError("no common window in three days")


# -- quiet hours ----------------------------------------------------------------------------


def test_quiet_window_wraps_midnight_and_end_is_allowed() -> None:
    assert DEFAULT.is_quiet(time(21, 0))
    assert DEFAULT.is_quiet(time(3, 0))
    assert DEFAULT.is_quiet(time(8, 59))
    assert not DEFAULT.is_quiet(time(9, 0))
    assert not DEFAULT.is_quiet(time(20, 59))


def test_quiet_window_within_one_day_and_empty_window() -> None:
    lunch = QuietHours(time(13, 0), time(14, 0))
    assert lunch.is_quiet(time(13, 30))
    assert not lunch.is_quiet(time(14, 0))
    assert not lunch.is_quiet(time(23, 0))
    assert not QuietHours(time(9, 0), time(9, 0)).is_quiet(time(3, 0))


def test_same_utc_minute_is_quiet_in_vladivostok_and_not_in_kaliningrad() -> None:
    # 12:00 UTC is 22:00 in Vladivostok (UTC+10) and 14:00 in Kaliningrad (UTC+2)
    assert policy.next_allowed(NOON, ["Europe/Kaliningrad"], DEFAULT) is None
    deferred = policy.deferral(NOON, ["Asia/Vladivostok"], DEFAULT)
    assert deferred == policy.Deferral(datetime(2026, 11, 25, 23, 0, tzinfo=UTC), "quiet_hours", True)


def test_candidate_zones_get_a_window_allowed_in_every_zone_and_say_so() -> None:
    deferred = policy.deferral(NOON, RUSSIAN_MOBILE_ZONES, DEFAULT)
    assert deferred is not None
    assert deferred.reason == "quiet_hours_candidate_zones"
    assert deferred.in_every_zone
    # 09:00 in Bucharest (UTC+2 in November) is 19:00 in Kamchatka and Anadyr (UTC+12)
    assert deferred.not_before == datetime(2026, 11, 26, 7, 0, tzinfo=UTC)
    assert allowed_everywhere(deferred.not_before, RUSSIAN_MOBILE_ZONES)
    assert not allowed_everywhere(deferred.not_before - timedelta(minutes=1), RUSSIAN_MOBILE_ZONES)


def test_candidate_zones_inside_the_common_window_send_now() -> None:
    assert policy.deferral(datetime(2026, 11, 26, 8, 30, tzinfo=UTC), RUSSIAN_MOBILE_ZONES, DEFAULT) is None


def test_one_candidate_zone_is_the_contacts_own_zone() -> None:
    assert policy.deferral(NOON, ["Asia/Vladivostok"], DEFAULT).reason == "quiet_hours"
    labelled = policy.deferral(NOON, ["Asia/Vladivostok"], DEFAULT, candidates=True)
    assert labelled.reason == "quiet_hours_candidate_zones"


def test_no_common_window_falls_back_to_the_soonest_minute_allowed_in_most_zones() -> None:
    # Tokyo (UTC+9) and São Paulo (UTC-3) are 12 h apart: with a 12-hour quiet window no
    # minute is allowed in both
    zones = ["Asia/Tokyo", "America/Sao_Paulo"]
    deferred = policy.deferral(datetime(2026, 11, 25, 13, 30, tzinfo=UTC), zones, DEFAULT)
    assert deferred is not None
    assert not deferred.in_every_zone
    assert deferred.reason == "quiet_hours_candidate_zones"
    # at 13:30 UTC it is 22:30 in Tokyo (quiet) and 10:30 in São Paulo (allowed): now
    assert deferred.not_before == datetime(2026, 11, 25, 13, 30, tzinfo=UTC)
    # at 00:30 UTC it is 09:30 in Tokyo and 21:30 in São Paulo: also now
    night = policy.deferral(datetime(2026, 11, 25, 0, 30, tzinfo=UTC), zones, DEFAULT)
    assert night.not_before == datetime(2026, 11, 25, 0, 30, tzinfo=UTC)
    assert not night.in_every_zone


def test_dst_spring_forward_uses_the_new_offset() -> None:
    # New York moves to EDT (UTC-4) at 07:00 UTC on 8 March 2026: 09:00 EDT is 13:00 UTC
    assert policy.next_allowed(
        datetime(2026, 3, 8, 12, 0, tzinfo=UTC), ["America/New_York"], DEFAULT
    ) == datetime(2026, 3, 8, 13, 0, tzinfo=UTC)


def test_dst_fall_back_uses_the_new_offset() -> None:
    # back to EST (UTC-5) at 06:00 UTC on 1 November 2026: 09:00 EST is 14:00 UTC
    assert policy.next_allowed(
        datetime(2026, 11, 1, 12, 0, tzinfo=UTC), ["America/New_York"], DEFAULT
    ) == datetime(2026, 11, 1, 14, 0, tzinfo=UTC)


def test_quiet_hours_ending_in_a_dst_gap_end_at_the_gap() -> None:
    # quiet until 02:30, but on 8 March 2026 New York skips from 02:00 to 03:00 EDT (07:00 UTC)
    quiet = QuietHours(time(22, 0), time(2, 30))
    assert policy.next_allowed(
        datetime(2026, 3, 8, 6, 30, tzinfo=UTC), ["America/New_York"], quiet
    ) == datetime(2026, 3, 8, 7, 0, tzinfo=UTC)


def test_naive_now_means_utc_and_the_answer_is_a_whole_minute() -> None:
    found = policy.next_allowed(datetime(2026, 11, 25, 12, 0, 30), ["Asia/Vladivostok"], DEFAULT)
    assert found == datetime(2026, 11, 25, 23, 0, tzinfo=UTC)
    assert found.tzinfo is not None


def test_matches_a_minute_by_minute_search() -> None:
    rng = random.Random(6)
    pool = [*RUSSIAN_MOBILE_ZONES, "Europe/Kaliningrad", "America/New_York", "Europe/Berlin", "Asia/Kolkata"]
    for _ in range(60):
        zones = rng.sample(pool, rng.randint(1, 4))
        start = time(rng.randint(18, 23), rng.choice((0, 30)))
        end = time(rng.randint(6, 10), rng.choice((0, 15)))
        quiet = QuietHours(start, end)
        now = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(minutes=rng.randrange(365 * 24 * 60), seconds=17)
        found = policy.deferral(now, zones, quiet)
        if found is None or found.in_every_zone:
            assert (found and found.not_before) == brute_force(now, zones, quiet), (zones, quiet, now)


@pytest.mark.parametrize(
    ("zones", "message"),
    [([], "at least one"), (["Mars/Olympus"], "IANA"), ("Europe/Moscow", "not one text")],
)
def test_bad_zones_are_refused(zones, message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        policy.next_allowed(NOON, zones, DEFAULT)


def test_bad_quiet_hours_are_refused() -> None:
    with pytest.raises(PolicyError, match="local time"):
        QuietHours("21:00", time(9))  # type: ignore[arg-type]
    with pytest.raises(PolicyError, match="whole minutes"):
        QuietHours(time(21, 0, 30), time(9))


# -- caps -------------------------------------------------------------------------------------


def test_caps_daily_first_then_weekly() -> None:
    caps = FrequencyCaps(per_day=1, per_week=3)
    assert caps.check(0, 0) is None
    assert caps.check(0, 2) is None
    assert caps.check(1, 1) == "capped_daily"
    assert caps.check(1, 3) == "capped_daily"
    assert caps.check(0, 3) == "capped_weekly"
    assert FrequencyCaps(per_day=None, per_week=None).check(50, 50) is None


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "1"])
def test_caps_must_be_positive_whole_numbers(value) -> None:
    with pytest.raises(PolicyError, match="per_day"):
        FrequencyCaps(per_day=value)


# -- the order of checks ------------------------------------------------------------------


def verdict(kind="promo", **overrides):
    facts = dict(
        valid_number=True, erased=False, marketing_last_action="opt_in", service_last_action=None,
        duplicate=False, last_day=0, last_week=0,
    )  # fmt: skip
    facts.update(overrides)
    return policy.exclusion(kind, **facts)


def test_each_check_wins_over_the_ones_after_it() -> None:
    everything_wrong = dict(
        valid_number=False,
        erased=True,
        marketing_last_action="opt_out",
        duplicate=True,
        last_day=5,
        last_week=9,
    )
    expected = ["erased", "invalid_number", "opted_out", "duplicate", "capped_daily", "capped_weekly"]
    fixes = [
        {"erased": False},
        {"valid_number": True},
        {"marketing_last_action": "opt_in"},
        {"duplicate": False},
        {"last_day": 0},
        {"last_week": 0},
    ]
    facts = dict(everything_wrong)
    for reason, fix in zip(expected, fixes, strict=True):
        assert verdict(**facts) == reason
        facts.update(fix)
    assert verdict(**facts) is None


def test_promotions_need_a_current_opt_in() -> None:
    assert verdict(marketing_last_action=None) == "no_consent"
    assert verdict(marketing_last_action="opt_out") == "opted_out"
    assert verdict(marketing_last_action="opt_in") is None


def test_service_messages_need_no_opt_in_stop_on_opt_out_and_are_not_capped() -> None:
    assert verdict("service", marketing_last_action=None) is None
    assert verdict("service", marketing_last_action="opt_out") is None
    assert verdict("service", service_last_action="opt_out") == "opted_out"
    assert verdict("service", last_day=10, last_week=10) is None


def test_every_reason_has_a_user_facing_explanation_in_english_and_russian() -> None:
    for reason in (*policy.POLICY_ORDER, *policy.HELD_REASONS):
        with i18n.language("en"):
            assert policy.explain(reason) == policy.SKIP_REASONS[reason]
        with i18n.language("ru"):
            russian = policy.explain(reason)
        assert russian != policy.SKIP_REASONS[reason] and any("а" <= ch <= "я" for ch in russian)
    with i18n.language("ru"):
        assert policy.explain("no_consent") == "нет действующего согласия на рекламу"
    assert policy.explain("something_new") == "something_new"
    assert policy.explain(None) == "—"
    assert policy.EXCLUSION_REASONS.isdisjoint(policy.HELD_REASONS)


# -- the split --------------------------------------------------------------------------------


def test_split_unit_is_fixed_per_campaign_and_contact() -> None:
    assert policy.split_unit(12, 34) == policy.split_unit(12, 34)
    assert policy.split_unit(12, 34) != policy.split_unit(13, 34)
    assert 0.0 <= policy.split_unit(1, 1) < 1.0


def test_split_proportions_holdout_then_test_then_remainder() -> None:
    n = 100_000
    groups = [
        policy.assign(policy.split_unit(7, i), ["A", "B"], holdout_fraction=0.05, test_fraction=0.2)
        for i in range(n)
    ]
    share = {g: groups.count(g) / n for g in set(groups)}
    assert share[policy.HOLDOUT] == pytest.approx(0.05, abs=0.005)
    assert share["A"] == pytest.approx(0.10, abs=0.005)
    assert share["B"] == pytest.approx(0.10, abs=0.005)
    assert share[policy.REMAINDER] == pytest.approx(0.75, abs=0.007)


def test_without_a_test_fraction_everyone_but_the_holdout_gets_a_variant() -> None:
    assert policy.assign(0.999999, ["A", "B", "C"]) == "C"
    assert policy.assign(0.0, ["A", "B", "C"]) == "A"
    assert policy.assign(0.04, ["A"], holdout_fraction=0.05) == policy.HOLDOUT
    assert policy.assign(0.05, ["A"], holdout_fraction=0.05) == "A"
    assert policy.assign(0.26, ["A", "B"], holdout_fraction=0.05, test_fraction=0.2) == policy.REMAINDER


def test_quiet_hours_read_from_settings_text_and_print_back() -> None:
    assert policy.parse_quiet_hours("21:00-09:00") == policy.QuietHours()
    assert policy.parse_quiet_hours(" 22:30 – 08:15 ") == policy.QuietHours(time(22, 30), time(8, 15))
    assert policy.parse_quiet_hours("off") == policy.NO_QUIET_HOURS
    assert not policy.NO_QUIET_HOURS.is_quiet(time(3, 0))
    assert str(policy.QuietHours(time(22, 30), time(8, 0))) == "22:30-08:00"


@pytest.mark.parametrize("text", ["21-09", "21:00", "21:00-9:60", "nine to five"])
def test_unreadable_quiet_hours_are_refused_with_the_text(text: str) -> None:
    with pytest.raises(policy.PolicyError, match="quiet hours"):
        policy.parse_quiet_hours(text)


def test_caps_read_from_settings() -> None:
    assert policy.parse_cap("2") == 2
    assert policy.parse_cap("off") is None and policy.parse_cap("") is None
    with pytest.raises(policy.PolicyError, match="SMSOPS_DAILY_CAP"):
        policy.parse_cap("0", "SMSOPS_DAILY_CAP")


def test_install_wide_defaults_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from smsops import config

    monkeypatch.setenv("SMSOPS_QUIET_HOURS", "20:00-10:00")
    monkeypatch.setenv("SMSOPS_DAILY_CAP", "off")
    monkeypatch.setenv("SMSOPS_WEEKLY_CAP", "5")
    monkeypatch.setenv("SMSOPS_SEED_NUMBERS", "+79990000001, 8 999 000 00 02,")
    assert config.quiet_hours() == policy.QuietHours(time(20, 0), time(10, 0))
    assert config.frequency_caps() == policy.FrequencyCaps(None, 5)
    assert config.seed_numbers() == ("+79990000001", "8 999 000 00 02")
    monkeypatch.setenv("SMSOPS_REFRESH_MINUTES", "-1")
    with pytest.raises(ValueError, match="SMSOPS_REFRESH_MINUTES"):
        config.refresh_minutes()
