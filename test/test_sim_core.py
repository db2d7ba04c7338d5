"""ROS-free sim station: kinematics, dynamics, task rules, renderer, scripted expert, corrector logic."""
import json

import numpy as np
import pytest

from recap_ros.sim import (
    Corrector,
    Expert,
    SimEnv,
    Task,
    run_expert_episode,
    sample_task,
)
from recap_ros.sim.dynamics import JointDynamics
from recap_ros.sim.kinematics import ARMS, HOME_ARM, Bimanual
from recap_ros.sim.task import (
    KEEP_OUT_MAX,
    KEEP_OUT_MIN,
    MARKER_HEIGHT,
    PROMPT_TEMPLATES,
    SUCCESS_RADIUS,
    WORKSPACE,
)
from recap_ros.station import CAMERA_ROLES, load_station, parse_station


@pytest.fixture(scope="module")
def station():
    return load_station("sim")


@pytest.fixture
def env(station):
    return SimEnv(station)


# ------------------------------------------------------------------------------------------- kinematics
def test_fk_zero_pose_matches_vx300s_geometry(station):
    kin = Bimanual(station.robot)
    q = np.zeros(14)
    left, right = kin.fk(q, "left"), kin.fk(q, "right")
    # straight arm: shoulder 0.12705 m up, upper arm 0.3 m + 0.05955 offset, forearm 0.3, tip 0.11 past the wrist
    assert np.allclose(left.tip, [-0.35 + 0.05955 + 0.3 + 0.069744 + 0.11, 0, 0.12705 + 0.3], atol=1e-9)
    assert np.allclose(right.tip, [0.35 - (0.05955 + 0.3 + 0.069744 + 0.11), 0, 0.42705], atol=1e-9)
    assert np.allclose(left.tool_axis, [1, 0, 0]) and np.allclose(right.tool_axis, [-1, 0, 0])


def test_jacobian_matches_finite_differences(station):
    arm = Bimanual(station.robot).arms["left"]
    q = np.array([0.3, -0.2, 0.4, 0.5, 0.6, 0.7])
    J = arm.jacobian(q)
    eps = 1e-6
    for i in range(6):
        d = np.zeros(6)
        d[i] = eps
        assert np.allclose(J[:3, i], (arm.tip(q + d) - arm.tip(q - d)) / (2 * eps), atol=1e-7)


@pytest.mark.parametrize("side", ARMS)
def test_ik_reaches_the_workspace_with_tool_down(station, side):
    arm = Bimanual(station.robot).arms[side]
    (x0, x1), (y0, y1) = WORKSPACE
    for x in np.linspace(x0, x1, 5):
        for y in np.linspace(y0, y1, 5):
            for z in (MARKER_HEIGHT + 0.005, 0.13):
                q, err = arm.ik(np.array([x, y, z]), HOME_ARM, iters=60)
                assert err < 2e-3, (side, x, y, z, err)
                assert np.all(q >= arm.lower) and np.all(q <= arm.upper)
                assert arm.fk(q).tool_axis[2] < -0.9  # pointing down


def test_station_joint_order_is_checked(station):
    raw = dict(station.raw)
    raw["robot"] = dict(raw["robot"], joints=list(reversed(raw["robot"]["joints"])))
    with pytest.raises(ValueError, match="left_"):
        Bimanual(parse_station(raw, "swapped.yaml").robot, "swapped.yaml")


