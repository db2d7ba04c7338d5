"""Advantage-conditioned flow-matching training of the policy (π0.6*, RECAP).

Each sample's prompt carries "Advantage: positive" (I_t = 1) or "Advantage: negative" (I_t = 0); the indicator is
dropped (no advantage segment) with probability ``drop_prob`` = 0.3, so one model is conditional and
unconditional (what classifier-free guidance needs). SFT mode fixes I_t = 1 for every sample (the first
fine-tune on demonstrations). As in the paper, every iteration fine-tunes from a GIVEN checkpoint (the
pre-trained / SFT bundle), never from the previous iteration. The result is a complete bundle
(:func:`recap_ros.policy.bundle.save_bundle`: weights, norm stats, ONNX graphs) the action server loads.

The flow-matching loss, indicator dropout, prompt assembly and image preparation are the policy package's
(:mod:`recap_ros.policy.training`); this module feeds them RECAP frames.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from recap_ros.policy.bundle import ACTION_SPACE, check_action_space, open_bundle, save_bundle
from recap_ros.policy.config import preset
from recap_ros.policy.model import Pi06Policy
from recap_ros.policy.normalize import Stats, compute_norm_stats
from recap_ros.policy.tokenizer import train_bpe
from recap_ros.policy.training import (
    drop_indicators,
    flow_matching_loss,
    prompt_encoder_for,
    sample_time,
)
from recap_ros.recap import loader, trainer
from recap_ros.recap.data import Frames

DROP_PROB = 0.3
TOKENIZERS = ("byte", "bpe")


def training_indicators(frames: Frames, sft: bool) -> np.ndarray:
    """I_t per frame before dropout: all positive in SFT mode, else the labels (interventions always positive)."""
    if sft:
        return np.ones(len(frames), bool)
    if frames.indicator is None:
        raise ValueError("advantage-conditioned training needs indicator labels (run recap-label) or SFT mode")
    return frames.indicator | frames.intervention


def normalized(stats: Stats, x: np.ndarray, mode: str) -> np.ndarray:
    """Bundle normalisation of x (float32), as the runtime does it (range floor, clip)."""
    return stats.normalize(np.asarray(x, np.float64), mode).astype(np.float32)


def action_targets(frames: Frames, action_space: str) -> np.ndarray:
    """The chunks the model learns to output: absolute joint positions, or (delta_joint_positions) the chunk
    relative to the state it was planned from, as the runtime adds that state back."""
    if action_space == ACTION_SPACE:
        return frames.action_chunk
    return (frames.action_chunk - frames.state[:, None, :]).astype(np.float32)


def goal_targets(model: Pi06Policy, frames: Frames) -> np.ndarray | None:
    """The frames' goals z-scored per dimension (a constant one becomes 0) for the model's auxiliary goal head; None
    when the model has no head or the frames carry no goals (e.g. an exported robot dataset: flow loss only)."""
    if not model.config.goal_dim or frames.goal is None:
        return None
    goal = np.asarray(frames.goal, np.float64)
    if goal.ndim != 2 or goal.shape[1] != model.config.goal_dim:
        raise ValueError(f"frames have goals of shape {goal.shape[1:]}, the model's goal head predicts "
                         f"({model.config.goal_dim},) (model config goal_dim)")
    std = goal.std(0)
    return ((goal - goal.mean(0)) / np.where(std > 1e-9, std, 1.0)).astype(np.float32)


class _PolicyLoss(nn.Module):
    """forward(batch) -> flow-matching loss of the batch's frames with dropped-out advantage indicators (+ the goal
    head's loss when the model has one and the frames carry goals). Dropout, flow noise and time are drawn for the
    global batch from the batch's generator (:class:`~recap_ros.recap.trainer.Batch`)."""

    def __init__(self, model: Pi06Policy, frames: Frames, indicators: np.ndarray, stats: dict[str, Stats],
                 drop_prob: float, action_space: str = ACTION_SPACE, goal_weight: float = 1.0, tokenizer=None,
                 knowledge_insulation: bool = False):
        super().__init__()
        self.model, self.frames, self.ind, self.drop = model, frames, indicators, drop_prob
        self.knowledge_insulation = knowledge_insulation
        c = model.config
        self.enc = prompt_encoder_for(model, tokenizer)
        self.state = torch.from_numpy(normalized(stats["state"], frames.state, c.normalization))
        self.chunk = torch.from_numpy(normalized(stats["actions"], action_targets(frames, action_space),
                                                 c.normalization))
        goal = goal_targets(model, frames)
        self.goal, self.goal_weight = (None if goal is None else torch.from_numpy(goal)), goal_weight

    def forward(self, batch: trainer.Batch) -> torch.Tensor:
        f, c, idx, rng, n = self.frames, self.model.config, batch.idx, batch.rng, len(batch.samples)
        ind = batch.mine(drop_indicators(self.ind[batch.samples].tolist(), self.drop, rng))
        noise = batch.mine(rng.standard_normal((n, c.chunk_len, c.action_dim), dtype=np.float32))
        time = batch.mine(sample_time(n, rng=rng))
        prompts = [f.prompts[k] for k in f.task_index[idx]]
        ti = torch.from_numpy(idx)
        return flow_matching_loss(self.model, torch.from_numpy(f.images[idx]), self.state[ti], prompts, ind,
                                  self.chunk[ti], prompt_encoder=self.enc, noise=torch.from_numpy(noise), time=time,
                                  knowledge_insulation=self.knowledge_insulation,
                                  goal=None if self.goal is None else self.goal[ti], goal_weight=self.goal_weight)


