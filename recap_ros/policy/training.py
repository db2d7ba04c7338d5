"""Training API of the policy (used by the RECAP trainer, recap_ros.recap).

How to train
------------
::

    import dataclasses, torch
    from recap_ros.policy.config import preset
    from recap_ros.policy.model import Pi06Policy
    from recap_ros.policy.normalize import compute_norm_stats
    from recap_ros.policy.training import (flow_matching_loss, prepare_images, drop_indicators,
                                           prompt_encoder_for)
    from recap_ros.policy.bundle import save_bundle, open_bundle

    model = Pi06Policy(preset("tiny"))                  # or open_bundle("tiny").load_model() to fine-tune
    stats = compute_norm_stats(states, actions)          # (N, 14) robot-unit arrays from the dataset
    enc = prompt_encoder_for(model)                      # byte tokenizer; pass a SentencePieceTokenizer for real ones
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for batch in loader:
        images = prepare_images(batch_views, model.config)                 # (B, 3, S, S, 3) uint8
        state = stats["state"].normalize(batch_state, model.config.normalization)       # (B, 14)
        chunk = stats["actions"].normalize(batch_chunks, model.config.normalization)    # (B, 50, 14)
        ind = drop_indicators(batch_indicators, p=0.3, rng=rng)            # True / False -> None 30 % of the time
        loss = flow_matching_loss(model, images, state, batch_prompts, ind, chunk, prompt_encoder=enc)
        opt.zero_grad(); loss.backward(); opt.step()
    save_bundle(model, "models/my_policy", stats)        # + ONNX export: load_policy("models/my_policy") works

Indicator per sample: True -> "Advantage: positive", False -> "Advantage: negative", None -> no indicator
(the unconditional branch used by CFG). Human corrections are always True (RECAP). Actions and state are
normalised with the bundle's statistics; actions are absolute joint positions (chunks of ``chunk_len``).

Smaller variants (e.g. a value-function backbone) reuse the blocks: ``PrefixEncoder(dataclasses.replace(
preset("tiny"), depth=2, width=96))`` returns per-layer KV and final hidden states (B, L, width) for a head;
:class:`~recap_ros.policy.model.VisionEncoder` and :class:`~recap_ros.policy.model.DecoderLayer` are usable alone.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from recap_ros import imaging
from recap_ros.policy.config import PolicyConfig
from recap_ros.policy.errors import PolicyError
from recap_ros.policy.model import Pi06Policy, images_to_float
from recap_ros.policy.tokenizer import ByteTokenizer, PromptEncoder


def prompt_encoder_for(model: Pi06Policy, tokenizer=None) -> PromptEncoder:
    c = model.config
    return PromptEncoder(tokenizer or ByteTokenizer(), c.max_text_tokens, c.max_advantage_tokens)


def prepare_images(views: Sequence[Sequence[np.ndarray]], config: PolicyConfig) -> np.ndarray:
    """Per-sample lists of HxWx3 uint8 views (camera_roles order) -> (B, n_cams, S, S, 3) uint8, resized exactly
    as at inference time."""
    s = config.image_size
    out = np.empty((len(views), config.num_cameras, s, s, 3), np.uint8)
    for i, sample in enumerate(views):
        if len(sample) != config.num_cameras:
            raise PolicyError(f"sample {i}: {len(sample)} views, the model takes {config.num_cameras}")
        for j, v in enumerate(sample):
            out[i, j] = imaging.fit(np.asarray(v, np.uint8), s, s, config.image_resize)
    return out


def drop_indicators(indicators: Sequence[bool | None], p: float, rng: np.random.Generator) -> list[bool | None]:
    """Replace each indicator by None with probability p (π0.6*: 30 %), making the model also unconditional."""
    return [None if rng.random() < p else (None if i is None else bool(i)) for i in indicators]


def sample_time(batch: int, device=None, rng: np.random.Generator | None = None) -> torch.Tensor:
    """openpi's flow time distribution: Beta(1.5, 1) · 0.999 + 0.001 (more weight near t = 1, the noise end)."""
    if rng is None:
        u = torch.distributions.Beta(torch.tensor(1.5), torch.tensor(1.0)).sample((batch,))
    else:
        u = torch.from_numpy(rng.beta(1.5, 1.0, batch).astype(np.float32))
    return (u * 0.999 + 0.001).to(device)