# ------------------------------------------------------------------------------------------- dynamics
def test_dynamics_velocity_limited_lag_and_limits(station):
    kin = Bimanual(station.robot)
    dyn = JointDynamics(kin.lower, kin.upper, kin.max_velocity, 0.02)
    q = kin.home()
    cmd = q.copy()
    cmd[0] += 1.0                     # big step: velocity limited
    cmd[1] = 100.0                    # beyond the upper limit: clamped
    traj = [q]
    for _ in range(100):
        q, v = dyn.step(q, cmd)
        traj.append(q)
        assert np.all(np.abs(v) <= kin.max_velocity + 1e-9)
        assert np.all(q >= kin.lower) and np.all(q <= kin.upper)
    speeds = np.abs(np.diff(np.array(traj)[:, 0])) / 0.02
    assert speeds[:10].max() == pytest.approx(kin.max_velocity[0])   # starts at the cap
    assert q[0] == pytest.approx(cmd[0], abs=1e-3)                     # converges to the command
    assert q[1] == pytest.approx(kin.upper[1])
    assert np.allclose(q[2:], kin.home()[2:])                          # other joints hold


def test_step_rejects_bad_commands(env):
    env.reset(seed=1)
    with pytest.raises(ValueError, match="14 joint positions"):
        env.step(np.zeros(13))
    bad = env.state
    bad[3] = np.nan
    with pytest.raises(ValueError, match=r"non-finite values at joints \[3\]"):
        env.step(bad)
    assert env.steps == 0


# ------------------------------------------------------------------------------------------- task
def test_task_is_deterministic_from_seed_and_varied(station):
    kin = Bimanual(station.robot)
    assert sample_task(7, kin) == sample_task(7, kin)
    tasks = [sample_task(s, kin) for s in range(200)]
    assert {t.arm for t in tasks} == set(ARMS)
    assert len({t.colour for t in tasks}) == 4
    assert len({t.prompt for t in tasks}) > 20
    for t in tasks:
        assert t.colour in t.prompt and t.arm in t.prompt
        xy = np.array([m.xy for m in t.markers])
        assert np.all(np.abs(xy[:, 0]) <= 0.2 + 1e-9) and np.all(np.abs(xy[:, 1]) <= 0.16 + 1e-9)
        assert not np.any(np.all(np.abs(xy) < KEEP_OUT_MAX[:2], axis=1))  # never under the box
    assert any(tmpl.split("{")[0] in t.prompt for t in tasks for tmpl in PROMPT_TEMPLATES)
    assert Task.from_dict(json.loads(json.dumps(tasks[3].to_dict()))) == tasks[3]


def test_env_episode_seeds_are_reproducible(station):
    a, b = SimEnv(station), SimEnv(station)
    assert [a.reset().seed for _ in range(5)] == [b.reset().seed for _ in range(5)]
    assert SimEnv(station, seed=1).reset() != SimEnv(station, seed=2).reset()


def test_rules_success_keep_out_wrong_marker(env):
    task = env.reset(seed=4)
    far = np.array([0.0, 0.0, 0.5])
    other = "right" if task.arm == "left" else "left"
    tips = {task.arm: far, other: far}
    assert not task.evaluate(tips, 0.0, 12.0).done
    assert task.evaluate({**tips, task.arm: task.target}, 0.1, 12.0).reason == "success"
    s = task.evaluate({**tips, other: task.target}, 0.1, 12.0)
    assert (s.state, s.reason) == ("failure", "keep_out") and "touched" in s.detail
    wrong = next(m for m in task.markers if m.colour != task.colour)
    assert task.evaluate({**tips, task.arm: wrong.top}, 0.1, 12.0).reason == "keep_out"
    box = (KEEP_OUT_MIN + KEEP_OUT_MAX) / 2
    assert "keep-out box" in task.evaluate({**tips, other: box}, 0.1, 12.0).detail
    assert "below the table" in task.evaluate({**tips, task.arm: np.array([0.3, 0.3, -0.01])}, 0.1, 12.0).detail
    assert task.evaluate(tips, 12.0, 12.0).reason == "timeout"


def test_timeout_when_holding_still(env):
    env.reset(seed=2)
    hold = env.state
    while not env.status.done:
        env.step(hold)
    assert (env.status.state, env.status.reason) == ("failure", "timeout")
    assert env.time_s == pytest.approx(env.timeout_s)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(hold)


