"""ValueAlert: V falling by more than ``drop`` within ``window_s`` raises one alert. Values are exact binary
fractions, expected drops and peaks worked out by hand."""
import math

import pytest

from recap_ros.monitor.live_value import steps_to_go
from recap_ros.monitor.value_alert import Alert, ValueAlert


def feed(alert: ValueAlert, samples):
    return [a for t, v in samples if (a := alert.update(t, v)) is not None]


def test_a_slow_decline_never_alerts():
    # 0.125 per 0.5 s: at most 0.25 within any 1 s window, not more than drop 0.25
    assert feed(ValueAlert(0.25, 1.0), [(0.5 * k, -0.125 * k) for k in range(8)]) == []


def test_a_sharp_drop_alerts_once_from_the_window_peak():
    # peak -0.25 (the later of two equal samples, t = 0.5) -> -0.625: drop 0.375 in 0.5 s
    got = feed(ValueAlert(0.25, 1.0), [(0.0, -0.25), (0.5, -0.25), (1.0, -0.625)])
    assert got == [Alert(1.0, -0.625, 0.5, -0.25)]
    assert got[0].drop == 0.375
    assert got[0].text() == "value dropped 0.375 in 0.50 s (V -0.250 -> -0.625)"


def test_a_rise_then_a_fall_measures_from_the_top():
    got = feed(ValueAlert(0.25, 1.0), [(0.0, -0.5), (0.5, -0.125), (1.0, -0.5)])
    assert got == [Alert(1.0, -0.5, 0.5, -0.125)]


def test_exactly_drop_is_not_more_than_drop():
    assert feed(ValueAlert(0.25, 1.0), [(0.0, -0.25), (0.5, -0.5)]) == []


def test_a_sample_exactly_window_s_old_is_in_the_window():
    assert feed(ValueAlert(0.25, 1.0), [(0.0, -0.25), (1.0, -0.75)]) == [Alert(1.0, -0.75, 0.0, -0.25)]


def test_a_fall_spread_over_more_than_the_window_does_not_alert():
    assert feed(ValueAlert(0.25, 1.0), [(0.0, -0.25), (1.5, -0.625)]) == []


def test_after_an_alert_the_next_needs_a_fresh_drop_from_the_alerting_sample():
    a = ValueAlert(0.25, 1.0)
    assert feed(a, [(0.0, -0.25), (1.0, -0.625)]) == [Alert(1.0, -0.625, 0.0, -0.25)]
    assert feed(a, [(1.5, -0.75)]) == []  # 0.125 below the alerting sample; the old peak is forgotten
    assert feed(a, [(2.0, -0.9375)]) == [Alert(2.0, -0.9375, 1.0, -0.625)]  # 0.3125 below it


def test_reset_forgets_the_window():
    a = ValueAlert(0.25, 1.0)
    a.update(0.0, -0.25)
    a.reset()
    assert a.update(0.5, -0.75) is None


@pytest.mark.parametrize("drop, window_s", [(0.0, 1.0), (1.5, 1.0), (0.2, 0.0), (0.2, math.inf), (0.2, -1.0)])
def test_bad_settings_are_refused_naming_the_value(drop, window_s):
    with pytest.raises(ValueError, match="drop|window_s"):
        ValueAlert(drop, window_s)


def test_time_going_back_or_a_nan_value_is_refused():
    a = ValueAlert(0.25, 1.0)
    a.update(1.0, -0.5)
    with pytest.raises(ValueError, match="went back"):
        a.update(0.5, -0.5)
    with pytest.raises(ValueError, match="finite"):
        a.update(2.0, float("nan"))


def test_steps_to_go_is_minus_v_times_the_max_length():
    assert steps_to_go(-0.25, 600) == 150.0
    assert steps_to_go(0.0, 600) == 0.0
