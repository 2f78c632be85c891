"""Phone numbers as CRMs hold them: normalisation to E.164, SMS reachability, masking."""

from __future__ import annotations

import random

import phonenumbers
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smsops import phones
from smsops.phones import PhoneInputError, PhoneNumber, UnknownRegionError, mask, normalize, normalize_many

REASONS = {"empty", "unparseable", "too_short", "too_long", "invalid", "not_mobile"}


@pytest.mark.parametrize(
    "raw",
    [
        "8 (912) 345-67-89",
        "+7 912 345 67 89",
        "+7\u00a0912\u00a0345\u00a067\u00a089",
        "+7\u2009912\u202f345 67 89",
        "79123456789",
        "89123456789",
        "9123456789",
        "8.912.345.67.89",
        "8-912-345-67-89",
        "+7(912)345-67-89",
        "+79123456789",
        "  +7 912 345 67 89\n",
        "+7 912 345-67-89 доб. 123",
        "8 912 345 67 89 ext. 12",
        "8(912)3456789, доб.12",
        "+7 912 345 67 89 x12",
        "\x00+7 912\u200b 345\x07 67 89",
    ],
)
def test_russian_mobile_in_every_crm_form_becomes_one_e164(raw: str) -> None:
    number = normalize(raw)
    assert number == PhoneNumber(
        raw=raw,
        e164="+79123456789",
        valid=True,
        reason=None,
        number_type="mobile",
        country="RU",
        time_zones=number.time_zones,
    )


@pytest.mark.parametrize(
    ("raw", "e164", "country", "number_type"),
    [
        ("+7 701 123 45 67", "+77011234567", "KZ", "mobile"),
        ("8 (701) 123-45-67", "+77011234567", "KZ", "mobile"),
        ("+375 29 123-45-67", "+375291234567", "BY", "mobile"),
        ("+998 90 123 45 67", "+998901234567", "UZ", "mobile"),
        ("+998 (90) 123-45-67", "+998901234567", "UZ", "mobile"),
        ("+374 91 123456", "+37491123456", "AM", "mobile"),
        ("+995 555 12 34 56", "+995555123456", "GE", "mobile"),
        ("+49 151 12345678", "+4915112345678", "DE", "mobile"),
        ("+49 (0)151 12345678", "+4915112345678", "DE", "mobile"),
        ("8 10 49 151 12345678", "+4915112345678", "DE", "mobile"),
        ("+44 7400 123456", "+447400123456", "GB", "mobile"),
        ("+1 (415) 523-4567", "+14155234567", "US", "fixed_line_or_mobile"),
    ],
)
def test_foreign_mobiles_are_valid_with_their_country(
    raw: str, e164: str, country: str, number_type: str
) -> None:
    number = normalize(raw)
    assert (number.e164, number.valid, number.reason, number.country, number.number_type) == (
        e164,
        True,
        None,
        country,
        number_type,
    )


def test_russian_landline_keeps_its_e164_but_cannot_receive_sms() -> None:
    number = normalize("8 (495) 123-45-67")
    assert number.e164 == "+74951234567"
    assert not number.valid
    assert number.reason == "not_mobile"
    assert number.number_type == "fixed_line"
    assert number.country == "RU"


def test_toll_free_number_is_not_mobile() -> None:
    number = normalize("8 800 555 35 35")
    assert (number.e164, number.valid, number.reason, number.number_type) == (
        "+78005553535",
        False,
        "not_mobile",
        "toll_free",
    )


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (None, "empty"),
        ("", "empty"),
        ("   ", "empty"),
        ("\t\u00a0\u200b", "empty"),
        ("-", "empty"),
        ("нет", "unparseable"),
        ("тел. уточнить", "unparseable"),
        ("8 800 ЗВОНИ", "unparseable"),
        ("8 800 ZVONI", "unparseable"),
        ("+7 912 345 67 89 (моб.)", "unparseable"),
        ("0", "too_short"),
        ("712", "too_short"),
        ("912-34-12", "too_short"),
        ("8 (912) 345-12", "too_short"),
        ("+7 912 345 67 89 12 34 56 78 90", "too_long"),
        ("1" * 40, "too_long"),
        ("8" * 65, "too_long"),
        ("+7 (000) 000-00-12", "invalid"),
        ("+7 912 345 67 89 12 34", "invalid"),
        ("+999 123456789", "invalid"),
    ],
)
def test_unusable_values_say_why(raw: str | None, reason: str) -> None:
    number = normalize(raw)
    assert not number.valid
    assert number.reason == reason
    assert number.e164 is None
    assert number.time_zones == ()


def test_huge_string_is_too_long_without_being_parsed() -> None:
    raw = "8" * 10_000_000
    number = normalize(raw)
    assert (number.valid, number.reason, number.number_type) == (False, "too_long", None)


@pytest.mark.parametrize("raw", [b"+79123456789", 79123456789, ["+79123456789"]])
def test_non_text_input_is_a_type_error_naming_the_type(raw: object) -> None:
    with pytest.raises(PhoneInputError, match=type(raw).__name__):
        normalize(raw)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        normalize_many(["+79123456789", raw])  # type: ignore[list-item]


def test_unknown_default_region_is_refused() -> None:
    with pytest.raises(UnknownRegionError, match="'XX'"):
        normalize("9123456789", default_region="XX")


def test_default_region_decides_numbers_without_country_code() -> None:
    assert normalize("030 1234567", default_region="DE").e164 == "+49301234567"
    assert normalize("0151 12345678", default_region="de").country == "DE"


def test_russian_mobile_time_zones_are_candidates_across_the_country() -> None:
    zones = normalize("+7 912 345 67 89").time_zones
    assert isinstance(zones, tuple)
    assert len(zones) > 1
    assert "Europe/Moscow" in zones
    assert "Asia/Vladivostok" in zones
    assert "Etc/Unknown" not in zones


