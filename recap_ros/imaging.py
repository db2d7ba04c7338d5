"""ROS-free image helpers shared by camera ingest, the sim renderer, the policy and export (OpenCV, numpy)."""
from __future__ import annotations

import cv2
import numpy as np


def fit_geometry(w: int, h: int, width: int, height: int, mode: str = "letterbox") -> tuple[int, int, int, int]:
    """Where :func:`fit` puts a w x h image inside width x height: (scaled width, scaled height, x0, y0)."""
    if mode == "resize":
        return width, height, 0, 0
    if mode != "letterbox":
        raise ValueError(f"unknown resize mode '{mode}' (letterbox, resize)")
    scale = min(width / w, height / h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    return nw, nh, (width - nw) // 2, (height - nh) // 2


def fit(rgb: np.ndarray, width: int, height: int, mode: str = "letterbox") -> np.ndarray:
    """Resize to width x height. 'letterbox' keeps the aspect ratio and pads with black; 'resize' stretches."""
    h, w = rgb.shape[:2]
    if (w, h) == (width, height):
        return rgb
    nw, nh, x0, y0 = fit_geometry(w, h, width, height, mode)
    if mode == "resize":
        return area_resize(rgb, width, height)
    out = np.zeros((height, width, 3), dtype=np.uint8)
    out[y0:y0 + nh, x0:x0 + nw] = area_resize(rgb, nw, nh)
    return out


def area_resize(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """cv2.resize(img, (width, height), INTER_AREA) of a uint8 image, the same bytes, faster: OpenCV shrinks by a
    non-integer factor (224 -> 64: 3.5) ~25 % faster from float32 than from uint8 (113 vs 149 µs per 224² view,
    1241 -> 873 µs for 640x480 -> 224x168), while its integer-factor path is faster from uint8."""
    h, w = img.shape[:2]
    if width < w and height < h and (w % width or h % height):
        return cv2.convertScaleAbs(cv2.resize(img.astype(np.float32), (width, height), interpolation=cv2.INTER_AREA))
    return cv2.resize(img, (width, height), interpolation=cv2.INTER_AREA)


def encode_jpeg(rgb: np.ndarray, quality: int = 85) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return buf.tobytes()


def decode_jpeg(data: bytes) -> np.ndarray:
    img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError("not a decodable JPEG")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
