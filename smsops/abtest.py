"""Which variant of an A/B test won, how sure we are, and what it would take to know.

The test (stated, so a marketer can repeat it): each variant's rate (clicks or conversions per
delivered message) gets a Wilson 95% interval. The best variant is compared with each other
variant by a two-sided two-proportion z-test with a pooled variance; with more than two
variants the significance level is divided by the number of comparisons (Bonferroni). The
best is the winner when every comparison is significant. The confidence shown is one minus
the largest of those p-values. Without a winner, the sample needed per variant to detect the
observed difference with 80% power at that significance level is estimated.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from statistics import NormalDist

_NORMAL = NormalDist()


@dataclass(frozen=True, slots=True)
class Arm:
    """One variant's result."""

    name: str
    successes: int
    trials: int
    rate: float
    low: float
    high: float


@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome of the test."""

    arms: tuple[Arm, ...]  # best first
    winner: str | None
    confidence: float  # 1 - p of the weakest comparison of the best with another variant
    p_value: float
    alpha: float
    needed_per_arm: int | None  # when there is no winner: recipients per variant to tell
    message: str


def wilson(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of a proportion (sound near 0 and for small samples)."""
    if trials <= 0:
        return 0.0, 1.0
    if not 0 <= successes <= trials:
        raise ValueError(f"successes must be between 0 and trials ({trials}), got {successes}")
    z = _NORMAL.inv_cdf(0.5 + confidence / 2)
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def two_proportion_p(s1: int, n1: int, s2: int, n2: int) -> float:
    """Two-sided p-value of the difference between two proportions (pooled z-test)."""
    if n1 <= 0 or n2 <= 0:
        return 1.0
    pooled = (s1 + s2) / (n1 + n2)
    variance = pooled * (1 - pooled) * (1 / n1 + 1 / n2)
    if variance == 0:
        return 1.0
    z = (s1 / n1 - s2 / n2) / math.sqrt(variance)
    return 2 * (1 - _NORMAL.cdf(abs(z)))


def sample_needed(p1: float, p2: float, alpha: float = 0.05, power: float = 0.8) -> int | None:
    """Recipients per variant to detect ``p1`` vs ``p2`` (two-sided), or None if they are equal."""
    if p1 == p2:
        return None
    z_alpha = _NORMAL.inv_cdf(1 - alpha / 2)
    z_beta = _NORMAL.inv_cdf(power)
    mean = (p1 + p2) / 2
    top = z_alpha * math.sqrt(2 * mean * (1 - mean)) + z_beta * math.sqrt(p1 * (1 - p1) + p2 * (1 - p2))
    return math.ceil(top * top / (p1 - p2) ** 2)


def compare(results: Mapping[str, tuple[int, int]], *, alpha: float = 0.05, metric: str = "CTR") -> Verdict:
    """The verdict for ``{variant: (successes, trials)}`` (two variants or more)."""
    if len(results) < 2:
        raise ValueError(f"an A/B test needs two variants or more, got {len(results)}")
    arms = []
    for name, (successes, trials) in results.items():
        low, high = wilson(successes, trials)
        arms.append(Arm(name, successes, trials, successes / trials if trials else 0.0, low, high))
    arms.sort(key=lambda a: (-a.rate, a.name))
    best, others = arms[0], arms[1:]
    level = alpha / len(others)
    p_values = [two_proportion_p(best.successes, best.trials, o.successes, o.trials) for o in others]
    worst_p = max(p_values)
    confidence = 1 - worst_p
    if worst_p < level and best.rate > others[0].rate:
        message = (
            f"{best.name} wins on {metric}: {best.rate:.1%} against {others[0].rate:.1%} "
            f"for {others[0].name}, confidence {confidence:.0%}."
        )
        return Verdict(tuple(arms), best.name, confidence, worst_p, level, None, message)
    runner = others[0]
    needed = sample_needed(best.rate, runner.rate, level) if best.trials and runner.trials else None
    if needed is None:
        advice = "the variants perform the same so far"
    else:
        have = min(best.trials, runner.trials)
        more = max(needed - have, 0)
        advice = f"about {needed:,} recipients per variant are needed to tell ({more:,} more than now)"
    message = (
        f"No significant difference on {metric} yet ({best.name} {best.rate:.1%} vs "
        f"{runner.name} {runner.rate:.1%}, confidence {confidence:.0%}); {advice}."
    )
    return Verdict(tuple(arms), None, confidence, worst_p, level, needed, message)
