"""Advantage, threshold and indicator math against hand computation."""
import numpy as np
import pytest

from recap_ros.recap import advantage as adv
from recap_ros.recap import returns as rt


def test_n_step_advantage_equals_hand_computation():
    # one episode of 5 steps (success), max_len 10, N = 2, arbitrary values
    r = rt.rewards(5, True, c_fail=20)            # [-1, -1, -1, -1, 0]
    v = np.array([-0.5, -0.4, -0.3, -0.2, -0.1])
    A = adv.n_step_advantage(rt.returns(r), v, np.zeros(5, int), np.arange(5), max_len=10, n=2)
    hand = [
        (-1 - 1) / 10 + v[2] - v[0],
        (-1 - 1) / 10 + v[3] - v[1],
        (-1 - 1) / 10 + v[4] - v[2],
        (-1 + 0) / 10 + 0.0 - v[3],   # t + N = 5 is past the end: V = 0
        (0) / 10 + 0.0 - v[4],
    ]
    np.testing.assert_allclose(A, hand)


def test_n_step_advantage_is_per_episode_and_counts_failure_cost():
    r = np.concatenate([rt.rewards(3, True, 20), rt.rewards(2, False, 20)])  # [-1,-1,0] [-1,-20]
    v = np.array([-0.3, -0.2, -0.1, -0.9, -0.95])
    ep = np.array([4, 4, 4, 9, 9])
    A = adv.n_step_advantage(rt.returns(r[:3]).tolist() + rt.returns(r[3:]).tolist(), v, ep,
                             np.array([0, 1, 2, 0, 1]), max_len=10, n=2)
    np.testing.assert_allclose(A[:3], [-0.2 + v[2] - v[0], -0.1 - v[1], 0.0 - v[2]])
    np.testing.assert_allclose(A[3:], [(-1 - 20) / 10 - v[3], -20 / 10 - v[4]])  # never bootstraps across
    # each episode divided by its own M (10 for the first task, 4 for the second)
    A = adv.n_step_advantage([-2.0, -1.0, 0.0, -21.0, -20.0], v, ep, np.array([0, 1, 2, 0, 1]),
                             max_len=np.array([10, 10, 10, 4, 4]), n=2)
    np.testing.assert_allclose(A, [-0.2 + v[2] - v[0], -0.1 - v[1], 0.0 - v[2], -21 / 4 - v[3], -20 / 4 - v[4]])
    with pytest.raises(ValueError, match=r"max_len has shape \(2,\)"):
        adv.n_step_advantage(np.zeros(5), v, ep, np.arange(5), max_len=np.array([10, 4]), n=2)


def test_episode_advantage_and_non_contiguous_episodes_rejected():
    v = np.array([-0.5, -0.5, -0.1, 0.0])
    # success of 4 steps, M = 8: rewards -1 -1 -1 0, reward-to-go -3 -2 -1 0
    np.testing.assert_allclose(adv.episode_advantage(np.array([-3.0, -2.0, -1.0, 0.0]), v, 8),
                               [-3 / 8 + 0.5, -2 / 8 + 0.5, -1 / 8 + 0.1, 0.0])
    # failure of 4 steps, M = 8, C_fail = 8: rewards -1 -1 -1 -8, reward-to-go -11 -10 -9 -8; not clipped at -1
    np.testing.assert_allclose(adv.episode_advantage(np.array([-11.0, -10.0, -9.0, -8.0]), v, 8),
                               [-11 / 8 + 0.5, -10 / 8 + 0.5, -9 / 8 + 0.1, -1.0])
    # one M per frame: two episodes of different tasks (M = 8 and M = 4)
    np.testing.assert_allclose(adv.episode_advantage(np.array([-2.0, 0.0, -2.0, 0.0]), v, np.array([8, 8, 4, 4])),
                               [-2 / 8 + 0.5, 0.0 + 0.5, -2 / 4 + 0.1, 0.0])
    with pytest.raises(ValueError, match="contiguous"):
        adv.n_step_advantage(np.zeros(3), np.zeros(3), np.array([0, 1, 0]), np.zeros(3), max_len=5)


