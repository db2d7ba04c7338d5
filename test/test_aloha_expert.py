"""Scripted ALOHA expert (recap_ros.sim.aloha.expert), ROS-free.

Success is gym-aloha's own reward 4, stepped through AlohaSim (test_aloha_sim checks AlohaSim step for step
against gym-aloha's env); the IK is checked with MuJoCo's forward kinematics; every command must pass the
aloha_sim station's limiter (its joint, velocity and acceleration limits) unchanged."""
import numpy as np
import pytest

pytest.importorskip("mujoco")
pytest.importorskip("gym_aloha")
pytest.importorskip("dm_control")

import mujoco  # noqa: E402

from recap_ros.control.limits import JointLimits, Limiter  # noqa: E402
from recap_ros.sim.aloha.env import AlohaSim, load_physics  # noqa: E402
from recap_ros.sim.aloha.expert import HOME, SIDES, TASKS, AlohaExpert, Arm, rotation_error  # noqa: E402
from recap_ros.station import load_station  # noqa: E402

EPISODE_TICKS = 400  # the aloha_sim station's 8 s timeout


class StationLimiter:
    """The mux's limiter with the aloha_sim station's limits, started at the measured position."""

    def __init__(self, sim: AlohaSim):
        self.limiter = Limiter(JointLimits.from_robot(load_station("aloha_sim").robot))
        self.limiter.reset(sim.qpos())

    def check(self, command: np.ndarray) -> None:
        np.testing.assert_array_equal(self.limiter.step(command), command)


def drive(sim: AlohaSim, expert: AlohaExpert, ticks: int, limiter: StationLimiter | None = None) -> None:
    start = sim.steps
    while not sim.status.done and sim.steps - start < ticks:
        command = expert.act(sim.physics)
        if limiter is not None:
            limiter.check(command)
        sim.step(command)


@pytest.mark.parametrize("task", TASKS)
def test_expert_reaches_success_within_the_limits(task):
    sim, expert = AlohaSim(timeout_s=EPISODE_TICKS * 0.02), AlohaExpert()
    for seed in (0, 1, 2):
        sim.reset(task, seed)
        expert.reset(sim.physics, task, seed)
        drive(sim, expert, EPISODE_TICKS, StationLimiter(sim))
        assert sim.status.state == "success", (task, seed, sim.status)


@pytest.mark.parametrize("xy", [(0.3, 0.4), (-0.15, 0.5)])
def test_cube_outside_the_sampled_area(xy):
    """A cube next to the right arm's base (the 60 deg approach is out of reach: a steeper one is chosen) or under
    the hand-over point (the left arm waits out of the right arm's way)."""
    sim, expert = AlohaSim(timeout_s=EPISODE_TICKS * 0.02), AlohaExpert()
    sim.reset("transfer_cube", 0)
    sim.physics.named.data.qpos["red_box_joint"][:2] = xy
    mujoco.mj_forward(sim.physics.model.ptr, sim.physics.data.ptr)
    expert.reset(sim.physics, "transfer_cube", 0)
    drive(sim, expert, EPISODE_TICKS, StationLimiter(sim))
    assert sim.status.state == "success", sim.status


@pytest.mark.parametrize("side", SIDES)
def test_ik_reaches_a_reachable_pose(side):
    """A pose MuJoCo's forward kinematics gives for some joint positions is reached from the home pose."""
    model = load_physics("transfer_cube").model.ptr
    site = model.site(f"cali_{side}_site1").id
    arm = Arm(model, mujoco.MjData(model), side)
    data = mujoco.MjData(model)

    def site_pose(q):
        data.qpos[arm.qadr] = q
        mujoco.mj_forward(model, data)
        return data.site_xpos[site].copy(), data.site_xmat[site].reshape(3, 3).copy()

    rng = np.random.default_rng(3)
    for _ in range(5):
        p_goal, R_goal = site_pose(HOME + rng.uniform(-0.5, 0.5, 6))
        p, R = site_pose(arm.ik(p_goal, R_goal, HOME, iters=200))
        assert np.linalg.norm(p - p_goal) < 1e-3
        assert np.linalg.norm(rotation_error(R_goal, R)) < 1e-2


def _object_z(sim: AlohaSim, body: str) -> float:
    return float(sim.physics.named.data.xpos[body][2])


def test_takeover_after_a_dropped_cube():
    """The policy lifts the cube, drops it and swings the arms away; the corrector (reset at the episode start,
    first act() at the take-over) re-grasps and finishes."""
    sim = AlohaSim(timeout_s=30.0)
    sim.reset("transfer_cube", 5)
    policy, corrector = AlohaExpert(), AlohaExpert()
    policy.reset(sim.physics, "transfer_cube", 5)
    corrector.reset(sim.physics, "transfer_cube", 5)
    while sim.max_reward < 2 or _object_z(sim, "box") < 0.1:
        sim.step(policy.act(sim.physics))
        assert sim.steps < EPISODE_TICKS
    command = sim.qpos()
    command[13] = 1.0                      # right gripper opens: the cube falls
    swing = np.zeros(14)
    swing[[0, 2, 7, 8]] = [0.01, -0.01, 0.01, -0.01]
    for _ in range(50):
        command += swing
        sim.step(command)
    assert _object_z(sim, "box") < 0.03 and sim.reward == 0
    drive(sim, corrector, EPISODE_TICKS, StationLimiter(sim))   # the mux starts from the measured position
    assert sim.status.state == "success", sim.status


def test_takeover_after_both_objects_dropped_and_an_arm_turned_away():
    """Insertion: the policy lifts both objects, drops them and turns the right arm far away; the corrector
    brings that arm home in joint space, re-grasps both objects and inserts."""
    sim = AlohaSim(timeout_s=30.0)
    sim.reset("insertion", 8)
    policy, corrector = AlohaExpert(), AlohaExpert()
    policy.reset(sim.physics, "insertion", 8)
    corrector.reset(sim.physics, "insertion", 8)
    while sim.reward < 2 or _object_z(sim, "socket") < 0.1:
        sim.step(policy.act(sim.physics))
        assert sim.steps < EPISODE_TICKS
    command = sim.qpos()
    command[[6, 13]] = 1.0                 # both grippers open: peg and socket fall
    for _ in range(120):                   # the right arm lifts and turns away
        command[7], command[8] = min(command[7] + 0.02, 1.8), max(command[8] - 0.02, -1.2)
        sim.step(command)
    assert max(_object_z(sim, "socket"), _object_z(sim, "peg")) < 0.05 and abs(sim.qpos()[7]) > 1.6
    drive(sim, corrector, EPISODE_TICKS, StationLimiter(sim))   # the mux starts from the measured position
    assert sim.status.state == "success", sim.status
