"""recap_ros.imaging.fit: the policy's, the export's and the cameras' resize is OpenCV's INTER_AREA, byte for byte."""
import cv2
import numpy as np
import pytest

from recap_ros import imaging


def images(seed):
    """Noise, a smooth image and a ramp, at random sizes."""
    rng = np.random.default_rng(seed)
    for i in range(60):
        h, w = (int(x) for x in rng.integers(16, 400, 2))
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        if i % 3 == 1:
            img = cv2.GaussianBlur(img, (0, 0), 3)
        elif i % 3 == 2:
            img = (np.arange(h * w * 3).reshape(h, w, 3) % 256).astype(np.uint8)
        yield img, rng


@pytest.mark.parametrize("seed", [0, 1])
def test_area_resize_equals_opencv_uint8_area(seed):
    """Shrinking (by integer and non-integer factors) and enlarging, the bytes cv2.resize(uint8, INTER_AREA) gives."""
    for img, rng in images(seed):
        h, w = img.shape[:2]
        for width, height in ((int(rng.integers(4, w)), int(rng.integers(4, h))), (w // 2 or 1, h // 2 or 1),
                              (int(rng.integers(w, 2 * w)), int(rng.integers(h, 2 * h)))):
            out = imaging.area_resize(img, width, height)
            np.testing.assert_array_equal(out, cv2.resize(img, (width, height), interpolation=cv2.INTER_AREA))


def test_fit_of_a_camera_view_to_the_policy_size():
    """224² -> 64² (3.5x: the tiny bundle) and 640x480 letterboxed into 224² (black bars above and below)."""
    rng = np.random.default_rng(3)
    view = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
    np.testing.assert_array_equal(imaging.fit(view, 64, 64, "resize"),
                                  cv2.resize(view, (64, 64), interpolation=cv2.INTER_AREA))
    frame = rng.integers(1, 256, (480, 640, 3), dtype=np.uint8)
    out = imaging.fit(frame, 224, 224, "letterbox")
    assert out.shape == (224, 224, 3) and not out[:28].any() and not out[196:].any()
    np.testing.assert_array_equal(out[28:196], cv2.resize(frame, (224, 168), interpolation=cv2.INTER_AREA))
