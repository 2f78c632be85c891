"""Message-core benchmarks: segment analysis and phone normalisation.

Run with `make bench`, or `.venv/bin/pytest -m bench -s -p no:cacheprovider bench/test_message_core.py`.
Figures go to docs/performance.md. Targets (issue 3): analyze ≥ 300,000 messages/s on one core
for 100-300 character Russian and English messages; normalize 1,000,000 numbers with realistic
repeats in ≤ 20 s.
"""

from __future__ import annotations

import random
import time
from datetime import datetime

import pytest

from smsops import demo, encoding, phones

pytestmark = pytest.mark.bench

RU_TEXT = (
    "Анна ваш заказ передан в доставку Отследить скидка на следующую покупку по промокоду до конца "
    "недели спасибо что выбираете нас новая коллекция уже в магазине бонусы сгорят через три дня"
)
EN_TEXT = (
    "Anna your order has shipped Track it here discount on your next purchase with code until Sunday "
    "thanks for shopping with us new collection is in store bonus points expire in three days"
)
RU_WORDS, EN_WORDS = RU_TEXT.split(), EN_TEXT.split()


def messages(words: list[str], count: int, rng: random.Random) -> list[str]:
    out = []
    for _ in range(count):
        target = rng.randint(100, 270)
        text = []
        while len(" ".join(text)) < target:
            text.append(rng.choice(words))
        out.append(" ".join(text)[:target] + " https://s.example/ab12cd")
    return out


@pytest.mark.parametrize("language", ["ru", "en"])
def test_analyze_throughput_on_one_core(language):
    rng = random.Random(3)
    texts = messages(RU_WORDS if language == "ru" else EN_WORDS, 2_000, rng)
    best = 0.0
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(50):
            for text in texts:
                encoding.analyze(text)
        best = max(best, 50 * len(texts) / (time.perf_counter() - started))
    segments = sum(encoding.analyze(t).segments for t in texts) / len(texts)
    chars = sum(map(len, texts)) / len(texts)
    print(f"\nanalyze {language}: {best:,.0f} messages/s (mean {chars:.0f} chars, {segments:.2f} segments)")
    assert best > 0


def test_normalize_a_million_numbers_with_repeats():
    """The demo generator's phone column: CRM formats, foreign, landline, invalid, duplicates."""
    generator = demo._Demo(1_000_000, 42, datetime(2026, 11, 1))
    original = phones.normalize_many
    captured: list[list] = []

    def capture(raws, *args, **kwargs):  # take the column the generator builds, skip the work
        captured.append(list(raws))
        return [phones.normalize(None)] * len(captured[-1])

    phones.normalize_many = capture
    try:
        generator.contacts()
    finally:
        phones.normalize_many = original
    column = captured[0]
    for processes in (None, 2):
        phones.clear_cache()
        started = time.perf_counter()
        phones.normalize_many(column, default_region="RU", processes=processes)
        seconds = time.perf_counter() - started
        print(
            f"\nnormalize {len(column):,} numbers ({len(set(column)):,} distinct), processes={processes}: {seconds:.1f} s"
        )
