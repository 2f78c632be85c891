"""GSM 03.38 / UCS-2 encoding and segmentation, and the helpers that make a text cheaper."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smsops import encoding
from smsops.encoding import Analysis, EncodingInputError, analyze, savings, smart_replace, transliterate

# GSM 03.38 default alphabet by code, 0x00-0x7F; None at 0x1B, the escape to the extension table.
# fmt: off
GSM_TABLE = [
    "@", "£", "$", "¥", "è", "é", "ù", "ì", "ò", "Ç", "\n", "Ø", "ø", "\r", "Å", "å",
    "Δ", "_", "Φ", "Γ", "Λ", "Ω", "Π", "Ψ", "Σ", "Θ", "Ξ", None, "Æ", "æ", "ß", "É",
    " ", "!", '"', "#", "¤", "%", "&", "'", "(", ")", "*", "+", ",", "-", ".", "/",
    "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", ":", ";", "<", "=", ">", "?",
    "¡", "A", "B", "C", "D", "E", "F", "G", "H", "I", "J", "K", "L", "M", "N", "O",
    "P", "Q", "R", "S", "T", "U", "V", "W", "X", "Y", "Z", "Ä", "Ö", "Ñ", "Ü", "§",
    "¿", "a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l", "m", "n", "o",
    "p", "q", "r", "s", "t", "u", "v", "w", "x", "y", "z", "ä", "ö", "ñ", "ü", "à",
]
# The extension table: character → code after the escape.
GSM_EXTENSION = {
    "\f": 0x0A, "^": 0x14, "{": 0x28, "}": 0x29, "\\": 0x2F, "[": 0x3C, "~": 0x3D, "]": 0x3E, "|": 0x40,
    "€": 0x65,
}
# fmt: on
GSM_CHARS = "".join(ch for ch in GSM_TABLE if ch) + "".join(GSM_EXTENSION)


def units_of(text: str, enc: str) -> int:
    """Reference unit count, one character at a time."""
    if enc == "GSM-7":
        return sum(2 if ch in GSM_EXTENSION else 1 for ch in text)
    return sum(2 if ord(ch) > 0xFFFF else 1 for ch in text)


def reference_parts(text: str) -> tuple[str, tuple[str, ...]]:
    """Reference encoding and greedy split, walking one character at a time."""
    enc = "GSM-7" if all(ch in GSM_CHARS for ch in text) else "UCS-2"
    single, multi = (160, 153) if enc == "GSM-7" else (70, 67)
    if units_of(text, enc) <= single:
        return enc, (text,) if text else ()
    parts, current, used = [], "", 0
    i = 0
    while i < len(text):
        ch = text[i]
        # A high and a low surrogate code point in a row travel together.
        pair = (
            enc == "UCS-2"
            and "\ud800" <= ch <= "\udbff"
            and text[i + 1 : i + 2]
            and ("\udc00" <= text[i + 1] <= "\udfff")
        )
        chunk = text[i : i + 2] if pair else ch
        weight = units_of(chunk, enc)
        if used + weight > multi:
            parts.append(current)
            current, used = "", 0
        current += chunk
        used += weight
        i += len(chunk)
    parts.append(current)
    return enc, tuple(parts)


def test_gsm_basic_table_is_the_gsm_03_38_default_alphabet() -> None:
    assert "".join(ch for ch in GSM_TABLE if ch) == encoding.GSM_BASIC
    assert set(encoding.GSM_EXTENSION) == set(GSM_EXTENSION)


@pytest.mark.parametrize(
    ("text", "enc", "units", "segments", "part_lengths"),
    [
        ("", "GSM-7", 0, 0, []),
        ("a" * 160, "GSM-7", 160, 1, [160]),
        ("a" * 161, "GSM-7", 161, 2, [153, 8]),
        ("a" * 306, "GSM-7", 306, 2, [153, 153]),
        ("a" * 307, "GSM-7", 307, 3, [153, 153, 1]),
        ("€", "GSM-7", 2, 1, [1]),
        ("a" * 158 + "€", "GSM-7", 160, 1, [159]),
        ("a" * 159 + "€", "GSM-7", 161, 2, [153, 7]),
        # "€" would take septets 153 and 154 of the first part: it moves to the second.
        ("a" * 152 + "€" + "b" * 10, "GSM-7", 164, 2, [152, 11]),
        ("a" * 151 + "€" + "b" * 10, "GSM-7", 163, 2, [152, 10]),
        ("ΔΦΓΛΩΠΨΣΘΞ", "GSM-7", 10, 1, [10]),
        ("é ü à", "GSM-7", 5, 1, [5]),
        ("Ç", "GSM-7", 1, 1, [1]),
        ("a\r\nb", "GSM-7", 4, 1, [4]),
        ("^{}\\[~]|€\f", "GSM-7", 20, 1, [10]),
        ("á ê", "UCS-2", 3, 1, [3]),
        ("ç", "UCS-2", 1, 1, [1]),
        ("`", "UCS-2", 1, 1, [1]),
        ("я" * 70, "UCS-2", 70, 1, [70]),
        ("я" * 71, "UCS-2", 71, 2, [67, 4]),
        ("a" * 70, "GSM-7", 70, 1, [70]),
        ("ж" + "a" * 69, "UCS-2", 70, 1, [70]),
        ("ж" + "a" * 70, "UCS-2", 71, 2, [67, 4]),
        ("я" * 134, "UCS-2", 134, 2, [67, 67]),
        ("я" * 135, "UCS-2", 135, 3, [67, 67, 1]),
        ("😀", "UCS-2", 2, 1, [1]),
        ("я" * 68 + "😀", "UCS-2", 70, 1, [69]),
        # The emoji would take units 67 and 68 of the first part: it moves to the second.
        ("я" * 66 + "😀" + "я" * 10, "UCS-2", 78, 2, [66, 11]),
        ("я" * 65 + "😀" + "я" * 10, "UCS-2", 77, 2, [66, 10]),
    ],
)
def test_analyze_counts_units_and_splits_segments(
    text: str, enc: str, units: int, segments: int, part_lengths: list[int]
) -> None:
    a = analyze(text)
    assert (a.encoding, a.units, a.segments) == (enc, units, segments)
    assert [len(p) for p in a.parts] == part_lengths
    assert "".join(a.parts) == text
    assert a.chars == len(text)


def test_cyrillic_text_of_70_characters_is_one_segment_and_71_is_two() -> None:
    text = "Ваш заказ №1234 передан в доставку. Курьер привезёт его завтра с 10 до 1"
    assert len(text[:70]) == 70
    assert analyze(text[:70]).segments == 1
    assert analyze(text[:71]).segments == 2


def test_ucs2_chars_lists_the_culprits_once_in_order_of_appearance() -> None:
    a = analyze("Hello, Мир! Mир — ç😀 à")
    assert a.encoding == "UCS-2"
    assert a.ucs2_chars == ("М", "и", "р", "—", "ç", "😀")
    assert analyze("Hello € [world]").ucs2_chars == ()


def test_remaining_counts_units_left_in_the_last_segment() -> None:
    assert analyze("").remaining == 160
    assert analyze("€").remaining == 158
    assert analyze("a" * 161).remaining == 145
    assert analyze("я").remaining == 69
    assert analyze("я" * 71).remaining == 63


def test_lone_surrogates_count_one_unit_each_and_do_not_crash() -> None:
    a = analyze("\ud83d" * 80)
    assert (a.encoding, a.units, a.segments) == ("UCS-2", 80, 2)
    # A high and a low surrogate kept apart by Python are still not split between parts.
    text = "я" * 66 + "\ud83d\ude00" + "я" * 10
    a = analyze(text)
    assert a.units == 78
    assert [len(p) for p in a.parts] == [66, 12]


@pytest.mark.parametrize("text", [None, b"hello", 42])
def test_non_text_is_a_type_error_naming_the_type(text: object) -> None:
    with pytest.raises(EncodingInputError, match=type(text).__name__):
        analyze(text)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        transliterate(text)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "enc", "units", "segments"),
    [
        ("a" * 10_000_000, "GSM-7", 10_000_000, 65_360),
        ("ab€" * 1_000_000, "GSM-7", 4_000_000, 26_316),
        ("я" * 10_000_000, "UCS-2", 10_000_000, 149_254),
        ("я😀" * 1_000_000, "UCS-2", 3_000_000, 45_455),
    ],
)
def test_very_long_text_is_analysed(text: str, enc: str, units: int, segments: int) -> None:
    a = analyze(text)
    assert (a.encoding, a.units, a.segments) == (enc, units, segments)
    assert len(a.parts) == segments
    assert "".join(a.parts) == text


def test_result_is_immutable() -> None:
    a = analyze("hi")
    with pytest.raises(AttributeError):
        a.text = "bye"  # type: ignore[misc]


# ---------------------------------------------------------------------------------------
# Properties


def check_analysis(text: str, a: Analysis) -> None:
    enc, parts = reference_parts(text)
    assert a.text == text
    assert a.encoding == enc
    assert a.units == units_of(text, enc)
    assert "".join(a.parts) == text
    assert a.segments == len(a.parts)
    assert a.parts == parts
    single, multi = (160, 153) if enc == "GSM-7" else (70, 67)
    limit = single if len(a.parts) == 1 else multi
    for i, part in enumerate(a.parts):
        assert part
        assert units_of(part, enc) <= limit
        following = a.parts[i + 1][:1] if i + 1 < len(a.parts) else ""
        if enc == "UCS-2" and following:
            assert not ("\ud800" <= part[-1] <= "\udbff" and "\udc00" <= following <= "\udfff")
    if enc == "GSM-7":
        assert a.ucs2_chars == ()
    else:
        assert a.ucs2_chars == tuple(dict.fromkeys(ch for ch in text if ch not in GSM_CHARS))


any_text = st.text(
    alphabet=st.one_of(
        st.characters(),
        st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF),
        st.characters(min_codepoint=0x1F600, max_codepoint=0x1F64F),
    ),
    max_size=500,
)
gsm_heavy_text = st.text(alphabet=st.sampled_from(GSM_CHARS + "€€€{}" + "ab"), max_size=800)
mostly_gsm_text = st.text(alphabet=st.sampled_from(GSM_CHARS + "€{" + "яç😀"), max_size=800)
cyrillic_with_emoji = st.lists(
    st.sampled_from([*"абвгдеёжз ,.!€{😀🎉\ud83d\ude00", "\ud83d\ude00"]), max_size=400
).map("".join)


@settings(max_examples=300)
@given(st.one_of(any_text, gsm_heavy_text, mostly_gsm_text, cyrillic_with_emoji))
def test_parts_rebuild_the_text_and_each_fits_its_segment(text: str) -> None:
    check_analysis(text, analyze(text))


@settings(max_examples=200)
@given(st.integers(1, 3), st.integers(-4, 4), st.sampled_from(["€", "{", "😀", "я", "a", "\ud83d\ude00"]))
def test_splitting_near_segment_boundaries(parts: int, offset: int, special: str) -> None:
    filler = "a" if special in ("€", "{", "a") else "я"
    per_part = 67 if filler == "я" else 153
    at = max(per_part * parts + offset, 0)
    text = filler * at + special + filler * 20
    check_analysis(text, analyze(text))


# ---------------------------------------------------------------------------------------
# Making a text cheaper


def test_smart_replace_swaps_look_alikes_for_gsm_characters() -> None:
    text = "«Скидка» — 20%… ‘только’ “сегодня”\u00a0до\u202f21:00 • бонус\u200b − 5 ´"
    replaced, changes = smart_replace(text)
    assert replaced == '"Скидка" - 20%... \'только\' "сегодня" до 21:00 - бонус - 5 \''
    assert changes == {
        "«": '"', "»": '"', "—": "-", "…": "...", "‘": "'", "’": "'", "“": '"', "”": '"',
        "\u00a0": " ", "\u202f": " ", "•": "-", "\u200b": "", "−": "-", "´": "'",
    }  # fmt: skip


def test_smart_replace_leaves_plain_text_alone() -> None:
    assert smart_replace("Hello, world!") == ("Hello, world!", {})


def test_smart_analysis_can_turn_a_text_into_gsm() -> None:
    text = "Your order ships today – thanks! “See you soon”…"
    assert analyze(text).encoding == "UCS-2"
    smart = analyze(text, smart=True)
    assert smart.encoding == "GSM-7"
    assert smart.text == 'Your order ships today - thanks! "See you soon"...'


@pytest.mark.parametrize(
    ("text", "latin"),
    [
        ("Щука", "Shchuka"),
        ("ЩУКА", "SHCHUKA"),
        ("щука", "shchuka"),
        ("Юля и Яна", "Yulya i Yana"),
        ("ООО «ЮГ»", 'OOO "YUG"'),
        ("Я", "Ya"),
        ("Жёлтый ёж", "Zheltyy ezh"),
        ("Подъезд, объявление, мышь", "Podezd, obyavlenie, mysh"),
        ("Хочу чай, эх", "Khochu chay, ekh"),
        ("Цена 990 ₽", "Tsena 990 rub."),
        ("Заказ № 5", "Zakaz No. 5"),
        ("Hello", "Hello"),
    ],
)
def test_transliterate_writes_cyrillic_in_latin(text: str, latin: str) -> None:
    assert transliterate(text) == latin


def test_transliterated_russian_message_becomes_gsm_and_saves_segments() -> None:
    text = (
        "Анна, ваш заказ №12345 передан в доставку — курьер привезёт его завтра с 10:00 до 14:00. "
        "Скидка 15% на следующую покупку по промокоду «ЗИМА»!"
    )
    latin = transliterate(text)
    assert analyze(latin).encoding == "GSM-7"
    assert latin.startswith("Anna, vash zakaz No.12345 peredan v dostavku - kurer privezet")
    assert savings(text) == encoding.Savings(original_segments=3, smart_segments=3, transliterated_segments=1)
