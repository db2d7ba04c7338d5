"""The sim task: touch a named coloured marker on the table with a named gripper.

Each episode is drawn deterministically from a seed: three markers of distinct colours at random table
positions (clear of each other and of the keep-out box in the middle), the target colour, the arm, the prompt
phrasing and a small perturbation of the start pose. Success: the named arm's tip within SUCCESS_RADIUS of the
target marker's top. Failure: timeout, or a keep-out violation (a tip below the table, a tip inside the
keep-out box, or a tip touching any other marker / the target with the wrong gripper).

ROS-free.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from recap_ros.sim.kinematics import ARMS, Bimanual

COLOURS: dict[str, tuple[int, int, int]] = {  # RGB, all far from the table, arm and keep-out colours
    "red": (225, 40, 40),
    "green": (40, 175, 65),
    "blue": (40, 90, 230),
    "yellow": (245, 210, 30),
}
PROMPT_TEMPLATES = (
    "touch the {colour} marker with the {arm} gripper",
    "use the {arm} gripper to touch the {colour} marker",
    "{arm} gripper: touch the {colour} marker",
    "move the {arm} gripper to the {colour} marker",
)
N_MARKERS = 3
MARKER_RADIUS = 0.035      # m, disc on the table
MARKER_HEIGHT = 0.01       # m, the disc's top surface
SUCCESS_RADIUS = 0.03      # m, tip to the marker's top centre (also the "touch" radius for wrong markers)
WORKSPACE = ((-0.2, 0.2), (-0.16, 0.16))  # marker centres, x and y ranges (m)
MIN_MARKER_GAP = 0.12      # m between marker centres
KEEP_OUT_MIN = np.array([-0.06, -0.06, 0.0])   # visible box in the middle of the table
KEEP_OUT_MAX = np.array([0.06, 0.06, 0.08])
KEEP_OUT_CLEARANCE = 0.06  # m, markers' centres keep at least this far (xy) from the box
START_NOISE = 0.05         # rad, uniform perturbation of the arm joints at episode start

RUNNING, SUCCESS, FAILURE = "running", "success", "failure"


@dataclass(frozen=True)
class Marker:
    colour: str
    xy: tuple[float, float]

    @property
    def rgb(self) -> tuple[int, int, int]:
        return COLOURS[self.colour]

    @property
    def top(self) -> np.ndarray:
        return np.array([self.xy[0], self.xy[1], MARKER_HEIGHT])


@dataclass(frozen=True)
class Status:
    state: str = RUNNING            # running | success | failure
    reason: str | None = None       # success | timeout | keep_out
    detail: str = ""

    @property
    def done(self) -> bool:
        return self.state != RUNNING


@dataclass(frozen=True)
class Task:
    seed: int
    prompt: str
    arm: str
    colour: str
    markers: tuple[Marker, ...]
    q0: tuple[float, ...]   # start joint positions, station order

    @property
    def target(self) -> np.ndarray:
        return self.marker(self.colour).top

    def marker(self, colour: str) -> Marker:
        for m in self.markers:
            if m.colour == colour:
                return m
        raise KeyError(colour)

    # ------------------------------------------------------------------ rules
    def violation(self, tips: dict[str, np.ndarray]) -> str | None:
        """Why these tip positions break the rules (None when they don't)."""
        for side in ARMS:
            p = tips[side]
            if p[2] < 0.0:
                return f"{side} tip below the table (z={p[2]:.3f})"
            if np.all(p >= KEEP_OUT_MIN) and np.all(p <= KEEP_OUT_MAX):
                return f"{side} tip inside the keep-out box"
            for m in self.markers:
                if (side, m.colour) != (self.arm, self.colour) and np.linalg.norm(p - m.top) < SUCCESS_RADIUS:
                    return f"{side} gripper touched the {m.colour} marker"
        return None

    def evaluate(self, tips: dict[str, np.ndarray], elapsed_s: float, timeout_s: float) -> Status:
        why = self.violation(tips)
        if why:
            return Status(FAILURE, "keep_out", why)
        if np.linalg.norm(tips[self.arm] - self.target) < SUCCESS_RADIUS:
            return Status(SUCCESS, "success", f"{self.arm} gripper touched the {self.colour} marker")
        if elapsed_s >= timeout_s:
            return Status(FAILURE, "timeout", f"not done after {timeout_s:.1f} s")
        return Status()

    # ------------------------------------------------------------------ (de)serialisation (episode events)
    def to_dict(self) -> dict:
        """JSON-ready description (exact: floats round-trip through JSON)."""
        return {"seed": self.seed, "prompt": self.prompt, "arm": self.arm, "colour": self.colour,
                "target": [float(v) for v in self.target],
                "markers": [{"colour": m.colour, "xy": [float(v) for v in m.xy]} for m in self.markers],
                "keep_out": {"min": KEEP_OUT_MIN.tolist(), "max": KEEP_OUT_MAX.tolist()},
                "q0": [float(v) for v in self.q0]}

    @classmethod
    def from_dict(cls, d: dict) -> "Task":
        """Inverse of to_dict; raises ValueError naming the bad field."""
        try:
            markers = tuple(Marker(str(m["colour"]), (float(m["xy"][0]), float(m["xy"][1]))) for m in d["markers"])
            task = cls(int(d["seed"]), str(d["prompt"]), str(d["arm"]), str(d["colour"]), markers,
                       tuple(float(v) for v in d["q0"]))
        except (KeyError, TypeError, IndexError, ValueError) as e:
            raise ValueError(f"task description lacks or has a bad field: {e!r}") from None
        if task.arm not in ARMS:
            raise ValueError(f"task arm must be one of {ARMS}, got {task.arm!r}")
        if any(m.colour not in COLOURS for m in markers) or task.colour not in [m.colour for m in markers]:
            raise ValueError(f"task colours {[m.colour for m in markers]} / target {task.colour!r} are invalid")
        return task


def _sample_markers(rng: np.random.Generator) -> list[tuple[float, float]]:
    (x0, x1), (y0, y1) = WORKSPACE
    box_lo, box_hi = KEEP_OUT_MIN[:2] - KEEP_OUT_CLEARANCE, KEEP_OUT_MAX[:2] + KEEP_OUT_CLEARANCE
    points: list[np.ndarray] = []
    while len(points) < N_MARKERS:  # rejection sampling; the free area is large, this ends in a few draws
        p = np.array([rng.uniform(x0, x1), rng.uniform(y0, y1)])
        if np.all(p > box_lo) and np.all(p < box_hi):
            continue
        if all(np.linalg.norm(p - o) >= MIN_MARKER_GAP for o in points):
            points.append(p)
    return [(float(p[0]), float(p[1])) for p in points]


def sample_task(seed: int, kin: Bimanual) -> Task:
    """The episode drawn from `seed` (same seed, same task)."""
    rng = np.random.default_rng(int(seed))
    colours = rng.choice(sorted(COLOURS), size=N_MARKERS, replace=False)
    markers = tuple(Marker(str(c), xy) for c, xy in zip(colours, _sample_markers(rng)))
    target = markers[int(rng.integers(N_MARKERS))].colour
    arm = ARMS[int(rng.integers(len(ARMS)))]
    prompt = PROMPT_TEMPLATES[int(rng.integers(len(PROMPT_TEMPLATES)))].format(colour=target, arm=arm)
    q0 = kin.home()
    for side in ARMS:
        sl = kin.arm_slice(side)
        q0[sl] += rng.uniform(-START_NOISE, START_NOISE, size=sl.stop - sl.start)
    q0 = np.clip(q0, kin.lower, kin.upper)
    return Task(int(seed), prompt, arm, target, markers, tuple(float(v) for v in q0))
