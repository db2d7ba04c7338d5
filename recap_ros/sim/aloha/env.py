"""AlohaSim: gym-aloha's MuJoCo ALOHA (two ViperX 6-DoF arms + grippers) without gym and without its
per-step rendering, for the ``aloha_sim`` station node and for ROS-free roll-outs.

    sim = AlohaSim()
    sim.reset("transfer_cube", seed=3)      # or "insertion"; object poses sampled as gym-aloha samples them
    while not sim.status.done:
        sim.step(q14)                       # joint-position targets, station order, grippers 0 (closed) .. 1 (open)
    sim.status                              # AlohaStatus(state, reason, detail); success = reward 4 before timeout
    sim.physics                             # the dm_control Physics (the scripted expert reads it)

One step is gym-aloha's ``control.Environment.step`` without the observation (which renders three 640x480
views): the task's ``before_step`` (grippers unnormalised, fingers mirrored), ``physics.step`` over DT, the
task's ``after_step`` and ``get_reward``. Joint positions and velocities are the task's ``get_qpos`` /
``get_qvel``. Cameras render through :class:`AlohaRenderer` (``mujoco.Renderer``, its own GL context, cheap
scene flags) from a copy of the joint positions, so rendering never touches the stepping physics.

Headless rendering uses EGL (``MUJOCO_GL=egl``, set by the package unless the caller chose a backend).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from recap_ros.sim.aloha import RenderUnavailable, gl_problem

try:
    import mujoco
except ModuleNotFoundError:  # the aloha extra is not installed
    raise
except Exception as e:  # noqa: BLE001 - mujoco loads its GL backend (MUJOCO_GL) on import
    raise RenderUnavailable(gl_problem(e)) from None
import numpy as np
from dm_control import mujoco as dm_mujoco
from dm_control.rl.control import PhysicsError
from gym_aloha import constants as aloha_constants
from gym_aloha.tasks import sim as aloha_tasks
from gym_aloha.utils import sample_box_pose, sample_insertion_pose

from recap_ros.sim.env import check_command
from recap_ros.station import ALOHA_TASKS

ARM_JOINTS = ("waist", "shoulder", "elbow", "forearm_roll", "wrist_angle", "wrist_rotate")
# station order = gym-aloha's JOINTS order: left arm, left gripper, right arm, right gripper
JOINT_NAMES = tuple(f"{side}_{j}" for side in ("left", "right") for j in (*ARM_JOINTS, "gripper"))
CAMERAS = ("top", "left_wrist", "right_wrist")
SUCCESS_REWARD = 4
# The task strings of LeRobot's aloha_sim datasets (aloha_sim_transfer_cube_*, aloha_sim_insertion_*).
PROMPTS = {"transfer_cube": "Pick up the cube with the right arm and transfer it to the left arm.",
           "insertion": "Insert the peg into the socket."}
_TASKS = {"transfer_cube": ("bimanual_viperx_transfer_cube.xml", aloha_tasks.TransferCubeTask, sample_box_pose),
          "insertion": ("bimanual_viperx_insertion.xml", aloha_tasks.InsertionTask,
                        lambda seed: np.concatenate(sample_insertion_pose(seed)))}
assert set(_TASKS) == set(ALOHA_TASKS) == set(PROMPTS)
# Scene flags off for the cameras: shadows, reflections and the skybox cost ~4x the render time and carry
# nothing a policy needs.
CHEAP_FLAGS_OFF = (mujoco.mjtRndFlag.mjRND_SHADOW, mujoco.mjtRndFlag.mjRND_REFLECTION, mujoco.mjtRndFlag.mjRND_SKYBOX)


@dataclass(frozen=True)
class AlohaStatus:
    state: str = "running"  # running | success | failure
    reason: str = ""        # success | timeout | physics
    detail: str = ""

    @property
    def done(self) -> bool:
        return self.state != "running"


def gripper_to_normalised(finger_pos):
    """Left finger position (m) -> gym-aloha's normalised gripper (0 closed .. 1 open)."""
    return aloha_constants.normalize_puppet_gripper_position(finger_pos)


def joint_limits(physics) -> tuple[np.ndarray, np.ndarray]:
    """(lower, upper) of the 14 station joints from the MuJoCo model: the arm joints' ranges, and each gripper's
    left-finger range normalised as gym-aloha normalises the gripper."""
    lo, hi = [], []
    for side in ("left", "right"):
        for j in ARM_JOINTS:
            r = physics.named.model.jnt_range[f"vx300s_{side}/{j}"]
            lo.append(float(r[0]))
            hi.append(float(r[1]))
        r = physics.named.model.jnt_range[f"vx300s_{side}/left_finger"]
        lo.append(float(gripper_to_normalised(r[0])))
        hi.append(float(gripper_to_normalised(r[1])))
    return np.array(lo), np.array(hi)


def load_physics(task: str):
    """gym-aloha's dm_control Physics of a task's scene (joint-position control)."""
    if task not in _TASKS:
        raise ValueError(f"unknown aloha task {task!r}; tasks: {', '.join(_TASKS)}")
    return dm_mujoco.Physics.from_xml_path(str(aloha_constants.ASSETS_DIR / _TASKS[task][0]))


