"""Scripted expert for gym-aloha's Transfer Cube and Bimanual Insertion: the demonstrator and the corrector.

API (ROS-free; the station's node and its scripted corrector call it at the control rate, DT = 0.02 s):

    expert = AlohaExpert()
    expert.reset(physics, task, seed)      # at each episode start: task "transfer_cube" | "insertion"
    action = expert.act(physics)           # np.ndarray (14,): the next joint-position command, once per tick

`seed` (the episode's seed) only moves the meeting point in the air by up to MEET_JITTER, so that demonstrations
vary; nothing else in the expert is random.

`physics` is gym-aloha's dm_control Physics (`env.unwrapped._env.physics`, or `AlohaSim.physics`); only `physics.model.ptr` and
`physics.data.ptr` (the raw MuJoCo model and data) are read, never written. The action follows gym-aloha's
joint-position convention: [left waist, shoulder, elbow, forearm_roll, wrist_angle, wrist_rotate, left gripper,
the same seven for the right arm], joints in rad, grippers normalised 0 (closed) .. 1 (open).

How it acts. Each arm's end effector is its fingertip site (`cali_<side>_site1`, at the tips of the fingers, in
the frame of `vx300s_<side>/gripper_link`: x points out between the fingers, y is the axis the fingers close
along). Every tick the expert reads the measured state (joint positions, object poses, finger-object contacts)
and picks each arm's waypoint (a pose of its fingertip site) and gripper target from it alone:

* transfer_cube: the right arm grasps the cube from above (approach 60 deg below horizontal), carries it to
  a meeting point in the air, the left arm comes in horizontally with its fingers vertical and closes on the
  cube (reward 4); then the right arm lets go and backs off. Cube held by the left -> lift it clear of the
  table; held by the right -> carry it to the meeting point; held by neither (at the start, dropped, knocked
  away) -> the right arm (re-)grasps it where it lies while the left waits beside the meeting point.
* insertion: the left arm grasps the socket and the right arm the peg, both from straight above at their
  centres; each held object is carried to a pose in the air, axis along x; then the peg's tip is servoed onto
  the socket's axis from the measured poses of both objects (so a grasp that slipped is corrected for), and
  pushed in until it touches the pin (reward 4); a tip caught on the socket's rim backs off and aligns again.
  An object that is not held (at the start, dropped) is (re-)grasped where it lies.

A grasp follows a funnel: open the gripper and go to a stand-off pose 8 cm back along the approach axis, move
in along that axis once the tip is on it and the gripper is open, close once at the grasp pose; a gripper that
closes on nothing opens again and the approach restarts. The approach pitch is the task's preferred one unless
the IK cannot reach that grasp or its stand-off from the home pose, then the next of CUBE_PITCHES /
BAR_PITCHES that it reaches (an object far out). An arm holds an object once both fingers touch it, and keeps
holding it while its gripper stays closed on something with the object at the tip; a held object moves only
once the gripper command is SQUEEZE below the measured opening (a take-over starts from the measured opening,
which does not squeeze). Nothing depends on time since reset, so the expert takes over from any state a policy
leaves the robot in (the corrector's case).

Motion: a Cartesian reference pose per arm moves toward the waypoint at a bounded linear and angular speed;
damped-least-squares inverse kinematics on the MuJoCo model (`mj_jacSite` over the arm's 6 joints, on a
private MjData) turns it into joint targets, warm-started from the previous command. The commands then pass
``recap_ros.control.limits.Limiter`` with limits below the station's: joints at VELOCITY_MARGIN * MAX_VELOCITY
and MAX_ACCELERATION, grippers at GRIPPER_SPEED and GRIPPER_ACCELERATION, so the mux never has to limit them.
An arm whose IK cannot follow its reference (STUCK_TICKS) or that is turned away or rolled over (WRAP_LIMIT)
first returns to the home pose in joint space. The reference and the limiter re-anchor, at rest, on the
measured state at the first act() after reset() and after ticks without act() (the physics time jumped: a
policy drove in between); the reference alone re-anchors on the measured tip when the robot is pushed
RESYNC_DIST away from it and after homing, the commands stay continuous.
"""
from __future__ import annotations

