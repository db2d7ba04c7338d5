"""CFG β validation, per-task table and back-off (ROS-free)."""
import math

import pytest

from recap_ros.control.guidance import (
    BackoffConfig,
    BetaBackoff,
    BetaError,
    beta_for_task,
    beta_problem,
    step_down,
    validate_beta,
)


@pytest.mark.parametrize("beta", [1.0, 1.5, 2.0, 2.5])
def test_allowed_betas(beta):
    assert beta_problem(beta) is None and validate_beta(beta, "test") == beta


@pytest.mark.parametrize("beta", [3.0, 1.2, 0.5, 2.51, math.nan, math.inf, "2", True])
def test_rejected_betas_name_value_and_source(beta):
    with pytest.raises(BetaError) as e:
        validate_beta(beta, "param beta")
    assert str(e.value).startswith("param beta:")


def test_rejection_reason_says_why():
    assert "[1.5, 2.5]" in beta_problem(3.0) and "3.0" in beta_problem(3.0)


def test_task_table():
    table = {"fold the towel": 2.0}
    assert beta_for_task(table, "fold the towel", 1.0) == 2.0
    assert beta_for_task(table, " fold the towel\n", 1.0) == 2.0
    assert beta_for_task(table, "other task", 1.5) == 1.5


def test_step_down_skips_the_gap():
    assert step_down(2.5, 0.25) == 2.25
    assert step_down(1.5, 0.25) == 1.0  # nothing allowed in (1, 1.5)


AGGRESSIVE = dict(peak_velocity_ratio=1.4, min_limit_margin=0.2)
CALM = dict(peak_velocity_ratio=0.3, min_limit_margin=0.2)


def test_backs_off_after_patience_and_only_counts_current_beta():
    b = BetaBackoff(BackoffConfig(patience=2, step=0.5, recover_after=0), requested=2.5)
    assert b.observe(2.5, **AGGRESSIVE) is None
    change = b.observe(2.5, **AGGRESSIVE)
    assert change.old == 2.5 and change.new == 2.0 and "peak velocity ratio 1.40" in change.reason
    # chunks still sampled with the old β do not count against the new one
    assert b.observe(2.5, **AGGRESSIVE) is None and b.observe(2.5, **AGGRESSIVE) is None
    b.observe(2.0, **AGGRESSIVE)
    assert b.observe(2.0, **AGGRESSIVE).new == 1.5
    b.observe(1.5, **AGGRESSIVE)
    assert b.observe(1.5, **AGGRESSIVE).new == 1.0
    assert b.observe(1.0, **AGGRESSIVE) is None and b.active == 1.0  # never below 1


def test_limit_margin_triggers_backoff():
    b = BetaBackoff(BackoffConfig(patience=1, min_limit_margin=0.05), requested=2.0)
    change = b.observe(2.0, peak_velocity_ratio=0.2, min_limit_margin=0.01)
    assert change.new == 1.75 and "limit margin" in change.reason


def test_calm_chunk_resets_patience():
    b = BetaBackoff(BackoffConfig(patience=2), requested=2.0)
    b.observe(2.0, **AGGRESSIVE)
    b.observe(2.0, **CALM)
    assert b.observe(2.0, **AGGRESSIVE) is None and b.active == 2.0


def test_recovers_toward_requested():
    b = BetaBackoff(BackoffConfig(patience=1, step=0.5, recover_after=3), requested=2.0)
    b.observe(2.0, **AGGRESSIVE)
    b.observe(1.5, **AGGRESSIVE)
    assert b.active == 1.0
    changes = [b.observe(1.0, **CALM) for _ in range(3)]
    assert changes[:2] == [None, None] and changes[2].new == 1.5
    changes = [b.observe(1.5, **CALM) for _ in range(3)]
    assert changes[2].new == 2.0
    assert all(b.observe(2.0, **CALM) is None for _ in range(5)) and b.active == 2.0


def test_request_resets_active():
    b = BetaBackoff(BackoffConfig(), requested=1.0)
    change = b.request(2.0, "task table")
    assert change.new == 2.0 and b.active == 2.0 and "task table" in change.reason
    with pytest.raises(BetaError, match="param"):
        b.request(3.0, "param")
    assert b.active == 2.0


def test_bad_config():
    with pytest.raises(ValueError):
        BackoffConfig(patience=0)
