"""Do value-drop alerts precede failures? Rate of alerted episodes among failures vs among successes.

    .venv/bin/python bench/value_alerts.py [--value sim_value] [--bundle sim_policy] [--episodes 300] [--quick]
    .venv/bin/python bench/value_alerts.py --bags DIR

``--bags``: the episodes a live station recorded with its value monitor (e.g. ``recap-station sim --bag-dir DIR``
without the scripted_corrector node, so that the policy fails now and then): V is the recorded /value, and the
alerts the node itself published on /value/alert are counted too.

Otherwise the episodes are the sim station's policy rolled out autonomously (no corrector, so it fails now and then) on held-out
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sim_policy_eval import HELD_OUT_SEED, wilson

DROPS = (0.1, 0.15, 0.2, 0.3)


@dataclass(frozen=True)
class Episode:
    success: bool
    reason: str
    duration_s: float
    v: np.ndarray       # V at the monitor's rate
    t: np.ndarray       # its times, seconds from the episode start
    recorded: int = 0   # alerts the live node published (bags only)


def alert_times(v: np.ndarray, t: np.ndarray, drop: float, window_s: float) -> list[float]:
    from recap_ros.monitor.value_alert import ValueAlert

    a = ValueAlert(drop, window_s)
    return [al.t_s for ti, vi in zip(t, v) if (al := a.update(float(ti), float(vi))) is not None]


def per_min(alerts: list[list[float]], episodes: list) -> float:
    """Alerts per minute of episode time (longer episodes have more chances to alert)."""
    minutes = sum(x.duration_s for x in episodes) / 60.0
    return sum(len(al) for al in alerts) / minutes if minutes else float("nan")


def rate(k: int, n: int) -> str:
    if n == 0:
        return "  0/0    (none)"
    lo, hi = wilson(k, n)
    return f"{k:3d}/{n:<4d} = {k / n if n else float('nan'):5.1%} [{lo:.0%}, {hi:.0%}]"


def rollout_episodes(a, st) -> tuple[list[Episode], str]:
    """Offline roll-outs of the station's policy; V from the value bundle on frames at the monitor's rate."""
    import torch

    from recap_ros.monitor.live_value import LiveValue
    from recap_ros.policy import load_policy
    from recap_ros.recap.rollout import Roller, rollouts
    from recap_ros.recap.value import predict_values

    torch.set_num_threads(a.threads)
    mon = st.value_monitor
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
    episodes = []
    for e in summary.episodes:
        f = e.frames.subset(e.frames.frame_index % stride == 0)
        v = predict_values(value.model, f.images, f.state, f.prompts, f.task_index)
        episodes.append(Episode(e.success, e.reason, e.steps / st.robot.control_rate_hz, v,
                                f.frame_index / st.robot.control_rate_hz))
    return episodes, (f"{n} offline roll-outs of {a.bundle or st.policy.bundle} on held-out seeds {a.first_seed}.."
                      f"{a.first_seed + n - 1} ({t_roll:.0f} s); V from {value.path.name} at "
                      f"{st.robot.control_rate_hz / stride:g} Hz")


def bag_episodes(bag_dir: str, st) -> tuple[list[Episode], str]:
    """Episodes a live station recorded with its value monitor: V from the recorded /value (observation stamps,
    from the episode start to its end), and the alerts the node itself published on /value/alert."""
    from rosbags.rosbag2 import Reader

    from recap_ros.export.bagread import ExportError, read_episode_bag
    from recap_ros.recording import bag as rbag

    mon = st.value_monitor
    episodes, skipped = [], {}
    for b in sorted(p for p in Path(bag_dir).iterdir() if (p / "metadata.yaml").is_file()):
        try:
            ep = read_episode_bag(b, st)
            success, _ = ep.outcome()
        except ExportError as e:
            skipped[e.kind] = skipped.get(e.kind, 0) + 1
            continue
        if ep.value is None:
            skipped["no /value"] = skipped.get("no /value", 0) + 1
            continue
        m = (ep.value.stamps >= ep.start_ns) & (ep.value.stamps <= ep.end_ns)
        with Reader(b) as r:
            conns = [c for c in r.connections if c.topic == mon.alert_topic]
            recorded = sum(1 for _ in r.messages(connections=conns)) if conns else 0  # (): every topic
        episodes.append(Episode(success, ep.custom.get(rbag.K_END_REASON, "success" if success else "failure"),
                                (ep.end_ns - ep.start_ns) / 1e9, np.asarray(ep.value.values, np.float64)[m],
                                (ep.value.stamps[m] - ep.start_ns) / 1e9, recorded))
    return episodes, f"{len(episodes)} episodes recorded by the live station in {bag_dir} (skipped: {skipped or 0})"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--station", default="sim")
    p.add_argument("--bags", default=None, help="use the episode bags a live station recorded with its "
                   "value_monitor (directory) instead of offline roll-outs")
    p.add_argument("--value", default=None, help="value bundle (default: the station's value_monitor.bundle)")
    p.add_argument("--bundle", default=None, help="policy bundle (default: the station's policy.bundle)")
    p.add_argument("--backend", default="onnxruntime")
    p.add_argument("--episodes", type=int, default=300)
    p.add_argument("--first-seed", type=int, default=HELD_OUT_SEED)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="20 episodes")
    a = p.parse_args(argv)
    from recap_ros.station import load_station

    st = load_station(a.station)
    mon = st.value_monitor
    if mon is None:
        print(f"{st.file}: no value_monitor section", file=sys.stderr)
        return 2
    episodes, source = bag_episodes(a.bags, st) if a.bags else rollout_episodes(a, st)
    fails = [x for x in episodes if not x.success]
    succ = [x for x in episodes if x.success]
    reasons: dict[str, int] = {}
    for x in episodes:
        reasons[x.reason] = reasons.get(x.reason, 0) + 1
    print(f"{source}: {len(succ)} successes, {len(fails)} failures {reasons}; alert window {mon.window_s:g} s")
    print(f"median V at the end: failures {np.median([x.v[-1] for x in fails if len(x.v)]) if fails else float('nan'):.3f}, "
          f"successes {np.median([x.v[-1] for x in succ if len(x.v)]) if succ else float('nan'):.3f}")
    if a.bags:
        print(f"alerts the node published (/value/alert): failed episodes {rate(sum(x.recorded > 0 for x in fails), len(fails))}, "
              f"successful {rate(sum(x.recorded > 0 for x in succ), len(succ))}")
    print(f"{'drop':>6}  {'failed episodes alerted':<32} {'successful episodes alerted':<32} "
          "alerts/min (failed, successful)  first alert before the failure (median)")
    for drop in sorted({*DROPS, mon.drop}):
        fa = [alert_times(x.v, x.t, drop, mon.window_s) for x in fails]
        sa = [alert_times(x.v, x.t, drop, mon.window_s) for x in succ]
        lead = [x.duration_s - al[0] for x, al in zip(fails, fa) if al]
        mark = "  <- station" if drop == mon.drop else ""
        print(f"{drop:6.2f}  {rate(sum(bool(al) for al in fa), len(fails)):<32} "
              f"{rate(sum(bool(al) for al in sa), len(succ)):<32} "
              f"{per_min(fa, fails):6.2f}, {per_min(sa, succ):6.2f}{'':19} "
              f"{np.median(lead) if lead else float('nan'):.1f} s{mark}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
