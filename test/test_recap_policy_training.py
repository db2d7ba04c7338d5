"""Advantage-conditioned policy training: indicator dropout rate, SFT, labels, bundle from a given checkpoint."""
import numpy as np
import pytest
import torch

from recap_ros.policy.normalize import MIN_SPAN, NORM_CLIP
from recap_ros.recap import train_policy as tp
from recap_ros.recap.data import concat, episode_frames
from recap_ros.recap.trainer import Batch

torch.set_num_threads(1)
SMALL = {"image_size": 16, "patch_size": 8, "vision_tokens": 4, "vision_depth": 1, "depth": 1, "width": 32,
         "head_dim": 16, "mlp_dim": 64, "expert_width": 32, "expert_mlp_dim": 64, "chunk_len": 8}


def frames(n_eps=4, T=12, size=16, chunk_len=8):
    eps = []
    rng = np.random.default_rng(0)
    for e in range(n_eps):
        q = rng.uniform(-0.5, 0.5, (T, 14)).astype(np.float32)
        iv = np.zeros(T, bool)
        iv[-3:] = e == 0
        eps.append(episode_frames(rng.integers(0, 255, (T, 3, size, size, 3), dtype=np.uint8), np.arange(T), q, q,
                                  iv, "touch the red marker with the left gripper", bool(e % 2), max_len=T,
                                  c_fail=2 * T, chunk_len=chunk_len, episode=e))
    return concat(eps)


def test_indicator_dropout_rate_is_0_3(monkeypatch):
    seen = []

    def fake_loss(model, images, state, prompts, indicators, actions, **kw):
        seen.extend(indicators)
        return torch.zeros((), requires_grad=True)

    monkeypatch.setattr(tp, "flow_matching_loss", fake_loss)
    f = frames()
    model = tp.Pi06Policy(tp.preset("tiny", **SMALL))
    stats = tp.compute_norm_stats(f.state, f.action_chunk)
    loss = tp._PolicyLoss(model, f, np.ones(len(f), bool), stats, tp.DROP_PROB)
    rng = np.random.default_rng(0)
    for _ in range(100):
        loss(Batch(rng.integers(0, len(f), 200), rng))
    n = len(seen)
    dropped = sum(x is None for x in seen) / n
    assert abs(dropped - 0.3) < 4 * np.sqrt(0.3 * 0.7 / n), dropped   # 4 sigma of the binomial
    assert set(seen) == {None, True}


def test_normalisation_bounded_for_degenerate_joints():
    x = np.zeros((100, 14))
    x[:, 0] = np.linspace(-1, 1, 100)                     # joint 0 moves, the others never do
    stats = tp.compute_norm_stats(x, x)
    y = np.zeros((2, 14))
    y[1, 5] = 1e-3                                        # a correction nudges a joint that never moved
    n = tp.normalized(stats["actions"], y, "quantile")
    assert n[1, 5] == pytest.approx(1e-3 / (MIN_SPAN / 2))  # scaled by the floored range, not by ~0
    y[1, 5] = 1.0                                         # far outside anything seen: clipped
    n = tp.normalized(stats["actions"], y, "quantile")
    assert np.abs(n).max() <= NORM_CLIP and n[1, 5] == NORM_CLIP
    np.testing.assert_allclose(n[:, 0], stats["actions"].normalize(y, "quantile")[:, 0])
    # the runtime path (Stats.normalize) is the same function: no train/serve skew
    np.testing.assert_array_equal(n, stats["actions"].normalize(y, "quantile").astype(np.float32))


def test_training_indicators_sft_labels_and_interventions():
    f = frames()
    assert tp.training_indicators(f, sft=True).all()
    with pytest.raises(ValueError, match="indicator labels"):
        tp.training_indicators(f, sft=False)
    lab = f.with_indicator(np.zeros(len(f), bool))
    ind = tp.training_indicators(lab, sft=False)
    np.testing.assert_array_equal(ind, f.intervention)      # human corrections always positive
    assert ind.any() and not ind.all()


def test_train_saves_loadable_bundle_and_finetunes_from_given_checkpoint(tmp_path):
    from recap_ros.policy import load_policy

    f = frames()
    model, losses = tp.train_policy(f, tmp_path / "sft", sft=True, steps=3, batch_size=4, progress=False,
                                    device="cpu", model_overrides=SMALL)
    assert len(losses) == 3 and all(np.isfinite(losses))
    pol = load_policy(str(tmp_path / "sft"), backend="torch")
    chunk = pol.infer(images=[np.zeros((40, 40, 3), np.uint8)] * 3, state=np.zeros(14), prompt="touch it")
    assert chunk.shape == (8, 14) and np.isfinite(chunk).all()
    lab = f.with_indicator(np.arange(len(f)) % 2 == 0)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    tuned, _ = tp.train_policy(lab, tmp_path / "it1", init=tmp_path / "sft", steps=2, batch_size=4, progress=False,
                               device="cpu")
    # starts from the given checkpoint: same architecture, same norm stats, weights moved
    assert tuned.config == model.config
    assert any(not torch.equal(base[k], v) for k, v in tuned.state_dict().items())
    with pytest.raises(ValueError, match="policy takes"):
        tp.train_policy(frames(size=24), None, init=tmp_path / "sft", steps=1, progress=False, device="cpu")


