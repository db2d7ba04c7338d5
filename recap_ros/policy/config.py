"""Architecture configuration of the π0.6*-style policy, with the ``tiny``, ``pi06`` and ``pi05`` presets.

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
# a continuous state token in the backbone prefix | in the expert suffix (π0) | π0.5's discretised state in the
# prompt text ("Task: ..., State: 12 200 ...;\nAction: ", see recap_ros.policy.tokenizer.discretize_state)
STATE_INPUT = ("prefix", "suffix", "tokens")
NORMALIZATION = ("quantile", "zscore")
IMAGE_RESIZE = ("resize", "letterbox")
VISION_ENCODERS = ("vit", "keypoints")  # SigLIP-class ViT | conv net + spatial-softmax keypoints (few-demo sims)
# ViT output -> backbone width: "linear" (PaliGemma: Linear with bias after the pooling) | "gemma3" (Gemma 3's
# multimodal projector: average pool, soft-embedding RMSNorm (1 + w), Linear without bias)
VISION_PROJECTORS = ("linear", "gemma3")


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
    vision_projector: str = "linear"
    # backbone (Gemma-class decoder: RMSNorm, GQA with RoPE, GeGLU MLP)
    vocab_size: int = 259
    width: int = 128
    depth: int = 2
    heads: int = 2
    kv_heads: int = 1
    head_dim: int = 32
    mlp_dim: int = 256
    # Gemma 3 decoder features (all off: the Gemma 1 decoder of PaliGemma / π0 / π0.5). They apply to the backbone
    # and to the action expert alike (the expert attends to the backbone's keys layer by layer, so both use the
    # same layer types and RoPE per layer).
    qk_norm: bool = False         # RMSNorm (1 + w) of every query and key head before RoPE
    sandwich_norm: bool = False   # RMSNorm (1 + w) after attention and after the MLP too (pre + post norms)
    global_every: int = 0         # 0: every layer global; N: layer i is global iff (i + 1) % N == 0, else local
    sliding_window: int = 0       # local layers see keys with |position difference| < sliding_window (0: all)
    rope_local_theta: float = 10000.0  # RoPE base of the local layers (global layers: rope_theta)
    rope_scale: float = 1.0       # global layers' linear RoPE scaling: positions / rope_scale (Gemma 3 4B: 8)
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

    def layer_is_local(self, i: int) -> bool:
        """Whether decoder layer i is a local (sliding-window, rope_local_theta) layer: Gemma 3's 5:1 pattern."""
        return self.global_every > 0 and (i + 1) % self.global_every != 0

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
        for key in ("global_every", "sliding_window"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise bad(key, "must be a non-negative integer")
        for key in ("qk_norm", "sandwich_norm"):
            if not isinstance(getattr(self, key), bool):
                raise bad(key, "must be true or false")
        for key in ("rope_theta", "rope_local_theta", "rope_scale"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise bad(key, "must be a positive number")
        if self.heads % self.kv_heads:
            raise bad("heads", f"not a multiple of kv_heads {self.kv_heads}")
        if self.head_dim % 2:
            raise bad("head_dim", "must be even (RoPE)")
        for key, choices in (("time_conditioning", TIME_CONDITIONING), ("state_input", STATE_INPUT),
                             ("normalization", NORMALIZATION), ("image_resize", IMAGE_RESIZE),
                             ("vision_projector", VISION_PROJECTORS)):
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
    # π0.6-class: Gemma 3 4B's decoder exactly (google/gemma-3-4b config.json: hidden 2560, 34 layers, 8 heads,
    # 4 KV heads, head_dim 256 = query_pre_attn_scalar, MLP 10240, vocabulary 262208, one global layer in 6, sliding
    # window 1024, RoPE 1M with linear factor 8 on global layers and 10k on local ones, QK-norm, pre + post norms),
    # SigLIP So400m/14 (1152 wide, 27 layers, 16 heads, MLP 4304) at 448 px -> 32² patches average-pooled by Gemma
    # 3's multimodal projector to 256 tokens per view, and an ~860 M action expert of the same depth.
    "pi06": PolicyConfig(
        image_size=448, patch_size=14, vision_width=1152, vision_depth=27, vision_heads=16, vision_mlp=4304,
        vision_tokens=256, vision_projector="gemma3", vocab_size=262208, width=2560, depth=34, heads=8, kv_heads=4,
        head_dim=256, mlp_dim=10240, qk_norm=True, sandwich_norm=True, global_every=6, sliding_window=1024,
        rope_theta=1_000_000.0, rope_local_theta=10000.0, rope_scale=8.0, expert_width=1024, expert_mlp_dim=4096,
        max_text_tokens=64, max_advantage_tokens=8),
    # π0.5 (openpi pi05 / LeRobot pi05): PaliGemma at 224 px (SigLIP So400m/14, 16² = 256 tokens per view, linear
    # projector; Gemma 2B: 2048 wide, 18 layers, 8 heads, 1 KV head, MLP 16384, vocabulary 257152), the gemma_300m
    # action expert (1024 wide, MLP 4096) with adaptive RMSNorm flow-time conditioning, the state discretised into
    # the prompt (256 bins), 200 prompt tokens, chunks of 50, 10 denoising steps, quantile normalisation.
    "pi05": PolicyConfig(
        image_size=224, patch_size=14, vision_width=1152, vision_depth=27, vision_heads=16, vision_mlp=4304,
        vision_tokens=256, vocab_size=257152, width=2048, depth=18, heads=8, kv_heads=1, head_dim=256,
        mlp_dim=16384, expert_width=1024, expert_mlp_dim=4096, time_conditioning="adarms", state_input="tokens",
        state_dim=32, action_dim=32, max_text_tokens=200, max_advantage_tokens=8, denoise_steps=10),
}


def preset(name: str, **overrides) -> PolicyConfig:
    """A named preset (``tiny``, ``pi06``, ``pi05``), optionally with fields replaced."""
    if name not in PRESETS:
        raise PolicyError(f"unknown model preset '{name}' (known: {', '.join(PRESETS)})")
    return dataclasses.replace(PRESETS[name], **overrides).validate()