def test_driving_a_tip_into_the_table_is_a_keep_out_failure(env):
    task = env.reset(seed=5)
    arm = env.kin.arms[task.arm]
    sl = env.kin.arm_slice(task.arm)
    cmd = env.state
    cmd[sl], _ = arm.ik(np.array([0.18 if task.arm == "right" else -0.18, 0.2, -0.05]), cmd[sl], iters=50)
    while not env.status.done:
        env.step(cmd)
    assert env.status.reason == "keep_out"


# ------------------------------------------------------------------------------------------- expert
def test_expert_succeeds_on_50_randomized_episodes(env):
    results = [run_expert_episode(env) for _ in range(50)]
    successes = sum(s.state == "success" for s, _ in results)
    seconds = [n * env.dt for s, n in results if s.state == "success"]
    print(f"\nscripted expert: {successes}/50 = {successes / 50:.0%} success, "
          f"episode length {np.mean(seconds):.2f} s mean, {np.max(seconds):.2f} s max")
    assert successes / 50 >= 0.95, [s for s, _ in results if s.state != "success"]
    assert max(seconds) < 5.0


def test_expert_commands_respect_velocity_limits(env):
    task = env.reset(seed=11)
    expert = Expert(env.kin, env.dt)
    expert.reset(task)
    prev = env.state
    while not env.status.done:
        cmd = expert.act(env.state)
        assert np.all(np.abs(cmd - prev) <= env.kin.max_velocity * env.dt + 1e-9)
        prev = cmd
        env.step(cmd)
    assert env.status.state == "success"


# ------------------------------------------------------------------------------------------- renderer
def test_render_shapes_determinism_and_visible_markers(env, station):
    task = env.reset(seed=3)
    images = env.images()
    for cam, img in zip(station.cameras, images):
        assert img.shape == (cam.output_height, cam.output_width, 3) and img.dtype == np.uint8
    assert all(np.array_equal(a, b) for a, b in zip(images, env.images()))
    base = images[CAMERA_ROLES.index("base")]
    for m in task.markers:  # each marker covers a clearly visible blob in the base camera
        match = np.all(np.abs(base.astype(int) - m.rgb) < 30, axis=2)
        assert match.sum() > 60, (m.colour, match.sum())
    # the arms move -> the wrist view changes
    before = env.render("left_wrist")
    q = env.state
    q[0] += 0.3
    assert not np.array_equal(before, env.render("left_wrist", q))


def test_wrist_camera_sees_the_target_when_expert_is_above_it(env):
    task = env.reset(seed=8)
    expert = Expert(env.kin, env.dt)
    expert.reset(task)
    while np.linalg.norm(env.tips()[task.arm] - task.target) > 2.5 * SUCCESS_RADIUS:
        env.step(expert.act(env.state))
    img = env.render(f"{task.arm}_wrist")
    match = np.all(np.abs(img.astype(int) - task.marker(task.colour).rgb) < 30, axis=2)
    assert match.sum() > 300


def test_render_scale_renders_smaller_and_resizes(station):
    raw = dict(station.raw)
    raw["sim"] = dict(raw["sim"], render_scale=0.5)
    env = SimEnv(parse_station(raw, "half.yaml"))
    env.reset(seed=0)
    assert env.renderer.intrinsics["base"].width == 112
    assert env.render("base").shape == (224, 224, 3)


# ------------------------------------------------------------------------------------------- corrector
def test_corrector_takes_over_after_patience_and_then_succeeds(env, station):
    task = env.reset(seed=6)
    corrector = Corrector(env.kin, env.dt, patience_s=1.0)
    corrector.start(task, 0.0)
    hold = env.state
    taken = None
    while taken is None:
        env.step(hold)                                   # a "policy" that does nothing
        taken = corrector.observe(env.state, env.time_s)
    assert "no progress" in taken and corrector.active
    assert env.time_s == pytest.approx(1.0 + env.dt, abs=2 * env.dt)
    assert corrector.observe(env.state, env.time_s) is None   # decides once
    while not env.status.done:
        env.step(corrector.command(env.state))
    assert env.status.state == "success"
    assert corrector.end() is True and not corrector.active


