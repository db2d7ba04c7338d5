"""Training API: tokenised indicators, flow-matching loss, norm stats, save_bundle -> load_policy round trip."""
import dataclasses
import json

import numpy as np
import pytest
import torch

from recap_ros.policy import PolicyError, load_policy
from recap_ros.policy.config import PRESETS, preset
from recap_ros.policy.model import KeypointEncoder, Pi06Policy, PrefixEncoder, images_to_float, spatial_keypoints
from recap_ros.policy.normalize import (
    compute_norm_stats,
    load_norm_stats,
    save_norm_stats,
)
from recap_ros.policy.tokenizer import NEGATIVE, POSITIVE, ByteTokenizer, PromptEncoder
from recap_ros.policy.training import (
    drop_indicators,
    flow_matching_loss,
    prepare_images,
    prompt_encoder_for,
)

SMALL = dict(depth=1, vision_depth=1, width=64, mlp_dim=128, expert_width=32, expert_mlp_dim=64)


def batch(b=4, seed=0):
    rng = np.random.default_rng(seed)
    cfg = preset("tiny")
    images = prepare_images([[rng.integers(0, 256, (40, 50, 3), dtype=np.uint8) for _ in range(3)]
                             for _ in range(b)], cfg)
    return (images, rng.standard_normal((b, 14)).astype(np.float32), ["pick the cube", "touch the marker"] * (b // 2),
            [True, False, None, True][:b], np.clip(rng.standard_normal((b, 50, 14)), -1, 1).astype(np.float32))


def test_prompt_encoder_indicators():
    enc = PromptEncoder(ByteTokenizer(), 96, 24)
    out = enc.encode(["pick", "pick", "pick"], [True, False, None])
    tok = ByteTokenizer()
    assert out["adv_mask"].sum(1).tolist() == [len(POSITIVE), len(NEGATIVE), 0]
    assert out["adv_tokens"][0, :len(POSITIVE)].tolist() == tok.encode(POSITIVE)
    assert out["adv_tokens"][1, :len(NEGATIVE)].tolist() == tok.encode(NEGATIVE)
    assert (out["tokens"] == out["tokens"][0]).all() and out["token_mask"][0, 0]  # shared prefix text
    with pytest.raises(PolicyError, match="advantage segment needs 20 tokens"):
        PromptEncoder(ByteTokenizer(), 96, 8)


def test_drop_indicators_rate():
    out = drop_indicators([True] * 2000, 0.3, np.random.default_rng(0))
    assert 0.25 < sum(i is None for i in out) / 2000 < 0.35 and set(out) == {True, None}


def test_norm_stats_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    state, actions = rng.normal(2.0, 3.0, (5000, 14)), rng.uniform(-1, 1, (200, 50, 14))
    st = compute_norm_stats(state, actions)
    assert np.allclose(st["state"].mean, 2.0, atol=0.2) and np.allclose(st["state"].std, 3.0, atol=0.2)
    assert np.allclose(st["actions"].q01, -0.98, atol=0.01) and np.allclose(st["actions"].q99, 0.98, atol=0.01)
    save_norm_stats(st, tmp_path / "n.json")
    assert set(json.loads((tmp_path / "n.json").read_text())["norm_stats"]) == {"state", "actions"}
    back = load_norm_stats(tmp_path / "n.json")
    for mode in ("quantile", "zscore"):
        x = state[:10]
        np.testing.assert_allclose(back["state"].unnormalize(back["state"].normalize(x, mode), mode), x, atol=1e-9)
    with pytest.raises(PolicyError, match="contains NaN"):
        compute_norm_stats(np.full((3, 14), np.nan), actions)


def test_loss_trains_and_respects_indicator():
    torch.manual_seed(0)
    model = Pi06Policy(preset("tiny", **SMALL))
    images, state, prompts, ind, actions = batch()
    noise, time = torch.randn(4, 50, 14), torch.full((4,), 0.5)
    loss = flow_matching_loss(model, images, state, prompts, ind, actions, noise=noise, time=time)
    assert loss.ndim == 0 and torch.isfinite(loss)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        loss = flow_matching_loss(model, images, state, prompts, ind, actions, noise=noise, time=time)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
    per = flow_matching_loss(model, images, state, prompts, ind, actions, noise=noise, time=time, reduction="none")
    flipped = flow_matching_loss(model, images, state, prompts, [not i if i is not None else None for i in ind],
                                 actions, noise=noise, time=time, reduction="none")
    assert per.shape == (4, 50, 14)
    assert not torch.allclose(per[:2], flipped[:2]) and torch.allclose(per[2], flipped[2])  # None: no indicator


def test_knowledge_insulation_stops_backbone_gradient():
    model = Pi06Policy(preset("tiny", **SMALL))
    images, state, prompts, ind, actions = batch()
    flow_matching_loss(model, images, state, prompts, ind, actions, knowledge_insulation=True).backward()
    assert all(p.grad is None for p in model.prefix.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.expert.parameters())


def test_loss_input_errors():
    model = Pi06Policy(preset("tiny", **SMALL))
    images, state, prompts, ind, actions = batch()
    with pytest.raises(PolicyError, match="use prepare_images"):
        flow_matching_loss(model, images[:, :, :32], state, prompts, ind, actions)
    with pytest.raises(PolicyError, match="expected \\(4, 14\\)"):
        flow_matching_loss(model, images, state[:, :7], prompts, ind, actions)


def test_save_bundle_loads_everywhere(tmp_path):
    from recap_ros.policy.bundle import save_bundle

    torch.manual_seed(1)
    model = Pi06Policy(preset("tiny", **SMALL, time_conditioning="concat", state_input="suffix",
                              normalization="zscore"))
    rng = np.random.default_rng(0)
    stats = compute_norm_stats(rng.normal(size=(100, 14)), rng.normal(size=(100, 14)))
    b = save_bundle(model, tmp_path / "mine", stats, steps=(3, 5))
    assert b.onnx_steps == (3, 5)
    views = [rng.integers(0, 256, (30, 30, 3), dtype=np.uint8) for _ in range(3)]
    outs = [load_policy(b.dir, backend=be).infer(views, np.ones(14), "stack", beta=beta, seed=2, steps=3)
            for be in ("torch", "onnxruntime") for beta in (1.0, 2.5)]
    np.testing.assert_allclose(outs[2], outs[0], atol=1e-4)
    np.testing.assert_allclose(outs[3], outs[1], atol=1e-4)
    assert "ONNX I/O contract" in (b.dir / "README.md").read_text()


def test_presets_and_value_backbone():
    pi = PRESETS["pi06"]
    assert (pi.depth, pi.width, pi.heads, pi.kv_heads, pi.head_dim, pi.mlp_dim) == (34, 2560, 8, 4, 256, 10240)
    assert (pi.image_size, pi.patch_size, pi.vision_tokens) == (448, 14, 256)
    with pytest.raises(PolicyError, match="unknown model preset"):
        preset("pi07")
    with pytest.raises(PolicyError, match="vision_tokens"):
        preset("tiny", vision_tokens=15)
    enc = PrefixEncoder(dataclasses.replace(preset("tiny"), depth=1, width=32, mlp_dim=64))
    c = enc.cfg
    x = prompt_encoder_for(Pi06Policy(preset("tiny"))).encode(["a"], [None])
    images = torch.zeros(1, 3, 3, c.image_size, c.image_size)
    keys, _, kv_mask, hidden = enc(images, *(torch.from_numpy(x[k]) for k in ("tokens", "token_mask", "adv_tokens",
                                                                               "adv_mask")), torch.zeros(1, 14))
    assert hidden.shape == (1, c.prefix_len, 32) and keys.shape[:2] == (1, 1) and kv_mask.shape == (1, c.prefix_len)


def test_fresh_prefix_tokens_have_comparable_scale():
    """Text tokens (Gemma-scaled by sqrt(width)) start at the image tokens' scale, so attention can update them
    (N(0, 1) embeddings made them ~sqrt(width)x larger: 28x for the tiny preset)."""
    torch.manual_seed(0)
    for cfg in (preset("tiny"), preset("tiny", width=256, head_dim=128), preset("tiny", vision_encoder="keypoints")):
        enc = PrefixEncoder(cfg)
        images, *_ = batch(2)
        img = enc.vision(images_to_float(torch.as_tensor(images)).flatten(0, 1))
        text = enc.embed(torch.arange(10, 60)) * cfg.width ** 0.5
        ratio = float(text.pow(2).mean().sqrt() / img.pow(2).mean().sqrt())
        assert 0.2 < ratio < 5.0, (cfg.width, ratio)


def test_spatial_keypoints_find_the_peak():
    """The keypoint encoder's spatial softmax returns a heatmap's peak in [-1, 1] image coordinates (x right,
    y down), and its peakedness: 0 for a flat map, large for one standing-out pixel, whatever the heatmap's scale."""
    enc = KeypointEncoder(preset("tiny", vision_encoder="keypoints", image_size=16), 32)
    heat = torch.zeros(1, 3, 64)
    heat[0, 0, 2 * 8 + 6] = 1.0  # row 2, column 6 of the 8x8 heatmap
    heat[0, 2] = heat[0, 0] * 1e-2  # the same shape, 100x weaker (a fresh conv net's heatmaps are weak)
    kp = spatial_keypoints(heat, enc.grid, torch.tensor(20.0))
    np.testing.assert_allclose(kp[0, 0, :2].numpy(), [-1 + 2 * 6 / 7, -1 + 2 * 2 / 7], atol=1e-3)
    np.testing.assert_allclose(kp[0, 1].numpy(), [0.0, 0.0, 0.0], atol=1e-6)
    assert kp[0, 0, 2] > 3
    np.testing.assert_allclose(kp[0, 2].numpy(), kp[0, 0].numpy(), rtol=2e-3, atol=1e-3)


def test_fresh_keypoints_follow_the_image():
    """A fresh keypoint encoder already places its keypoints differently in different scenes (its heatmaps are
    standardised), so the policy's training has a signal from the views from the first step."""
    torch.manual_seed(0)
    enc = KeypointEncoder(preset("tiny", vision_encoder="keypoints", image_size=48), 32)
    rng = np.random.default_rng(0)
    scenes = np.full((8, 48, 48, 3), 150, np.uint8)
    for img in scenes:  # one small saturated blob per scene at a random place, as a sim marker
        y, x = rng.integers(4, 44, 2)
        img[y - 3:y + 3, x - 3:x + 3] = (225, 40, 40)
    x = images_to_float(torch.from_numpy(scenes)[None])[0]
    with torch.no_grad():
        xy = enc.keypoints(x)[..., :2]
    assert float(xy.std(0).mean()) > 0.1


def test_keypoint_policy_config_and_export(tmp_path):
    """vision_encoder "keypoints": validated, one token per keypoint per view, and its bundle runs the same on
    torch and ONNX Runtime."""
    from recap_ros.policy.bundle import save_bundle

    with pytest.raises(PolicyError, match="vision_encoder='cnn'"):
        preset("tiny", vision_encoder="cnn")
    with pytest.raises(PolicyError, match="image_size=33"):
        preset("tiny", vision_encoder="keypoints", image_size=33)
    cfg = preset("tiny", **SMALL, vision_encoder="keypoints", vision_tokens=5)  # any count, not only squares
    assert cfg.prefix_len == 3 * 5 + cfg.max_text_tokens + 1 + cfg.max_advantage_tokens
    torch.manual_seed(2)
    rng = np.random.default_rng(0)
    stats = compute_norm_stats(rng.normal(size=(100, 14)), rng.normal(size=(100, 14)))
    b = save_bundle(Pi06Policy(cfg), tmp_path / "kp", stats)
    views = [rng.integers(0, 256, (30, 30, 3), dtype=np.uint8) for _ in range(3)]
    outs = [load_policy(b.dir, backend=be).infer(views, np.ones(14), "touch red", beta=2.0, seed=2)
            for be in ("torch", "onnxruntime")]
    np.testing.assert_allclose(outs[1], outs[0], atol=1e-4)


def test_film_conditions_the_keypoints_on_the_prompt_and_exports(tmp_path):
    """vision_film (keypoints only): a fresh model's FiLM is zero (the keypoints do not depend on the prompt yet);
    once trained, different prompts move the keypoints of the same views; the bundle runs the same on torch and
    ONNX Runtime."""
    from recap_ros.policy.bundle import save_bundle

    with pytest.raises(PolicyError, match="vision_film=True"):
        preset("tiny", vision_film=True)  # the ViT has no FiLM
    torch.manual_seed(3)
    cfg = preset("tiny", **SMALL, vision_encoder="keypoints", vision_film=True, image_size=32)
    model = Pi06Policy(cfg)
    enc = prompt_encoder_for(model)
    rng = np.random.default_rng(0)
    views = rng.integers(0, 256, (1, 3, 32, 32, 3), dtype=np.uint8)

    def keypoints(prompt):
        tok = enc.encode([prompt], [None])
        text = model.prefix.embed(torch.from_numpy(tok["tokens"])) * cfg.width ** 0.5
        m = torch.from_numpy(tok["token_mask"]).float()[..., None]
        cond = ((text * m).sum(1) / m.sum(1)).repeat_interleave(3, 0)
        return model.prefix.vision.keypoints(images_to_float(torch.from_numpy(views))[0], cond)

    with torch.no_grad():
        torch.testing.assert_close(keypoints("touch the red marker"), keypoints("touch the blue marker"))
        for lin in model.prefix.vision.film:
            torch.nn.init.normal_(lin.weight, std=0.5)
        assert (keypoints("touch the red marker") - keypoints("touch the blue marker")).abs().max() > 1e-3
    stats = compute_norm_stats(rng.normal(size=(100, 14)), rng.normal(size=(100, 14)))
    b = save_bundle(model, tmp_path / "film", stats)
    v = [rng.integers(0, 256, (30, 30, 3), dtype=np.uint8) for _ in range(3)]
    outs = [load_policy(b.dir, backend=be).infer(v, np.ones(14), "touch red", beta=2.0, seed=2)
            for be in ("torch", "onnxruntime")]
    np.testing.assert_allclose(outs[1], outs[0], atol=1e-4)


def test_goal_head_adds_a_supervised_loss_and_ignores_the_indicator():
    """goal_dim: an auxiliary head on the prefix adds goal_weight · MSE to the flow-matching loss; its prediction
    never depends on the advantage segment; without a head a goal is an error, as is a per-element loss."""
    with pytest.raises(PolicyError, match="goal_dim=-1"):
        preset("tiny", goal_dim=-1)
    torch.manual_seed(0)
    model = Pi06Policy(preset("tiny", **SMALL, goal_dim=3))
    images, state, prompts, ind, actions = batch()
    goal = np.ones((4, 3), np.float32)
    kw = dict(noise=torch.zeros(4, 50, 14), time=torch.full((4,), 0.5))
    flow = flow_matching_loss(model, images, state, prompts, ind, actions, **kw)
    both = flow_matching_loss(model, images, state, prompts, ind, actions, goal=goal, goal_weight=2.0, **kw)
    enc = prompt_encoder_for(model)
    preds = []
    for indicators in ([True] * 4, [None] * 4):
        tok = {k: torch.from_numpy(v) for k, v in enc.encode(prompts, indicators).items()}
        _, _, kv_mask, hidden = model.prefix(images_to_float(torch.from_numpy(images)), tok["tokens"],
                                             tok["token_mask"], tok["adv_tokens"], tok["adv_mask"],
                                             torch.from_numpy(state))
        preds.append(model.predict_goal(hidden, kv_mask))
    torch.testing.assert_close(preds[0], preds[1])
    expected = 2.0 * torch.nn.functional.mse_loss(preds[0], torch.from_numpy(goal))
    torch.testing.assert_close(both - flow, expected, rtol=1e-4, atol=1e-6)
    with pytest.raises(PolicyError, match="'mean'"):
        flow_matching_loss(model, images, state, prompts, ind, actions, goal=goal, reduction="none")
    with pytest.raises(PolicyError, match="no goal head"):
        flow_matching_loss(Pi06Policy(preset("tiny", **SMALL)), images, state, prompts, ind, actions, goal=goal)


def test_bpe_tokenizer_makes_each_prompt_word_one_token(tmp_path):
    """train_bpe: a SentencePiece BPE model trained on the prompts gives every word of them one token and still
    encodes any other text (byte fallback) into ids the model's vocabulary holds."""
    from recap_ros.policy.tokenizer import train_bpe

    prompts = [f"touch the {c} marker with the {a} gripper" for c in ("red", "green", "blue")
               for a in ("left", "right")]
    tok = train_bpe(prompts, tmp_path / "tokenizer.model")
    pieces = tok.sp.encode("Task: touch the green marker with the right gripper", out_type=str)
    assert pieces == ["▁Task", ":", "▁touch", "▁the", "▁green", "▁marker", "▁with", "▁the", "▁right", "▁gripper"]
    ids = tok.encode("grab the purple cube ☺")
    assert tok.sp.decode(ids) == "grab the purple cube ☺" and max(ids) < tok.vocab_size
    enc = PromptEncoder(tok, 32, 8)  # both advantage texts fit a short segment
    assert enc.encode(["touch it"], [False])["adv_mask"].sum() <= 4
    with pytest.raises(PolicyError, match="at least one"):
        train_bpe(["  "], tmp_path / "empty.model")
