"""Distributional value function: expectation over bins, loss decreases on synthetic data, bundle round trip."""
import json

import numpy as np
import pytest
import torch

from recap_ros.recap import returns as rt
from recap_ros.recap.data import concat, episode_frames
from recap_ros.recap.train_value import train_value
from recap_ros.recap.value import (
    ValueBundleError,
    ValueConfig,
    ValueModel,
    default_backbone,
    load_value,
    predict_values,
    save_value,
)

torch.set_num_threads(1)
SMALL = default_backbone(image_size=16)


def synthetic_frames(n_eps=8, T=30, size=16, seed=0):
    """Episodes whose outcome is visible in the image (bright = success) and whose progress is in the state."""
    rng = np.random.default_rng(seed)
    eps = []
    for e in range(n_eps):
        success = bool(e % 2)
        imgs = np.full((T, 3, size, size, 3), 200 if success else 30, np.uint8)
        imgs = (imgs + rng.integers(0, 10, imgs.shape)).astype(np.uint8)
        state = np.zeros((T, 14), np.float32)
        state[:, 0] = np.linspace(0, 1, T)
        eps.append(episode_frames(imgs, np.arange(T), state, state, np.zeros(T, bool), "touch the red marker",
                                  success, max_len=T, c_fail=2 * T, chunk_len=4, episode=e))
    return concat(eps)


def test_expected_value_is_probability_weighted_bin_centres():
    model = ValueModel(ValueConfig(SMALL))
    logits = torch.full((2, rt.NUM_BINS), -1e9)
    logits[0, 0] = 0.0                      # all mass on v = -1
    logits[1, 100] = logits[1, 200] = 0.0   # half on -0.5, half on 0
    np.testing.assert_allclose(model.value(logits).numpy(), [-1.0, -0.25], atol=1e-6)


def test_value_loss_decreases_and_values_order_outcomes(tmp_path):
    frames = synthetic_frames()
    model, losses = train_value(frames, out=tmp_path / "v", steps=150, batch_size=32, lr=2e-3, progress=False,
                                device="cpu")
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert last < 0.5 * first, (first, last)
    v = predict_values(model, frames.images, frames.state, frames.prompts, frames.task_index)
    succ = frames.episode_success
    assert v[succ].mean() > v[~succ].mean() + 0.3          # failures sit near -1
    late = succ & (frames.frame_index > 25)
    early = succ & (frames.frame_index < 5)
    assert v[late].mean() > v[early].mean()                # value rises towards success
    # bundle round trip gives the same values
    again = load_value(tmp_path / "v")
    np.testing.assert_allclose(predict_values(again, frames.images, frames.state, frames.prompts,
                                              frames.task_index), v, atol=1e-5)


def test_fine_tune_from_checkpoint_and_bad_bundles(tmp_path):
    frames = synthetic_frames(n_eps=2, T=10)
    base = save_value(ValueModel(ValueConfig(SMALL)), tmp_path / "base")
    model, _ = train_value(frames, init=base, steps=2, batch_size=4, progress=False, device="cpu")
    assert model.cfg.backbone.width == SMALL.width
    with pytest.raises(ValueBundleError, match="not a value bundle"):
        load_value(tmp_path / "missing")
    cfg = json.loads((base / "config.json").read_text())
    cfg["backbone"]["width"] = 96
    (base / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueBundleError, match="do not match"):
        load_value(base)
    with pytest.raises(ValueError, match="views"):
        train_value(synthetic_frames(n_eps=1, T=5, size=32), init=save_value(
            ValueModel(ValueConfig(SMALL)), tmp_path / "b2"),
            steps=1, progress=False, device="cpu")


def test_new_value_model_fits_the_longest_prompt(tmp_path):
    """gym-aloha's prompts are longer than the default 64 text tokens: a new value model makes room for them."""
    long_prompt = "x" * 100  # BOS + "Task: " (6) + 100 + "\n" = 108 byte tokens -> rounded up to 112
    T = 6
    imgs = np.zeros((T, 3, 16, 16, 3), np.uint8)
    state = np.zeros((T, 14), np.float32)
    frames = concat([episode_frames(imgs, np.arange(T), state, state, np.zeros(T, bool), long_prompt, True,
                                    max_len=T, c_fail=T, chunk_len=4, episode=0)])
    model, _ = train_value(frames, out=tmp_path / "v", steps=2, batch_size=4, progress=False, device="cpu")
    assert model.cfg.backbone.max_text_tokens == 112
    assert load_value(tmp_path / "v").cfg.backbone.max_text_tokens == 112
