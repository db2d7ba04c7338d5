"""Shared training loop for the value function and the policy: DDP under ``torchrun``, CPU otherwise.

Under torchrun (WORLD_SIZE > 1) every rank draws its own batches (seed + rank), gradients are averaged by
DistributedDataParallel (NCCL on GPU, gloo on CPU) and only rank 0 reports progress and saves.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm import tqdm


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(device: str | None = None) -> Dist:
    """Join the torchrun process group when WORLD_SIZE > 1; pick the device (cuda:LOCAL_RANK when present)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, dev)


def fit(model: nn.Module, num_samples: int, steps: int, batch_size: int, lr: float, dist: Dist, seed: int = 0,
        desc: str = "train", weight_decay: float = 1e-4, warmup: int = 50, log_every: int = 10,
        progress: bool = True) -> list[float]:
    """AdamW with linear warm-up and cosine decay; returns the (rank-0) loss per step.

    ``model(indices, rng)`` (its forward, so DDP can hook it) returns the loss of one batch of sample indices.
    """
    if num_samples <= 0:
        raise ValueError("no training samples")
    model.to(dist.device).train()
    module = model
    if dist.world > 1:
        module = nn.parallel.DistributedDataParallel(
            model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))) * 0.9 + 0.1

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    rng = np.random.default_rng(seed + 1000 * dist.rank)
    losses: list[float] = []
    bar = tqdm(range(steps), desc=desc, disable=not (progress and dist.main), dynamic_ncols=True)
    for step in bar:
        idx = rng.integers(0, num_samples, size=batch_size)
        loss = module(idx, rng)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{desc}: loss became {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if step % log_every == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-log_every:]):.4f}")
    return losses


def barrier(dist: Dist) -> None:
    if dist.world > 1:
        torch.distributed.barrier()
