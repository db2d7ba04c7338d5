"""ROS-free sim roll-outs at simulation speed: scripted demonstrations, policy evaluation, and RECAP data collection
with the scripted corrector intervening.

One control tick is what the station does each 20 ms, with the station's own algorithms:

* the policy's chunks are executed by :class:`recap_ros.control.stitching.ChunkExecutor` (re-plan every ``s``
  ticks, cross-fade, clamping and velocity limiting) — inference takes no simulated time here, so each chunk is
  accepted at the tick its observation was taken (delay d = 0);
* the corrector (:class:`recap_ros.sim.corrector.Corrector`) watches the joint states and, when it takes over,
  publishes the mode ``teleop`` and its commands into :class:`recap_ros.control.mux.TeleopMux`, whose output is
  what the robot receives and whose intervention flag is recorded;
* :class:`recap_ros.sim.env.SimEnv` steps the robot and judges success / failure.

Camera views are rendered (full station resolution, resized like the policy does) only at the ticks that need
them: policy queries, and every ``frame_stride``-th tick when frames are recorded for training.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from recap_ros.control.mux import TeleopMux
from recap_ros.control.stitching import ChunkExecutor, JointLimits
from recap_ros.recap.data import Frames, episode_frames, kept_ticks, resize_views
from recap_ros.sim.corrector import Corrector
from recap_ros.sim.env import SimEnv
from recap_ros.sim.expert import Expert
from recap_ros.station import CAMERA_ROLES, Station

POLICY, TELEOP = "policy", "teleop"


@dataclass
class Episode:
    seed: int
    prompt: str
    success: bool
    reason: str
    steps: int
    interventions: int              # ticks driven by the corrector
    frames: Frames | None = None    # training frames (when recorded)


@dataclass
class Summary:
    episodes: list[Episode] = field(default_factory=list)
    reset_pause_s: float = 0.5
    dt: float = 0.02

    @property
    def n(self) -> int:
        return len(self.episodes)

    @property
    def successes(self) -> int:
        return sum(e.success for e in self.episodes)

    @property
    def success_rate(self) -> float:
        return self.successes / self.n if self.n else float("nan")

    @property
    def sim_time_s(self) -> float:
        """Robot time spent: every episode's duration plus the station's reset pause between episodes."""
        return sum(e.steps * self.dt + self.reset_pause_s for e in self.episodes)

    @property
    def throughput_per_hour(self) -> float:
        """Successes per hour of simulated station time."""
        return self.successes / self.sim_time_s * 3600.0 if self.episodes else float("nan")

    def reasons(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for e in self.episodes:
            out[e.reason] = out.get(e.reason, 0) + 1
        return out


class Roller:
    """Runs episodes on one SimEnv with the station's executor, mux and (optionally) corrector."""

    def __init__(self, station: Station, image_size: int, policy=None, beta: float = 1.0,
                 corrector: bool = False, c_fail: float | None = None, delays: Sequence[int] = (0,)):
        """``delays``: inference delay in ticks, as the live station sees it: each chunk is planned from the
        observation of its request tick and starts executing d ticks later (at its index d), d drawn from
        ``delays`` (e.g. the delays a live run measured) with a per-episode seeded generator; (0,): the chunk is
        ready on the tick it was asked for."""
        if not delays or min(delays) < 0:
            raise ValueError(f"delays must be a non-empty list of ticks >= 0 (got {list(delays)!r})")
        self.delays = [int(d) for d in delays]
        self.station, self.policy, self.beta, self.use_corrector = station, policy, float(beta), corrector
        self.env = SimEnv(station)
        self.dt = self.env.dt
        self.max_len = round(station.sim.episode_timeout_s / self.dt)
        self.c_fail = float(self.max_len if c_fail is None else c_fail)
        self.image_size = image_size
        self.limits = JointLimits.from_robot(station.robot)
        self.chunk_len = policy.info.chunk_len if policy is not None else 50

    def run(self, seed: int, record: bool = False, frame_stride: int = 5, scripted: bool = False,
            episode: int = 0, policy_seed: int = 0) -> Episode:
        """One episode from task seed ``seed``. ``scripted``: the expert demonstrates the whole episode
        (through the mux's teleop input, recorded as a demonstration: intervention False)."""
        st = self.station
        task = self.env.reset(seed=seed)
        mux = TeleopMux(st.mux, st.robot)
        mux.on_joint_state(self.env.state, 0.0)
        expert = Expert(self.env.kin, self.dt)
        expert.reset(task)
        corrector = None
        if self.use_corrector and not scripted:
            corrector = Corrector(self.env.kin, self.dt, st.sim.corrector_patience_s)
            corrector.start(task, 0.0)
        if scripted:
            mux.on_mode(TELEOP)
        elif self.policy is None:
            raise ValueError("a policy roll-out needs a policy (or scripted=True)")
        executor = ChunkExecutor(self.limits, self.chunk_len, st.policy.replan_every, st.policy.crossfade_ticks)
        executor.reset(self.env.state)
        delay_rng = np.random.default_rng(seed)
        pending = None  # (request, chunk, tick it arrives)
        states, actions, flags, views, view_ticks = [], [], [], [], []
        tick = interventions = 0
        while not self.env.status.done:
            now = tick * self.dt
            q = self.env.state
            mux.on_joint_state(q, now)
            rendered = None
            frame_tick = record and tick % frame_stride == 0  # a training frame (views rendered for the
            if frame_tick:                                     # policy between them are not recorded)
                rendered = self.env.images()
            if scripted:
                mux.on_command(TELEOP, expert.act(q), now)
            else:
                if corrector is not None and not corrector.active and corrector.observe(q, now):
                    mux.on_mode(TELEOP)
                if corrector is not None and corrector.active:
                    mux.on_command(TELEOP, corrector.command(q), now)
                else:
                    if pending is None and executor.wants_plan():
                        req = executor.request()
                        rendered = rendered if rendered is not None else self.env.images()
                        chunk = self.policy.infer(images=rendered, state=q, prompt=task.prompt, beta=self.beta,
                                                  seed=policy_seed + tick)
                        pending = (req, chunk, tick + int(delay_rng.choice(self.delays)))
                    if pending is not None and tick >= pending[2]:
                        executor.accept(pending[0], pending[1])
                        pending = None
                    cmd = executor.step()
                    mux.on_command(POLICY, cmd.command, now)
            out = mux.tick(now)
            interventions += out.intervention and not scripted
            if record:
                states.append(q)
                actions.append(out.positions)
                flags.append(out.intervention and not scripted)
                if frame_tick:
                    views.append(resize_views(rendered, self.image_size))
                    view_ticks.append(tick)
            self.env.step(out.positions)
            tick += 1
        status = self.env.status
        ep = Episode(task.seed, task.prompt, status.state == "success", status.reason, self.env.steps,
                     int(interventions))
        if record:
            T = len(states)
            keep = kept_ticks(T, frame_stride)
            if keep[-1] not in view_ticks:  # the last tick is always a training frame
                views.append(resize_views([self.env.render(r, states[-1]) for r in CAMERA_ROLES], self.image_size))
                view_ticks.append(int(keep[-1]))
            ep.frames = episode_frames(np.stack(views), keep, np.stack(states), np.stack(actions),
                                       np.asarray(flags), task.prompt, ep.success, self.max_len, self.c_fail,
                                       self.chunk_len, episode=episode, goal=task.target)
        return ep


def rollouts(roller: Roller, seeds, record: bool = False, frame_stride: int = 5, scripted: bool = False,
             progress: bool = True, desc: str = "episodes") -> Summary:
    from tqdm import tqdm

    summary = Summary(reset_pause_s=roller.station.sim.reset_pause_s, dt=roller.dt)
    bar = tqdm(list(seeds), desc=desc, disable=not progress, dynamic_ncols=True)
    for k, seed in enumerate(bar):
        summary.episodes.append(roller.run(int(seed), record, frame_stride, scripted, episode=k))
        bar.set_postfix(success=f"{summary.success_rate:.2f}")
    return summary