def test_n_step_advantage_on_subsampled_frames_equals_full_rate():
    r = rt.rewards(23, False, c_fail=40)
    v = np.random.default_rng(0).uniform(-1, 0, 23)
    full = adv.n_step_advantage(rt.returns(r), v, np.zeros(23, int), np.arange(23), max_len=30, n=4)
    keep = np.unique(np.r_[np.arange(0, 23, 2), 22])
    sub = adv.n_step_advantage(rt.returns(r)[keep], v[keep], np.zeros(len(keep), int), keep, max_len=30, n=4)
    np.testing.assert_allclose(sub, full[keep])
    # a stride that does not divide N bootstraps from the last frame before t + N (here k = 2 for N = 3)
    odd = adv.n_step_advantage(rt.returns(r)[keep], v[keep], np.zeros(len(keep), int), keep, max_len=30, n=3)
    two = adv.n_step_advantage(rt.returns(r), v, np.zeros(23, int), np.arange(23), max_len=30, n=2)
    np.testing.assert_allclose(odd[:-2], two[keep][:-2])


def test_threshold_is_per_task_percentile_and_indicator_strict():
    A = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0])
    task = np.array([0] * 5 + [1] * 5)
    eps = adv.task_thresholds(A, task, positive_fraction=0.4)
    assert eps == {0: pytest.approx(np.quantile([1, 2, 3, 4, 5], 0.6)),
                   1: pytest.approx(np.quantile([10, 20, 30, 40, 50], 0.6))}
    assert eps[0] == pytest.approx(3.4) and eps[1] == pytest.approx(34.0)
    ind = adv.indicators(A, task, eps)
    np.testing.assert_array_equal(ind, [0, 0, 0, 1, 1, 0, 0, 0, 1, 1])


def test_configured_fraction_is_positive_on_large_sample():
    rng = np.random.default_rng(0)
    A = rng.normal(size=20_000)
    task = rng.integers(0, 3, size=A.size)
    for frac in (0.3, 0.4):
        ind = adv.indicators(A, task, adv.task_thresholds(A, task, frac))
        for k in range(3):
            assert ind[task == k].mean() == pytest.approx(frac, abs=0.02)


def test_interventions_forced_positive_and_excluded_from_threshold():
    A = np.array([-5.0, -5.0, 1.0, 2.0, 3.0, 4.0])
    task = np.zeros(6, int)
    iv = np.array([True, True, False, False, False, False])
    lab = adv.label(np.zeros(6), np.zeros(6, int), task, iv, max_len=1, mode="pretrain",
                    positive_fraction=0.5, ret=A)
    assert lab.thresholds[0] == pytest.approx(np.quantile([1, 2, 3, 4], 0.5))
    np.testing.assert_array_equal(lab.indicator, [True, True, False, False, True, True])
    # a task with only interventions: everything positive
    lab2 = adv.label(np.zeros(2), np.zeros(2, int), np.zeros(2, int), np.ones(2, bool), 10, "pretrain",
                     ret=np.array([-10.0, -10.0]))
    assert lab2.indicator.all()


def test_label_modes_default_fractions_and_errors():
    rng = np.random.default_rng(1)
    n = 4000
    ep = np.repeat(np.arange(40), 100)
    r = np.concatenate([rt.rewards(100, bool(i % 2), 200) for i in range(40)])
    v = rng.uniform(-1, 0, n)
    R = np.concatenate([rt.returns(r[i:i + 100]) for i in range(0, n, 100)])
    fin = adv.label(v, ep, np.zeros(n, int), np.zeros(n, bool), 200, "finetune", ret=R,
                    frame_index=np.tile(np.arange(100), 40))
    pre = adv.label(v, ep, np.zeros(n, int), np.zeros(n, bool), 200, "pretrain", ret=rng.uniform(-200, 0, n))
    assert fin.positive_fraction() == pytest.approx(0.4, abs=0.01)
    assert pre.positive_fraction() == pytest.approx(0.3, abs=0.01)
    with pytest.raises(ValueError, match="unknown advantage mode"):
        adv.label(v, ep, np.zeros(n, int), np.zeros(n, bool), 200, "other")
    with pytest.raises(ValueError, match="returns"):
        adv.label(v, ep, np.zeros(n, int), np.zeros(n, bool), 200, "finetune")
    with pytest.raises(ValueError, match="positive fraction"):
        adv.task_thresholds(v, np.zeros(n, int), 1.5)
    with pytest.raises(ValueError, match="no threshold"):
        adv.indicators(v, np.ones(n, int), {0: 0.0})
