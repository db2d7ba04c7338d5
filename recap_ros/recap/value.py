"""Distributional value function p_phi(V | o_t, l) over B = 201 bins of the normalised return (ROS-free, torch).

Inputs are the policy's: the camera views, the joint state and the task prompt. The backbone is the policy's
own :class:`recap_ros.policy.model.PrefixEncoder` (vision encoder + Gemma-class layers, prompt tokens through the
policy's prompt encoder); its final hidden states are mean-pooled over the valid tokens into a linear head with
one logit per bin. Two kinds:

- ``small``: a smaller config than the policy's (:func:`default_backbone`), byte tokenizer, random init.
- ``vlm``: the architecture of a policy bundle's backbone (the paper's value function is a VLM of its own, 670M
  next to the 4B policy), started from that bundle's vision + language weights (``recap-train-value
  --init-backbone BUNDLE``) and using the bundle's tokenizer (a SentencePiece model is copied into the value
  bundle). The action expert is not part of it; a state projection is added when the policy has none.
Trained with cross-entropy against the bin of the empirical return (Eq. 1); the continuous value is
V(o_t) = sum_b p(b) v(b) with v(b) from :func:`recap_ros.recap.returns.bin_values`.

Bundle: ``config.json`` (architecture, tokenizer, state normalisation, where the backbone came from),
``model.safetensors`` and, for a SentencePiece tokenizer, its ``tokenizer.model``, in one directory.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from recap_ros.policy.config import PolicyConfig, preset
from recap_ros.policy.errors import PolicyError
from recap_ros.policy.model import PrefixEncoder, images_to_float
from recap_ros.policy.tokenizer import ByteTokenizer, PromptEncoder, load_tokenizer
from recap_ros.recap import returns as rt

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"


class ValueBundleError(RuntimeError):
    """A value bundle is missing, corrupt or does not fit the data."""


def default_backbone(**overrides) -> PolicyConfig:
    """The value backbone: the policy's ``tiny`` prefix encoder made smaller (paper: 670M vs the 4B policy)."""
    base = {"image_size": 32, "patch_size": 8, "vision_width": 48, "vision_depth": 1, "vision_heads": 2,
            "vision_mlp": 96, "vision_tokens": 4, "width": 64, "depth": 2, "heads": 2, "kv_heads": 1, "head_dim": 32,
            "mlp_dim": 128, "max_text_tokens": 64}
    return preset("tiny", **{**base, **overrides})


@dataclass
class ValueConfig:
    backbone: PolicyConfig = field(default_factory=default_backbone)
    num_bins: int = rt.NUM_BINS
    state_mean: list = field(default_factory=list)  # filled from the training data
    state_std: list = field(default_factory=list)
    tokenizer: dict = field(default_factory=lambda: ByteTokenizer().spec())  # spec as in a policy bundle
    backbone_from: str | None = None  # the policy bundle the backbone started from (None: small, random init)

    @property
    def kind(self) -> str:
        return "small" if self.backbone_from is None else "vlm"

    def to_json(self) -> dict:
        return {"kind": "recap_value", "backbone": self.backbone.to_json(), "num_bins": self.num_bins,
                "state_mean": list(self.state_mean), "state_std": list(self.state_std),
                "tokenizer": dict(self.tokenizer), "backbone_from": self.backbone_from}

    @classmethod
    def from_json(cls, d: dict) -> ValueConfig:
        if d.get("kind") != "recap_value":
            raise ValueBundleError(f"kind is {d.get('kind')!r}, not 'recap_value'")
        try:
            return cls(PolicyConfig.from_json(d["backbone"]), int(d["num_bins"]), list(d["state_mean"]),
                       list(d["state_std"]), dict(d.get("tokenizer", ByteTokenizer().spec())),
                       d.get("backbone_from"))
        except (KeyError, PolicyError) as e:
            raise ValueBundleError(f"bad value config ({e})") from None


