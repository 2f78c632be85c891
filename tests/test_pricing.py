import pytest

from smsops import pricing
from smsops.reference import sms_prices


def test_listed_countries_have_their_own_price_and_others_the_default():
    table = sms_prices()
    for country in ("RU", "KZ", "BY", "UZ", "AM", "GE", "US", "GB", "DE"):
        p = pricing.price(country)
        assert not p.is_default and p.per_segment == table[country][1]
    for unknown in ("FR", None, "", "zz"):
        p = pricing.price(unknown)
        assert p.is_default and p.per_segment == table["ZZ"][1]


def test_message_cost_is_segments_times_price():
    assert pricing.message_cost(3, "RU") == pytest.approx(3 * sms_prices()["RU"][1])
    assert pricing.message_cost(0, "RU") == 0
    with pytest.raises(ValueError, match="negative"):
        pricing.message_cost(-1, "RU")


def test_estimate_splits_the_bill_by_country():
    ru, kz, zz = (sms_prices()[c][1] for c in ("RU", "KZ", "ZZ"))
    est = pricing.estimate([("RU", 1), ("RU", 2), ("KZ", 1), (None, 4), ("ru", 1)])
    assert est.messages == 5 and est.segments == 9
    by = {r.country: r for r in est.by_country}
    assert by["RU"].messages == 3 and by["RU"].segments == 4
    assert by["RU"].cost == pytest.approx(4 * ru)
    assert by["ZZ"].cost == pytest.approx(4 * zz)
    assert est.total == pytest.approx(4 * ru + kz + 4 * zz)
    assert est.currency == "RUB"
    assert [r.cost for r in est.by_country] == sorted((r.cost for r in est.by_country), reverse=True)


def test_an_empty_audience_costs_nothing():
    est = pricing.estimate([])
    assert est.messages == 0 and est.total == 0 and est.by_country == ()
