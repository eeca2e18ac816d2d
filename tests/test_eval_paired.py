"""eval/paired.py: the t quantile against printed tables, the sign-flip test against brute-force enumeration,
the interval against a hand computation."""

import itertools
import random

import pytest

from mllm_kd.eval.paired import paired_summary, sign_flip_p, t975


@pytest.mark.parametrize(
    ("df", "table"), [(1, 12.706), (2, 4.303), (3, 3.182), (5, 2.571), (9, 2.262), (15, 2.131), (30, 2.042)]
)
def test_t975_matches_the_printed_table(df, table):
    assert t975(df) == pytest.approx(table, abs=0.004)


def test_t975_refuses_zero_degrees_of_freedom():
    with pytest.raises(ValueError, match="degrees of freedom"):
        t975(0)


def _brute_force_p(diffs):
    observed = sum(diffs)
    hits = sum(
        sum(sign * abs(d) for sign, d in zip(signs, diffs, strict=True)) >= observed - 1e-9
        for signs in itertools.product((1, -1), repeat=len(diffs))
    )
    return hits / 2 ** len(diffs)


@pytest.mark.parametrize("seed", range(5))
def test_sign_flip_p_equals_enumerating_every_sign_pattern(seed):
    rng = random.Random(seed)
    diffs = [round(rng.uniform(-10, 14), 2) for _ in range(rng.randint(2, 11))]
    assert sign_flip_p(diffs) == pytest.approx(_brute_force_p(diffs), abs=1e-12)


def test_sign_flip_p_extremes():
    # every seed ahead: only the observed pattern is as large
    assert sign_flip_p([1.0, 2.0, 3.0, 4.0]) == 1 / 16
    assert sign_flip_p([-1.0, -2.0, -3.0]) == 1.0  # every seed behind: every pattern is at least as large


def test_paired_summary_against_a_hand_computation():
    out = paired_summary([5.0, 10.0, -8.0, 2.5])
    # mean 2.375; deviations 2.625, 7.625, -10.375, 0.125: variance 172.1875 / 3 = 57.396, sd 7.576
    # half width t975(3) * 7.576 / 2 = 3.1824 * 3.788 = 12.06 (t975(3) from the expansion: 3.1786 -> 12.04)
    assert out["n"] == 4
    assert out["mean"] == pytest.approx(2.375, abs=0.006)  # 2.375, rounded to 2 decimals
    assert out["sd"] == pytest.approx(7.58, abs=0.01)
    assert out["ci95"][0] == pytest.approx(2.375 - 12.04, abs=0.02)
    assert out["ci95"][1] == pytest.approx(2.375 + 12.04, abs=0.02)
    assert out["p_sign_flip"] == 0.3125  # 5 of the 16 sign patterns sum to 9.5 or more


def test_paired_summary_needs_two_seeds():
    with pytest.raises(ValueError, match="two seeds"):
        paired_summary([3.0])
