"""Two training recipes compared seed by seed: the mean of the per-seed differences, its 95% t-interval, and the
exact one-sided sign-flip (paired permutation) test that the first recipe is ahead.

Seeds move a small student by more than most recipe changes do, so a comparison of means over a few seeds
says little; pairing by seed (the same data order, the same start where the recipes share a stage) and an
interval say how much it does. Pure functions of the differences, no dependencies beyond the standard library.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Sequence

_Z975 = 1.959963984540054  # the standard normal's 97.5% quantile
_Z_POWER_80 = 0.84  # the standard normal's 80% quantile (80% power)


def t975(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom: exact for 1 and 2, else the
    Cornish-Fisher expansion around the normal quantile (Abramowitz & Stegun 26.7.5; within 0.003 for df >= 3)."""
    if df < 1:
        raise ValueError(f"t975: degrees of freedom must be at least 1, got {df}")
    if df == 1:
        return math.tan(math.pi * (0.975 - 0.5))
    if df == 2:
        return 0.95 * math.sqrt(2 / (4 * 0.975 * 0.025))
    z, v = _Z975, float(df)
    return (
        z
        + (z**3 + z) / (4 * v)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * v**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * v**3)
        + (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / (92160 * v**4)
    )


def sign_flip_p(diffs: Sequence[float], decimals: int = 2) -> float:
    """Exact one-sided p-value that the differences' sum is this large by chance: under "no difference" each
    seed's difference is as likely to have the other sign, so the p-value is the share of the 2^n sign
    patterns whose sum is at least the observed one. Counted exactly over sums in units of ``10**-decimals``
    (the differences are rounded to that), so it costs n times the range of sums, not 2^n."""
    scale = 10**decimals
    units = [abs(round(d * scale)) for d in diffs]
    observed = sum(round(d * scale) for d in diffs)
    sums = Counter({0: 1})
    for u in units:
        step: Counter = Counter()
        for s, k in sums.items():
            step[s + u] += k
            step[s - u] += k
        sums = step
    return sum(k for s, k in sums.items() if s >= observed) / 2 ** len(units)


def paired_summary(diffs: Sequence[float], lead: float = 3.0) -> dict:
    """For two seeds or more: the mean difference, its standard deviation, the 95% t-interval of the mean, the
    sign-flip p-value (all in the differences' units, rounded to 2 decimals, p to 4), and ``seeds_for_lead``:
    about how many seeds a paired comparison at this noise needs to tell a difference of ``lead`` from none
    (two-sided 5% level, 80% power, normal approximation)."""
    n = len(diffs)
    if n < 2:
        raise ValueError(f"paired_summary: needs two seeds or more, got {n}")
    mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    half = t975(n - 1) * sd / math.sqrt(n)
    return {
        "n": n,
        "mean": round(mean, 2),
        "sd": round(sd, 2),
        "ci95": [round(mean - half, 2), round(mean + half, 2)],
        "p_sign_flip": round(sign_flip_p(diffs), 4),
        "seeds_for_lead": math.ceil(((round(_Z975, 2) + _Z_POWER_80) * sd / lead) ** 2),
    }
