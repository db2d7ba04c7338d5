"""Frames for RECAP training held in memory (ROS-free, numpy).

One :class:`Frames` holds training frames of a set of episodes, in episode order, with the dataset columns of
docs/ARCHITECTURE.md that training needs; images are already resized to the model's input size and every frame
carries its 50 Hz action chunk a_{t:t+H} (the episode's last action repeated past its end, as LeRobot does).
Frames may be a subsample of the control ticks (every k-th tick plus the last one; ``frame_index`` keeps the
tick number), which is how sim roll-outs keep rendering cheap. Every frame carries its episode's maximum length M
and C_fail, the units of its returns, so frame sets of tasks with different lengths join. Sources: an exported
LeRobot dataset (:func:`recap_ros.recap.dataset_io.load_frames`) or sim roll-outs (:mod:`recap_ros.recap.rollout`).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from recap_ros import imaging
from recap_ros.recap import returns as rt

FIELDS = ("images", "state", "action_chunk", "intervention", "episode_index", "frame_index", "task_index", "ret",
          "return_normalized", "return_bin", "episode_success", "max_len", "c_fail")


@dataclass
class Frames:
    images: np.ndarray            # (N, n_cams, H, W, 3) uint8, camera order = model camera roles (or a
    #                               recap_ros.recap.loader.DatasetImages: decoded from the videos when indexed)
    state: np.ndarray             # (N, D) float32
    action_chunk: np.ndarray      # (N, H, D) float32, commands sent to the robot from this tick on
    intervention: np.ndarray      # (N,) bool
    episode_index: np.ndarray     # (N,) int64
    frame_index: np.ndarray       # (N,) int64
    task_index: np.ndarray        # (N,) int64 into prompts
    prompts: list[str]
    ret: np.ndarray               # (N,) float64, undiscounted reward-to-go R_t (not normalised)
    return_normalized: np.ndarray  # (N,) float64
    return_bin: np.ndarray        # (N,) int64
    episode_success: np.ndarray   # (N,) bool
    max_len: np.ndarray           # (N,) int64: the episode's task maximum length M (steps), return_normalized's unit
    c_fail: np.ndarray            # (N,) float64: the episode's failure cost C_fail on its final step
    indicator: np.ndarray | None = field(default=None)  # (N,) bool, set by labelling
    goal: np.ndarray | None = field(default=None)  # (N, G) float32: the task's goal where known (sim: target xyz)

    def __post_init__(self):
        n = len(self.state)
        for name in FIELDS[1:]:
            if len(getattr(self, name)) != n:
                raise ValueError(f"Frames.{name} has {len(getattr(self, name))} rows, state has {n}")
        for name in ("indicator", "goal"):
            col = getattr(self, name)
            if col is not None and len(col) != n:
                raise ValueError(f"Frames.{name} has {len(col)} rows, state has {n}")
        if n and (self.task_index.min() < 0 or self.task_index.max() >= len(self.prompts)):
            raise ValueError(f"task_index out of range for {len(self.prompts)} prompts")
        if n:
            self._check_units()

    def _check_units(self) -> None:
        """return_normalized must be clip(ret / max_len, -1, 0) frame by frame: one normalisation, no unit mix."""
        if self.max_len.min() <= 0:
            i = int(np.argmin(self.max_len))
            raise ValueError(f"episode {self.episode_index[i]}: max episode length {self.max_len[i]} is not > 0")
        bad = np.flatnonzero(np.abs(rt.normalise(self.ret, self.max_len) - self.return_normalized) > 1e-5)
        if bad.size:
            i = int(bad[0])
            raise ValueError(f"episode {self.episode_index[i]} frame {self.frame_index[i]}: return_normalized "
                             f"{self.return_normalized[i]:.6g} is not clip(return {self.ret[i]:.6g} / max_len "
                             f"{self.max_len[i]}, -1, 0) ({bad.size} frames disagree)")

    def __len__(self) -> int:
        return len(self.state)

    @property
    def num_episodes(self) -> int:
        return len(np.unique(self.episode_index))

    def normalisation(self) -> dict[str, dict[str, list]]:
        """Per task (prompt): the distinct max lengths M and failure costs C_fail of its episodes."""
        return {self.prompts[k]: {"max_len": sorted(set(self.max_len[self.task_index == k].tolist())),
                                  "c_fail": sorted(set(self.c_fail[self.task_index == k].tolist()))}
                for k in np.unique(self.task_index)}

    def subset(self, mask: np.ndarray) -> Frames:
        """The frames where ``mask`` is true (prompts and indices unchanged)."""
        m = np.asarray(mask, bool)
        cols = {k: getattr(self, k)[m] for k in FIELDS + ("indicator", "goal") if getattr(self, k) is not None}
        return replace(self, **cols)

    def with_indicator(self, indicator: np.ndarray) -> Frames:
        return replace(self, indicator=np.asarray(indicator, bool))


def concat(parts: list[Frames]) -> Frames:
    """Join frame sets; episode and task indices are renumbered so they stay unique. Every frame keeps its own
    episode's max length and C_fail, so sets of tasks (or datasets) with different lengths join."""
    if not parts:
        raise ValueError("nothing to concatenate")
    prompts: list[str] = []
    for p in parts:
        prompts += [x for x in p.prompts if x not in prompts]
    kw: dict[str, list] = {k: [] for k in FIELDS}
    ind = [p.indicator for p in parts] if all(p.indicator is not None for p in parts) else None
    goal = [p.goal for p in parts] if all(p.goal is not None for p in parts) else None
    offset = 0
    for p in parts:
        for k, col in kw.items():
            col.append(getattr(p, k))
        _, ep = np.unique(p.episode_index, return_inverse=True)
        kw["episode_index"][-1] = ep + offset
        offset += int(ep.max()) + 1 if len(ep) else 0
        kw["task_index"][-1] = np.array([prompts.index(p.prompts[i]) for i in p.task_index], np.int64)
    return Frames(prompts=prompts,
                  indicator=None if ind is None else np.concatenate(ind),
                  goal=None if goal is None else np.concatenate(goal),
                  **{k: np.concatenate(v) for k, v in kw.items()})