import mujoco
import numpy as np
from gym_aloha.constants import normalize_puppet_gripper_position

from recap_ros.control.limits import JointLimits, Limiter

DT = 0.02                                   # s, gym-aloha's control period
SIDES = ("left", "right")
ARM_JOINTS = ("waist", "shoulder", "elbow", "forearm_roll", "wrist_angle", "wrist_rotate")
MAX_VELOCITY = np.array([2.0, 2.0, 2.0, 3.0, 3.0, 3.0])  # rad/s per arm joint (ViperX 300 s, config/stations)
VELOCITY_MARGIN = 0.9                       # fraction of MAX_VELOCITY the commands may use
MAX_ACCELERATION = 20.0                     # rad/s^2 per arm joint (the aloha_sim station allows 10 pi)
GRIPPER_SPEED = 4.0                         # normalised gripper units per second (the station allows 10)
GRIPPER_ACCELERATION = 80.0                 # normalised gripper units per second^2 (the station allows 100)
SQUEEZE = 0.1                               # gripper command below the measured opening before a held object moves
GRIPPER_OPEN_MEASURED = 0.85                # measured opening above which a gripper counts as open
GRIPPER_EMPTY_MEASURED = 0.15               # measured opening below which a closed gripper holds nothing

LINEAR_SPEED = 0.45                         # m/s, reference speed between waypoints
APPROACH_SPEED = 0.2                        # m/s, along a grasp's approach axis
INSERT_SPEED = 0.06                         # m/s, peg into the socket
ANGULAR_SPEED = 2.5                         # rad/s, reference rotation at LINEAR_SPEED (slower in proportion)
EASE_GAIN = 8.0                             # 1/s: speed <= gain * distance left
STANDOFF = 0.08                             # m back along the approach axis before moving in
ON_AXIS_TOL = 0.012                         # m: tip this close to the approach axis may move in
AT_GRASP_TOL = 0.008                        # m: tip this close to the grasp point closes the gripper
ORIENT_TOL = 0.25                           # rad: orientation error allowed while moving in
HOLD_DIST = 0.03                            # m: object centre this close to a closed gripper's tip is held
RESYNC_DIST = 0.08                          # m: measured tip this far from the reference -> re-anchor
STUCK_DIST = 0.01                           # m: IK solution this far from the reference ...
STUCK_TICKS = 10                            # ... for this many ticks -> back to the home pose in joint space
HOME = np.array([0.0, -0.96, 1.16, 0.0, -0.3, 0.0])   # gym-aloha's START_ARM_POSE, per arm
WRAP_LIMIT = np.array([1.6, np.inf, np.inf, 2.2, np.inf, 2.6])  # |q| beyond this -> home first (rad)
HOME_TOL = 0.1                              # rad: homing ends this close to HOME

IK_ITERS = 6
IK_DAMPING = 0.03
IK_ROT_WEIGHT = 0.2                         # m per rad in the IK error