class AlohaSim:
    """One ALOHA scene at a time (a reset may switch the task); ``physics`` is that scene's Physics."""

    def __init__(self, timeout_s: float = 8.0, dt: float = aloha_constants.DT, preload: tuple[str, ...] = ()):
        """``preload``: tasks whose scenes load now (a reset to another task loads its scene then)."""
        self.timeout_s, self.dt = float(timeout_s), float(dt)
        self._scenes: dict[str, tuple] = {}
        for task in preload:
            self._scene(task)
        self.task = ""
        self.seed: int | None = None
        self.physics = None
        self._task = None
        self.n_sub_steps = 0
        self.steps = 0
        self.reward = 0
        self.max_reward = 0
        self.stage_steps: dict[int, int] = {}  # reward stage -> step at which it was first reached
        self.status = AlohaStatus()

    def _scene(self, task: str):
        if task not in self._scenes:
            physics = load_physics(task)
            n = round(self.dt / physics.timestep())
            if n < 1 or abs(n * physics.timestep() - self.dt) > 1e-9:
                raise ValueError(f"control period {self.dt} s is not a multiple of the model's timestep "
                                 f"{physics.timestep()} s")
            self._scenes[task] = (physics, _TASKS[task][1](), n)
        return self._scenes[task]

    def scene_model(self, task: str):
        """The MjModel of a task's scene (preloaded, or loaded by an earlier reset to that task)."""
        return self._scenes[task][0].model.ptr

    def reset(self, task: str, seed: int) -> np.ndarray:
        """Start an episode of ``task`` with gym-aloha's object poses for ``seed``; returns the joint positions."""
        self.physics, self._task, self.n_sub_steps = self._scene(task)
        self.task, self.seed = task, int(seed)
        self._task.random.seed(self.seed)  # as gym-aloha's reset seeds its task (the tasks draw nothing from it)
        aloha_tasks.BOX_POSE[0] = _TASKS[task][2](self.seed)  # gym-aloha's tasks read the poses from this global
        with self.physics.reset_context():
            self._task.initialize_episode(self.physics)
        self.steps, self.reward, self.max_reward, self.stage_steps = 0, 0, 0, {}
        self.status = AlohaStatus()
        return self.qpos()

    @property
    def prompt(self) -> str:
        return PROMPTS[self.task]

    @property
    def time_s(self) -> float:
        return self.steps * self.dt

    def object_poses(self) -> list[float]:
        """The free objects' poses (x, y, z, qw, qx, qy, qz each), as gym-aloha's env_state."""
        return self._task.get_env_state(self.physics).tolist()

    def qpos(self) -> np.ndarray:
        """Joint positions (14, station order; grippers normalised 0..1)."""
        return self._task.get_qpos(self.physics)

    def qvel(self) -> np.ndarray:
        """Joint velocities (14; gripper velocities normalised as the positions)."""
        return self._task.get_qvel(self.physics)

    def step(self, command) -> np.ndarray:
        """Apply joint-position targets (14, station order) for one control period; returns the joint positions."""
        if self._task is None or self.status.done:
            raise RuntimeError("AlohaSim.step() needs a running episode: call reset() first")
        action = check_command(command, len(JOINT_NAMES))
        self.steps += 1
        try:
            self._task.before_step(action, self.physics)
            self.physics.step(self.n_sub_steps)
            self._task.after_step(self.physics)
        except PhysicsError as e:
            self.status = AlohaStatus("failure", "physics", f"simulation diverged: {e}")
            return self.qpos()
        self.reward = int(self._task.get_reward(self.physics))
        for stage in range(1, self.reward + 1):
            self.stage_steps.setdefault(stage, self.steps)
        self.max_reward = max(self.max_reward, self.reward)
        if self.reward >= SUCCESS_REWARD:
            self.status = AlohaStatus("success", "success", f"reward {self.reward} at {self.time_s:.2f} s")
        elif self.time_s >= self.timeout_s - 1e-9:
            self.status = AlohaStatus("failure", "timeout", f"highest reward {self.max_reward} of {SUCCESS_REWARD} "
                                                           f"in {self.timeout_s:g} s")
        return self.qpos()


def camera_matrix(model, camera: str, width: int, height: int) -> np.ndarray:
    """3x3 pinhole intrinsics of a MuJoCo camera rendered at width x height (square pixels, vertical fovy)."""
    cam_id = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, camera)
    if cam_id < 0:
        raise ValueError(f"the ALOHA scene has no camera {camera!r}")
    f = 0.5 * height / math.tan(math.radians(float(model.cam_fovy[cam_id])) / 2)
    return np.array([[f, 0.0, width / 2], [0.0, f, height / 2], [0.0, 0.0, 1.0]])


class AlohaRenderer:
    """RGB views of one scene with ``mujoco.Renderer``: its own GL context (create and use it on one thread)
    and its own MjData, posed from a copy of the simulation's qpos; shadows, reflections, skybox off."""

    def __init__(self, model, width: int, height: int):
        try:
            self.renderer = mujoco.Renderer(model, height=height, width=width)
        except Exception as e:  # noqa: BLE001 - the GL backends raise ImportError, RuntimeError, OSError, ...
            if isinstance(e, ValueError):  # larger than the model's offscreen buffer: not a GL problem
                raise
            raise RenderUnavailable(gl_problem(e)) from None
        for flag in CHEAP_FLAGS_OFF:
            self.renderer.scene.flags[flag] = 0
        self.model = model
        self.data = mujoco.MjData(model)

    def render(self, camera: str, qpos: np.ndarray) -> np.ndarray:
        """HxWx3 uint8 RGB of ``camera`` with the scene at ``qpos`` (the model's full qpos)."""
        self.data.qpos[:] = qpos
        mujoco.mj_kinematics(self.model, self.data)
        mujoco.mj_comPos(self.model, self.data)
        mujoco.mj_camlight(self.model, self.data)
        self.renderer.update_scene(self.data, camera=camera)
        return self.renderer.render()

    def close(self) -> None:
        self.renderer.close()