def test_corrector_leaves_a_progressing_policy_alone(env):
    task = env.reset(seed=9)
    corrector = Corrector(env.kin, env.dt, patience_s=0.5)
    corrector.start(task, 0.0)
    expert = Expert(env.kin, env.dt)
    expert.reset(task)
    while not env.status.done:
        env.step(expert.act(env.state))
        assert corrector.observe(env.state, env.time_s) is None
    assert env.status.state == "success" and corrector.end() is False


def test_corrector_takes_over_before_a_keep_out_violation(env):
    task = env.reset(seed=12)
    corrector = Corrector(env.kin, env.dt, patience_s=5.0)
    corrector.start(task, 0.0)
    sl = env.kin.arm_slice(task.arm)
    dive = env.state   # a policy driving the named arm's tip straight into the keep-out box
    dive[sl], _ = env.kin.arms[task.arm].ik((KEEP_OUT_MIN + KEEP_OUT_MAX) / 2, dive[sl], iters=50)
    taken = None
    while taken is None and not env.status.done:
        env.step(dive)
        taken = corrector.observe(env.state, env.time_s)
    assert taken is not None and "keep-out" in taken, env.status
    assert not env.status.done   # decided before the violation happened
    while not env.status.done:
        env.step(corrector.command(env.state))
    assert env.status.state == "success", env.status


def test_corrector_logic_validates_input(env):
    with pytest.raises(ValueError):
        Corrector(env.kin, env.dt, patience_s=0.0)
    c = Corrector(env.kin, env.dt, patience_s=1.0)
    assert c.observe(env.state, 0.0) is None          # no episode: never takes over
    with pytest.raises(RuntimeError):
        c.command(env.state)
    with pytest.raises(ValueError, match="arm"):
        Task.from_dict({**env.reset(seed=1).to_dict(), "arm": "middle"})


def test_corrector_predicts_from_measured_velocity_not_from_bunched_stamps(env):
    """A robot loop that catches up after a stall publishes joint states 0.1 ms apart although the arm moved a
    whole 20-ms tick between each: differencing those stamps makes a 200x velocity and a false keep-out alarm
    (the live station's false takeovers). With the measured velocities the expert is never taken over."""
    def run(use_velocity):
        task = env.reset(seed=9)
        corrector = Corrector(env.kin, env.dt, patience_s=5.0)
        corrector.start(task, 0.0)
        expert = Expert(env.kin, env.dt)
        expert.reset(task)
        stamp = 0.0
        while not env.status.done:
            env.step(expert.act(env.state))
            stamp += env.dt if env.steps % 10 >= 4 else 1e-4  # a stall, then 4 ticks published in a burst
            reason = corrector.observe(env.state, stamp, env.velocity if use_velocity else None)
            if reason:
                return reason
        return None

    assert "keep-out" in (run(use_velocity=False) or "")
    assert run(use_velocity=True) is None and env.status.state == "success"


def test_corrector_takes_over_before_a_keep_out_violation_from_measured_velocity(env):
    task = env.reset(seed=12)
    corrector = Corrector(env.kin, env.dt, patience_s=5.0)
    corrector.start(task, 0.0)
    sl = env.kin.arm_slice(task.arm)
    dive = env.state
    dive[sl], _ = env.kin.arms[task.arm].ik((KEEP_OUT_MIN + KEEP_OUT_MAX) / 2, dive[sl], iters=50)
    taken = None
    while taken is None and not env.status.done:
        env.step(dive)
        taken = corrector.observe(env.state, env.time_s, env.velocity)
    assert taken is not None and "keep-out" in taken and not env.status.done
