"""Cost of the sim station: one control step, the scripted expert, rendering each camera, JPEG encoding,
and roll-out speed relative to real time. Prints ms p50/p99 and ratios measured within this run.

    .venv/bin/python bench/sim_cost.py [--station sim] [--duration 2.0] [--quick]
"""
from __future__ import annotations

import argparse
import time

import numpy as np


from recap_ros.imaging import encode_jpeg  # noqa: E402
from recap_ros.sim import Expert, SimEnv  # noqa: E402
from recap_ros.station import CAMERA_ROLES, load_station  # noqa: E402


def measure(fn, duration: float, min_calls: int = 20) -> np.ndarray:
    """Call fn repeatedly for `duration` seconds; per-call times in ms."""
    times = []
    end = time.perf_counter() + duration
    while time.perf_counter() < end or len(times) < min_calls:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return np.array(times) * 1e3


def row(name: str, ms: np.ndarray) -> str:
    return f"{name:<28} p50 {np.percentile(ms, 50):7.3f} ms   p99 {np.percentile(ms, 99):7.3f} ms   (n={len(ms)})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--station", default="sim")
    ap.add_argument("--duration", type=float, default=2.0, help="seconds per measurement")
    ap.add_argument("--quick", action="store_true", help="0.3 s per measurement")
    args = ap.parse_args()
    duration = 0.3 if args.quick else args.duration
    station = load_station(args.station)
    env = SimEnv(station)
    period_ms = station.robot.period_s * 1e3

    # a running episode driven by the expert (resets whenever it ends) so the arms move while measuring
    expert = Expert(env.kin, env.dt)

    def step() -> None:
        if env.task is None or env.status.done:
            env.reset()
        if expert.task is not env.task:
            expert.reset(env.task)
        env.step(expert.act(env.state))

    def hold_step() -> None:
        if env.task is None or env.status.done:
            env.reset()
        env.step(env.state)

    print(f"sim station '{station.name}': {len(station.robot.joints)} joints at {station.robot.control_rate_hz:g} Hz, "
          f"cameras {[(c.role, c.output_width, c.output_height) for c in station.cameras]}, "
          f"render_scale {station.sim.render_scale}")
    step_ms = measure(hold_step, duration)
    expert_step_ms = measure(step, duration)
    print(row("env.step (hold)", step_ms))
    print(row("expert.act + env.step", expert_step_ms))
    render_ms = {}
    for role in CAMERA_ROLES:
        render_ms[role] = measure(lambda r=role: env.render(r), duration)
        print(row(f"render {role}", render_ms[role]))
    img = env.render("base")
    quality = station.cameras[0].jpeg_quality
    jpeg_ms = measure(lambda: encode_jpeg(img, quality), duration)
    print(row(f"encode_jpeg q{quality}", jpeg_ms))

    step_p50 = np.percentile(expert_step_ms, 50)
    frame_p50 = sum(np.percentile(v, 50) for v in render_ms.values())
    fps = station.cameras[0].fps
    per_tick = step_p50 + frame_p50 * fps * station.robot.period_s  # cameras at their fps, control at its rate
    print(f"\nexpert roll-out without images: {period_ms / step_p50:8.1f}x real time")
    print(f"roll-out rendering 3 cameras every tick: {period_ms / (step_p50 + frame_p50):8.1f}x real time")
    print(f"live station CPU per control period ({fps:g} fps cameras): {per_tick:.2f} ms of {period_ms:.0f} ms "
          f"= {per_tick / period_ms:.1%} of one core (+ JPEG {np.percentile(jpeg_ms, 50) * 3 * fps / 1e3:.1%} "
          f"while recorded)")
    print(f"render / step cost ratio: {frame_p50 / 3 / step_p50:.1f}")


if __name__ == "__main__":
    main()