def _tensor(x, dtype, device) -> torch.Tensor:
    return x.to(device=device, dtype=dtype) if isinstance(x, torch.Tensor) else torch.as_tensor(
        np.asarray(x), dtype=dtype, device=device)


def flow_matching_loss(model: Pi06Policy, images, state, prompts: Sequence[str], indicators: Sequence[bool | None],
                       actions, *, prompt_encoder: PromptEncoder | None = None, noise=None, time=None,
                       knowledge_insulation: bool = False, reduction: str = "mean", goal=None,
                       goal_weight: float = 1.0) -> torch.Tensor:
    """Flow-matching loss ||v(x_t, t) − (noise − actions)||² with x_t = t·noise + (1 − t)·actions.

    images (B, n_cams, S, S, 3) uint8 (or float in [0, 1]); state (B, state_dim) and actions
    (B, chunk_len, action_dim) normalised; prompts / indicators length B. ``knowledge_insulation`` stops the
    action expert's gradient into the backbone (π0.5 KI; then train the backbone with its own objective).
    ``reduction``: 'mean' (scalar) or 'none' (B, chunk_len, action_dim). ``goal`` (B, goal_dim), normalised: adds
    ``goal_weight`` · MSE of the model's auxiliary goal head (:meth:`Pi06Policy.predict_goal`; 'mean' only)."""
    c = model.config
    device = next(model.parameters()).device
    images = images.to(device) if isinstance(images, torch.Tensor) else torch.from_numpy(np.asarray(images)).to(device)
    b = images.shape[0]
    if tuple(images.shape[1:]) != (c.num_cameras, c.image_size, c.image_size, 3):
        raise PolicyError(f"images: expected (B, {c.num_cameras}, {c.image_size}, {c.image_size}, 3), got "
                          f"{tuple(images.shape)} (use prepare_images)")
    state = _tensor(state, torch.float32, device)
    actions = _tensor(actions, torch.float32, device)
    if tuple(state.shape) != (b, c.state_dim) or tuple(actions.shape) != (b, c.chunk_len, c.action_dim):
        raise PolicyError(f"state {tuple(state.shape)} / actions {tuple(actions.shape)}: expected ({b}, "
                          f"{c.state_dim}) / ({b}, {c.chunk_len}, {c.action_dim})")
    if len(prompts) != b or len(indicators) != b:
        raise PolicyError(f"{len(prompts)} prompts and {len(indicators)} indicators for a batch of {b}")
    enc = (prompt_encoder or prompt_encoder_for(model)).encode(
        list(prompts), list(indicators), state.cpu().numpy() if c.state_input == "tokens" else None)
    tok = {k: torch.from_numpy(v).to(device) for k, v in enc.items()}
    noise = torch.randn_like(actions) if noise is None else _tensor(noise, torch.float32, device)
    time = sample_time(b, device) if time is None else _tensor(time, torch.float32, device)
    t = time[:, None, None]
    x_t = t * noise + (1.0 - t) * actions
    if goal is not None and reduction != "mean":
        raise PolicyError("the goal loss is only added to a 'mean' flow-matching loss")
    keys, values, kv_mask, hidden = model.prefix(images_to_float(images), tok["tokens"], tok["token_mask"],
                                                 tok["adv_tokens"], tok["adv_mask"],
                                                 state if c.state_input == "prefix" else None)
    if knowledge_insulation:
        keys, values = keys.detach(), values.detach()
    v = model.velocity(keys, values, kv_mask, state if c.state_input == "suffix" else None, x_t, time)
    loss = F.mse_loss(v, noise - actions, reduction=reduction)
    if goal is not None:
        goal = _tensor(goal, torch.float32, device)
        loss = loss + goal_weight * F.mse_loss(model.predict_goal(hidden, kv_mask), goal)
    return loss
