"""The committed sim station policy fits the data pipeline it ships with.

Guards against train/serve skew: a change to normalisation, image preprocessing, prompt encoding or the frame
layout made after the bundle was trained shows up here as a flow-matching loss far above the one the bundle
reached in training (the bundled policy trained to ~0.01 on demonstrations; a random or skewed one is ~0.9).
"""
import numpy as np
import torch

from recap_ros.policy.bundle import open_bundle
from recap_ros.recap.data import concat
from recap_ros.recap.rollout import Roller, rollouts
from recap_ros.recap.train_policy import _PolicyLoss, training_indicators
from recap_ros.recap.trainer import Batch
from recap_ros.station import load_station

FRESH_SEED = 7_000_000  # neither the bundle's demonstrations (1,000,000+) nor the held-out evaluation (5,000,000+)


def test_sim_policy_fits_fresh_expert_demonstrations():
    st = load_station("sim")
    bundle = open_bundle(st.policy.bundle)
    model = bundle.load_model().eval()
    demos = rollouts(Roller(st, model.config.image_size), range(FRESH_SEED, FRESH_SEED + 4), record=True,
                     frame_stride=3, scripted=True, progress=False)
    frames = concat([e.frames for e in demos.episodes])
    loss_of = _PolicyLoss(model, frames, training_indicators(frames, sft=True), bundle.norm_stats, drop_prob=0.0,
                          action_space=bundle.action_space, goal_weight=0.0, tokenizer=bundle.tokenizer)
    rng = np.random.default_rng(0)
    with torch.no_grad():
        loss = float(np.mean([float(loss_of(Batch(rng.integers(0, len(frames), 64), rng))) for _ in range(8)]))
    assert loss < 0.1, (f"bundle '{st.policy.bundle}' has flow-matching loss {loss:.3f} on fresh expert "
                        f"demonstrations: it no longer matches the training/runtime data pipeline (retrain it)")
