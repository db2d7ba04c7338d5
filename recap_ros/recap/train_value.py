"""Train the distributional value function on RECAP frames (cross-entropy against the return bins).

As in the paper, every iteration fine-tunes from a given checkpoint (``init``: the pre-trained value bundle,
never the previous iteration's) on all the data collected so far.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from recap_ros.policy.tokenizer import ByteTokenizer, PromptEncoder
from recap_ros.recap import loader, trainer
from recap_ros.recap.data import Frames
from recap_ros.recap.value import (
    ValueConfig,
    ValueModel,
    default_backbone,
    load_value,
    save_value,
    vlm_value_model,
)


class _ValueLoss(nn.Module):
    """forward(batch) -> cross-entropy of the value logits against the return bins of the batch's frames (each
    image shifted by its own random translation of up to ``augment_shift`` pixels)."""

    def __init__(self, model: ValueModel, frames: Frames, augment_shift: int):
        super().__init__()
        self.model, self.frames, self.shift = model, frames, augment_shift
        self.tokens = model.encode_prompts(frames.prompts)

    def forward(self, batch: trainer.Batch) -> torch.Tensor:
        f, dev, idx = self.frames, self.model.head.weight.device, batch.idx
        imgs = torch.from_numpy(f.images[idx])
        if self.shift:  # small random translations: the value must not key on exact pixels
            shifts = batch.mine(batch.rng.integers(-self.shift, self.shift + 1, size=(len(batch.samples), 2)))
            imgs = torch.stack([torch.roll(im, shifts=(int(dy), int(dx)), dims=(1, 2))
                                for im, (dy, dx) in zip(imgs, shifts)])
        task = torch.from_numpy(f.task_index[idx])
        logits = self.model(imgs.to(dev), torch.from_numpy(f.state[idx]).to(dev),
                            {k: v[task].to(dev) for k, v in self.tokens.items()})
        return nn.functional.cross_entropy(logits, torch.from_numpy(f.return_bin[idx]).to(dev))


def new_value_model(frames: Frames, **backbone_overrides) -> ValueModel:
    """A fresh value model sized for ``frames`` with state normalisation from their statistics."""
    n_cams, size = frames.images.shape[1], frames.images.shape[2]
    roles = backbone_overrides.pop("camera_roles", default_backbone().camera_roles[:n_cams])
    if "max_text_tokens" not in backbone_overrides:  # room for the data's longest prompt, in steps of 16
        enc = PromptEncoder(ByteTokenizer(), 1 << 20, default_backbone().max_advantage_tokens)
        longest = max(len(enc.text_tokens(p)) for p in frames.prompts)
        backbone_overrides["max_text_tokens"] = max(default_backbone().max_text_tokens, -(-longest // 16) * 16)
    bb = default_backbone(image_size=size, camera_roles=tuple(roles), state_dim=frames.state.shape[1],
                          action_dim=frames.state.shape[1], **backbone_overrides)
    return ValueModel(ValueConfig(bb, state_mean=frames.state.mean(0).tolist(),
                                  state_std=(frames.state.std(0) + 1e-3).tolist()))


def train_value(frames: Frames, out: str | Path | None = None, init: str | Path | None = None, steps: int = 500,
                batch_size: int = 64, lr: float = 3e-4, seed: int = 0, device: str | None = None,
                progress: bool = True, backbone_overrides: dict | None = None, warmup: int = 50,
                run: trainer.RunDir | None = None, init_backbone: str | Path | None = None,
                workers: int = 0) -> tuple[ValueModel, list[float]]:
    """Fine-tune from ``init`` (a value bundle), or train a new model: a ``vlm`` one started from the policy bundle
    ``init_backbone``'s backbone, else a ``small`` one; saves a bundle to ``out`` on rank 0. ``run``: checkpoints,
    resume and metrics (:func:`recap_ros.recap.trainer.fit`). Images not yet decoded (``load_frames(...,
    decode='lazy')``) are decoded ahead in ``workers`` DataLoader processes (:mod:`recap_ros.recap.loader`)."""
    dist = trainer.setup(device)
    torch.manual_seed(seed)
    if init is not None and init_backbone is not None:
        raise ValueError(f"give a value bundle to fine-tune ({init}) or a policy backbone to start from "
                         f"({init_backbone}), not both")
    if init is not None or init_backbone is not None:
        # the given checkpoint, never the previous iteration's result
        model = load_value(init) if init is not None else vlm_value_model(init_backbone, frames.state)
        bb = model.cfg.backbone
        if bb.image_size != frames.images.shape[2] or bb.num_cameras != frames.images.shape[1]:
            raise ValueError(f"{init or init_backbone}: value model takes {bb.num_cameras} x {bb.image_size}^2 "
                             f"views, frames have {frames.images.shape[1]} x {frames.images.shape[2]}^2")
    else:
        model = new_value_model(frames, **(backbone_overrides or {}))
    frames = loader.prefetched(frames, steps, batch_size, seed, workers, dist.rank, dist.world,
                               start=trainer.resume_point(run, seed, "value"))
    if frames.return_bin.max() >= model.cfg.num_bins or frames.return_bin.min() < 0:
        raise ValueError(f"return bins span [{frames.return_bin.min()}, {frames.return_bin.max()}], "
                         f"outside the model's {model.cfg.num_bins} bins")
    losses = trainer.fit(_ValueLoss(model, frames, augment_shift=1), len(frames), steps, batch_size, lr, dist,
                         seed=seed, desc="value", progress=progress, warmup=warmup, run=run)
    model.eval()
    if out is not None and dist.main:
        save_value(model, out)
    trainer.barrier(dist)
    return model, losses