class ValueModel(nn.Module):
    """The policy's PrefixEncoder (vision + prompt + state token, no advantage segment) -> masked mean-pool ->
    linear head with one logit per return bin. ``tokenizer``: the one ``cfg.tokenizer`` names (default: byte)."""

    def __init__(self, cfg: ValueConfig, tokenizer=None):
        super().__init__()
        self.cfg = cfg
        bb = cfg.backbone
        if bb.state_input != "prefix":
            raise ValueError("the value backbone needs state_input='prefix' (the state is an input of V)")
        self.encoder = PrefixEncoder(bb)
        self.head = nn.Linear(bb.width, cfg.num_bins)
        self.tokenizer = tokenizer or ByteTokenizer()
        if self.tokenizer.spec()["type"] != cfg.tokenizer.get("type"):
            raise ValueError(f"value config names a {cfg.tokenizer.get('type')!r} tokenizer, given a "
                             f"{self.tokenizer.spec()['type']!r} one")
        if self.tokenizer.vocab_size > bb.vocab_size:
            raise ValueError(f"tokenizer has {self.tokenizer.vocab_size} tokens, the value backbone's vocab_size "
                             f"is {bb.vocab_size}")
        self.prompts = PromptEncoder(self.tokenizer, bb.max_text_tokens, bb.max_advantage_tokens)
        mean = torch.tensor(cfg.state_mean or [0.0] * bb.state_dim, dtype=torch.float32)
        std = torch.tensor(cfg.state_std or [1.0] * bb.state_dim, dtype=torch.float32)
        self.register_buffer("state_mean", mean, persistent=False)
        self.register_buffer("state_std", std.clamp_min(1e-6), persistent=False)
        self.register_buffer("bin_values", torch.tensor(rt.bin_values(cfg.num_bins), dtype=torch.float32),
                             persistent=False)

    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Prompt tokens for each distinct task (no advantage segment: V does not see the indicator)."""
        enc = self.prompts.encode(list(prompts), [None] * len(prompts))
        return {k: torch.from_numpy(v) for k, v in enc.items()}

    def forward(self, images: torch.Tensor, state: torch.Tensor, tok: dict[str, torch.Tensor]) -> torch.Tensor:
        """images (B, n_cams, S, S, 3) uint8; state (B, D) robot units; tok rows of :meth:`encode_prompts`
        -> logits (B, num_bins)."""
        bb = self.cfg.backbone
        if tuple(images.shape[1:]) != (bb.num_cameras, bb.image_size, bb.image_size, 3):
            raise ValueError(f"images {tuple(images.shape)} do not fit the value model "
                             f"(B, {bb.num_cameras}, {bb.image_size}, {bb.image_size}, 3)")
        st = (state.float() - self.state_mean) / self.state_std
        _, _, mask, h = self.encoder(images_to_float(images), tok["tokens"], tok["token_mask"], tok["adv_tokens"],
                                     tok["adv_mask"], st)
        m = mask.unsqueeze(-1).float()
        return self.head((h * m).sum(1) / m.sum(1))

    def value(self, logits: torch.Tensor) -> torch.Tensor:
        """Continuous V = sum_b softmax(logits)_b v(b)."""
        return torch.softmax(logits.float(), -1) @ self.bin_values


def vlm_value_model(bundle, state: np.ndarray, camera_roles: tuple[str, ...] | None = None) -> ValueModel:
    """A ``vlm`` value model: the policy bundle's backbone architecture and vision + language weights (its
    PrefixEncoder; the action expert and goal head are dropped), its tokenizer, a new head, and state
    normalisation from ``state`` (N, D). A state projection is new when the policy feeds the state elsewhere."""
    from recap_ros.policy.bundle import open_bundle

    b = bundle if hasattr(bundle, "load_model") else open_bundle(bundle)
    if state.shape[1] != b.config.state_dim:
        raise ValueError(f"{b.dir}: backbone takes a {b.config.state_dim}-dim state, the frames have "
                         f"{state.shape[1]}")
    bb = dataclasses.replace(b.config, state_input="prefix", goal_dim=0,
                             camera_roles=tuple(camera_roles or b.config.camera_roles)).validate()
    cfg = ValueConfig(bb, state_mean=state.mean(0).tolist(), state_std=(state.std(0) + 1e-3).tolist(),
                      tokenizer=b.tokenizer.spec(), backbone_from=f"{b.name} ({b.dir}, bundle {b.bundle_id})")
    model = ValueModel(cfg, b.tokenizer)
    prefix = {k.removeprefix("prefix."): v for k, v in b.load_model().state_dict().items() if k.startswith("prefix.")}
    missing, unexpected = model.encoder.load_state_dict(prefix, strict=False)
    new = {k for k in missing if k.startswith("state_proj.")} if b.config.state_input != "prefix" else set()
    if set(missing) - new or unexpected:
        raise ValueError(f"{b.dir}: policy backbone weights do not fit the value backbone (missing "
                         f"{sorted(set(missing) - new)[:5]}, unexpected {sorted(unexpected)[:5]})")
    return model


def save_value(model: ValueModel, path: str | Path) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    spec = model.tokenizer.spec()
    if spec["type"] == "sentencepiece" and Path(model.tokenizer.path).resolve() != (path / spec["file"]).resolve():
        shutil.copyfile(model.tokenizer.path, path / spec["file"])
    (path / CONFIG_FILE).write_text(json.dumps(model.cfg.to_json(), indent=1))
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(path / WEIGHTS_FILE))
    return path


def load_value(path: str | Path, device: str | torch.device = "cpu") -> ValueModel:
    path = Path(path)
    cfg_file, w_file = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not cfg_file.is_file() or not w_file.is_file():
        raise ValueBundleError(f"{path}: not a value bundle (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        cfg = ValueConfig.from_json(json.loads(cfg_file.read_text()))
    except json.JSONDecodeError as e:
        raise ValueBundleError(f"{cfg_file}: corrupt JSON ({e})") from e
    except ValueBundleError as e:
        raise ValueBundleError(f"{cfg_file}: {e}") from None
    try:
        tokenizer = load_tokenizer(cfg.tokenizer, path)
    except PolicyError as e:
        raise ValueBundleError(f"{cfg_file}: {e}") from None
    try:
        model = ValueModel(cfg, tokenizer)
        model.load_state_dict(load_file(str(w_file)))
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueBundleError(f"{path}: weights do not match the config ({e})") from e
    return model.to(device).eval()


@torch.no_grad()
def predict_values(model: ValueModel, images: np.ndarray, state: np.ndarray, prompts: list[str],
                   task_index: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """V(o_t) for every frame (numpy in, float64 out)."""
    model.eval()
    dev = next(model.parameters()).device
    tok_all = {k: v.to(dev) for k, v in model.encode_prompts(prompts).items()}
    out = np.empty(len(state), np.float64)
    for s in range(0, len(state), batch_size):
        sl = slice(s, s + batch_size)
        logits = model(torch.from_numpy(images[sl]).to(dev), torch.from_numpy(state[sl]).to(dev),
                       {k: v[torch.from_numpy(np.asarray(task_index[sl])).to(dev)] for k, v in tok_all.items()})
        out[sl] = model.value(logits).double().cpu().numpy()
    return out
