"""Success rate of a policy bundle on the sim station over held-out task seeds (autonomous: no corrector).

    .venv/bin/python bench/sim_policy_eval.py [--bundle sim_policy] [--episodes 100] [--quick]

Roll-outs are ROS-free at simulation speed but use the station's chunk executor (re-plan every s ticks,
cross-fade, limits) and mux, exactly as `recap_ros.recap.rollout` documents. Held-out seeds start at 5,000,000
(demos for the bundled policy use seeds from 1,000,000; the RECAP iteration bench collects from 2,000,000).
Prints success rate (with a 95 % Wilson interval), failure reasons, throughput (successes per hour of simulated
station time, reset pauses included) and the simulation speed-up over real time.

``--sensitivity``: does the policy use its images and prompt? On the first tick of fresh held-out tasks it compares
the named arm's tip at the end of the predicted chunk (1 s ahead) with the scripted expert's, and measures how far
that end point moves when the views come from another task (other marker layout) or the prompt names another
colour. A policy that ignores them (end point shifts << expert motion) can only copy its state's motion.
"""
from __future__ import annotations

import argparse
import math
import time

HELD_OUT_SEED = 5_000_000
SENSITIVITY_TASKS = 20


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, c - h), min(1.0, c + h)  # exact 0 and 1 at k = 0 and k = n (not -0.00 from rounding)


def evaluate(bundle: str, episodes: int, first_seed: int = HELD_OUT_SEED, backend: str = "auto",
             beta: float = 1.0, station_name: str = "sim", progress: bool = True, desc: str = "eval",
             delays=(0,)):
    """``delays``: inference delays in ticks to draw from (the live station's; see Roller)."""
    from recap_ros.policy import load_policy
    from recap_ros.recap.rollout import Roller, rollouts
    from recap_ros.station import load_station

    station = load_station(station_name)
    policy = load_policy(bundle, backend=backend)
    policy.check_station(station)
    roller = Roller(station, policy.info.image_size, policy, beta=beta, corrector=False, delays=delays)
    t0 = time.perf_counter()
    summary = rollouts(roller, range(first_seed, first_seed + episodes), progress=progress, desc=desc)
    return summary, time.perf_counter() - t0


def sensitivity(bundle: str, episodes: int = SENSITIVITY_TASKS, first_seed: int = HELD_OUT_SEED,
                backend: str = "auto", station_name: str = "sim"):
    """Median chunk-end error vs the expert, and median end-point shifts under swapped views / colour (metres)."""
    import numpy as np

    from recap_ros.policy import load_policy
    from recap_ros.sim.env import SimEnv
    from recap_ros.sim.expert import Expert
    from recap_ros.sim.task import COLOURS
    from recap_ros.station import load_station

    env = SimEnv(load_station(station_name))
    policy = load_policy(bundle, backend=backend)
    colours = sorted(COLOURS)
    firsts = []
    for seed in range(first_seed, first_seed + episodes):
        task = env.reset(seed=seed)
        q0, views = env.state, env.images()
        expert = Expert(env.kin, env.dt)
        expert.reset(task)
        for _ in range(policy.info.chunk_len):
            if env.status.done:
                break
            last = expert.act(env.state)
            env.step(last)
        firsts.append((task, q0, views, env.kin.tips(last)[task.arm]))
    err, moved, by_views, by_colour = [], [], [], []
    for k, (task, q0, views, expert_end) in enumerate(firsts):
        def end(v, prompt):
            chunk = policy.infer(images=v, state=q0, prompt=prompt, seed=0)
            return env.kin.tips(chunk[-1])[task.arm]

        own = end(views, task.prompt)
        other = colours[(colours.index(task.colour) + 1) % len(colours)]
        err.append(np.linalg.norm(own - expert_end))
        moved.append(np.linalg.norm(expert_end - env.kin.tips(q0)[task.arm]))
        by_views.append(np.linalg.norm(end(firsts[(k + 1) % len(firsts)][2], task.prompt) - own))
        by_colour.append(np.linalg.norm(end(views, task.prompt.replace(task.colour, other)) - own))
    return {name: float(np.median(v)) for name, v in
            (("expert_motion", moved), ("error", err), ("shift_other_views", by_views),
             ("shift_other_colour", by_colour))}


def report(name: str, summary, wall_s: float) -> None:
    lo, hi = wilson(summary.successes, summary.n)
    steps = [e.steps for e in summary.episodes]
    print(f"{name}: success {summary.successes}/{summary.n} = {summary.success_rate:.3f} "
          f"(95% CI {lo:.2f}-{hi:.2f}); reasons {summary.reasons()}")
    print(f"{name}: throughput {summary.throughput_per_hour:.1f} successes/hour of sim time "
          f"({summary.sim_time_s:.1f} s sim time, mean episode {sum(steps) / len(steps) / 50:.2f} s); "
          f"simulated {summary.sim_time_s / wall_s:.1f}x real time ({wall_s:.1f} s wall)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", default="sim_policy")
    p.add_argument("--episodes", type=int, default=100)
    p.add_argument("--first-seed", type=int, default=HELD_OUT_SEED)
    p.add_argument("--backend", default="auto")
    p.add_argument("--beta", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="20 episodes")
    p.add_argument("--delays", type=int, nargs="+", default=[1],
                   help="inference delays in ticks, one drawn per chunk (the live sim station measured d = 1 for "
                        "87 %% of 595 chunks, 2-8 for the rest; bench/station_eval.py passes its own run's)")
    p.add_argument("--sensitivity", action="store_true", help="also measure whether the policy uses views / prompt")
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    n = 20 if a.quick else a.episodes
    summary, wall = evaluate(a.bundle, n, a.first_seed, a.backend, a.beta, delays=a.delays)
    report(f"{a.bundle} (beta {a.beta})", summary, wall)
    if a.sensitivity:
        m = sensitivity(a.bundle, first_seed=a.first_seed, backend=a.backend)
        print(f"{a.bundle}: first-tick chunk end (1 s ahead), medians over {SENSITIVITY_TASKS} tasks: expert moves "
              f"{m['expert_motion']:.3f} m, policy misses it by {m['error']:.3f} m; the policy's end point moves "
              f"{m['shift_other_views']:.3f} m with another task's views, {m['shift_other_colour']:.3f} m with "
              f"another colour in the prompt")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