def test_moscow_landline_time_zone_is_moscow() -> None:
    assert normalize("+7 495 123 45 67").time_zones == ("Europe/Moscow",)


def test_repeated_value_is_served_from_the_cache() -> None:
    assert normalize("8 (912) 000-11-22") is normalize("8 (912) 000-11-22")


def test_normalize_many_keeps_input_order_and_shares_results_for_repeats() -> None:
    raws = ["8 (912) 345-67-89", None, "нет", "+7 912 345 67 89", "8 (912) 345-67-89", "", None]
    result = normalize_many(iter(raws))
    assert [r.raw for r in result] == raws
    assert result == [normalize(raw) for raw in raws]
    assert result[0] is result[4]
    assert result[1] is result[6]
    assert result[0].e164 == result[3].e164 == "+79123456789"


def test_normalize_many_of_nothing_is_empty() -> None:
    assert normalize_many([]) == []


def _distinct_column(n: int, seed: int) -> list[str | None]:
    rng = random.Random(seed)
    forms = ("8 ({a}) {b}-{c}-{d}", "+7 {a} {b} {c} {d}", "7{a}{b}{c}{d}", "8.{a}.{b}.{c}.{d}")
    mobiles = rng.sample(range(9_000_000_000, 10_000_000_000), n)
    column: list[str | None] = []
    for i, mobile in enumerate(mobiles):
        s = str(mobile)
        column.append(forms[i % len(forms)].format(a=s[:3], b=s[3:6], c=s[6:8], d=s[8:]))
    column[::97] = [f"+7 495 {i % 1000:03d} {i % 100:02d} {i % 97:02d}" for i in range(len(column[::97]))]
    column[::101] = [f"+49 151 {i:08d}" for i in range(len(column[::101]))]
    column[::1009] = [None] * len(column[::1009])
    return column


def test_normalize_many_in_two_processes_matches_serial() -> None:
    column = _distinct_column(60_000, seed=11)
    column += column[:5_000]  # repeats too
    assert len(set(column)) >= phones.PARALLEL_THRESHOLD

    parallel = normalize_many(column, default_region="RU", processes=2)
    serial = normalize_many(column, default_region="RU")

    assert parallel == serial
    assert [p.raw for p in parallel] == column
    assert parallel[0] is parallel[60_000]
    assert sum(p.valid for p in parallel) > 55_000


@pytest.mark.parametrize(
    ("e164", "masked"),
    [
        ("+79123456789", "+7 912 ***-**-89"),
        ("+14155234567", "+1 415 ***-**-67"),
        ("+4915112345678", "+49 151 ******-78"),
        ("+375291234567", "+375 291 ****-67"),
        (None, "—"),
        ("8 912 345", "* *** *45"),
    ],
)
def test_mask_hides_the_middle_of_the_number(e164: str | None, masked: str) -> None:
    assert mask(e164) == masked


def test_mask_refuses_non_text() -> None:
    with pytest.raises(PhoneInputError, match="int"):
        mask(79123456789)  # type: ignore[arg-type]


@settings(max_examples=400)
@given(st.one_of(st.none(), st.text(max_size=80)))
def test_normalize_never_raises_on_text(raw: str | None) -> None:
    number = normalize(raw)
    if number.valid:
        assert number.e164 is not None
        assert number.e164.startswith("+")
        assert number.reason is None
    else:
        assert number.reason in REASONS
    assert "Etc/Unknown" not in number.time_zones


_SEPARATOR = st.sampled_from(["", "", "", " ", "-", ".", "(", ")", "\u00a0"])


@st.composite
def ru_mobile_forms(draw: st.DrawFn) -> str:
    prefix = draw(st.sampled_from(["", "+7", "8", "7", "+7 ", "8 ", "+7(", "8 ("]))
    digits = "9" + "".join(draw(st.lists(st.sampled_from("0123456789"), min_size=9, max_size=9)))
    return prefix + "".join(draw(_SEPARATOR) + d for d in digits) + draw(_SEPARATOR)


@settings(max_examples=500)
@given(ru_mobile_forms())
def test_russian_mobile_forms_agree_with_libphonenumber(raw: str) -> None:
    try:
        parsed = phonenumbers.parse(raw, "RU")
    except phonenumbers.NumberParseException:
        expected = None
    else:
        valid = phonenumbers.is_valid_number(parsed)
        expected = phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164) if valid else None
    assert normalize(raw).e164 == expected


def test_clear_cache_forgets_results_but_not_answers() -> None:
    before = normalize("8 (912) 000-11-33")
    phones.clear_cache()
    after = normalize("8 (912) 000-11-33")
    assert after == before
    assert after is not before


def test_the_per_prefix_shortcut_agrees_with_libphonenumber_on_random_russian_mobiles():
    """normalize answers +79… numbers from a verdict cached per 6-digit prefix; that verdict
    must be what libphonenumber says for every number of the range."""
    import random

    import phonenumbers

    rng = random.Random(20261125)
    phones.clear_cache()
    for _ in range(20_000):
        digits = "9" + "".join(rng.choice("0123456789") for _ in range(9))
        raw = rng.choice(["8", "+7", "7", "", "8 (", "+7 "]) + digits
        parsed = phonenumbers.parse(raw, "RU")
        valid = phonenumbers.is_valid_number(parsed)
        kind = phonenumbers.number_type(parsed)
        got = phones.normalize(raw)
        assert got.e164 == (phonenumbers.format_number(parsed, 0) if valid else None), raw
        assert got.valid == (valid and kind in (1, 2)), raw
