"""Offline success of the scripted ALOHA expert (recap_ros.sim.aloha.expert) on gym-aloha's two tasks.

    ./dev run python bench/aloha_expert_eval.py [--episodes 100] [--first-seed 0] [--tasks transfer_cube insertion]

Steps gym-aloha's physics through ``AlohaSim`` (gym-aloha's reset, action mapping and reward, no rendering) at
its 50 Hz control rate. Success = gym-aloha's reward 4.

1. From the start: the expert drives each episode from reset. Success within the station's 8 s timeout (400
   ticks) and within gym-aloha's registered 300-step limit, Wilson 95 % CIs, ticks to success, the CPU and
   wall time of act() per tick, and for each failure the highest reward stage it reached.
2. Take-over: a disturbing policy drives for K ~ U{0..300} ticks (U{0..160} for expert_then_fault), then a
   fresh expert (reset at the episode's start, first act() at the take-over, as the station's corrector does)
   has 400 ticks to finish. The disturbing policy cycles by seed through
   - ``noisy_expert``: another expert's commands plus smoothed noise on the arm joints (0..0.3 rad, random
     per episode) and random gripper overrides (open or closed for 0.2..1 s, every 3 s on average): grasps,
     half lifts, hand-overs, drops;
   - ``random_walk``: smooth random joint targets around the home pose and random grippers;
   - ``expert_then_fault``: the expert alone, then for the last 10..50 ticks before the take-over a fault: the
     arms drift (smoothed noise, 0.3 rad) and each gripper opens or closes at random: the take-over finds
     objects held, lifted, mid-hand-over, dropped or knocked over.
   All are rate-limited to the joints' max velocity, as the station's mux would. Prints success per disturbance
   and overall, leaving out the episodes the disturbing policy finished itself and those in which it threw an
   object off the table (listed), where the take-over found the objects (reward stage), and the failures
   (highest stage, seeds).
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sim_policy_eval import wilson  # noqa: E402

from recap_ros.sim.aloha.env import AlohaSim  # noqa: E402
from recap_ros.sim.aloha.expert import DT, MAX_VELOCITY, TASKS, AlohaExpert  # noqa: E402

STATION_TICKS = 400       # the aloha_sim station's 8 s timeout
GYM_TICKS = 300           # gym-aloha's registered max_episode_steps
MAX_DISTURB = 300
OFF_TABLE_Z = -0.05       # m: an object this low has fallen off the table (the task cannot be finished)
FAULT_BEFORE = 160        # expert_then_fault takes over before the expert alone would have finished (~150 ticks)
DISTURBANCES = ("noisy_expert", "random_walk", "expert_then_fault")
ARM_STEP = np.concatenate([MAX_VELOCITY, [2.5]] * 2) * DT   # per-tick limit, gripper 2.5 normalised/s


class Disturber:
    """A policy that leaves the robot somewhere mid-task."""

    def __init__(self, kind: str, sim: AlohaSim, task: str, seed: int, takeover_tick: int):
        self.kind, self.rng = kind, np.random.default_rng(10_000 + seed)
        self.fault_tick = takeover_tick - int(self.rng.integers(10, 51))
        self.expert = AlohaExpert()
        self.expert.reset(sim.physics, task, seed)
        self.home = sim.qpos().copy()
        self.cmd = self.home.copy()
        self.sigma = 0.3 if kind == "expert_then_fault" else self.rng.uniform(0.0, 0.3)
        self.fault_grip = self.rng.integers(0, 2, 2).astype(float)
        self.noise = np.zeros(14)
        self.target = self.home.copy()
        self.grip_override: tuple[int, float] | None = None   # (ticks left, value)

    def act(self, sim: AlohaSim) -> np.ndarray:
        arms = ~np.isin(np.arange(14), (6, 13))
        alpha = DT / 0.5                                      # noise correlation time 0.5 s
        self.noise += alpha * (-self.noise) + np.sqrt(2 * alpha) * self.sigma * self.rng.standard_normal(14)
        if self.kind == "expert_then_fault":
            if sim.steps < self.fault_tick:
                self.cmd = self.expert.act(sim.physics)
                return self.cmd.copy()
            want = self.cmd + np.where(arms, self.noise * alpha, 0.0)     # drift
            want[[6, 13]] = self.fault_grip
            self.cmd = self.cmd + np.clip(want - self.cmd, -ARM_STEP, ARM_STEP)
            return self.cmd.copy()
        if self.kind == "noisy_expert":
            want = self.expert.act(sim.physics) + np.where(arms, self.noise, 0.0)
        else:
            if self.rng.random() < DT / 0.8 or np.allclose(self.cmd, self.target):
                self.target = self.home + self.rng.uniform(-0.6, 0.6, 14)
                self.target[[6, 13]] = self.rng.integers(0, 2, 2)
            want = self.target.copy()
        if self.grip_override is None and self.rng.random() < DT / 3.0:
            self.grip_override = (int(self.rng.integers(10, 50)), float(self.rng.integers(0, 2)))
        if self.grip_override is not None:
            left, value = self.grip_override
            want[[6, 13]] = value
            self.grip_override = (left - 1, value) if left > 1 else None
        self.cmd = self.cmd + np.clip(want - self.cmd, -ARM_STEP, ARM_STEP)
        return self.cmd.copy()


def from_start(task: str, seeds: range) -> None:
    sim, expert = AlohaSim(timeout_s=STATION_TICKS * DT), AlohaExpert()
    ticks, failures, act_ms, act_cpu_ms, t0 = [], defaultdict(list), [], [], time.perf_counter()
    for seed in seeds:
        sim.reset(task, seed)
        expert.reset(sim.physics, task, seed)
        while not sim.status.done:
            t_act, cpu_act = time.perf_counter(), time.thread_time()
            command = expert.act(sim.physics)
            act_cpu_ms.append(1e3 * (time.thread_time() - cpu_act))
            act_ms.append(1e3 * (time.perf_counter() - t_act))
            sim.step(command)
        if sim.status.state == "success":
            ticks.append(sim.steps)
        else:
            failures[f"{sim.status.reason}, highest reward {sim.max_reward}"].append(seed)
    n, k = len(seeds), len(ticks)
    k_gym = sum(t <= GYM_TICKS for t in ticks)
    lo, hi = wilson(k, n)
    lo_g, hi_g = wilson(k_gym, n)
    print(f"{task:14s} from start: {k}/{n} = {k / n:.1%} [95% CI {lo:.1%}, {hi:.1%}] within {STATION_TICKS} ticks; "
          f"{k_gym}/{n} = {k_gym / n:.1%} [{lo_g:.1%}, {hi_g:.1%}] within {GYM_TICKS}")
    if ticks:
        p = np.percentile(ticks, [0, 50, 90, 100])
        print(f"{'':14s} ticks to success min/median/p90/max {p[0]:.0f}/{p[1]:.0f}/{p[2]:.0f}/{p[3]:.0f} "
              f"({time.perf_counter() - t0:.1f} s wall for {n} episodes)")
    p, c = np.percentile(act_ms, [50, 99, 100]), np.percentile(act_cpu_ms, [50, 99, 100])
    print(f"{'':14s} act() per tick: CPU time p50/p99/max {c[0]:.2f}/{c[1]:.2f}/{c[2]:.2f} ms, wall time "
          f"{p[0]:.2f}/{p[1]:.2f}/{p[2]:.2f} ms (wall includes preemption by other processes)")
    for reason, failed in sorted(failures.items(), key=lambda kv: -len(kv[1])):
        print(f"{'':14s} failure: {reason} x{len(failed)} (seeds {', '.join(map(str, failed))})")


def takeover(task: str, seeds: range) -> None:
    sim = AlohaSim(timeout_s=(MAX_DISTURB + STATION_TICKS) * DT)
    results = {kind: [0, 0] for kind in DISTURBANCES}
    found, failures, before, after, lost = Counter(), defaultdict(list), 0, [], []
    for i, seed in enumerate(seeds):
        kind = DISTURBANCES[i % len(DISTURBANCES)]
        sim.reset(task, seed)
        expert = AlohaExpert()
        expert.reset(sim.physics, task, seed)
        last = FAULT_BEFORE if kind == "expert_then_fault" else MAX_DISTURB
        k_takeover = int(np.random.default_rng(seed).integers(0, last + 1))
        disturber = Disturber(kind, sim, task, seed, k_takeover)
        while not sim.status.done and sim.steps < k_takeover:
            sim.step(disturber.act(sim))
        if sim.status.state == "success":
            before += 1                                   # the disturbing policy succeeded on its own
            continue
        if sim.status.done:
            failures[f"{kind}: {sim.status.reason} before the take-over"].append(seed)
            results[kind][1] += 1
            continue
        stage = sim.reward
        found[stage] += 1
        start = sim.steps
        while not sim.status.done and sim.steps - start < STATION_TICKS:
            sim.step(expert.act(sim.physics))
        if sim.status.state != "success" and min(sim.object_poses()[2::7]) < OFF_TABLE_Z:
            lost.append(seed)                             # the disturbing policy threw an object off the table
            continue
        results[kind][1] += 1
        if sim.status.state == "success":
            results[kind][0] += 1
            after.append(sim.steps - start)
        else:
            failures[f"{kind}: {sim.status.reason if sim.status.done else 'no success'} in {STATION_TICKS} ticks, "
                     f"reward {stage} at the take-over, highest {sim.max_reward}"].append(seed)
    k = sum(r[0] for r in results.values())
    n = sum(r[1] for r in results.values())
    lo, hi = wilson(k, n)
    print(f"{task:14s} take-over:  {k}/{n} = {k / max(n, 1):.1%} [95% CI {lo:.1%}, {hi:.1%}] within {STATION_TICKS} "
          f"ticks of the take-over; {before} episodes succeeded before it, in {len(lost)} an object left the table "
          f"(seeds {', '.join(map(str, lost)) or '-'})")
    for kind, (kk, nn) in results.items():
        lo, hi = wilson(kk, nn)
        print(f"{'':14s}   {kind:12s} {kk}/{nn} = {kk / max(nn, 1):.1%} [{lo:.1%}, {hi:.1%}]")
    print(f"{'':14s}   reward stage at the take-over: "
          + ", ".join(f"{r:.0f}: {c}" for r, c in sorted(found.items())))
    if after:
        p = np.percentile(after, [50, 90, 100])
        print(f"{'':14s}   ticks from take-over to success median/p90/max {p[0]:.0f}/{p[1]:.0f}/{p[2]:.0f}")
    for reason, failed in sorted(failures.items(), key=lambda kv: -len(kv[1])):
        print(f"{'':14s}   failure: {reason} x{len(failed)} (seeds {', '.join(map(str, failed))})")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--episodes", type=int, default=100)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    ap.add_argument("--no-takeover", action="store_true", help="only the from-start evaluation")
    args = ap.parse_args(argv)
    seeds = range(args.first_seed, args.first_seed + args.episodes)
    for task in args.tasks:
        from_start(task, seeds)
        if not args.no_takeover:
            takeover(task, seeds)


if __name__ == "__main__":
    main()
