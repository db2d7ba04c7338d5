"""The VLM value function: the policy bundle's backbone (architecture + vision/language weights) and tokenizer,
trained with recap-train-value --init-backbone, saved and loaded by load_value / predict_values like the small one."""
import json

import numpy as np
import pytest
import sentencepiece
import torch
from safetensors.numpy import load_file
from test_recap_value import synthetic_frames

from recap_ros import paths
from recap_ros.recap import cli
from recap_ros.recap.data import save_frames
from recap_ros.recap.train_value import train_value
from recap_ros.recap.value import load_value, predict_values, vlm_value_model

torch.set_num_threads(1)
PROMPT = "touch the red marker"


@pytest.fixture
def policy_bundle():
    """The committed sim policy: keypoint vision (FiLM), 2-layer backbone, BPE tokenizer, goal head, 48 px views."""
    return paths.model_dir("sim_policy")


def test_vlm_value_starts_from_the_policy_backbone_and_uses_its_tokenizer(policy_bundle, tmp_path):
    bundle = policy_bundle
    frames = synthetic_frames(n_eps=2, T=6, size=48)
    model = vlm_value_model(bundle, frames.state)
    assert model.cfg.kind == "vlm" and "sim_policy" in model.cfg.backbone_from
    policy = load_file(str(bundle / "model.safetensors"))  # read apart from the bundle loader
    enc = model.encoder.state_dict()
    prefix = {k.removeprefix("prefix."): v for k, v in policy.items() if k.startswith("prefix.")}
    assert set(enc) == set(prefix)  # the whole prefix encoder; the action expert and goal head are not taken
    for k, v in prefix.items():
        np.testing.assert_array_equal(enc[k].numpy(), v, err_msg=k)
    # the prompt is encoded by the bundle's SentencePiece model: BOS, then its pieces of "Task: <prompt>\n"
    sp = sentencepiece.SentencePieceProcessor(model_file=str(bundle / "tokenizer.model"))
    want = [sp.bos_id()] + list(sp.encode(f"Task: {PROMPT}\n"))
    tok = model.encode_prompts([PROMPT])
    assert tok["tokens"][0, :len(want)].tolist() == want and int(tok["token_mask"].sum()) == len(want)

    out = tmp_path / "value"
    trained, losses = train_value(frames, out, init_backbone=bundle, steps=3, batch_size=4, progress=False,
                                  device="cpu")
    assert len(losses) == 3 and np.isfinite(losses).all()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tokenizer"] == {"type": "sentencepiece", "file": "tokenizer.model"}
    assert (out / "tokenizer.model").read_bytes() == (bundle / "tokenizer.model").read_bytes()
    again = load_value(out)
    assert again.cfg.kind == "vlm" and again.cfg.backbone.width == trained.cfg.backbone.width
    v = predict_values(trained, frames.images, frames.state, frames.prompts, frames.task_index)
    np.testing.assert_allclose(predict_values(again, frames.images, frames.state, frames.prompts,
                                              frames.task_index), v, atol=1e-5)
    assert ((v >= -1) & (v <= 0)).all()


def test_recap_train_value_init_backbone_cli(policy_bundle, tmp_path, capsys):
    bundle = policy_bundle
    data = tmp_path / "frames.npz"
    save_frames(synthetic_frames(n_eps=2, T=6, size=48), data)
    assert cli.train_value_main([str(data), "--out", str(tmp_path / "v"), "--init-backbone", str(bundle),
                                 "--steps", "2", "--batch-size", "4", "--holdout", "0", "--device", "cpu"]) == 0
    assert load_value(tmp_path / "v").cfg.kind == "vlm"
    with pytest.raises(SystemExit):  # a value bundle to fine-tune or a backbone to start from, not both
        cli.train_value_main([str(data), "--out", str(tmp_path / "w"), "--init-backbone", str(bundle),
                              "--init", str(tmp_path / "v")])
    assert "not allowed with argument" in capsys.readouterr().err


def test_vlm_value_refuses_another_state_size(policy_bundle):
    bundle = policy_bundle
    with pytest.raises(ValueError, match=r"backbone takes a 14-dim state, the frames have 7"):
        vlm_value_model(bundle, np.zeros((4, 7), np.float32))


def test_vlm_value_from_an_imported_gemma3_bundle(tmp_path):
    """recap-train-value --init-backbone <a bundle recap-import-checkpoint wrote from a transformers Gemma 3>:
    the value's encoder holds the checkpoint's backbone (read apart, from the imported safetensors), a state
    projection is added (the Gemma 3 folder has no state input), and it trains, saves and loads."""
    import hf_models

    from recap_ros.policy.import_checkpoint import import_checkpoint

    hf_models.gemma3().save_pretrained(tmp_path / "hf")
    import_checkpoint(tmp_path / "hf", tmp_path / "imported", "hf", overrides={
        "expert_width": 32, "expert_mlp_dim": 48, "image_size": 28, "chunk_len": 8, "max_text_tokens": 64,
        "denoise_steps": 1}, dtype="float32")
    frames = synthetic_frames(n_eps=2, T=6, size=28)
    trained, losses = train_value(frames, tmp_path / "value", init_backbone=tmp_path / "imported", steps=2,
                                  batch_size=4, progress=False, device="cpu")
    assert len(losses) == 2 and np.isfinite(losses).all()
    imported = load_file(str(tmp_path / "imported" / "model.safetensors"))
    fresh = vlm_value_model(tmp_path / "imported", frames.state).encoder.state_dict()  # before training
    backbone = {k.removeprefix("prefix."): v for k, v in imported.items() if k.startswith("prefix.")}
    assert backbone and set(backbone) <= set(fresh)
    for k, v in backbone.items():
        np.testing.assert_array_equal(fresh[k].numpy(), v, err_msg=k)
    again = load_value(tmp_path / "value")
    v = predict_values(again, frames.images, frames.state, frames.prompts, frames.task_index)
    np.testing.assert_allclose(predict_values(trained, frames.images, frames.state, frames.prompts,
                                              frames.task_index), v, atol=1e-5)
    assert ((v >= -1) & (v <= 0)).all()