def chunks(action: np.ndarray, chunk_len: int) -> np.ndarray:
    """(T, D) actions of one episode -> (T, chunk_len, D): a_{t:t+H}, repeating the last action past the end."""
    T = len(action)
    idx = np.minimum(np.arange(T)[:, None] + np.arange(chunk_len)[None, :], T - 1)
    return np.asarray(action)[idx]


def kept_ticks(num_steps: int, stride: int) -> np.ndarray:
    """Ticks kept as training frames: every ``stride``-th tick and always the last one."""
    if stride < 1:
        raise ValueError(f"frame stride must be >= 1 (got {stride})")
    return np.unique(np.r_[np.arange(0, num_steps, stride), num_steps - 1])


def episode_frames(images: np.ndarray, ticks: np.ndarray, state: np.ndarray, action: np.ndarray,
                   intervention: np.ndarray, prompt: str, success: bool, max_len: int, c_fail: float,
                   chunk_len: int, episode: int = 0, num_bins: int = rt.NUM_BINS, goal=None) -> Frames:
    """One episode's training frames with RECAP labels from :func:`recap_ros.recap.returns.episode_labels`.

    state / action / intervention are per control tick (T rows); images (len(ticks) rows) belong to ``ticks``;
    ``goal``: the episode's goal vector (e.g. the sim target's position), repeated on every frame.
    """
    T = len(state)
    ticks = np.asarray(ticks, np.int64)
    if len(action) != T or len(intervention) != T:
        raise ValueError(f"episode {episode}: {T} states, {len(action)} actions, {len(intervention)} flags")
    if len(images) != len(ticks) or (len(ticks) and (ticks.min() < 0 or ticks.max() >= T)):
        raise ValueError(f"episode {episode}: {len(images)} images for ticks {ticks[:3]}.. of a {T}-tick episode")
    lab = rt.episode_labels(T, success, max_len, c_fail, num_bins)
    n = len(ticks)
    return Frames(images=np.asarray(images, np.uint8), state=np.asarray(state, np.float32)[ticks],
                  action_chunk=chunks(np.asarray(action, np.float32), chunk_len)[ticks],
                  intervention=np.asarray(intervention, bool)[ticks], episode_index=np.full(n, episode, np.int64),
                  frame_index=ticks, task_index=np.zeros(n, np.int64), prompts=[prompt],
                  ret=lab["return"][ticks], return_normalized=lab["return_normalized"][ticks],
                  return_bin=lab["return_bin"][ticks], episode_success=np.full(n, bool(success)),
                  max_len=np.full(n, int(max_len), np.int64), c_fail=np.full(n, float(c_fail)),
                  goal=None if goal is None else np.tile(np.asarray(goal, np.float32).ravel(), (n, 1)))


def resize_views(views, size: int, mode: str = "resize") -> np.ndarray:
    """HxWx3 RGB views -> (len(views), size, size, 3) uint8, shaped by :func:`recap_ros.imaging.fit` in ``mode``
    (default: the stretch resize of the sim policies and the value monitor)."""
    if not len(views):
        return np.empty((0, size, size, 3), np.uint8)
    return np.stack([imaging.fit(np.asarray(v, np.uint8), size, size, mode) for v in views])


def save_frames(frames: Frames, path) -> None:
    """Frames as one compressed .npz (a training cache of roll-outs; datasets proper are LeRobot exports)."""
    arrays = {name: getattr(frames, name) for name in FIELDS}
    for name in ("indicator", "goal"):
        if getattr(frames, name) is not None:
            arrays[name] = getattr(frames, name)
    np.savez(path, prompts=np.array(frames.prompts), **arrays)


def load_frames_npz(path) -> Frames:
    with np.load(path, allow_pickle=False) as z:
        missing = [k for k in FIELDS + ("prompts",) if k not in z.files]
        if missing:
            raise ValueError(f"{path}: not a frames file of this version (missing {missing}); write it again")
        return Frames(prompts=[str(p) for p in z["prompts"]],
                      indicator=z["indicator"] if "indicator" in z.files else None,
                      goal=z["goal"] if "goal" in z.files else None,
                      **{k: z[k] for k in FIELDS})
