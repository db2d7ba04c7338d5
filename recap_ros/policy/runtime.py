"""The policy runtime used by the action server (contract: docs/ARCHITECTURE.md, "Policy runtime contract").

``load_policy(bundle, backend)`` -> :class:`Policy`; ``policy.infer(images, state, prompt, beta, seed, steps)``
-> (chunk_len, action_dim) float64 absolute joint-position targets in robot units. Host side of a chunk:
resize the views to the model's size, tokenise "Task: <prompt>" and "Advantage: positive", normalise the
state, draw the initial noise from ``seed`` (numpy PCG64, identical for every backend, shared by both CFG
branches), run the backend (two engine calls), de-normalise. ``beta == 1`` runs the conditional branch only;
any other β runs cond + uncond as one batch of 2. Not thread-safe: call ``infer`` from one thread at a time.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

from recap_ros import imaging
from recap_ros.policy.backends import make_backend
from recap_ros.policy.bundle import ACTION_SPACE, Bundle, open_bundle
from recap_ros.policy.errors import PolicyError


@dataclass(frozen=True)
class PolicyInfo:
    name: str
    bundle_id: str
    bundle_dir: str
    backend: str
    device: str
    chunk_len: int
    action_dim: int
    state_dim: int
    camera_roles: tuple[str, ...]
    image_size: int
    denoise_steps: int  # bundle default
    exported_steps: tuple[int, ...]  # step counts the ONNX / TensorRT backends can run (torch: any)
    joint_names: tuple[str, ...] | None
    normalization: str
    action_space: str = ACTION_SPACE


def check_station(info: PolicyInfo, station) -> None:
    """Raise PolicyError naming the first mismatch between a model (its :class:`PolicyInfo`) and a
    recap_ros.station.Station: joint count, camera roles, joint order."""
    where = (f"station '{station.name}' ({station.file}) vs policy bundle '{info.name}' "
             f"({info.bundle_dir})")
    n = len(station.robot.joints)
    if n != info.state_dim or n != info.action_dim:
        raise PolicyError(f"{where}: the station has {n} joints but the model's state/action dim is "
                          f"{info.state_dim}/{info.action_dim}")
    roles = {c.role for c in station.cameras}
    missing = [r for r in info.camera_roles if r not in roles]
    if missing:
        raise PolicyError(f"{where}: the model needs camera roles {list(info.camera_roles)}, the station has "
                          f"no camera with role {missing}")
    if info.joint_names is not None:
        for i, (a, b) in enumerate(zip(station.robot.joint_names, info.joint_names)):
            if a != b:
                raise PolicyError(f"{where}: joint {i} is '{a}' on the station but '{b}' in the model "
                                  "(joint order must match the training data)")


class Policy:
    def __init__(self, bundle: Bundle, backend):
        self.bundle, self.backend = bundle, backend
        c = bundle.config
        self.config, self.prompts = c, bundle.prompt_encoder
        names = bundle.meta.get("joint_names")
        self.info = PolicyInfo(name=bundle.name, bundle_id=bundle.bundle_id, bundle_dir=str(bundle.dir),
                               backend=backend.name, device=backend.device, chunk_len=c.chunk_len,
                               action_dim=c.action_dim, state_dim=c.state_dim, camera_roles=tuple(c.camera_roles),
                               image_size=c.image_size, denoise_steps=c.denoise_steps,
                               exported_steps=bundle.onnx_steps, joint_names=tuple(names) if names else None,
                               normalization=c.normalization, action_space=bundle.action_space)
        self._prompt_cache: tuple[tuple[str, bool], dict] | None = None

    # ----------------------------------------------------------------------------------------- station
    def check_station(self, station) -> None:
        """Raise PolicyError naming the first mismatch between this bundle and a recap_ros.station.Station."""
        check_station(self.info, station)

    # ----------------------------------------------------------------------------------------- inference
    def prepare_inputs(self, images, state, prompt: str, seed: int, beta: float | None,
                       advantage: bool = True) -> dict[str, np.ndarray]:
        """Validated, preprocessed backend inputs (the export I/O contract, batch 1). ``advantage``: True
        conditions on "Advantage: positive", False leaves the indicator out (the unconditional policy)."""
        c = self.config
        if not isinstance(images, (list, tuple)) or len(images) != c.num_cameras:
            raise PolicyError(f"images: expected a list of {c.num_cameras} views {list(c.camera_roles)}, got "
                              f"{type(images).__name__} of length {len(images) if hasattr(images, '__len__') else '?'}")
        views = []
        for role, img in zip(c.camera_roles, images):
            if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3 \
                    or min(img.shape[:2]) < 1:
                desc = f"{img.dtype} {img.shape}" if isinstance(img, np.ndarray) else type(img).__name__
                raise PolicyError(f"images[{role}]: expected an HxWx3 uint8 RGB array, got {desc}")
            views.append(imaging.fit(img, c.image_size, c.image_size, c.image_resize))
        q = np.asarray(state, dtype=np.float64)
        if q.shape != (c.state_dim,):
            raise PolicyError(f"state: expected shape ({c.state_dim},), got {q.shape}")
        if not np.isfinite(q).all():
            bad = np.flatnonzero(~np.isfinite(q)).tolist()
            raise PolicyError(f"state: non-finite joint positions at indices {bad}")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
            raise PolicyError(f"seed: expected a non-negative integer, got {seed!r}")
        state_norm = self.bundle.norm_stats["state"].normalize(q, c.normalization).astype(np.float32)[None]
        key = (prompt, bool(advantage))
        if c.state_input == "tokens":  # π0.5: the discretised state is prompt text, tokenised every call
            self._prompt_cache = (None, self.prompts.encode([prompt], [True if advantage else None], state_norm))
        elif self._prompt_cache is None or self._prompt_cache[0] != key:
            self._prompt_cache = (key, self.prompts.encode([prompt], [True if advantage else None]))
        feeds = dict(self._prompt_cache[1])
        feeds["images"] = np.stack(views)[None]
        feeds["state"] = state_norm
        feeds["noise"] = np.random.default_rng(int(seed)).standard_normal(
            (1, c.chunk_len, c.action_dim), dtype=np.float32)
        if beta is not None:
            feeds["beta"] = np.array([beta], np.float32)
        return feeds

    def infer(self, images, state, prompt: str, beta: float = 1.0, seed: int = 0,
              steps: int | None = None, advantage: bool = True) -> np.ndarray:
        """One action chunk: (chunk_len, action_dim) float64 absolute joint positions in robot units.
        ``advantage`` False: no advantage indicator in the prompt (then β must be 1: CFG needs the indicator)."""
        if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not math.isfinite(beta) or beta < 0:
            raise PolicyError(f"beta: expected a finite number >= 0 (1.0 = no guidance), got {beta!r}")
        if not isinstance(advantage, (bool, np.bool_)):
            raise PolicyError(f"advantage: expected true or false, got {advantage!r}")
        if not advantage and float(beta) != 1.0:
            raise PolicyError(f"advantage: false runs the unconditional policy; β = {beta} needs the advantage "
                              "indicator (use β = 1)")
        steps = self.config.denoise_steps if steps is None else steps
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or not 1 <= steps <= 100:
            raise PolicyError(f"steps: expected an integer in [1, 100], got {steps!r}")
        guided = float(beta) != 1.0
        feeds = self.prepare_inputs(images, state, prompt, seed, float(beta) if guided else None, bool(advantage))
        out = self.backend.run(feeds, int(steps), float(beta) if guided else None)
        actions = self.bundle.norm_stats["actions"].unnormalize(out[0].astype(np.float64), self.config.normalization)
        if self.info.action_space != ACTION_SPACE:  # delta_joint_positions: relative to the observed state
            actions = actions + np.asarray(state, np.float64)[None]
        if actions.shape != (self.config.chunk_len, self.config.action_dim) or not np.isfinite(actions).all():
            raise PolicyError(f"backend {self.info.backend} returned an invalid chunk (shape {actions.shape}, "
                              f"finite: {bool(np.isfinite(actions).all())})")
        return actions


def load_policy(bundle: str = "tiny", backend: str = "auto", *, verify: bool | None = None, device: str | None = None,
                precision: str | None = None, threads: int | None = None,
                steps: tuple[int, ...] | None = None) -> Policy:
    """Load a bundle (name under models/ or a path) on a backend: auto | torch | onnxruntime | onnxruntime-cuda |
    onnxruntime-trt | tensorrt (``auto``: :data:`recap_ros.policy.backends.AUTO_ORDER`).

    Options: ``device`` ('cpu' / 'cuda' / 'cuda:N'; torch, the GPU backends), ``precision`` (tensorrt: bf16
    (default) | fp16 | fp32; onnxruntime*: fp32 (default) | fp16 | bf16), ``steps`` (tensorrt: step counts whose
    engines are loaded, built first when missing; default the bundle's), ``threads`` (CPU threads of torch /
    onnxruntime). Raises PolicyError on any bundle or backend problem."""
    b = open_bundle(bundle, verify=verify)
    return Policy(b, make_backend(b, backend, device=device, precision=precision, threads=threads, steps=steps))
