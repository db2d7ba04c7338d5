"""MuJoCo ALOHA sim, ROS-free: AlohaSim against gym-aloha's own env, constants and model; cameras; when the
scripted expert drives (ExpertDriver); the aloha_sim station file and its node graph."""
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from recap_ros.sim.aloha import RenderUnavailable  # before mujoco: it picks headless EGL

pytest.importorskip("mujoco")
pytest.importorskip("gym_aloha")

import gym_aloha.constants as C  # noqa: E402
import mujoco  # noqa: E402

from recap_ros import launch_graph  # noqa: E402
from recap_ros.sim.aloha.corrector import ExpertDriver  # noqa: E402
from recap_ros.sim.aloha.env import (CAMERAS, JOINT_NAMES, AlohaRenderer, AlohaSim, camera_matrix,  # noqa: E402
                                     joint_limits)
from recap_ros.station import StationConfigError, load_station, parse_station  # noqa: E402

TASKS = ("transfer_cube", "insertion")


def _reference_env(task):
    """gym-aloha's own gymnasium env (renders a small top view every step)."""
    from gym_aloha.env import AlohaEnv

    return AlohaEnv(task, obs_type="pixels_agent_pos", observation_width=32, observation_height=24)


@pytest.mark.parametrize("task", TASKS)
def test_steps_match_gym_aloha(task):
    """Same seed, same actions: the same joint positions and the same reward stage as gym-aloha's env."""
    sim, ref = AlohaSim(), _reference_env(task)
    q = sim.reset(task, 7)
    obs, _ = ref.reset(seed=7)
    np.testing.assert_array_equal(q, obs["agent_pos"])
    rng = np.random.default_rng(1)
    action = q.copy()
    for _ in range(8):
        action = action + rng.normal(0.0, 0.03, 14)
        action[[6, 13]] = rng.uniform(0.0, 1.0, 2)
        q = sim.step(action)
        obs, reward, *_ = ref.step(action)
        np.testing.assert_array_equal(q, obs["agent_pos"])
        assert sim.reward == reward


def test_reset_is_deterministic_per_seed():
    """Object poses are gym-aloha's samples for the seed: the same seed gives the same scene, another a different."""
    from gym_aloha.utils import sample_box_pose, sample_insertion_pose

    sim = AlohaSim()
    sim.reset("transfer_cube", 11)
    np.testing.assert_array_equal(sim.object_poses(), sample_box_pose(11))
    sim.reset("insertion", 11)
    np.testing.assert_array_equal(sim.object_poses(), np.concatenate(sample_insertion_pose(11)))
    first = sim.object_poses()
    sim.step(sim.qpos())
    sim.reset("insertion", 11)
    assert sim.object_poses() == first and sim.steps == 0 and sim.reward == 0
    sim.reset("insertion", 12)
    assert sim.object_poses() != first


def test_joint_order_and_start_pose():
    """Station joint order = gym-aloha's JOINTS order; the start pose is gym-aloha's START_ARM_POSE."""
    assert list(JOINT_NAMES) == [n.replace("_arm_", "_") for n in C.JOINTS]
    assert load_station("aloha_sim").robot.joint_names == list(JOINT_NAMES)
    q = AlohaSim().reset("transfer_cube", 0)
    start = np.array(C.START_ARM_POSE)
    np.testing.assert_array_equal(q[:6], start[:6])
    np.testing.assert_array_equal(q[7:13], start[8:14])
    grip = (0.02239 - 0.01844) / (0.05800 - 0.01844)  # gym-aloha's puppet gripper normalisation, by hand
    assert q[6] == pytest.approx(grip) and q[13] == pytest.approx(grip)


def test_gripper_normalisation():
    """A gripper command 0..1 drives the fingers to gym-aloha's unnormalised position (clamped to the model's
    range); the reading is the finger position normalised with gym-aloha's constants."""
    sim = AlohaSim()
    q = sim.reset("transfer_cube", 0)
    command = q.copy()
    command[6], command[13] = 1.0, 0.5
    for _ in range(40):
        sim.step(command)
    ctrl = sim.physics.data.ctrl
    assert ctrl[6] == pytest.approx(0.058)  # 1.0 -> 0.058 m (MuJoCo clamps it to the ctrlrange 0.021..0.057)
    assert ctrl[7] == pytest.approx(-0.058)  # the other finger mirrored
    assert ctrl[14] == pytest.approx(0.01844 + 0.5 * (0.058 - 0.01844))
    finger = sim.physics.data.qpos[[6, 14]]
    np.testing.assert_allclose(sim.qpos()[[6, 13]], (finger - C.PUPPET_GRIPPER_POSITION_CLOSE)
                               / (C.PUPPET_GRIPPER_POSITION_OPEN - C.PUPPET_GRIPPER_POSITION_CLOSE))
    assert sim.qpos()[6] == pytest.approx((0.057 - 0.01844) / 0.03956, abs=0.01)  # opened to the end


