"""Do value-drop alerts precede failures? Rate of alerted episodes among failures vs among successes.

    .venv/bin/python bench/value_alerts.py [--value sim_value] [--bundle sim_policy] [--episodes 300] [--quick]

Episodes: the sim station's policy rolled out autonomously (no corrector, so it fails now and then) on held-out
task seeds (5,000,000 on, as bench/sim_policy_eval.py), ROS-free at simulation speed with the station's chunk
executor and mux (recap_ros.recap.rollout). Camera views and joint states are taken at the value monitor's rate
(``value_monitor.rate_hz``: every 10th tick at 5 Hz) and resized as the live monitor resizes them; V comes from
the same value bundle through the same call the live node makes (recap_ros.recap.value.predict_values), and the
deployed alert logic (recap_ros.monitor.value_alert.ValueAlert, the station's ``drop`` and ``window_s``) runs on
it from each episode's start, as the node does after an episode start event.

Prints, for the station's setting and a few other drop thresholds: failed episodes with at least one alert / all
failed, successful episodes with an alert / all successful (95 % Wilson intervals), and how long before the
failure the first alert came (median).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sim_policy_eval import HELD_OUT_SEED, wilson

DROPS = (0.1, 0.15, 0.2, 0.3)


def alert_times(v: np.ndarray, t: np.ndarray, drop: float, window_s: float) -> list[float]:
    from recap_ros.monitor.value_alert import ValueAlert

    a = ValueAlert(drop, window_s)
    return [al.t_s for ti, vi in zip(t, v) if (al := a.update(float(ti), float(vi))) is not None]


def per_min(alerts: list[list[float]], episodes: list) -> float:
    """Alerts per minute of episode time (longer episodes have more chances to alert)."""
    minutes = sum(x[2] for x in episodes) / 60.0
    return sum(len(al) for al in alerts) / minutes if minutes else float("nan")


def rate(k: int, n: int) -> str:
    lo, hi = wilson(k, n)
    return f"{k:3d}/{n:<4d} = {k / n if n else float('nan'):5.1%} [{lo:.0%}, {hi:.0%}]"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--station", default="sim")
    p.add_argument("--value", default=None, help="value bundle (default: the station's value_monitor.bundle)")
    p.add_argument("--bundle", default=None, help="policy bundle (default: the station's policy.bundle)")
    p.add_argument("--backend", default="onnxruntime")
    p.add_argument("--episodes", type=int, default=300)
    p.add_argument("--first-seed", type=int, default=HELD_OUT_SEED)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="20 episodes")
    a = p.parse_args(argv)
    import torch

    from recap_ros.policy import load_policy
    from recap_ros.recap.rollout import Roller, rollouts
    from recap_ros.recap.value import predict_values
    from recap_ros.monitor.live_value import LiveValue
    from recap_ros.station import load_station

    torch.set_num_threads(a.threads)
    st = load_station(a.station)
    mon = st.value_monitor
    if mon is None:
        print(f"{st.file}: no value_monitor section", file=sys.stderr)
        return 2
    n = 20 if a.quick else a.episodes
    value = LiveValue(a.value or mon.bundle, len(st.cameras), len(st.robot.joints), a.threads)
    policy = load_policy(a.bundle or st.policy.bundle, backend=a.backend, threads=a.threads)
    stride = max(1, round(st.robot.control_rate_hz / mon.rate_hz))
    roller = Roller(st, value.image_size, policy, corrector=False)
    # Roller records a view at every policy query tick too: a stride that divides replan_every keeps the frames
    # on the stride; the monitor's ticks are then every stride-th of them
    record_stride = math.gcd(stride, st.policy.replan_every)
    t0 = time.perf_counter()
    summary = rollouts(roller, range(a.first_seed, a.first_seed + n), record=True, frame_stride=record_stride,
                       desc="roll-outs")
    t_roll = time.perf_counter() - t0
    episodes = []  # (success, reason, duration s, V, frame times s)
    for e in summary.episodes:
        f = e.frames.subset(e.frames.frame_index % stride == 0)
        v = predict_values(value.model, f.images, f.state, f.prompts, f.task_index)
        episodes.append((e.success, e.reason, e.steps / st.robot.control_rate_hz, v,
                         f.frame_index / st.robot.control_rate_hz))
    fails = [x for x in episodes if not x[0]]
    succ = [x for x in episodes if x[0]]
    print(f"{n} episodes of {a.bundle or st.policy.bundle} on held-out seeds {a.first_seed}..{a.first_seed + n - 1} "
          f"(roll-outs {t_roll:.0f} s): {len(succ)} successes, {len(fails)} failures {summary.reasons()}; V from "
          f"{value.path.name} at {st.robot.control_rate_hz / stride:g} Hz, alert window {mon.window_s:g} s")
    print(f"median V at the end: failures {np.median([x[3][-1] for x in fails]) if fails else float('nan'):.3f}, "
          f"successes {np.median([x[3][-1] for x in succ]) if succ else float('nan'):.3f}")
    print(f"{'drop':>6}  {'failed episodes alerted':<32} {'successful episodes alerted':<32} "
          "alerts/min (failed, successful)  first alert before the failure (median)")
    for drop in sorted({*DROPS, mon.drop}):
        fa = [alert_times(x[3], x[4], drop, mon.window_s) for x in fails]
        sa = [alert_times(x[3], x[4], drop, mon.window_s) for x in succ]
        lead = [x[2] - al[0] for x, al in zip(fails, fa) if al]
        mark = "  <- station" if drop == mon.drop else ""
        print(f"{drop:6.2f}  {rate(sum(bool(al) for al in fa), len(fails)):<32} "
              f"{rate(sum(bool(al) for al in sa), len(succ)):<32} "
              f"{per_min(fa, fails):6.2f}, {per_min(sa, succ):6.2f}{'':19} "
              f"{np.median(lead) if lead else float('nan'):.1f} s{mark}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
