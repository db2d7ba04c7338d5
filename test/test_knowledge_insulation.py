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


def test_fine_tuning_an_imported_gemma3_bundle_with_knowledge_insulation_keeps_its_backbone(tmp_path):
    """recap-train-policy --init <imported bundle> --knowledge-insulation, at small scale: the imported Gemma 3
    backbone stays as imported (the action loss never reaches it), the fresh action expert learns."""
    import hf_models
    from safetensors.torch import load_file

    from recap_ros.policy.import_checkpoint import import_checkpoint

    hf_models.gemma3().save_pretrained(tmp_path / "hf")
    import_checkpoint(tmp_path / "hf", tmp_path / "imported", "hf", overrides={
        "expert_width": 32, "expert_mlp_dim": 48, "image_size": 28, "chunk_len": 8, "max_text_tokens": 64,
        "denoise_steps": 1}, dtype="float32")
    f = frames(size=28)
    labelled = f.with_indicator(np.arange(len(f)) % 2 == 0)  # advantage labels: both segments are trained
    tp.train_policy(labelled, tmp_path / "tuned", init=tmp_path / "imported", steps=2, batch_size=4,
                    progress=False, knowledge_insulation=True, warmup=0)
    before, after = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("imported", "tuned"))
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("prefix."))
    assert not torch.equal(before["expert.action_out.weight"], after["expert.action_out.weight"])
