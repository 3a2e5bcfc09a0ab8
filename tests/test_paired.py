"""cnnjax.paired: the paired differences an ablation reports, against scipy's own statistics."""

import math

import numpy as np
import pytest
from scipy import stats

from cnnjax import paired

SETTING = [0.81, 0.78, 0.84, 0.80, 0.83]
REFERENCE = [0.76, 0.77, 0.79, 0.74, 0.80]


def test_the_interval_is_scipys_paired_t_interval():
    mean, low, high = paired.t_interval(np.subtract(SETTING, REFERENCE))
    result = stats.ttest_rel(SETTING, REFERENCE)
    expected = result.confidence_interval(0.95)
    np.testing.assert_allclose(
        [mean, low, high], [np.mean(np.subtract(SETTING, REFERENCE)), *expected], rtol=1e-12
    )
    assert (result.pvalue < 0.05) == (low > 0 or high < 0)  # the interval and the test agree


@pytest.mark.parametrize(("mean", "sd"), [(0.01, 0.02), (0.002, 0.05), (-0.03, 0.01)])
def test_seeds_needed_is_the_fewest_whose_interval_excludes_zero(mean, sd):
    n = paired.seeds_needed(mean, sd)

    def half_width(k):
        return stats.t.ppf(0.975, k - 1) * sd / math.sqrt(k)

    assert half_width(n) < abs(mean)
    assert n == 2 or half_width(n - 1) >= abs(mean)


def test_verdicts_follow_the_metrics_good_direction():
    better = paired.difference(SETTING, REFERENCE, "best_val_accuracy", +1)
    assert better.verdict == "better" and better.low > 0 and better.seeds == 5
    # Lower is better for a loss: the same positive difference is worse.
    worse = paired.difference(SETTING, REFERENCE, "best_val_loss", -1)
    assert worse.verdict == "worse" and worse.seeds_needed is None
    noisy = paired.difference([0.80, 0.76, 0.83], [0.78, 0.79, 0.79], "test_accuracy", +1)
    assert noisy.verdict == "not resolved with 3 seeds"
    d = np.subtract([0.80, 0.76, 0.83], [0.78, 0.79, 0.79])
    assert noisy.seeds_needed == paired.seeds_needed(float(np.mean(d)), float(np.std(d, ddof=1)))
    assert noisy.seeds_needed > 3


def test_unpaired_seeds_are_left_out_and_too_few_pairs_say_so():
    # A diverged seed (NaN) and a missing test accuracy (None) drop their pairs only.
    d = paired.difference([0.8, math.nan, 0.82, 0.9], [0.7, 0.7, None, 0.75], "test_accuracy", 1)
    assert d.seeds == 2
    np.testing.assert_allclose(d.mean, np.mean([0.1, 0.15]))
    few = paired.difference([0.8, math.nan], [0.7, 0.7], "test_accuracy", +1)
    assert few.seeds == 1 and few.verdict.startswith("n/a") and math.isnan(few.mean)


def test_the_reference_is_none_by_default_else_the_first():
    assert paired.reference_name(["flip", "none", "zoom"]) == "none"
    assert paired.reference_name(["flip", "zoom"]) == "flip"
    assert paired.reference_name(["flip", "zoom"], "zoom") == "zoom"
    with pytest.raises(ValueError, match="not among"):
        paired.reference_name(["flip"], "none")


def test_a_reference_that_did_not_finish_gives_way_to_the_next():
    def result(name, values):
        return {"name": name, "seeds": [{key: v for key, _, _ in paired.METRICS} for v in values]}

    results = [result("none", []), result("flip", [0.7, 0.8]), result("zoom", [0.75, 0.9])]
    reference, diffs = paired.from_reference(results, "none")  # none failed: no seeds
    assert reference == "flip" and list(diffs) == ["zoom"]
    np.testing.assert_allclose(diffs["zoom"][0].mean, 0.075)
    assert paired.from_reference(results, "zoom")[0] == "zoom"  # a finished one is kept
    assert paired.from_reference([result("none", [])]) == ("", {})
