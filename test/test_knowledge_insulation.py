"""Knowledge insulation wired through the RECAP policy trainer: with it the action loss leaves the backbone's
gradients exactly zero, without it they are not."""
import numpy as np
import pytest
import torch
from test_recap_policy_training import SMALL, frames

from recap_ros.recap import train_policy as tp
from recap_ros.recap.trainer import Batch


@pytest.mark.parametrize("insulated", [True, False])
def test_action_loss_reaches_the_backbone_only_without_knowledge_insulation(insulated):
    f = frames()
    torch.manual_seed(0)
    model = tp.Pi06Policy(tp.preset("tiny", **SMALL))
    stats = tp.compute_norm_stats(f.state, f.action_chunk)
    loss = tp._PolicyLoss(model, f, np.ones(len(f), bool), stats, tp.DROP_PROB, knowledge_insulation=insulated)
    rng = np.random.default_rng(0)
    loss(Batch(rng.integers(0, len(f), 8), rng)).backward()
    backbone = [p.grad for n, p in model.prefix.named_parameters()]
    reached = any(g is not None and g.abs().max() > 0 for g in backbone)
    assert reached is not insulated
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in model.expert.action_out.parameters())
