"""Value quality figures (Spearman per outcome, calibration, held-out episodes) against hand computation."""
import math

import numpy as np
import pytest

from recap_ros.recap import value_quality as vq


def test_spearman_with_and_without_ties():
    # no ties: ranks (3, 1, 2) vs (1, 2, 3), d = (2, -1, -1): 1 - 6 * 6 / (3 * (9 - 1)) = -0.5
    assert vq.spearman(np.array([3.0, 1.0, 2.0]), np.array([1.0, 2.0, 3.0])) == pytest.approx(-0.5)
    # ties get their average rank: y ranks (1, 2, 3.5, 5, 3.5); Pearson of the ranks = 8 / sqrt(10 * 9.5)
    assert vq.spearman(np.arange(1.0, 6.0), np.array([5.0, 6.0, 7.0, 8.0, 7.0])) == pytest.approx(8 / math.sqrt(95))
    np.testing.assert_allclose(vq.ranks(np.array([5.0, 6.0, 7.0, 8.0, 7.0])), [1, 2, 3.5, 5, 3.5])
    assert math.isnan(vq.spearman(np.ones(4), np.arange(4.0)))     # a constant side: undefined
    assert math.isnan(vq.spearman(np.ones(1), np.ones(1)))
    with pytest.raises(ValueError, match="one length"):
        vq.spearman(np.ones(3), np.ones(4))


def test_report_ranks_per_outcome_on_the_unclipped_return_and_calibrates_on_the_target():
    v = np.array([-0.9, -0.5, -0.1, -0.8, -0.9, -0.95])
    ret = np.array([-2.0, -1.0, 0.0, -5.0, -4.0, -3.0])      # a success (M = 2), then a failure (C_fail = 3)
    rep = vq.report(v, ret, np.full(6, 2), np.array([0, 0, 0, 1, 1, 1]), np.array([1, 1, 1, 0, 0, 0], bool))
    assert rep["successes"] == {"episodes": 1, "frames": 3, "spearman": pytest.approx(1.0)}
    # the failure's returns -2.5, -2, -1.5 rise while V falls: rho = -1 (clipped targets would all be -1)
    assert rep["failures"] == {"episodes": 1, "frames": 3, "spearman": pytest.approx(-1.0)}
    c = rep["calibration"]
    # V - target: success 0.1, 0, -0.1; failure (target -1) 0.2, 0.1, 0.05
    assert c["mae"] == pytest.approx(0.55 / 6) and c["bias"] == pytest.approx(0.35 / 6)
    assert c["bands"][0] == {"v": [-1.0, -0.8], "frames": 3, "mean_v": pytest.approx(-2.75 / 3),
                             "mean_target": pytest.approx(-1.0)}
    assert [b["frames"] for b in c["bands"]] == [3, 1, 1, 1]
    text = "\n".join(vq.format_report(rep))
    assert "held-out successes: 1.000 (1 episodes, 3 frames)" in text and "held-out failures: -1.000" in text


def test_holdout_takes_a_fraction_of_each_outcome():
    ep = np.repeat(np.arange(8), 3)
    success = np.repeat([1, 1, 1, 1, 1, 0, 0, 0], 3).astype(bool)
    held = vq.holdout_episodes(ep, success, 0.2, seed=3)
    held_eps = np.unique(ep[held])
    assert len(held_eps) == 2 and success[held].any() and (~success[held]).any()  # 1 of 5 successes, 1 of 3 failures
    assert not vq.holdout_episodes(ep, success, 0.0).any()
    one_failure = vq.holdout_episodes(ep[:18], success[:18], 0.5)   # a single failure stays in training
    assert success[:18][one_failure].all() and len(np.unique(ep[:18][one_failure])) == 2
    with pytest.raises(ValueError, match="held-out fraction"):
        vq.holdout_episodes(ep, success, 1.0)
