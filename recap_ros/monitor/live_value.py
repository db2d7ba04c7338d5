"""V of one live observation (ROS-free): a value bundle applied to the newest camera views, joint state and prompt.

The views are resized as the training frames were (:func:`recap_ros.recap.data.resize_views`, a stretch to the
bundle's input size) and fed through :func:`recap_ros.recap.value.predict_values`, so live and offline values
of the same observation agree. ``steps_to_go = -V * max_len``: the value is the normalised return, minus the
steps left divided by the task's maximum episode length.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from recap_ros import paths
from recap_ros.recap.data import resize_views
from recap_ros.recap.value import ValueBundleError, load_value, predict_values


def steps_to_go(v: float, max_len: int) -> float:
    """Estimated control ticks left in the episode for a value ``v`` in [-1, 0]."""
    return -float(v) * int(max_len)


class LiveValue:
    def __init__(self, bundle: str, n_cameras: int, state_dim: int, threads: int | None = None,
                 device: str = "cpu"):
        """``bundle``: a value bundle name (``models/<name>``) or directory. Raises ValueBundleError naming the
        bundle when it is missing, corrupt or does not fit the station's cameras and joints."""
        if threads:
            import torch

            torch.set_num_threads(int(threads))
        self.path = paths.model_dir(bundle)
        self.model = load_value(self.path, device)
        bb = self.model.cfg.backbone
        if bb.num_cameras != n_cameras or bb.state_dim != state_dim:
            raise ValueBundleError(f"{self.path}: the value bundle takes {bb.num_cameras} cameras and a "
                                   f"{bb.state_dim}-dim state; the station has {n_cameras} and {state_dim}")
        self.image_size = bb.image_size

    def __call__(self, views: Sequence[np.ndarray], state: np.ndarray, prompt: str) -> float:
        """V for HxWx3 RGB ``views`` (station camera order), ``state`` (robot units) and ``prompt``."""
        images = resize_views(views, self.image_size)[None]
        return float(predict_values(self.model, images, np.asarray(state, np.float32)[None], [prompt],
                                    np.zeros(1, np.int64))[0])
