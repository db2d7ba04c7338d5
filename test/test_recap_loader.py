"""Images decoded while training (recap_ros.recap.loader): random access to the dataset's videos gives the pixels of
a plain sequential decode, and value training on them, with or without DataLoader workers, is bit-identical to
training on images decoded up front."""
import io

import av
import cv2
import numpy as np
import pytest
import torch

from recap_ros.dataset.reader import RecapDataset
from recap_ros.export import cli as export_cli
from recap_ros.export.synth import SynthEpisode, write_episode_bag
from recap_ros.recap import loader
from recap_ros.recap.dataset_io import IMAGE_KEY, ROLES, load_frames
from recap_ros.recap.train_value import train_value
from recap_ros.station import load_station

torch.set_num_threads(1)
NS = 1_000_000_000
SIZE = 32


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    d = tmp_path_factory.mktemp("loader")
    station = load_station("sim")
    for ep in range(2):
        write_episode_bag(d / "bags", station, SynthEpisode(duration_s=2.0, episode=ep, textured=True,
                                                            outcome="success" if ep else "failure",
                                                            start_ns=1_700_000_000 * NS + ep * 100 * NS))
    code, _ = export_cli.run(export_cli.build_parser().parse_args([str(d / "bags"), "--out", str(d / "ds"),
                                                                   "--quiet"]), out=io.StringIO())
    assert code == 0
    return d / "ds"


def sequential_decode(root) -> dict[int, np.ndarray]:
    """Per episode: (T, n_cams, S, S, 3), every frame of every video read front to back with PyAV (no seeking) at
    its stored size, then shrunk by OpenCV's area interpolation (the policy runtime's stretch resize)."""
    ds = RecapDataset(root)
    out = {}
    for ep in range(ds.num_episodes):
        meta = ds.episode_meta(ep)
        lo, hi = ds.episode_range(ep)
        views = []
        for role in ROLES:
            key = IMAGE_KEY.format(role=role)
            path = root / ds.info["video_path"].format(video_key=key, chunk_index=meta[f"videos/{key}/chunk_index"],
                                                        file_index=meta[f"videos/{key}/file_index"])
            first = int(round(meta[f"videos/{key}/from_timestamp"] * ds.fps))
            with av.open(str(path)) as c:
                frames = [cv2.resize(f.to_ndarray(format="rgb24"), (SIZE, SIZE), interpolation=cv2.INTER_AREA)
                          for f in c.decode(video=0)]
            views.append(np.stack(frames[first:first + hi - lo]))
        out[ep] = np.stack(views, 1)
    return out


def test_random_access_gives_the_pixels_of_a_sequential_decode(dataset):
    ref = sequential_decode(dataset)
    lazy = load_frames(dataset, SIZE, decode="lazy", progress=False)
    upfront = load_frames(dataset, SIZE, progress=False)
    want = np.concatenate([ref[e] for e in sorted(ref)])
    assert isinstance(lazy.images, loader.DatasetImages) and lazy.images.shape == want.shape
    np.testing.assert_array_equal(upfront.images, want)
    idx = np.random.default_rng(0).integers(0, len(want), 40)  # unsorted, repeats, both episodes
    idx[:2] = idx[2]
    np.testing.assert_array_equal(lazy.images[idx], want[idx])
    np.testing.assert_array_equal(lazy.images[5:9], want[5:9])
    held = lazy.subset(lazy.episode_index == 1)  # a mask selects rows without decoding
    assert isinstance(held.images, loader.DatasetImages)
    np.testing.assert_array_equal(held.images[np.arange(len(held))], ref[1])


@pytest.mark.timeout(120)
def test_training_on_decoded_batches_is_bit_identical(dataset):
    steps, batch = 4, 8
    upfront = load_frames(dataset, SIZE, progress=False)
    lazy = load_frames(dataset, SIZE, decode="lazy", progress=False)
    model, losses = train_value(upfront, steps=steps, batch_size=batch, warmup=1, progress=False, device="cpu")
    for workers in (0, 1):
        served = loader.prefetched(lazy, steps, batch, 0, workers)
        again, curve = train_value(served, steps=steps, batch_size=batch, warmup=1, progress=False, device="cpu")
        assert curve == losses, workers
        for (k, a), b in zip(model.state_dict().items(), again.state_dict().values()):
            assert torch.equal(a, b), (workers, k)
        # every training step was served from the plan; the one request off it is the trainer's unused-parameter
        # probe (two samples before the first step)
        assert served.images.served == steps and served.images.misses == 1


