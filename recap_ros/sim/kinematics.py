"""Kinematics of the simulated bimanual station: two ViperX-300-S-like 6-DoF arms (URDF joint origins/axes).

Each arm is a serial chain of revolute joints given the URDF way (origin translation of the joint frame in its
parent, rotation axis in the joint frame), with the Interbotix vx300s numbers (metres). Forward kinematics,
the geometric Jacobian and damped-least-squares inverse kinematics are plain numpy. The gripper (7th joint of
each arm, normalised 0 closed .. 1 open) does not move the tool tip; it only opens the rendered fingers.

World frame: table top is z = 0, x to the right as seen from the base camera, y away from it. The left arm
base sits at x = -0.35 facing +x, the right arm at x = +0.35 facing -x (both face the workspace).

ROS-free.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from transforms3d.euler import euler2mat

from recap_ros.station import Robot

ARMS = ("left", "right")
ARM_DOF = 6
JOINTS_PER_ARM = ARM_DOF + 1  # + gripper
ARM_JOINT_SUFFIXES = ("waist", "shoulder", "elbow", "forearm_roll", "wrist_angle", "wrist_rotate")

# vx300s URDF: joint origin (xyz in the parent link frame) and axis (in the joint frame), base -> wrist_rotate.
JOINT_ORIGINS = np.array([
    [0.0, 0.0, 0.079],      # waist
    [0.0, 0.0, 0.04805],    # shoulder
    [0.05955, 0.0, 0.3],    # elbow
    [0.2, 0.0, 0.0],        # forearm_roll
    [0.1, 0.0, 0.0],        # wrist_angle
    [0.069744, 0.0, 0.0],   # wrist_rotate
])
JOINT_AXES = np.array([[0, 0, 1], [0, 1, 0], [0, 1, 0], [1, 0, 0], [0, 1, 0], [1, 0, 0]], dtype=float)
_AXIS_INDEX = [int(np.argmax(a)) for a in JOINT_AXES]
TOOL_TIP = 0.11            # wrist_rotate frame -> finger tips along the tool x axis (ee_arm + gripper + fingers)
GRIPPER_BASE = 0.06        # wrist_rotate frame -> where the fingers start
FINGER_GAP = (0.012, 0.06)  # finger separation at gripper 0 (closed) and 1 (open), metres
BASE_X = 0.35              # |x| of the arm bases
BASE_YAW = {"left": 0.0, "right": np.pi}
DOWN = np.array([0.0, 0.0, -1.0])
# A ready pose above the table (tool pointing forward-down); grippers half open.
HOME_ARM = np.array([0.0, -0.55, 0.35, 0.0, 1.25, 0.0])
HOME_GRIPPER = 0.5


def _rot(axis: int, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    if axis == 0:
        return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])
    if axis == 1:
        return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


@dataclass(frozen=True)
class ArmFrames:
    """World-frame result of forward kinematics for one arm."""
    joints: np.ndarray   # (6, 3) joint origins, waist .. wrist_rotate
    axes: np.ndarray     # (6, 3) joint axes in world
    tool_R: np.ndarray   # (3, 3) wrist_rotate frame (x = tool axis)
    tip: np.ndarray      # (3,) finger tips (tool centre point)

    @property
    def tool_axis(self) -> np.ndarray:
        return self.tool_R[:, 0]


class Arm:
    """One 6-DoF arm with its base pose in the world and joint limits (radians)."""

    def __init__(self, side: str, lower: np.ndarray, upper: np.ndarray):
        if side not in ARMS:
            raise ValueError(f"arm side must be one of {ARMS}, got {side!r}")
        self.side = side
        self.base_p = np.array([-BASE_X if side == "left" else BASE_X, 0.0, 0.0])
        self.base_R = euler2mat(0.0, 0.0, BASE_YAW[side], "sxyz")
        self.lower = np.asarray(lower, dtype=float)
        self.upper = np.asarray(upper, dtype=float)

    def fk(self, q: np.ndarray) -> ArmFrames:
        R, p = self.base_R, self.base_p
        joints, axes = np.empty((ARM_DOF, 3)), np.empty((ARM_DOF, 3))
        for i in range(ARM_DOF):
            p = p + R @ JOINT_ORIGINS[i]
            joints[i] = p
            axes[i] = R[:, _AXIS_INDEX[i]]
            R = R @ _rot(_AXIS_INDEX[i], q[i])
        return ArmFrames(joints, axes, R, p + R[:, 0] * TOOL_TIP)

    def tip(self, q: np.ndarray) -> np.ndarray:
        return self.fk(q).tip

    def jacobian(self, q: np.ndarray, frames: ArmFrames | None = None) -> np.ndarray:
        """Geometric Jacobian (6x6) of the tool tip: rows 0-2 linear velocity, rows 3-5 angular velocity."""
        f = frames or self.fk(q)
        J = np.empty((6, ARM_DOF))
        J[:3] = np.cross(f.axes, f.tip - f.joints).T
        J[3:] = f.axes.T
        return J

    def ik(self, target: np.ndarray, q0: np.ndarray, tool_axis: np.ndarray | None = DOWN,
           axis_weight: float = 0.3, iters: int = 8, damping: float = 0.04,
           tol: float = 1e-4) -> tuple[np.ndarray, float]:
        """Damped least squares: tip -> target (and the tool axis -> tool_axis, weighted), within joint limits.

        Returns (q, tip position error in metres). Starts from q0, so consecutive calls track smoothly.
        """
        q = np.clip(np.asarray(q0, dtype=float).copy(), self.lower, self.upper)
        lam2 = damping * damping
        err = np.inf
        for _ in range(iters):
            f = self.fk(q)
            e_p = target - f.tip
            err = float(np.linalg.norm(e_p))
            J = self.jacobian(q, f)
            if tool_axis is None:
                e, Jw = e_p, J[:3]
            else:
                e = np.concatenate([e_p, axis_weight * np.cross(f.tool_axis, tool_axis)])
                Jw = np.vstack([J[:3], axis_weight * J[3:]])
            if err < tol and (tool_axis is None or np.linalg.norm(e[3:]) < tol):
                break
            dq = Jw.T @ np.linalg.solve(Jw @ Jw.T + lam2 * np.eye(len(e)), e)
            q = np.clip(q + dq, self.lower, self.upper)
        return q, float(np.linalg.norm(target - self.fk(q).tip))


class Bimanual:
    """The station's two arms, indexed by the station joint order: left_* (6 arm + gripper) then right_*."""

    def __init__(self, robot: Robot, source: str = "<station>"):
        names = robot.joint_names
        for k, side in enumerate(ARMS):
            block = names[k * JOINTS_PER_ARM:(k + 1) * JOINTS_PER_ARM]
            bad = [n for n in block if not n.startswith(side + "_")]
            if bad:
                raise ValueError(f"{source}: robot.joints: the sim expects 7 '{side}_*' joints at positions "
                                 f"{k * JOINTS_PER_ARM}..{(k + 1) * JOINTS_PER_ARM - 1} (6 arm + gripper), "
                                 f"got {block}")
        self.names = names
        self.lower = np.array(robot.lower)
        self.upper = np.array(robot.upper)
        self.max_velocity = np.array(robot.max_velocity)
        self.arms = {side: Arm(side, self.lower[self.arm_slice(side)], self.upper[self.arm_slice(side)])
                     for side in ARMS}

    @staticmethod
    def arm_slice(side: str) -> slice:
        k = ARMS.index(side)
        return slice(k * JOINTS_PER_ARM, k * JOINTS_PER_ARM + ARM_DOF)

    @staticmethod
    def gripper_index(side: str) -> int:
        return ARMS.index(side) * JOINTS_PER_ARM + ARM_DOF

    def home(self) -> np.ndarray:
        q = np.empty(len(self.names))
        for side in ARMS:
            q[self.arm_slice(side)] = HOME_ARM
            q[self.gripper_index(side)] = HOME_GRIPPER
        return np.clip(q, self.lower, self.upper)

    def fk(self, q: np.ndarray, side: str) -> ArmFrames:
        return self.arms[side].fk(q[self.arm_slice(side)])

    def tips(self, q: np.ndarray) -> dict[str, np.ndarray]:
        return {side: self.arms[side].tip(q[self.arm_slice(side)]) for side in ARMS}

    def finger_gap(self, q: np.ndarray, side: str) -> float:
        i = self.gripper_index(side)
        g = float(np.clip((q[i] - self.lower[i]) / (self.upper[i] - self.lower[i]), 0.0, 1.0))
        return FINGER_GAP[0] + g * (FINGER_GAP[1] - FINGER_GAP[0])