def check_frames(model: Pi06Policy, frames: Frames) -> None:
    c = model.config
    want = (c.num_cameras, c.image_size, c.image_size, 3)
    if tuple(frames.images.shape[1:]) != want:
        raise ValueError(f"frames have images {tuple(frames.images.shape[1:])}, the policy takes {want}")
    if frames.action_chunk.shape[1:] != (c.chunk_len, c.action_dim) or frames.state.shape[1] != c.state_dim:
        raise ValueError(f"frames have state {frames.state.shape[1:]} / chunks {frames.action_chunk.shape[1:]}, "
                         f"the policy takes ({c.state_dim},) / ({c.chunk_len}, {c.action_dim})")


def train_policy(frames: Frames, out: str | Path | None, init: str | Path | None = None, preset_name: str = "tiny",
                 sft: bool = False, drop_prob: float = DROP_PROB, steps: int = 1000, batch_size: int = 32,
                 lr: float = 3e-4, seed: int = 0, device: str | None = None, progress: bool = True,
                 joint_names: list[str] | None = None, description: str = "",
                 model_overrides: dict | None = None, action_space: str = ACTION_SPACE, tokenizer: str | None = None,
                 goal_weight: float = 1.0, warmup: int = 50, knowledge_insulation: bool = False,
                 run: trainer.RunDir | None = None, workers: int = 0) -> tuple[Pi06Policy, list[float]]:
    """Fine-tune the bundle ``init`` (weights, norm stats, tokenizer and action space kept) or train
    ``preset_name`` from scratch (norm stats from ``frames``, outputs in ``action_space``, prompts tokenised by
    ``tokenizer``: "byte" (default), or "bpe" = :func:`~recap_ros.policy.tokenizer.train_bpe` on the frames' prompts);
    writes a bundle to ``out`` on rank 0. A model with a goal head (``goal_dim``) also learns to predict the frames'
    goals, weighted by ``goal_weight``. ``knowledge_insulation`` (π0.5 / π0.6): the action expert's loss does not
    reach the backbone (its keys and values are detached), which then learns only from its own objective (the goal
    head here) or stays as imported. ``run``: checkpoints, resume and metrics
    (:func:`recap_ros.recap.trainer.fit`). Images not yet decoded (``load_frames(..., decode='lazy')``) are decoded
    ahead in ``workers`` DataLoader processes (:mod:`recap_ros.recap.loader`)."""
    if not 0.0 <= drop_prob < 1.0:
        raise ValueError(f"indicator drop probability must be in [0, 1) (got {drop_prob})")
    check_action_space(action_space, "train_policy")  # before any training time is spent
    if tokenizer is not None and tokenizer not in TOKENIZERS:
        raise ValueError(f"tokenizer must be one of {', '.join(TOKENIZERS)} (got {tokenizer!r})")
    if tokenizer is not None and init is not None:
        raise ValueError(f"tokenizer {tokenizer!r} is for a new model; fine-tuning keeps the checkpoint's ({init})")
    dist = trainer.setup(device)
    torch.manual_seed(seed)
    if init is not None:
        bundle = open_bundle(init)  # the given checkpoint, never the previous iteration's result
        model, stats, tokenizer = bundle.load_model(), bundle.norm_stats, bundle.tokenizer
        joint_names = joint_names or bundle.meta.get("joint_names")
        action_space = bundle.action_space
    else:
        overrides = dict(model_overrides or {})
        if tokenizer == "bpe":
            tmp = tempfile.TemporaryDirectory()  # holds the BPE model until save_bundle copies it into the bundle
            tokenizer = train_bpe(frames.prompts, Path(tmp.name) / "tokenizer.model")
            overrides.setdefault("vocab_size", tokenizer.vocab_size)
        else:
            tokenizer = None  # byte-level
        model = Pi06Policy(preset(preset_name, **overrides))
        stats = compute_norm_stats(frames.state, action_targets(frames, action_space))
    check_frames(model, frames)
    frames = loader.prefetched(frames, steps, batch_size, seed, workers, dist.rank, dist.world,
                               start=trainer.resume_point(run, seed, "policy"))
    indicators = training_indicators(frames, sft)
    loss = _PolicyLoss(model, frames, indicators, stats, drop_prob, action_space, goal_weight, tokenizer,
                       knowledge_insulation)
    losses = trainer.fit(loss, len(frames), steps, batch_size, lr, dist, seed=seed,
                         desc="policy" + (" (SFT)" if sft else "") + (" + goal" if loss.goal is not None else ""),
                         progress=progress, warmup=warmup, run=run)
    model.eval()
    if out is not None and dist.main:
        save_bundle(model, out, stats, tokenizer, joint_names=joint_names, description=description,
                    action_space=action_space)
    trainer.barrier(dist)
    return model, losses
