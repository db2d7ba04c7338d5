"""Architecture configuration of the π0.6*-style policy, with the ``tiny`` and ``pi06`` presets.

``PolicyConfig`` is plain data (JSON in the bundle's ``config.json`` under ``"model"``). Smaller variants (a value
function backbone, an ablation) are ``dataclasses.replace(preset("tiny"), depth=..., ...)``; every field is
validated by :meth:`PolicyConfig.validate`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from recap_ros.policy.errors import PolicyError

CAMERA_ROLES = ("base", "left_wrist", "right_wrist")
TIME_CONDITIONING = ("adarms", "concat")  # π0.5 adaptive RMSNorm | π0 action+time MLP
STATE_INPUT = ("prefix", "suffix")  # a continuous state token in the backbone prefix | in the expert suffix (π0)
NORMALIZATION = ("quantile", "zscore")
IMAGE_RESIZE = ("resize", "letterbox")
VISION_ENCODERS = ("vit", "keypoints")  # SigLIP-class ViT | conv net + spatial-softmax keypoints (few-demo sims)


@dataclass(frozen=True)
class PolicyConfig:
    # vision. "vit": SigLIP-class ViT whose patch grid is average-pooled to `vision_tokens` per view.
    # "keypoints" (ACT / Diffusion-Policy-style, learns from few demonstrations): a stride-2 conv stem and
    # `vision_depth` residual 3x3 conv blocks of `vision_width` channels, a 1x1 conv to `vision_tokens` heatmaps,
    # spatial softmax -> one token per heatmap from its expected (x, y) and peakedness (patch_size/heads/mlp unused).
    vision_encoder: str = "vit"
    image_size: int = 64
    patch_size: int = 8
    vision_width: int = 64
    vision_depth: int = 2
    vision_heads: int = 2
    vision_mlp: int = 128
    vision_tokens: int = 16
    # "keypoints" only: FiLM (RT-1) of the stem and every conv block by the prompt's mean token embedding, so the
    # heatmaps can pick out what the prompt names (e.g. "the red marker") instead of every salient thing.
    vision_film: bool = False
    # backbone (Gemma-class decoder: RMSNorm, GQA with RoPE, GeGLU MLP)
    vocab_size: int = 259
    width: int = 128
    depth: int = 2
    heads: int = 2
    kv_heads: int = 1
    head_dim: int = 32
    mlp_dim: int = 256
    # action expert: same depth and attention geometry as the backbone (it attends to the backbone's KV)
    expert_width: int = 64
    expert_mlp_dim: int = 128
    time_conditioning: str = "adarms"
    state_input: str = "prefix"
    # io
    camera_roles: tuple[str, ...] = CAMERA_ROLES
    state_dim: int = 14
    action_dim: int = 14
    chunk_len: int = 50
    max_text_tokens: int = 96
    max_advantage_tokens: int = 24
    denoise_steps: int = 5
    normalization: str = "quantile"
    image_resize: str = "resize"
    rope_theta: float = 10000.0
    # training only: an auxiliary head predicting the task's goal (goal_dim numbers, e.g. the sim target's position)
    # from the prefix's hidden states; a dense supervised signal for vision + language. Not exported (0: none).
    goal_dim: int = 0
    extra: dict = field(default_factory=dict, compare=False)

    # ----------------------------------------------------------------------------------------- derived
    @property
    def num_cameras(self) -> int:
        return len(self.camera_roles)

    @property
    def prefix_len(self) -> int:
        """KV length: image tokens + text tokens (+ state token) + advantage tokens."""
        return (self.num_cameras * self.vision_tokens + self.max_text_tokens
                + (1 if self.state_input == "prefix" else 0) + self.max_advantage_tokens)

    def validate(self) -> "PolicyConfig":
        def bad(key, why):
            return PolicyError(f"model config: {key}={getattr(self, key)!r}: {why}")

        for key in ("image_size", "patch_size", "vision_width", "vision_depth", "vision_heads", "vision_mlp",
                    "vision_tokens", "vocab_size", "width", "depth", "heads", "kv_heads", "head_dim", "mlp_dim",
                    "expert_width", "expert_mlp_dim", "state_dim", "action_dim", "chunk_len", "max_text_tokens",
                    "max_advantage_tokens", "denoise_steps"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise bad(key, "must be a positive integer")
        if self.vision_encoder not in VISION_ENCODERS:
            raise bad("vision_encoder", f"must be one of {', '.join(VISION_ENCODERS)}")
        if self.vision_encoder == "keypoints":
            if self.image_size % 2:
                raise bad("image_size", "must be even (the keypoint encoder's stem has stride 2)")
        else:
            if self.image_size % self.patch_size:
                raise bad("image_size", f"not a multiple of patch_size {self.patch_size}")
            grid = self.image_size // self.patch_size
            side = round(self.vision_tokens ** 0.5)
            if side * side != self.vision_tokens or grid % side:
                raise bad("vision_tokens", f"must be a square whose side divides the patch grid {grid}")
            if self.vision_width % self.vision_heads:
                raise bad("vision_width", f"not a multiple of vision_heads {self.vision_heads}")
        if not isinstance(self.vision_film, bool) or (self.vision_film and self.vision_encoder != "keypoints"):
            raise bad("vision_film", "must be true or false, and true only with vision_encoder keypoints")
        if isinstance(self.goal_dim, bool) or not isinstance(self.goal_dim, int) or self.goal_dim < 0:
            raise bad("goal_dim", "must be a non-negative integer")
        if self.heads % self.kv_heads:
            raise bad("heads", f"not a multiple of kv_heads {self.kv_heads}")
        if self.head_dim % 2:
            raise bad("head_dim", "must be even (RoPE)")
        for key, choices in (("time_conditioning", TIME_CONDITIONING), ("state_input", STATE_INPUT),
                             ("normalization", NORMALIZATION), ("image_resize", IMAGE_RESIZE)):
            if getattr(self, key) not in choices:
                raise bad(key, f"must be one of {', '.join(choices)}")
        if len(set(self.camera_roles)) != len(self.camera_roles) or not self.camera_roles:
            raise bad("camera_roles", "must be a non-empty list of distinct roles")
        return self

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["camera_roles"] = list(self.camera_roles)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "PolicyConfig":
        if not isinstance(d, dict):
            raise PolicyError(f"model config: expected a mapping, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise PolicyError(f"model config: unknown keys {unknown}")
        d = dict(d)
        if "camera_roles" in d:
            d["camera_roles"] = tuple(d["camera_roles"])
        try:
            return cls(**d).validate()
        except TypeError as e:
            raise PolicyError(f"model config: {e}") from None


PRESETS: dict[str, PolicyConfig] = {
    # CPU tests: ~0.5 M parameters, 64 px views, 16 tokens per view.
    "tiny": PolicyConfig(),
    # π0.6-class: Gemma-3-4B-class backbone, SigLIP-So400m/14 at 448 px pooled to 256 tokens per view,
    # an ~860 M action expert of the same depth (34 layers) sharing the attention geometry.
    "pi06": PolicyConfig(
        image_size=448, patch_size=14, vision_width=1152, vision_depth=27, vision_heads=16, vision_mlp=4304,
        vision_tokens=256, vocab_size=262144, width=2560, depth=34, heads=8, kv_heads=4, head_dim=256,
        mlp_dim=10240, expert_width=1024, expert_mlp_dim=4096, max_text_tokens=64, max_advantage_tokens=8,
        rope_theta=10000.0),
}


def preset(name: str, **overrides) -> PolicyConfig:
    """A named preset (``tiny``, ``pi06``), optionally with fields replaced."""
    if name not in PRESETS:
        raise PolicyError(f"unknown model preset '{name}' (known: {', '.join(PRESETS)})")
    return dataclasses.replace(PRESETS[name], **overrides).validate()