def test_delta_action_space_trains_on_motion_and_serves_absolute_positions(tmp_path):
    """delta_joint_positions (openpi DeltaActions): the model learns chunk − state (norm stats of the motion),
    the bundle says so, fine-tuning keeps it, and the runtime returns absolute positions (state added back)."""
    from recap_ros.policy import load_policy
    from recap_ros.policy.bundle import open_bundle
    from recap_ros.policy.errors import PolicyError

    f = frames()
    np.testing.assert_array_equal(tp.action_targets(f, "delta_joint_positions"),
                                  f.action_chunk - f.state[:, None, :])
    assert tp.action_targets(f, "absolute_joint_positions") is f.action_chunk
    tp.train_policy(f, tmp_path / "d", sft=True, steps=2, batch_size=4, progress=False, device="cpu",
                    model_overrides=SMALL, action_space="delta_joint_positions")
    b = open_bundle(tmp_path / "d")
    assert b.action_space == "delta_joint_positions"
    motion = tp.action_targets(f, "delta_joint_positions").reshape(-1, 14)
    np.testing.assert_allclose(b.norm_stats["actions"].mean, motion.mean(0), atol=1e-5)
    tp.train_policy(f, tmp_path / "d2", init=tmp_path / "d", sft=True, steps=1, batch_size=4, progress=False,
                    device="cpu")
    assert open_bundle(tmp_path / "d2").action_space == "delta_joint_positions"
    pol = load_policy(str(tmp_path / "d"), backend="torch")
    assert pol.info.action_space == "delta_joint_positions"
    views = [np.zeros((40, 40, 3), np.uint8)] * 3
    q = np.linspace(-0.4, 0.4, 14)
    a0, a1 = (pol.infer(views, state, "touch it", seed=1) for state in (np.zeros(14), q))
    # the same motion would be added to a different state: only the state-dependence of the net differs
    raw = pol.backend.run(pol.prepare_inputs(views, q, "touch it", 1, None), pol.config.denoise_steps, None)[0]
    np.testing.assert_allclose(a1, b.norm_stats["actions"].unnormalize(raw.astype(np.float64), "quantile") + q,
                               atol=1e-6)
    assert not np.allclose(a0, a1)
    with pytest.raises(PolicyError, match="train_policy: action_space 'joint_velocities' is not one of"):
        tp.train_policy(f, None, steps=1, progress=False, device="cpu", action_space="joint_velocities")


def test_goals_travel_with_frames_and_are_z_scored(tmp_path, monkeypatch):
    """Frames' goal column survives concat and the .npz cache (and is dropped when a part lacks it); the goal head
    learns z-scored goals (a constant dimension becomes 0); a head of another size is a clear error; fine-tuning
    a bundle encodes prompts with the bundle's own tokenizer."""
    from dataclasses import replace

    from recap_ros.recap.data import load_frames_npz, save_frames

    eps = [replace(frames(n_eps=1), goal=np.tile([0.1 * e, -0.2, 0.01], (12, 1)).astype(np.float32)) for e in range(3)]
    f = concat(eps)
    assert f.goal.shape == (36, 3) and concat([f, frames(n_eps=1)]).goal is None
    save_frames(f, tmp_path / "f.npz")
    np.testing.assert_array_equal(load_frames_npz(tmp_path / "f.npz").goal, f.goal)
    with pytest.raises(ValueError, match="goal has 2 rows"):
        replace(f, goal=f.goal[:2])
    model = tp.Pi06Policy(tp.preset("tiny", **SMALL, goal_dim=3))
    z = tp.goal_targets(model, f)
    np.testing.assert_allclose(z.mean(0), 0, atol=1e-6)
    np.testing.assert_allclose(z.std(0), [1, 0, 0], atol=1e-6)
    assert tp.goal_targets(tp.Pi06Policy(tp.preset("tiny", **SMALL)), f) is None
    with pytest.raises(ValueError, match="goal_dim"):
        tp.goal_targets(tp.Pi06Policy(tp.preset("tiny", **SMALL, goal_dim=2)), f)
    _, losses = tp.train_policy(f, tmp_path / "g", sft=True, steps=2, batch_size=4, progress=False, device="cpu",
                                model_overrides=dict(SMALL, goal_dim=3), tokenizer="bpe")
    assert np.isfinite(losses).all()
    kinds = []
    real = tp.flow_matching_loss

    def spy(*a, **kw):
        kinds.append((kw["prompt_encoder"].tok.kind, kw["goal"] is not None))
        return real(*a, **kw)

    monkeypatch.setattr(tp, "flow_matching_loss", spy)
    tp.train_policy(f, None, init=tmp_path / "g", sft=True, steps=1, batch_size=4, progress=False, device="cpu")
    assert kinds == [("sentencepiece", True)] * 2  # the trainer's unused-parameter probe, then the one step
    with pytest.raises(ValueError, match="tokenizer 'bpe' is for a new model"):
        tp.train_policy(f, None, init=tmp_path / "g", sft=True, steps=1, progress=False, device="cpu",
                        tokenizer="bpe")
