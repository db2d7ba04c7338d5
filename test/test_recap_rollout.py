"""ROS-free sim roll-outs: scripted demos are recorded with labels; the corrector's takeover is an intervention."""
import numpy as np
import pytest

from recap_ros.recap import returns as rt
from recap_ros.recap.rollout import Roller, rollouts
from recap_ros.station import load_station


@pytest.fixture(scope="module")
def station():
    return load_station("sim")


def test_scripted_demo_recorded_with_labels(station):
    roller = Roller(station, image_size=16)
    s = rollouts(roller, [1_000_000], record=True, frame_stride=10, scripted=True, progress=False)
    ep = s.episodes[0]
    f = ep.frames
    assert ep.success and ep.interventions == 0 and s.success_rate == 1.0
    assert f.images.shape[1:] == (3, 16, 16, 3) and f.action_chunk.shape[1:] == (50, 14)
    assert f.frame_index[0] == 0 and f.frame_index[-1] == ep.steps - 1
    lab = rt.episode_labels(ep.steps, True, roller.max_len, roller.c_fail)
    np.testing.assert_array_equal(f.return_bin, lab["return_bin"][f.frame_index])
    assert s.throughput_per_hour == pytest.approx(3600 / (ep.steps * 0.02 + station.sim.reset_pause_s))


def test_random_policy_gets_corrected(station, tmp_path):
    import torch

    from recap_ros.policy import load_policy
    from recap_ros.policy.bundle import random_bundle

    torch.set_num_threads(1)
    random_bundle("tiny", tmp_path / "rand", max_text_tokens=64)
    policy = load_policy(str(tmp_path / "rand"), backend="torch")
    roller = Roller(station, image_size=16, policy=policy, corrector=True)
    ep = roller.run(1_000_001, record=True, frame_stride=25)
    assert ep.interventions > 0
    f = ep.frames
    assert f.intervention.any() and not f.intervention[0]
    # once the corrector drives, it drives to the end of the episode
    first = np.argmax(f.intervention)
    assert f.intervention[first:].all()


def test_policy_views_between_frames_are_not_recorded(station, tmp_path):
    """A frame stride that does not divide the re-plan period (10 vs 25): the views rendered for the policy's
    queries at ticks 25, 75, ... are not training frames; the frames are ticks 0, 10, 20, ... and the last."""
    import torch

    from recap_ros.policy import load_policy
    from recap_ros.policy.bundle import random_bundle

    torch.set_num_threads(1)
    random_bundle("tiny", tmp_path / "rand", max_text_tokens=64)
    policy = load_policy(str(tmp_path / "rand"), backend="torch")
    ep = Roller(station, image_size=16, policy=policy).run(1_000_002, record=True, frame_stride=10)
    T = ep.steps
    expected = sorted(set(range(0, T, 10)) | {T - 1})
    assert ep.frames.frame_index.tolist() == expected and len(ep.frames.images) == len(expected)
