"""An abstention threshold with a stated hallucination bound: risk control with a confidence level.

A model answers, or declines with the abstention sentence. Its risk score on a prompt is the mean token
log-probability it gives the abstention sentence as its reply: the higher, the more it leans to declining. The
served system declines when the model does, or when the score reaches a threshold. On a calibration split of the
unanswerable items, the threshold is the largest one whose calibration loss (unanswerable questions answered, k
of n) has an exact binomial upper confidence bound at level 1 - delta of at most alpha. The loss only grows with
the threshold, so this is an upper-confidence-bound risk-controlling choice (Bates et al., "Distribution-free,
risk-controlling prediction sets", 2021): with probability at least 1 - delta over the calibration draw, the
hallucination rate on exchangeable unanswerable questions is at most alpha. The other split tests it: the
realised rate with its exact interval, and the share of answerable questions still answered.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass

import numpy as np

NEVER = math.inf  # a threshold no score reaches: the model's own abstentions only
ALWAYS = -math.inf  # every prompt declined: the calibration split is too small for the bound


def calibration_split(keys: list[str], fraction: float, seed: int) -> list[bool]:
    """True for the items that calibrate (a seeded share of them, by key), False for those that test."""
    draw = lambda key: int.from_bytes(hashlib.sha256(f"{seed}|calibration|{key}".encode()).digest()[:8], "big") / 2**64  # noqa: E731
    return [draw(key) < fraction for key in keys]


def binomial_upper(k: int, n: int, delta: float) -> float:
    """Exact (Clopper-Pearson) one-sided upper bound at level 1 - delta of a rate seen k times in n."""
    from scipy.stats import beta

    return 1.0 if k >= n else float(beta.ppf(1 - delta, k + 1, n - k))


def tolerated(n: int, alpha: float, delta: float) -> int:
    """The most answered unanswerable items among n whose rate's upper bound is still at most alpha; -1: none."""
    k = -1
    while k + 1 < n and binomial_upper(k + 1, n, delta) <= alpha:
        k += 1
    return k


def items_needed(alpha: float, delta: float) -> int:
    """Calibration items needed to state the bound at all (none of them answered): (1 - alpha)^n <= delta."""
    return math.ceil(math.log(delta) / math.log(1 - alpha))


def risk_control_threshold(scores: list[float], abstained: list[bool], alpha: float, delta: float) -> float:
    """The largest threshold t (declining at score >= t) whose count of answered unanswerable items scoring below
    it keeps the upper bound at most alpha. NEVER when the model's own abstentions already do, ALWAYS when no
    threshold can (fewer than items_needed calibration items)."""
    allowed = tolerated(len(scores), alpha, delta)
    if allowed < 0:
        return ALWAYS
    answered = sorted(s for s, a in zip(scores, abstained) if not a)
    if len(answered) <= allowed:
        return NEVER
    return float(answered[allowed])  # items strictly below it: exactly `allowed`; ties decline


def declines(score: float, abstained: bool, threshold: float) -> bool:
    return abstained or score >= threshold


def clopper_pearson(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact binomial interval of a rate."""
    from scipy.stats import beta

    if n == 0:
        return 0.0, 1.0
    tail = (1 - level) / 2
    low = 0.0 if successes == 0 else float(beta.ppf(tail, successes, n - successes + 1))
    high = 1.0 if successes == n else float(beta.ppf(1 - tail, successes + 1, n - successes))
    return low, high


@dataclass
class AbstentionBound:
    alpha: float
    confidence: float  # 1 - delta: the probability over calibration draws that the rate is at most alpha
    threshold: float  # decline at a score >= this (inf: never beyond the model's own abstentions; -inf: always)
    calibration_items: int  # unanswerable items that set the threshold
    test_items: int  # unanswerable items that test it
    hallucination_rate: float  # on the test split: unanswerable questions answered, at the threshold
    hallucination_ci: tuple[float, float]
    raw_hallucination_rate: float  # the same items, the model's own abstentions only
    answered_items: int  # answerable items (all of them: the threshold is set on unanswerable ones only)
    answer_rate: float  # answerable questions still answered at the threshold
    raw_answer_rate: float
    f1_at_threshold: float  # golden F1, a declined item scoring 0

    @property
    def exceeded(self) -> bool:
        """The realised rate is above alpha by more than its interval allows."""
        return self.test_items > 0 and self.hallucination_ci[0] > self.alpha

    @property
    def stated(self) -> bool:
        """Whether the calibration split was large enough to state the bound (else every prompt is declined)."""
        return self.threshold != ALWAYS

    def as_dict(self) -> dict:
        out = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}
        out["hallucination_ci"] = list(self.hallucination_ci)
        out["threshold"] = threshold_value(self.threshold)
        out["exceeded"], out["stated"] = self.exceeded, self.stated
        out["items_needed"] = items_needed(self.alpha, 1 - self.confidence)
        return out


def threshold_value(threshold: float) -> float | str:
    """The threshold as JSON, tags and reports show it: a number, or "never" / "always"."""
    return threshold if math.isfinite(threshold) else ("never" if threshold > 0 else "always")


def abstention_bound(
    golden: dict[str, list], unanswerable: dict[str, list], unanswerable_keys: list[str],
    alpha: float, delta: float, fraction: float, seed: int,
) -> AbstentionBound:  # fmt: skip
    """`golden`: {score, abstained, f1} per answerable item; `unanswerable`: {score, abstained} per unanswerable item
    (lists in item order). The unanswerable items split into calibration and test by key; every answerable item
    measures what the threshold costs."""
    u_cal = calibration_split(unanswerable_keys, fraction, seed)
    cal = [i for i, c in enumerate(u_cal) if c]
    test = [i for i, c in enumerate(u_cal) if not c]
    threshold = risk_control_threshold(
        [unanswerable["score"][i] for i in cal], [bool(unanswerable["abstained"][i]) for i in cal], alpha, delta
    )
    u_declined = [declines(unanswerable["score"][i], unanswerable["abstained"][i], threshold) for i in test]
    g_declined = [declines(s, a, threshold) for s, a in zip(golden["score"], golden["abstained"])]
    hallucinated = sum(not d for d in u_declined)
    return AbstentionBound(
        alpha=alpha,
        confidence=1 - delta,
        threshold=threshold,
        calibration_items=len(cal),
        test_items=len(test),
        hallucination_rate=hallucinated / len(test) if test else math.nan,
        hallucination_ci=clopper_pearson(hallucinated, len(test)),
        raw_hallucination_rate=float(np.mean([not unanswerable["abstained"][i] for i in test])) if test else math.nan,
        answered_items=len(g_declined),
        answer_rate=float(np.mean([not d for d in g_declined])) if g_declined else math.nan,
        raw_answer_rate=float(np.mean([not a for a in golden["abstained"]])) if g_declined else math.nan,
        f1_at_threshold=float(np.mean([0.0 if d else f for f, d in zip(golden["f1"], g_declined)])) if g_declined else math.nan,
    )