TABLE_Z = 0.0                               # table top
PEG_HALF_LEN = 0.06
SOCKET_HALF_LEN = 0.06
PIN_DEPTH = SOCKET_HALF_LEN - 0.04          # socket mouth to the pin's end along the axis
CUBE_PITCHES = tuple(np.deg2rad([60, 75, 45, 90, 30]))  # approaches below horizontal to pick the cube, preferred first
BAR_PITCHES = tuple(np.deg2rad([90, 75, 60, 45]))       # ... to pick the peg or the socket
FINGER_HALF_WIDTH = 0.03                    # m, fingertip half width across the closing axis
TABLE_CLEARANCE = 0.003                     # m, fingertips' lowest corner above the table
REGRASP_MOVE = 0.01                         # m the object moves before its grasp is chosen again
REACH_IK_ITERS = 40
REACH_TOL = 0.005                           # m (and 0.05 rad) IK error of a reachable pose
TRANSFER_MEET = np.array([0.0, 0.5, 0.22])  # cube centre during the hand-over (jittered per seed)
SOCKET_MEET = np.array([-0.08, 0.5, 0.2])   # socket centre in the air (jittered per seed)
PEG_WAIT_GAP = 0.08                         # m: peg tip before the socket's mouth while the socket is on its way
INSERT_GAP = 0.02                           # m: peg tip before the mouth while aligning
INSERT_DEPTH = PIN_DEPTH + 0.01             # m: peg tip past the mouth aimed at (beyond the pin's end)
ALIGN_TOL = 0.006                           # m: tip off the socket axis allowed while pushing in (8 mm clearance)
ALIGN_ANGLE_TOL = 0.08                      # rad: peg axis off the socket axis allowed while pushing in
INSIDE_TOL = 0.008                          # m: largest offset of a peg tip inside the socket's opening
SERVO_NEAR = 0.03                           # m: peg and socket servo at INSERT_SPEED this close to their goals
CLEAR_WAIT_X = 0.05                         # m: a cube lying at smaller x ...
CLEAR_WAIT_OFFSET = np.array([-0.1, 0.0, 0.08])  # ... and the left arm waits this much farther back and higher
MEET_JITTER = 0.02                          # m, per-seed offset of the meeting points (demo diversity)

TASKS = ("transfer_cube", "insertion")


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def rotation_error(R_goal: np.ndarray, R: np.ndarray) -> np.ndarray:
    """World-frame rotation vector that turns R into R_goal."""
    q = np.empty(4)
    mujoco.mju_mat2Quat(q, (R_goal @ R.T).ravel())
    if q[0] < 0:
        q = -q
    s = np.linalg.norm(q[1:])
    if s < 1e-12:
        return np.zeros(3)
    return q[1:] / s * 2.0 * np.arctan2(s, q[0])


def rotate(R: np.ndarray, w: np.ndarray) -> np.ndarray:
    """exp([w]x) @ R (w a world-frame rotation vector)."""
    angle = float(np.linalg.norm(w))
    if angle < 1e-12:
        return R.copy()
    k = w / angle
    K = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return (np.eye(3) + np.sin(angle) * K + (1 - np.cos(angle)) * K @ K) @ R