def test_limits_from_the_model():
    """Station arm limits = the MuJoCo model's joint ranges (read with mujoco from gym-aloha's XML); the gripper
    range 0..1 (gym-aloha's action range) contains the fingers' normalised range."""
    model = mujoco.MjModel.from_xml_path(str(C.ASSETS_DIR / "bimanual_viperx_transfer_cube.xml"))
    station = load_station("aloha_sim")
    for j in station.robot.joints:
        side, name = j.name.split("_", 1)
        if name == "gripper":
            assert (j.lower, j.upper) == (0.0, 1.0)
            continue
        lo, hi = model.jnt_range[mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_JOINT, f"vx300s_{side}/{name}")]
        assert (j.lower, j.upper) == (pytest.approx(lo), pytest.approx(hi))
    sim = AlohaSim()
    sim.reset("insertion", 0)
    lo, hi = joint_limits(sim.physics)
    assert lo[6] == pytest.approx((0.021 - 0.01844) / 0.03956) and hi[13] == pytest.approx((0.057 - 0.01844) / 0.03956)
    assert lo[0] == pytest.approx(-3.14158) and hi[9] == pytest.approx(1.6057)


def test_timeout_success_and_reward_stages():
    sim = AlohaSim(timeout_s=0.1)  # 5 control periods
    q = sim.reset("transfer_cube", 0)
    for _ in range(4):
        sim.step(q)
        assert not sim.status.done
    sim.step(q)
    assert sim.status.done and sim.status.reason == "timeout" and sim.steps == 5
    with pytest.raises(RuntimeError):
        sim.step(q)
    # the stage bookkeeping with the task's reward replaced by a scripted sequence
    sim = AlohaSim(timeout_s=1.0)
    sim.reset("insertion", 0)
    rewards = iter([0, 2, 1, 4])
    sim._task.get_reward = lambda physics: next(rewards)
    for _ in range(3):
        sim.step(q)
    assert sim.stage_steps == {1: 2, 2: 2} and sim.max_reward == 2 and sim.reward == 1 and not sim.status.done
    sim.step(q)
    assert sim.status.state == "success" and sim.stage_steps == {1: 2, 2: 2, 3: 4, 4: 4}


def test_bad_commands_are_refused_and_change_nothing():
    sim = AlohaSim()
    q = sim.reset("transfer_cube", 0)
    for bad in (np.zeros(13), np.full(14, np.nan), [0.0] * 13 + [np.inf]):
        with pytest.raises(ValueError):
            sim.step(bad)
    assert sim.steps == 0
    np.testing.assert_array_equal(sim.qpos(), q)
    with pytest.raises(ValueError):
        sim.reset("stack_blocks", 0)


def test_cameras_render_the_scene():
    sim = AlohaSim()
    sim.reset("transfer_cube", 0)
    renderer = AlohaRenderer(sim.scene_model("transfer_cube"), 96, 64)
    qpos = sim.physics.data.qpos.copy()
    views = {c: renderer.render(c, qpos) for c in CAMERAS}
    for c, img in views.items():
        assert img.shape == (64, 96, 3) and img.dtype == np.uint8 and img.std() > 5, c
    assert not np.array_equal(views["top"], views["left_wrist"])
    np.testing.assert_array_equal(renderer.render("top", qpos), views["top"])
    moved = qpos.copy()
    moved[-7:-4] += [0.0, 0.0, 0.1]  # the cube lifted 10 cm
    assert not np.array_equal(renderer.render("top", moved), views["top"])
    np.testing.assert_array_equal(sim.physics.data.qpos, qpos)  # rendering never touches the simulation
    renderer.close()


