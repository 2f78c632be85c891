"""A/B verdicts: Wilson intervals, the two-proportion test, and the sample still needed."""

from __future__ import annotations

import pytest

from smsops import abtest


def test_wilson_interval_matches_a_worked_example():
    # 10 clicks of 100: the Wilson 95% interval is about 5.5% to 17.4%
    low, high = abtest.wilson(10, 100)
    assert low == pytest.approx(0.0552, abs=1e-3) and high == pytest.approx(0.1744, abs=1e-3)
    assert abtest.wilson(0, 50)[0] == 0.0 and abtest.wilson(50, 50)[1] == 1.0
    assert abtest.wilson(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError, match="between 0 and trials"):
        abtest.wilson(11, 10)


def test_two_proportion_p_value_matches_a_textbook_case():
    # 120/1000 vs 90/1000: z = 2.19, two-sided p = 0.028
    assert abtest.two_proportion_p(120, 1000, 90, 1000) == pytest.approx(0.0285, abs=1e-3)
    assert abtest.two_proportion_p(0, 100, 0, 100) == 1.0


def test_a_clear_winner_is_named_with_its_confidence():
    verdict = abtest.compare({"A": (400, 10_000), "B": (520, 10_000)})
    assert verdict.winner == "B"
    assert verdict.confidence > 0.99
    assert verdict.message.startswith("B wins on CTR")
    assert [a.name for a in verdict.arms] == ["B", "A"]


def test_without_a_clear_winner_it_says_what_sample_is_needed():
    verdict = abtest.compare({"A": (40, 1_000), "B": (48, 1_000)})
    assert verdict.winner is None
    assert verdict.needed_per_arm == abtest.sample_needed(0.048, 0.040)
    assert verdict.needed_per_arm > 1_000
    assert "No significant difference" in verdict.message and "more than now" in verdict.message


def test_more_variants_need_more_evidence():
    two = abtest.compare({"A": (100, 2_000), "B": (135, 2_000)})
    three = abtest.compare({"A": (100, 2_000), "B": (135, 2_000), "C": (101, 2_000)})
    assert three.alpha == two.alpha / 2


def test_sample_needed_grows_as_the_difference_shrinks():
    assert abtest.sample_needed(0.05, 0.06) > abtest.sample_needed(0.05, 0.08) > 0
    assert abtest.sample_needed(0.05, 0.05) is None
