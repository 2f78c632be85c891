import pytest

from smsops.senders import SenderError, validate


@pytest.mark.parametrize(
    ("raw", "value", "kind"),
    [
        ("SHOPMARKET", "SHOPMARKET", "alphanumeric"),
        (" Shop-24 ", "Shop-24", "alphanumeric"),
        ("A&B Store", "A&B Store", "alphanumeric"),
        ("ABCDEFGHIJK", "ABCDEFGHIJK", "alphanumeric"),  # exactly 11
        ("+7 912 345-67-89", "+79123456789", "long_code"),
        ("+14155238886", "+14155238886", "long_code"),
        ("900", "900", "short_code"),
        ("12345678", "12345678", "short_code"),
    ],
)
def test_valid_senders(raw, value, kind):
    sender = validate(raw)
    assert (sender.value, sender.kind) == (value, kind)


@pytest.mark.parametrize(
    ("raw", "rule"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("ABCDEFGHIJKL", "12 characters; at most 11"),
        ("МАГАЗИН", "Latin letters"),
        ("Shop!", "'!'"),
        ("12-34", "at least one letter"),
        ("A  B", "consecutive spaces"),
        ("+7 912 ABC", "'+' and digits"),
        ("+999123", "not a phone number"),
        ("+7 000 000 00 00", "not a valid number"),
        ("12", "3 to 8"),
        ("123456789", "3 to 8"),
    ],
)
def test_invalid_senders_name_the_rule(raw, rule):
    with pytest.raises(SenderError, match=rule.replace("+", r"\+")):
        validate(raw)


def test_a_non_string_sender_is_refused():
    with pytest.raises(SenderError, match="must be text"):
        validate(None)  # type: ignore[arg-type]