def test_a_run_resumed_mid_plan_is_served_from_there(dataset):
    lazy = load_frames(dataset, SIZE, decode="lazy", progress=False)
    plan = loader.trainer_plan(len(lazy), 6, 4, seed=0)
    served = loader.Prefetched(lazy.images, plan, workers=0)
    np.testing.assert_array_equal(served[plan[3]], lazy.images.decode(plan[3]))  # resumed at step 3
    np.testing.assert_array_equal(served[plan[4]], lazy.images.decode(plan[4]))
    np.testing.assert_array_equal(served[np.array([0, 0])], lazy.images.decode([0, 0]))  # off the plan
    assert (served.served, served.misses) == (2, 1)


def test_a_run_resumed_with_another_global_batch_is_served_from_the_plan(dataset, tmp_path, monkeypatch):
    """A run stopped after step 3 with 8 samples a step and resumed with 4 (as when resumed on half the ranks)
    continues the sample stream at position 24, not at 3 x 4: the loader's plan starts there too, so every resumed
    step is served from it (the one miss is the trainer's unused-parameter probe)."""
    from recap_ros.recap import train_value as tv
    from recap_ros.recap.trainer import RunDir

    lazy = load_frames(dataset, SIZE, decode="lazy", progress=False)
    real_forward, seen = tv._ValueLoss.forward, []

    def forward(self, batch):
        if batch.step == 4 and len(batch.samples) == 8:
            raise KeyboardInterrupt
        if len(batch.samples) > 2:  # (not the unused-parameter probe)
            seen.append((batch.step, batch.samples.copy()))
        return real_forward(self, batch)

    monkeypatch.setattr(tv._ValueLoss, "forward", forward)
    with pytest.raises(KeyboardInterrupt):
        train_value(lazy, steps=6, batch_size=8, warmup=1, progress=False, device="cpu", workers=0,
                    backbone_overrides={"depth": 1}, run=RunDir(tmp_path / "run", checkpoint_every=3))
    first_leg = dict(seen)
    made = []
    real_prefetched = loader.prefetched
    monkeypatch.setattr(loader, "prefetched", lambda *a, **k: made.append(real_prefetched(*a, **k)) or made[-1])
    seen.clear()
    train_value(lazy, steps=6, batch_size=4, warmup=1, progress=False, device="cpu", workers=0,
                backbone_overrides={"depth": 1}, run=RunDir(tmp_path / "run", checkpoint_every=3, resume=True))
    resumed = dict(seen)
    assert sorted(resumed) == [3, 4, 5]
    # the stream: epoch permutations back to back; after 3 steps of 8 samples, positions 24, 25, ... (by hand)
    stream = np.concatenate([first_leg[s] for s in (0, 1, 2)])
    assert len(stream) == 24 and len(set(stream.tolist())) == 24  # 24 distinct samples of this epoch
    assert not set(np.concatenate(list(resumed.values())).tolist()) & set(stream.tolist())  # none seen again
    images = made[0].images
    assert (images.served, images.misses) == (3, 1)


def test_policy_training_on_decoded_batches_is_bit_identical(dataset):
    """recap-train-policy --workers N: the same losses and weights as with images decoded up front."""
    from recap_ros.recap.train_policy import train_policy

    overrides = {"image_size": SIZE}
    steps, batch = 3, 4
    upfront = load_frames(dataset, SIZE, 50, progress=False)
    lazy = load_frames(dataset, SIZE, 50, decode="lazy", progress=False)
    model, losses = train_policy(upfront, None, sft=True, steps=steps, batch_size=batch, warmup=1, progress=False,
                                 device="cpu", model_overrides=overrides)
    again, curve = train_policy(lazy, None, sft=True, steps=steps, batch_size=batch, warmup=1, progress=False,
                                device="cpu", model_overrides=overrides, workers=1)
    assert curve == losses
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k


class _OneVideo:
    """A stand-in dataset whose video holds 8 x 16 frames of one colour."""

    def frames(self, ep, key, ticks):
        return np.tile(np.array([10, 20, 30], np.uint8), (len(ticks), 8, 16, 1))


def test_views_are_shaped_as_the_model_is_served():
    """Training views take the model's image_resize: a 16 x 8 frame letterboxed into 8 x 8 is 4 rows of colour
    between 2 black rows above and below (by hand); stretched it is all colour."""
    box = loader.decode_views(_OneVideo(), 0, "k", [0, 1], 8, "letterbox")
    assert box.shape == (2, 8, 8, 3)
    assert (box[:, :2] == 0).all() and (box[:, 6:] == 0).all()
    assert (box[:, 2:6] == [10, 20, 30]).all()
    stretched = loader.decode_views(_OneVideo(), 0, "k", [0], 8, "resize")
    assert (stretched == [10, 20, 30]).all()
    assert loader.decode_views(_OneVideo(), 0, "k", [], 8, "resize").shape == (0, 8, 8, 3)