def align(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Rotation vector of the smallest rotation that turns unit vector a into unit vector b."""
    c = np.cross(a, b)
    s = float(np.linalg.norm(c))
    if s < 1e-12:
        return np.zeros(3)
    return c / s * np.arctan2(s, float(np.dot(a, b)))


def grasp_frame(approach: np.ndarray, fingers: np.ndarray, top: np.ndarray) -> np.ndarray:
    """Gripper orientation: x along approach, y along +-fingers, z = x cross y (the top of the gripper) on the
    side of `top` (the wrist then stays on the side it has at the home pose)."""
    x = _unit(approach)
    y = _unit(fingers - np.dot(fingers, x) * x)
    if np.dot(np.cross(x, y), top) < 0:
        y = -y
    return np.column_stack([x, y, np.cross(x, y)])


class Arm:
    """Kinematics of one ViperX arm on the expert's private MjData."""

    def __init__(self, model: mujoco.MjModel, data: mujoco.MjData, side: str):
        self.model, self.data, self.side = model, data, side
        jids = [model.joint(f"vx300s_{side}/{j}").id for j in ARM_JOINTS]
        self.qadr = np.array([model.jnt_qposadr[j] for j in jids])
        self.dofs = np.array([model.jnt_dofadr[j] for j in jids])
        self.lower, self.upper = model.jnt_range[jids, 0], model.jnt_range[jids, 1]
        self.finger_qadr = model.jnt_qposadr[model.joint(f"vx300s_{side}/left_finger").id]
        self.site = model.site(f"cali_{side}_site1").id
        self.base = model.body(f"vx300s_{side}").id
        self.fingers = {model.geom(f"vx300s_{side}/10_{f}_gripper_finger").id for f in ("left", "right")}
        self._jacp, self._jacr = np.zeros((3, model.nv)), np.zeros((3, model.nv))

    def fk(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.data.qpos[self.qadr] = q
        mujoco.mj_kinematics(self.model, self.data)
        return self.data.site_xpos[self.site].copy(), self.data.site_xmat[self.site].reshape(3, 3).copy()

    def ik(self, p_goal: np.ndarray, R_goal: np.ndarray, q0: np.ndarray, iters: int = IK_ITERS) -> np.ndarray:
        """Joint positions that put the site at (p_goal, R_goal): damped least squares from q0."""
        q = np.clip(np.asarray(q0, dtype=float), self.lower, self.upper)
        for _ in range(iters):
            p, R = self.fk(q)
            err = np.concatenate([p_goal - p, IK_ROT_WEIGHT * rotation_error(R_goal, R)])
            if np.linalg.norm(err) < 1e-5:
                break
            mujoco.mj_comPos(self.model, self.data)
            mujoco.mj_jacSite(self.model, self.data, self._jacp, self._jacr, self.site)
            J = np.vstack([self._jacp[:, self.dofs], IK_ROT_WEIGHT * self._jacr[:, self.dofs]])
            dq = J.T @ np.linalg.solve(J @ J.T + IK_DAMPING**2 * np.eye(6), err)
            q = np.clip(q + dq, self.lower, self.upper)
        return q


class AlohaExpert:
    def __init__(self):
        self.task: str | None = None
        self._model = None
        self._meet = TRANSFER_MEET.copy()
        self._ref: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._limit: dict[str, Limiter] = {}
        self._closing: dict[str, bool] = {}     # the gripper was told to close at a grasp pose
        self._held: dict[str, bool] = {}        # the arm holds its object (see _holds)
        self._homing: dict[str, bool] = {}      # the arm returns to HOME in joint space
        self._stuck: dict[str, int] = {}        # ticks the IK has not reached the reference
        self._grasp_pitch: dict[str, tuple[np.ndarray, float]] = {}   # object position it was chosen at, pitch
        self._time = 0.0

    # ------------------------------------------------------------------ API
    def reset(self, physics, task: str, seed: int) -> None:
        """Start an episode of `task` on `physics`; the next act() anchors on the measured state."""
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
        model = physics.model.ptr
        if model is not self._model:
            self._model, self._data = model, mujoco.MjData(model)
            self._arms = {s: Arm(model, self._data, s) for s in SIDES}
            self._table = model.geom("table").id
            self._limits = {s: JointLimits(
                np.append(a.lower, 0.0), np.append(a.upper, 1.0),
                np.append(VELOCITY_MARGIN * MAX_VELOCITY, GRIPPER_SPEED),
                np.append(np.full(6, MAX_ACCELERATION), GRIPPER_ACCELERATION), DT) for s, a in self._arms.items()}
        self.task = task
        base = TRANSFER_MEET if task == "transfer_cube" else SOCKET_MEET
        self._meet = base + np.array([*np.random.default_rng(seed).uniform(-MEET_JITTER, MEET_JITTER, 2), 0.0])
        names = ("box",) if task == "transfer_cube" else ("peg", "socket")
        self._bodies = {n: model.body(n).id for n in names}
        self._geoms = {n: {g for g in range(model.ngeom) if model.geom_bodyid[g] == b} for n, b in self._bodies.items()}
        self._ref, self._grasp_pitch = {}, {}

    def act(self, physics) -> np.ndarray:
        """The next 14-dim joint-position command (gym-aloha's action convention) from the measured state."""
        if self.task is None:
            raise RuntimeError("AlohaExpert.act() before reset()")
        d = physics.data.ptr
        self._data.qpos[:] = d.qpos
        q_meas = {s: d.qpos[a.qadr].copy() for s, a in self._arms.items()}
        tips = {s: self._arms[s].fk(q_meas[s]) for s in SIDES}
        grip_meas = {s: float(normalize_puppet_gripper_position(d.qpos[a.finger_qadr])) for s, a in self._arms.items()}
        if not self._ref or abs(d.time - self._time - DT) > 0.5 * DT:   # first act, or act() skipped ticks
            self._anchor(q_meas, tips, grip_meas)
        self._time = d.time
        for s in SIDES:
            if not self._homing[s] and np.linalg.norm(self._ref[s][0] - tips[s][0]) > RESYNC_DIST:
                self._ref[s] = tips[s]
        contacts = self._contacts(d)
        obs = dict(d=d, tips=tips, grip=grip_meas, contacts=contacts)
        plan = self._plan_transfer(obs) if self.task == "transfer_cube" else self._plan_insertion(obs)
        out = np.empty(14)
        for i, s in enumerate(SIDES):
            goal_p, goal_R, speed, grip = plan[s]
            if not self._homing[s] and (self._stuck[s] > STUCK_TICKS or self._wrapped(q_meas[s])):
                self._homing[s] = True
            if self._homing[s] and np.max(np.abs(q_meas[s] - HOME)) < HOME_TOL:
                self._homing[s], self._stuck[s], self._ref[s] = False, 0, tips[s]
            if self._held[s] and grip_meas[s] - self._limit[s].position[6] < SQUEEZE:
                arm_target = self._limit[s].position[:6]     # squeeze what it holds before moving it
            else:
                arm_target = HOME if self._homing[s] else self._move(s, goal_p, goal_R, speed)
            out[7 * i:7 * i + 7] = self._limit[s].step(np.append(arm_target, grip))
        return out

    # ------------------------------------------------------------ measuring
    def _anchor(self, q_meas, tips, grip_meas) -> None:
        """Start again from the measured state: references on the measured tips, commands at rest there."""
        self._closing, self._held = {s: False for s in SIDES}, {s: False for s in SIDES}
        self._homing, self._stuck = {s: False for s in SIDES}, {s: 0 for s in SIDES}
        for s in SIDES:
            self._ref[s] = tips[s]
            self._limit[s] = Limiter(self._limits[s])
            self._limit[s].reset(np.append(q_meas[s], grip_meas[s]))

    def _contacts(self, d) -> set[tuple[int, int]]:
        return {tuple(sorted((int(c.geom1), int(c.geom2)))) for c in d.contact[:d.ncon]}

    def _pose(self, d, name: str) -> tuple[np.ndarray, np.ndarray]:
        b = self._bodies[name]
        return d.xpos[b].copy(), d.xmat[b].reshape(3, 3).copy()

    def _touching(self, contacts, geoms_a, geoms_b) -> bool:
        return any(tuple(sorted((a, b))) in contacts for a in geoms_a for b in geoms_b)

    def _holds(self, obs, side: str, name: str) -> bool:
        """Both fingers of `side` touch the object, or (contacts flicker while it moves) the gripper holding
        it is still closed on something and the object is still at its tip."""
        if all(self._touching(obs["contacts"], {f}, self._geoms[name]) for f in self._arms[side].fingers):
            self._held[side] = True
        else:
            near = np.linalg.norm(self._pose(obs["d"], name)[0] - obs["tips"][side][0]) < HOLD_DIST
            self._held[side] = self._held[side] and near and obs["grip"][side] > GRIPPER_EMPTY_MEASURED
        return self._held[side]

    def _on_table(self, obs, name: str) -> bool:
        return self._touching(obs["contacts"], {self._table}, self._geoms[name])

    def _base_xy(self, obs, side: str) -> np.ndarray:
        return obs["d"].xpos[self._arms[side].base][:2]

    # ------------------------------------------------------------- behaviours
    def _grasp(self, obs, side: str, g: np.ndarray, R: np.ndarray):
        """One tick of the grasp funnel toward tip pose (g, R): (goal position, goal rotation, speed, gripper)."""
        p, R_tip = obs["tips"][side]
        a = R[:, 0]
        rel = p - g
        back = -float(np.dot(rel, a))                 # distance behind the grasp point along the approach
        off_axis = float(np.linalg.norm(rel + back * a))
        ori_err = float(np.linalg.norm(rotation_error(R, R_tip)))
        gripper_open = obs["grip"][side] > GRIPPER_OPEN_MEASURED
        if self._closing[side]:
            if np.linalg.norm(rel) > 2.5 * AT_GRASP_TOL or obs["grip"][side] < GRIPPER_EMPTY_MEASURED:
                self._closing[side] = False           # pushed away, or closed on nothing: open and retry
            else:
                return g, R, APPROACH_SPEED, 0.0
        if np.linalg.norm(rel) < AT_GRASP_TOL and ori_err < ORIENT_TOL and gripper_open:
            self._closing[side] = True
            return g, R, APPROACH_SPEED, 0.0
        standoff = g - STANDOFF * a
        if off_axis < ON_AXIS_TOL and -0.01 < back < STANDOFF + 0.02 and ori_err < ORIENT_TOL:
            if gripper_open:
                return g, R, APPROACH_SPEED, 1.0
            return p, R, APPROACH_SPEED, 1.0          # hold on the axis until the gripper is open
        if p[2] < standoff[2] - 0.03:                 # low and off the axis: go straight up first
            return np.array([p[0], p[1], standoff[2]]), R, APPROACH_SPEED, 1.0
        return standoff, R, LINEAR_SPEED, 1.0

    def _carry(self, obs, side: str, name: str, p_obj_goal: np.ndarray, R_obj_goal: np.ndarray):
        """Tip goal that brings the held object to (p_obj_goal, R_obj_goal), keeping the measured grasp."""
        p_obj, R_obj = self._pose(obs["d"], name)
        p, R = obs["tips"][side]
        R_delta = R_obj_goal @ R_obj.T
        return p_obj_goal + R_delta @ (p - p_obj), R_delta @ R

    def _retreat(self, obs, side: str):
        """Open and back off 10 cm up and toward the arm's own base."""
        p, R = obs["tips"][side]
        back = np.append(_unit(self._base_xy(obs, side) - p[:2]) * 0.1, 0.1)
        return p + back, self._ref[side][1], LINEAR_SPEED, 1.0

    # ------------------------------------------------------------ transfer
    def _cube_grasp(self, obs) -> tuple[np.ndarray, np.ndarray]:
        """Right tip pose grasping the cube where it lies: fingers on the two side faces across the arm's reach."""
        p_box, R_box = self._pose(obs["d"], "box")
        from_base = np.append(_unit(p_box[:2] - self._base_xy(obs, "right")), 0.0)
        faces = [R_box[:, i] for i in range(3) if abs(R_box[2, i]) < 0.7]   # horizontal face normals
        side_dir = np.cross([0.0, 0.0, 1.0], from_base)
        fingers = max(faces, key=lambda n: abs(np.dot(n, side_dir))) if faces else side_dir
        return self._reachable_grasp(obs, "right", "box", p_box, fingers, CUBE_PITCHES)

    def _receive_pose(self, cube: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Left tip pose closing on the cube's top and bottom faces, coming in horizontally along +x."""
        R = np.column_stack([[1.0, 0, 0], [0, 0, 1.0], [0, -1.0, 0]])
        if np.linalg.norm(rotation_error(R, self._ref["left"][1])) > np.pi / 2:
            R = np.column_stack([[1.0, 0, 0], [0, 0, -1.0], [0, 1.0, 0]])  # the mirror grasp, nearer the wrist
        return cube + np.array([0.005, 0.0, 0.0]), R

    def _plan_transfer(self, obs):
        p_box, _ = self._pose(obs["d"], "box")
        right_holds, left_holds = self._holds(obs, "right", "box"), self._holds(obs, "left", "box")
        plan = {}
        if left_holds:
            p, R = obs["tips"]["left"]
            lift = p + np.array([0.0, 0.0, 0.1]) if self._on_table(obs, "box") else p
            plan["left"] = (lift, self._ref["left"][1], LINEAR_SPEED, 0.0)
            plan["right"] = self._retreat(obs, "right") if right_holds or obs["grip"]["right"] < 0.9 \
                else (obs["tips"]["right"][0], self._ref["right"][1], LINEAR_SPEED, 1.0)
            self._closing["left"] = True
            return plan
        if right_holds:
            self._closing["right"] = True
            p, R = self._carry(obs, "right", "box", self._meet, self._pose(obs["d"], "box")[1])
            plan["right"] = (p, self._ref["right"][1], LINEAR_SPEED, 0.0)
            g, R_l = self._receive_pose(p_box)
            if np.linalg.norm(p_box - self._meet) < 0.015:
                plan["left"] = self._grasp(obs, "left", g, R_l)
            else:
                self._closing["left"] = False
                plan["left"] = (g - STANDOFF * R_l[:, 0], R_l, LINEAR_SPEED, 1.0)
            return plan
        plan["right"] = self._grasp(obs, "right", *self._cube_grasp(obs))
        g, R_l = self._receive_pose(self._meet)
        wait = g - STANDOFF * R_l[:, 0]
        if p_box[0] < CLEAR_WAIT_X:           # the right arm reaches under the hand-over point: wait out of its way
            wait = wait + CLEAR_WAIT_OFFSET
        self._closing["left"] = False
        plan["left"] = (wait, R_l, LINEAR_SPEED, 1.0)
        return plan

    # ------------------------------------------------------------ insertion
    def _top_grasp(self, obs, side: str, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Tip pose grasping a lying bar-shaped object at its centre from above, fingers across it."""
        p_obj, R_obj = self._pose(obs["d"], name)
        axis = np.array([R_obj[0, 0], R_obj[1, 0], 0.0])
        fingers = np.cross([0.0, 0.0, 1.0], axis) if np.linalg.norm(axis) > 1e-6 else np.array([0.0, 1.0, 0.0])
        return self._reachable_grasp(obs, side, name, p_obj + np.array([0.0, 0.0, 0.004]), fingers, BAR_PITCHES)

    def _reachable_grasp(self, obs, side: str, name: str, g: np.ndarray, fingers: np.ndarray,
                         pitches: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
        """Tip pose grasping at g: fingers along `fingers` (made horizontal), the approach leaning away from the
        arm's base at the first of these pitches (below horizontal) whose grasp and stand-off poses the IK
        reaches from the home pose (the first pitch if none). The pitch is chosen again once the object has
        moved REGRASP_MOVE from where it was chosen."""
        p_obj = self._pose(obs["d"], name)[0]
        fingers = _unit(np.array([fingers[0], fingers[1], 0.0]))
        from_base = np.append(p_obj[:2] - self._base_xy(obs, side), 0.0)
        h = np.cross(fingers, [0.0, 0.0, 1.0])
        h = h if np.dot(h, from_base) >= 0 else -h

        def pose(pitch):
            approach = np.cos(pitch) * h - np.sin(pitch) * np.array([0.0, 0.0, 1.0])
            gp = g.copy()
            gp[2] = max(gp[2], TABLE_Z + FINGER_HALF_WIDTH * np.cos(pitch) + TABLE_CLEARANCE)
            return gp, grasp_frame(approach, fingers, h + np.array([0.0, 0.0, 1.0]))

        def reachable(pitch):
            gp, R = pose(pitch)
            return all(self._reaches(self._arms[side], p, R) for p in (gp, gp - STANDOFF * R[:, 0]))

        cached = self._grasp_pitch.get(side)
        if cached is None or np.linalg.norm(cached[0] - p_obj) > REGRASP_MOVE:
            cached = self._grasp_pitch[side] = (p_obj, next(filter(reachable, pitches), pitches[0]))
        return pose(cached[1])

    def _reaches(self, arm: Arm, p: np.ndarray, R: np.ndarray) -> bool:
        q = arm.ik(p, R, HOME, iters=REACH_IK_ITERS)
        p_q, R_q = arm.fk(q)
        return np.linalg.norm(p_q - p) < REACH_TOL and np.linalg.norm(rotation_error(R, R_q)) < 10 * REACH_TOL

    def _plan_insertion(self, obs):
        d = obs["d"]
        p_sock, R_sock = self._pose(d, "socket")
        p_peg, R_peg = self._pose(d, "peg")
        left_holds, right_holds = self._holds(obs, "left", "socket"), self._holds(obs, "right", "peg")
        plan = {}
        if left_holds:
            self._closing["left"] = True
            R_goal = rotate(R_sock, align(R_sock[:, 0] * np.sign(R_sock[0, 0] or 1.0), np.array([1.0, 0, 0])))
            p, R = self._carry(obs, "left", "socket", self._meet, R_goal)
            near = np.linalg.norm(p_sock - self._meet) < SERVO_NEAR
            plan["left"] = (p, R, INSERT_SPEED if near else LINEAR_SPEED, 0.0)
        else:
            plan["left"] = self._grasp(obs, "left", *self._top_grasp(obs, "left", "socket"))
        if not right_holds:
            plan["right"] = self._grasp(obs, "right", *self._top_grasp(obs, "right", "peg"))
            return plan
        self._closing["right"] = True
        u = R_sock[:, 0] * (1.0 if np.dot(R_sock[:, 0], p_peg - p_sock) >= 0 else -1.0)   # mouth direction
        mouth = p_sock + SOCKET_HALF_LEN * u
        a_peg = R_peg[:, 0] * (1.0 if np.dot(R_peg[:, 0], mouth - p_peg) >= 0 else -1.0)  # toward the tip
        tip = p_peg + PEG_HALF_LEN * a_peg
        socket_ready = left_holds and np.linalg.norm(p_sock - self._meet) < SERVO_NEAR
        if not socket_ready:      # wait with the peg beside the socket's meeting pose
            u_wait = np.array([1.0, 0.0, 0.0])
            peg_goal = self._meet + (SOCKET_HALF_LEN + PEG_WAIT_GAP + PEG_HALF_LEN) * u_wait
            R_goal = rotate(R_peg, align(a_peg, -u_wait))
            p, R = self._carry(obs, "right", "peg", peg_goal, R_goal)
            plan["right"] = (p, R, LINEAR_SPEED, 0.0)
            return plan
        rel = tip - mouth
        along = float(np.dot(rel, u))
        lateral = float(np.linalg.norm(rel - along * u))
        angle = float(np.linalg.norm(align(a_peg, -u)))
        aligned = lateral < ALIGN_TOL and angle < ALIGN_ANGLE_TOL
        inside = along < 0 and lateral < INSIDE_TOL       # in the opening, not stuck on the socket's rim
        depth = -INSERT_DEPTH if aligned or inside else INSERT_GAP
        tip_goal = mouth + depth * u
        R_goal = rotate(R_peg, align(a_peg, -u))
        p, R = self._carry(obs, "right", "peg", tip_goal - PEG_HALF_LEN * (-u), R_goal)
        near = aligned or np.linalg.norm(tip - tip_goal) < SERVO_NEAR
        plan["right"] = (p, R, INSERT_SPEED if near else LINEAR_SPEED, 0.0)
        return plan

    # --------------------------------------------------------------- motion
    def _move(self, side: str, goal_p: np.ndarray, goal_R: np.ndarray, speed: float) -> np.ndarray:
        """Advance the side's reference toward the goal; the arm's joint positions for it (before limiting)."""
        p, R = self._ref[side]
        delta = goal_p - p
        dist = float(np.linalg.norm(delta))
        if dist > 1e-9:
            p = p + delta * min(1.0, min(speed, EASE_GAIN * dist) * DT / dist)
        w = rotation_error(goal_R, R)
        angle = float(np.linalg.norm(w))
        if angle > 1e-9:
            omega = ANGULAR_SPEED * speed / LINEAR_SPEED
            R = rotate(R, w * min(1.0, min(omega, EASE_GAIN * angle) * DT / angle))
        self._ref[side] = (p, R)
        arm = self._arms[side]
        wanted = arm.ik(p, R, self._limit[side].position[:6])
        self._stuck[side] = self._stuck[side] + 1 if np.linalg.norm(arm.fk(wanted)[0] - p) > STUCK_DIST else 0
        return wanted

    def _wrapped(self, q: np.ndarray) -> bool:
        """An arm configuration outside the branch the IK works in (turned away, rolled over)."""
        return bool(np.any(np.abs(q) > WRAP_LIMIT))

