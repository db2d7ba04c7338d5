"""Camera calibration files (camera_info_manager / camera_calibration YAML) and their transformation to the
published image size (ROS-free).

The calibration describes the image it was taken at (``image_width`` x ``image_height``); camera_ingest
publishes a letterboxed or resized image, so K and P are mapped the way :func:`recap_ros.imaging.fit` maps
pixels (pixel centres, as cv2.resize does): x' = (x + 0.5)·sx − 0.5 + x0. Distortion and R are unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import yaml

from recap_ros.camera.settings import CameraConfigError
from recap_ros.imaging import fit_geometry


@dataclass(frozen=True)
class Calibration:
    width: int
    height: int
    distortion_model: str
    d: np.ndarray  # (n,)
    k: np.ndarray  # (3, 3)
    r: np.ndarray  # (3, 3)
    p: np.ndarray  # (3, 4)

    @property
    def calibrated(self) -> bool:
        return bool(self.k[0, 0] != 0.0)


def uncalibrated(width: int, height: int) -> Calibration:
    """ROS convention for an uncalibrated camera: K = P = 0, no distortion model."""
    return Calibration(width, height, "", np.zeros(0), np.zeros((3, 3)), np.eye(3), np.zeros((3, 4)))


def load_calibration(path: str) -> Calibration:
    """Read a camera_info YAML; errors name the file and the key."""
    try:
        data = yaml.safe_load(Path(path).expanduser().read_text())
    except OSError as e:
        raise CameraConfigError(f"camera_info_file {path}: cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise CameraConfigError(f"camera_info_file {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise CameraConfigError(f"camera_info_file {path}: expected a mapping, got {type(data).__name__}")

    def matrix(key: str, shape: tuple[int, int] | None, required: bool = True) -> np.ndarray | None:
        entry = data.get(key)
        if entry is None:
            if required:
                raise CameraConfigError(f"camera_info_file {path}: missing key '{key}'")
            return None
        values = entry.get("data") if isinstance(entry, dict) else entry
        try:
            arr = np.asarray(values, dtype=np.float64).ravel()
        except (TypeError, ValueError):
            raise CameraConfigError(f"camera_info_file {path}: '{key}' must be a list of numbers") from None
        if shape is not None:
            if arr.size != shape[0] * shape[1]:
                raise CameraConfigError(f"camera_info_file {path}: '{key}' needs {shape[0] * shape[1]} values, "
                                        f"got {arr.size}")
            arr = arr.reshape(shape)
        if not np.all(np.isfinite(arr)):
            raise CameraConfigError(f"camera_info_file {path}: '{key}' has non-finite values")
        return arr

    size = []
    for key in ("image_width", "image_height"):
        v = data.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise CameraConfigError(f"camera_info_file {path}: '{key}' must be a positive integer (got {v!r})")
        size.append(v)
    k = matrix("camera_matrix", (3, 3))
    r = matrix("rectification_matrix", (3, 3), required=False)
    p = matrix("projection_matrix", (3, 4), required=False)
    if p is None:
        p = np.hstack([k, np.zeros((3, 1))])
    d = matrix("distortion_coefficients", None, required=False)
    return Calibration(size[0], size[1], str(data.get("distortion_model", "plumb_bob")),
                       np.zeros(0) if d is None else d, k, np.eye(3) if r is None else r, p)


def fit_calibration(cal: Calibration, width: int, height: int, mode: str) -> Calibration:
    """The calibration of the image produced by ``imaging.fit(image, width, height, mode)``."""
    if not cal.calibrated:
        return replace(cal, width=width, height=height)
    nw, nh, x0, y0 = fit_geometry(cal.width, cal.height, width, height, mode)
    sx, sy = nw / cal.width, nh / cal.height
    # pixel (x, y) -> ((x + 0.5)·sx − 0.5 + x0, (y + 0.5)·sy − 0.5 + y0) as a homogeneous 3x3 map
    a = np.array([[sx, 0.0, 0.5 * sx - 0.5 + x0], [0.0, sy, 0.5 * sy - 0.5 + y0], [0.0, 0.0, 1.0]])
    return replace(cal, width=width, height=height, k=a @ cal.k, p=a @ cal.p)
