"""Renderer of the sim station: three pinhole cameras drawn with OpenCV primitives (no GL, no GPU).

base: fixed above the front edge of the table, looking down at the workspace between the arms.
left_wrist / right_wrist: mounted on the gripper frame above the fingers, looking along the tool axis.

Scene: floor, table (with a 10 cm grid), coloured marker discs, the keep-out box, both arms as capsules
(links), spheres (joints) and two fingers whose gap follows the gripper joint. Depth order: the table and the
markers lie on the table and are drawn first; every 3-D primitive is then drawn far to near (painter's
algorithm); geometry is clipped at the near plane. Output: HxWx3 uint8 RGB, deterministic for a given state.

ROS-free.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from recap_ros.sim.kinematics import ARMS, GRIPPER_BASE, TOOL_TIP, Bimanual
from recap_ros.sim.task import KEEP_OUT_MAX, KEEP_OUT_MIN, MARKER_HEIGHT, MARKER_RADIUS, Task
from recap_ros.station import CAMERA_ROLES, Station

NEAR = 0.01                       # m, near clipping plane
SHIFT = 4                         # fixed-point bits for sub-pixel polygon vertices
BASE_CAM_POS = np.array([0.0, -0.36, 0.8])
BASE_CAM_LOOK_AT = np.array([0.0, 0.04, 0.0])
BASE_FOV_DEG = 66.0
WRIST_FOV_DEG = 80.0
WRIST_CAM_OFFSET = np.array([0.0, 0.0, 0.055])   # in the wrist_rotate frame: above the fingers
WRIST_CAM_PITCH = np.deg2rad(12.0)               # tilted from the tool axis toward the fingers

FLOOR_RGB = (58, 62, 72)
TABLE_RGB = (176, 156, 124)
GRID_RGB = (156, 137, 108)
TABLE_EXTENT = ((-0.75, 0.75), (-0.45, 0.6))
GRID_STEP = 0.1
KEEP_OUT_RGB = (150, 70, 165)
LINK_RGB = {"left": (55, 58, 66), "right": (66, 60, 55)}
JOINT_RGB = (25, 25, 28)
FINGER_RGB = (235, 235, 235)
LINK_RADIUS = 0.022
BASE_RADIUS = 0.045
FINGER_RADIUS = 0.005
_CIRCLE = np.stack([np.cos(np.linspace(0, 2 * np.pi, 24, endpoint=False)),
                    np.sin(np.linspace(0, 2 * np.pi, 24, endpoint=False))], axis=1)


@dataclass(frozen=True)
class Intrinsics:
    width: int
    height: int
    fx: float
    fy: float
    cx: float
    cy: float

    @classmethod
    def from_fov(cls, width: int, height: int, fov_deg: float) -> "Intrinsics":
        f = 0.5 * width / np.tan(np.deg2rad(fov_deg) / 2)  # horizontal field of view
        return cls(width, height, f, f, (width - 1) / 2, (height - 1) / 2)

    @property
    def K(self) -> np.ndarray:
        return np.array([[self.fx, 0, self.cx], [0, self.fy, self.cy], [0, 0, 1.0]])


def look_at(position: np.ndarray, target: np.ndarray) -> np.ndarray:
    """World -> optical-frame rotation (rows: x right, y down, z forward) of a camera at position."""
    z = target - position
    z = z / np.linalg.norm(z)
    x = np.cross(z, [0.0, 0.0, 1.0])
    x /= np.linalg.norm(x)
    return np.stack([x, np.cross(z, x), z])


def _box_faces(lo: np.ndarray, hi: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """(corners (4,3), outward normal, shade factor) of an axis-aligned box, bottom face left out."""
    x0, y0, z0 = lo
    x1, y1, z1 = hi
    return [
        (np.array([[x0, y0, z1], [x1, y0, z1], [x1, y1, z1], [x0, y1, z1]]), np.array([0, 0, 1.0]), 1.0),
        (np.array([[x0, y0, z0], [x1, y0, z0], [x1, y0, z1], [x0, y0, z1]]), np.array([0, -1.0, 0]), 0.8),
        (np.array([[x0, y1, z0], [x1, y1, z0], [x1, y1, z1], [x0, y1, z1]]), np.array([0, 1.0, 0]), 0.8),
        (np.array([[x0, y0, z0], [x0, y1, z0], [x0, y1, z1], [x0, y0, z1]]), np.array([-1.0, 0, 0]), 0.65),
        (np.array([[x1, y0, z0], [x1, y1, z0], [x1, y1, z1], [x1, y0, z1]]), np.array([1.0, 0, 0]), 0.65),
    ]


def _clip_polygon(pc: np.ndarray) -> np.ndarray:
    """Sutherland-Hodgman clip of a camera-frame polygon (N,3) against z >= NEAR."""
    out = []
    n = len(pc)
    for i in range(n):
        a, b = pc[i], pc[(i + 1) % n]
        a_in, b_in = a[2] >= NEAR, b[2] >= NEAR
        if a_in:
            out.append(a)
        if a_in != b_in:
            t = (NEAR - a[2]) / (b[2] - a[2])
            out.append(a + t * (b - a))
    return np.array(out) if out else np.empty((0, 3))


class Renderer:
    """Draws the scene for each camera role of a sim station."""

    def __init__(self, station: Station, kin: Bimanual):
        self.kin = kin
        self.scale = station.sim.render_scale if station.sim else 1.0
        self.output_size: dict[str, tuple[int, int]] = {}
        self.intrinsics: dict[str, Intrinsics] = {}      # of the rendered (possibly down-scaled) image
        for cam in station.cameras:
            w, h = cam.output_width, cam.output_height
            self.output_size[cam.role] = (w, h)
            rw, rh = max(16, round(w * self.scale)), max(16, round(h * self.scale))
            self.intrinsics[cam.role] = Intrinsics.from_fov(
                rw, rh, BASE_FOV_DEG if cam.role == "base" else WRIST_FOV_DEG)
        self._base_R = look_at(BASE_CAM_POS, BASE_CAM_LOOK_AT)
        self._table = self._table_geometry()
        self._box = _box_faces(KEEP_OUT_MIN, KEEP_OUT_MAX)

    def output_intrinsics(self, role: str) -> Intrinsics:
        """Intrinsics of the published image (output size), for CameraInfo."""
        w, h = self.output_size[role]
        fov = BASE_FOV_DEG if role == "base" else WRIST_FOV_DEG
        return Intrinsics.from_fov(w, h, fov)

    # ------------------------------------------------------------------ camera poses
    def camera_pose(self, role: str, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(R world->optical, camera position in world) for a role at joint positions q."""
        if role == "base":
            return self._base_R, BASE_CAM_POS
        if role not in CAMERA_ROLES:
            raise ValueError(f"unknown camera role {role!r} (one of {CAMERA_ROLES})")
        f = self.kin.fk(q, role.split("_")[0])
        xt, zt = f.tool_R[:, 0], f.tool_R[:, 2]
        c, s = np.cos(WRIST_CAM_PITCH), np.sin(WRIST_CAM_PITCH)
        z = c * xt - s * zt
        y = -(c * zt + s * xt)
        return np.stack([np.cross(y, z), y, z]), f.joints[-1] + f.tool_R @ WRIST_CAM_OFFSET

    # ------------------------------------------------------------------ scene
    @staticmethod
    def _table_geometry() -> tuple[np.ndarray, np.ndarray]:
        """Table quad (4,3) and grid line endpoints (N,2,3)."""
        (x0, x1), (y0, y1) = TABLE_EXTENT
        quad = np.array([[x0, y0, 0], [x1, y0, 0], [x1, y1, 0], [x0, y1, 0]], dtype=float)
        xs = np.arange(np.ceil(x0 / GRID_STEP), np.floor(x1 / GRID_STEP) + 1) * GRID_STEP
        ys = np.arange(np.ceil(y0 / GRID_STEP), np.floor(y1 / GRID_STEP) + 1) * GRID_STEP
        lines = [[[x, y0, 0.0], [x, y1, 0.0]] for x in xs] + [[[x0, y, 0.0], [x1, y, 0.0]] for y in ys]
        return quad, np.array(lines)

    def _arm_geometry(self, q: np.ndarray, own: str | None):
        """Both arms as segments (N,2,3) with radii and colours, and joint balls (M,3) with radii.

        `own`: the arm carrying the camera; only its fingers are drawn (its links are behind the camera)."""
        segs, seg_r, seg_rgb, balls = [], [], [], []
        for side in ARMS:
            f = self.kin.fk(q, side)
            j = f.joints
            if side != own:
                foot = np.array([j[0][0], j[0][1], 0.0])
                segs += [(foot, j[1]), (j[1], j[2]), (j[2], j[3]), (j[3], j[5])]
                seg_r += [BASE_RADIUS, LINK_RADIUS, LINK_RADIUS, 0.8 * LINK_RADIUS]
                seg_rgb += [LINK_RGB[side]] * 4
                balls += [j[1], j[2], j[4]]
            xt, yt = f.tool_R[:, 0], f.tool_R[:, 1]
            palm = j[5] + xt * GRIPPER_BASE
            half = 0.5 * self.kin.finger_gap(q, side)
            for sgn in (-1.0, 1.0):
                root = palm + sgn * half * yt
                segs.append((root, root + xt * (TOOL_TIP - GRIPPER_BASE)))
                seg_r.append(FINGER_RADIUS)
                seg_rgb.append(FINGER_RGB)
        return np.array(segs), np.array(seg_r), seg_rgb, np.array(balls).reshape(-1, 3)

    # ------------------------------------------------------------------ drawing
    def render(self, role: str, q: np.ndarray, task: Task | None) -> np.ndarray:
        """HxWx3 uint8 RGB image of camera `role` with the arms at q and the task's markers."""
        K = self.intrinsics[role]
        R, pos = self.camera_pose(role, q)
        img = np.empty((K.height, K.width, 3), dtype=np.uint8)
        img[:] = FLOOR_RGB
        one = 1 << SHIFT

        def pix(pc: np.ndarray) -> np.ndarray:  # camera frame -> fixed-point pixels
            return np.stack([K.fx * pc[..., 0] / pc[..., 2] + K.cx, K.fy * pc[..., 1] / pc[..., 2] + K.cy],
                            -1) * one

        def poly(pw: np.ndarray, rgb, outline=None) -> None:
            pc = _clip_polygon((pw - pos) @ R.T)
            if len(pc) >= 3:
                pts = np.round(pix(pc)).astype(np.int32)
                cv2.fillPoly(img, [pts], rgb, cv2.LINE_AA, SHIFT)
                if outline is not None:
                    cv2.polylines(img, [pts], True, outline, 1, cv2.LINE_AA, SHIFT)

        def segments(ends_w: np.ndarray, radii: np.ndarray):
            """Near-clipped fixed-point endpoints, pixel thickness and depth of segments (batched)."""
            c = (ends_w - pos) @ R.T                       # (N, 2, 3)
            za, zb = c[:, 0, 2], c[:, 1, 2]
            keep = np.maximum(za, zb) >= NEAR
            t = np.clip((NEAR - za) / np.where(zb != za, zb - za, 1.0), 0.0, 1.0)[:, None]
            a = np.where((za < NEAR)[:, None], c[:, 0] + t * (c[:, 1] - c[:, 0]), c[:, 0])
            b = np.where((zb < NEAR)[:, None], c[:, 0] + t * (c[:, 1] - c[:, 0]), c[:, 1])
            depth = 0.5 * (a[:, 2] + b[:, 2])
            thick = np.clip(np.round(2 * radii * K.fx / np.maximum(depth, NEAR)), 1, 4 * K.width).astype(int)
            ends = np.round(np.stack([pix(a), pix(b)], 1)).astype(np.int64)
            return keep, ends.tolist(), thick.tolist(), depth

        quad, grid = self._table
        poly(quad, TABLE_RGB)
        keep, ends, thick, _ = segments(grid, np.zeros(len(grid)))
        for k in np.flatnonzero(keep):
            cv2.line(img, ends[k][0], ends[k][1], GRID_RGB, 1, cv2.LINE_AA, SHIFT)
        if task is not None:
            for m in task.markers:
                ring = np.column_stack([m.xy[0] + MARKER_RADIUS * _CIRCLE[:, 0],
                                        m.xy[1] + MARKER_RADIUS * _CIRCLE[:, 1],
                                        np.full(len(_CIRCLE), MARKER_HEIGHT)])
                poly(ring, m.rgb, tuple(int(0.55 * c) for c in m.rgb))

        # 3-D primitives, far to near: keep-out box faces, arm links / fingers, joint balls
        segs, seg_r, seg_rgb, balls = self._arm_geometry(q, None if role == "base" else role.split("_")[0])
        keep, ends, thick, depth = segments(segs, seg_r)
        items = [(float(depth[k]), 1, int(k)) for k in np.flatnonzero(keep)]
        bc = (balls - pos) @ R.T
        items += [(float(bc[k, 2]), 2, int(k)) for k in np.flatnonzero(bc[:, 2] > NEAR)]
        for k, (corners, normal, _) in enumerate(self._box):
            if np.dot(pos - corners[0], normal) > 0:  # faces turned towards the camera only
                items.append((float(((corners.mean(0) - pos) @ R.T)[2]), 0, k))
        items.sort(key=lambda it: -it[0])
        ball_uv = np.round(pix(bc)).astype(np.int64).tolist() if len(bc) else []
        for z, kind, k in items:
            if kind == 1:
                cv2.line(img, ends[k][0], ends[k][1], seg_rgb[k], thick[k], cv2.LINE_AA, SHIFT)
            elif kind == 2:
                r = max(1, round(1.15 * LINK_RADIUS * K.fx / z)) * one
                cv2.circle(img, ball_uv[k], r, JOINT_RGB, -1, cv2.LINE_AA, SHIFT)
            else:
                corners, _, shade = self._box[k]
                rgb = tuple(int(c * shade) for c in KEEP_OUT_RGB)
                poly(corners, rgb, tuple(int(0.5 * c) for c in rgb))

        w, h = self.output_size[role]
        if (K.width, K.height) != (w, h):
            img = cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)
        return img