def test_camera_matrix_by_hand():
    model = AlohaSim(preload=("transfer_cube",)).scene_model("transfer_cube")
    k = camera_matrix(model, "top", 224, 224)  # the scene's top camera: fovy 78 deg
    f = 112 / math.tan(math.radians(39))
    np.testing.assert_allclose(k, [[f, 0, 112], [0, f, 112], [0, 0, 1]])
    with pytest.raises(ValueError):
        camera_matrix(model, "cam_high", 224, 224)


def test_missing_gl_is_one_line():
    """A GL backend that cannot start raises RenderUnavailable with one line naming the packages."""
    code = ("from recap_ros.sim.aloha import RenderUnavailable\n"
            "try:\n    from recap_ros.sim.aloha.env import AlohaRenderer, AlohaSim\n"
            "    AlohaRenderer(AlohaSim(preload=('transfer_cube',)).scene_model('transfer_cube'), 32, 32)\n"
            "except RenderUnavailable as e:\n    print('REFUSED', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "MUJOCO_GL": "osmesa", "PYOPENGL_PLATFORM": "osmesa",
                              "LD_LIBRARY_PATH": "/nonexistent"})
    lines = [line for line in out.stdout.splitlines() if line.startswith("REFUSED")]
    assert len(lines) == 1 and "MUJOCO_GL=osmesa" in lines[0] and "libegl1" in lines[0], out.stdout + out.stderr
    assert issubclass(RenderUnavailable, RuntimeError)


class StubExpert:
    """Test double of recap_ros.sim.aloha.expert.AlohaExpert: records resets, returns a fixed command."""

    def __init__(self):
        self.resets = []

    def reset(self, physics, task, seed):
        self.resets.append((task, seed))

    def act(self, physics):
        return np.full(14, 0.5)


def test_expert_driver_always():
    expert = StubExpert()
    d = ExpertDriver(expert, patience_s=1.0, always=True)
    d.start(None, "insertion", 3, 0.0)
    assert expert.resets == [("insertion", 3)] and d.active
    assert d.observe(0, 5.0) is None  # already driving: no take-over
    np.testing.assert_array_equal(d.command(None), np.full(14, 0.5))
    assert d.end() and not d.active


def test_expert_driver_takes_over_when_the_stage_stops_rising():
    d = ExpertDriver(StubExpert(), patience_s=1.0)
    d.start(None, "transfer_cube", 0, 10.0)
    assert not d.active
    with pytest.raises(RuntimeError):
        d.command(None)
    assert d.observe(0, 10.9) is None
    assert d.observe(1, 10.95) is None  # progress: the clock restarts at 10.95
    assert d.observe(1, 11.9) is None
    assert d.observe(0, 11.94) is None  # a lower stage is no progress, and no reason to grab yet
    reason = d.observe(1, 11.95)
    assert reason and "highest 1" in reason and d.active
    assert d.observe(2, 12.0) is None  # once driving, it drives until the end
    assert d.end() and not d.end()
    assert d.observe(0, 100.0) is None  # between episodes: nothing
    with pytest.raises(ValueError):
        ExpertDriver(StubExpert(), patience_s=0.0)


def test_station_schema_and_node_graph():
    st = load_station("aloha_sim")
    assert st.sim.simulator == "aloha" and st.sim.tasks == TASKS
    assert [c.name for c in st.cameras] == list(CAMERAS)
    specs = launch_graph.node_specs(st)
    assert [(s.executable, s.name) for s in specs][0] == ("aloha_sim", "sim_robot")
    assert "scripted_corrector" not in {s.executable for s in specs}  # the corrector runs inside aloha_sim
    assert launch_graph.node_specs(load_station("sim"))[0].executable == "sim_robot"
    raw = st.raw
    for sim, key, why in (({**raw["sim"], "simulator": "bullet"}, "sim.simulator", "must be one of"),
                          ({**raw["sim"], "tasks": ["stack"]}, "sim.tasks", "needs a list of tasks"),
                          ({**raw["sim"], "tasks": []}, "sim.tasks", "needs a list of tasks"),
                          ({**load_station("sim").raw["sim"], "tasks": ["insertion"]}, "sim.tasks", "only a station")):
        with pytest.raises(StationConfigError) as e:
            parse_station({**raw, "sim": sim}, "x.yaml")
        assert e.value.key == key and why in e.value.why
