"""RECAP labels end to end on an export of two tasks with different maximum lengths M (successes, failures,
human corrections): every consumer uses each episode's stored M and C_fail; advantages, per-task thresholds and
indicators equal values written out by hand from the rewards and a fixed V; the README flow
recap-export -> recap-train-value -> recap-label -> recap-train-policy runs without flags; a --max-len that is not
the stored M is refused."""
import io
import json
import shutil
from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from recap_ros.dataset.reader import RecapDataset
from recap_ros.export import cli as export_cli
from recap_ros.export.synth import SynthEpisode, write_episode_bag
from recap_ros.recap import advantage, cli
from recap_ros.recap.data import concat, episode_frames, load_frames_npz, save_frames
from recap_ros.recap.dataset_io import load_frames
from recap_ros.recap.value import ValueConfig, ValueModel, default_backbone, save_value
from recap_ros.station import load_station

torch.set_num_threads(1)
NS = 1_000_000_000
TASK_A, TASK_B = "touch the red marker with the left gripper", "touch the blue marker with the right gripper"
M = {TASK_A: 90, TASK_B: 60}           # --task-max-len at export; C_fail defaults to M
EPISODES = [  # (episode, task, duration s, outcome, human corrections (t0, t1) s)
    (0, TASK_A, 1.2, "success", []),
    (1, TASK_A, 1.0, "failure", []),
    (2, TASK_A, 1.4, "success", [(0.3, 0.7)]),
    (3, TASK_A, 0.8, "failure", [(0.2, 0.5)]),
    (4, TASK_B, 0.8, "success", []),
    (5, TASK_B, 1.0, "failure", [(0.4, 0.6)]),
    (6, TASK_B, 0.6, "success", []),
    (7, TASK_B, 1.3, "failure", []),
]
SMALL_POLICY = {"image_size": 16, "patch_size": 8, "vision_tokens": 4, "vision_depth": 1, "depth": 1, "width": 32,
                "head_dim": 16, "mlp_dim": 64, "expert_width": 32, "expert_mlp_dim": 64, "max_text_tokens": 64}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    d = tmp_path_factory.mktemp("e2e")
    station = load_station("sim")
    for ep, task, dur, outcome, corr in EPISODES:
        write_episode_bag(d / "bags", station, SynthEpisode(duration_s=dur, outcome=outcome, interventions=corr,
                                                            prompt=task, episode=ep,
                                                            start_ns=1_700_000_000 * NS + ep * 100 * NS))
    assert export_cli.main([str(d / "bags"), "--out", str(d / "ds"), "--task-max-len", f"{TASK_A}=90",
                            "--task-max-len", f"{TASK_B}=60", "--quiet"]) == 0
    return d / "ds"


def spec_of(ds: RecapDataset, e: int):
    """The EPISODES row a dataset episode was exported from (bag names end in _epNNNN)."""
    bag = ds.episode_meta(e)["recap/source_bag"]
    return next(row for row in EPISODES if bag.endswith(f"_ep{row[0]:04d}"))


def hand_advantages(dataset, value_of, n=50):
    """Per dataset episode, written out step by step from the rewards (not with recap_ros functions):
    r_t = -1, the last step 0 (success) or -M (failure, C_fail = M); both advantages in units of the task's M.
    ``value_of(e, f)``: the fixed V of frame f of dataset episode e (tick first_tick + f of the bag)."""
    ds = RecapDataset(dataset)
    out = []
    for e in range(ds.num_episodes):
        _, task, dur, outcome, _ = spec_of(ds, e)
        meta = ds.episode_meta(e)
        T, first, m = meta["recap/episode_ticks"], meta["recap/first_tick"], M[task]
        assert T == round(dur * 50) + 1 and first + len(ds.episode(e)["index"]) == T  # one segment to the end
        r = [-1.0] * (T - 1) + [0.0 if outcome == "success" else -float(m)]
        V = {t: value_of(e, t - first) for t in range(first, T)}
        finetune, pretrain = [], []
        for t in range(first, T):
            if t + n <= T - 1:
                finetune.append(sum(r[t:t + n]) / m + V[t + n] - V[t])
            else:                                  # the episode ends within N steps: V after the end is 0
                finetune.append(sum(r[t:]) / m - V[t])
            pretrain.append(sum(r[t:]) / m - V[t])  # the paper's form: whole remaining episode, not clipped
        iv = ds.episode(e)["intervention"].reshape(-1).astype(bool)
        out.append((task, np.array(finetune), np.array(pretrain), iv))
    return out


def hand_labels(rows, mode):
    """eps_l = the (1 - fraction) quantile of the task's autonomous advantages; I_t = A > eps_l or a correction."""
    frac = {"finetune": 0.4, "pretrain": 0.3}[mode]
    col = 1 if mode == "finetune" else 2
    eps = {}
    for task in (TASK_A, TASK_B):
        auto = np.concatenate([row[col][~row[3]] for row in rows if row[0] == task])
        eps[task] = float(np.quantile(auto, 1.0 - frac))
    A = np.concatenate([row[col] for row in rows])
    ind = np.concatenate([(row[col] > eps[row[0]]) | row[3] for row in rows])
    return A, eps, ind


def test_export_stores_each_tasks_max_length_and_frames_keep_it(dataset):
    frames = load_frames(dataset, 16, progress=False)
    assert frames.normalisation() == {TASK_A: {"max_len": [90], "c_fail": [90.0]},
                                      TASK_B: {"max_len": [60], "c_fail": [60.0]}}
    # failures are in the data, every failure frame's normalised return is -1 (C_fail = M): nothing to infer
    assert (~frames.episode_success).sum() > 0 and (frames.return_normalized[~frames.episode_success] == -1).all()
    # a success of task B, 31 ticks from tick 1 (the first is trimmed): return -29 steps -> -29 / 60 (task A's M
    # would give -29 / 90)
    ds = RecapDataset(dataset)
    e6 = next(e for e in range(ds.num_episodes) if spec_of(ds, e)[0] == 6)
    first = np.flatnonzero(frames.episode_index == e6)[0]
    assert (ds.episode_meta(e6)["recap/episode_ticks"], ds.episode_meta(e6)["recap/first_tick"]) == (31, 1)
    assert frames.ret[first] == -29 and frames.return_normalized[first] == pytest.approx(-29 / 60)


@pytest.mark.parametrize("mode", ["finetune", "pretrain"])
def test_labels_equal_hand_computation_with_a_fixed_value(dataset, mode):
    value_of = lambda e, t: -0.9 + 0.6 * ((7 * e + 3 * t) % 11) / 10  # noqa: E731  any fixed V in [-0.9, -0.3]
    rows = hand_advantages(dataset, value_of)
    A, eps, ind = hand_labels(rows, mode)
    frames = load_frames(dataset, 16, progress=False)
    v = np.array([value_of(e, t) for e, t in zip(frames.episode_index, frames.frame_index)])
    lab = advantage.label(v, frames.episode_index, frames.task_index, frames.intervention, frames.max_len, mode,
                          ret=frames.ret, frame_index=frames.frame_index)
    np.testing.assert_allclose(lab.advantage, A, rtol=0, atol=1e-9)
    assert {frames.prompts[k]: t for k, t in lab.thresholds.items()} == pytest.approx(eps, abs=1e-9)
    np.testing.assert_array_equal(lab.indicator, ind)
    assert ind[frames.intervention].all() and frames.intervention.sum() > 0
    # the failures' whole-episode advantage goes below -1 - V: the sum is not clipped
    if mode == "pretrain":
        assert (A[~frames.episode_success] < -1.0 - v[~frames.episode_success] + 1e-12).all()
        # ep 7 (task B, ticks 0..65, failure), first exported frame = tick 1: (64 steps + C_fail 60) / M 60
        assert (A + v)[~frames.episode_success].min() == pytest.approx(-(64 + 60) / 60)


def constant_value_bundle(path, size=16):
    """A value model whose every prediction is V = -0.5 (all probability on bin 100 of 201)."""
    model = ValueModel(ValueConfig(default_backbone(image_size=size)))
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.fill_(-1e4)
        model.head.bias[100] = 0.0
    return save_value(model, path)


def test_recap_label_cli_matches_hand_labels_and_refuses_another_max_len(dataset, tmp_path, capsys):
    value = constant_value_bundle(tmp_path / "v")
    rows = hand_advantages(dataset, lambda e, t: -0.5)
    for mode in ("finetune", "pretrain"):
        out = tmp_path / f"{mode}.parquet"
        assert cli.label_main([str(dataset), "--value", str(value), "--mode", mode, "--out", str(out),
                               "--threads", "1"]) == 0
        report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        A, eps, ind = hand_labels(rows, mode)
        t = pq.read_table(str(out))
        np.testing.assert_allclose(t["advantage"].to_numpy(), A, rtol=0, atol=1e-9)
        np.testing.assert_array_equal(t["indicator"].to_numpy(zero_copy_only=False), ind)
        assert report["thresholds"] == pytest.approx({k: round(x, 5) for k, x in eps.items()}, abs=1e-5)
        assert report["normalisation"][TASK_B] == {"max_len": [60], "c_fail": [60.0]}
    # --max-len that is not the stored M: refused in one line naming both values
    for given, stored in ((1000, 90), (90, 60)):
        assert cli.label_main([str(dataset), "--value", str(value), "--max-len", str(given),
                               "--out", str(tmp_path / "x.parquet")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"--max-len {given} differs from the max length {stored}" in err[0], err
    assert not (tmp_path / "x.parquet").exists()


def test_readme_flow_without_flags(dataset, tmp_path, capsys):
    """export (fixture) -> train value -> label -> train policy; only outputs, sizes and step counts given."""
    assert cli.train_value_main([str(dataset), "--out", str(tmp_path / "v"), "--image-size", "16", "--steps", "4",
                                 "--device", "cpu", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "Spearman rho(V, R_t/M) on held-out successes" in out and "on held-out failures" in out
    assert "calibration of V" in out and f"task '{TASK_A}': max length M [90], C_fail [90.0]" in out
    readme = (tmp_path / "v" / "README.md").read_text()
    assert "Spearman rho(V, R_t/M) on held-out failures" in readme and "C_fail >= M for every episode" in readme
    assert cli.label_main([str(dataset), "--value", str(tmp_path / "v"), "--out", str(tmp_path / "l.parquet"),
                           "--threads", "1"]) == 0
    assert cli.train_policy_main([str(dataset), "--sft", "--model", json.dumps(SMALL_POLICY), "--steps", "1",
                                  "--device", "cpu", "--threads", "1", "--out", str(tmp_path / "sft")]) == 0
    assert cli.train_policy_main([str(dataset), "--init", str(tmp_path / "sft"), "--labels",
                                  str(tmp_path / "l.parquet"), "--steps", "1", "--device", "cpu", "--threads", "1",
                                  "--out", str(tmp_path / "it1")]) == 0
    assert (tmp_path / "it1" / "model.safetensors").is_file()


def test_station_default_export_with_a_failure_trains_and_labels(tmp_path, capsys):
    """The real sim-station path: bags exported with no normalisation flag (M from the station: episode_timeout_s
    12.0 x 50 Hz = 600 steps, C_fail = M) hold a failure; recap-train-value and recap-label run on it as they are
    (they used to stop on any export with a failed episode)."""
    station = load_station("sim")
    for ep, outcome in ((0, "success"), (1, "failure")):
        write_episode_bag(tmp_path / "bags", station, SynthEpisode(duration_s=1.2, outcome=outcome, prompt=TASK_A,
                                                                   episode=ep, start_ns=1_700_000_000 * NS + ep * NS))
    assert export_cli.main([str(tmp_path / "bags"), "--out", str(tmp_path / "ds"), "--quiet"]) == 0
    ds = RecapDataset(tmp_path / "ds")
    fail = next(e for e in range(ds.num_episodes) if not ds.episode(e)["episode_success"][0])
    assert ds.episode_meta(fail)["recap/max_len"] == 600 and ds.episode_meta(fail)["recap/c_fail"] == 600.0
    # every failure frame: R_t = -(T - 1 - t) - 600 <= -600, divided by M = 600 and clipped: -1
    np.testing.assert_array_equal(ds.episode(fail)["return_normalized"], -1.0)
    assert cli.train_value_main([str(tmp_path / "ds"), "--out", str(tmp_path / "v"), "--image-size", "16",
                                 "--steps", "2", "--holdout", "0", "--device", "cpu", "--threads", "1"]) == 0
    assert cli.label_main([str(tmp_path / "ds"), "--value", str(tmp_path / "v"), "--out", str(tmp_path / "l.parquet"),
                           "--threads", "1"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["normalisation"] == {TASK_A: {"max_len": [600], "c_fail": [600.0]}}
    assert pq.read_table(str(tmp_path / "l.parquet")).num_rows == ds.num_frames


def test_export_refuses_another_normalisation_for_a_task_already_in_the_dataset(dataset, tmp_path):
    ds = tmp_path / "ds"
    shutil.copytree(dataset, ds)
    station = load_station("sim")
    bags = tmp_path / "bags"
    for ep in (20, 21):
        write_episode_bag(bags / str(ep), station, SynthEpisode(duration_s=0.6, outcome="failure", prompt=TASK_B,
                                                                episode=ep, start_ns=1_800_000_000 * NS + ep * NS))
    code, results = export_cli.run(export_cli.build_parser().parse_args(
        [str(bags / "20"), "--out", str(ds), "--max-len", "100", "--quiet"]), out=io.StringIO())
    assert code == 1 and results[0].status == "failed"
    assert f"the dataset normalises task '{TASK_B}' by max length 60, C_fail 60; this export would use 100, 100" \
        in results[0].message
    assert export_cli.main([str(bags / "21"), "--out", str(ds), "--task-max-len", f"{TASK_B}=60", "--quiet"]) == 0
    assert RecapDataset(ds).num_episodes == len(EPISODES) + 1


def two_task_frames():
    """Two one-episode frame sets of different tasks and lengths: 4 steps with M = 8 (success), 3 with M = 4
    (failure, C_fail = 6)."""
    def one(T, prompt, success, m, c_fail):
        return episode_frames(np.zeros((T, 3, 8, 8, 3), np.uint8), np.arange(T), np.zeros((T, 14)),
                              np.zeros((T, 14)), np.zeros(T, bool), prompt, success, m, c_fail, chunk_len=2)
    return one(4, TASK_A, True, 8, 8), one(3, TASK_B, False, 4, 6)


def test_concat_keeps_each_episodes_normalisation_and_round_trips(tmp_path):
    a, b = two_task_frames()
    f = concat([a, b])
    np.testing.assert_array_equal(f.max_len, [8, 8, 8, 8, 4, 4, 4])
    np.testing.assert_array_equal(f.c_fail, [8, 8, 8, 8, 6, 6, 6])
    # returns -3 -2 -1 0 | -8 -7 -6 (C_fail 6 on the last step), each divided by its own M, clipped
    np.testing.assert_allclose(f.return_normalized, [-3 / 8, -2 / 8, -1 / 8, 0, -1, -1, -1])
    assert f.normalisation() == {TASK_A: {"max_len": [8], "c_fail": [8.0]}, TASK_B: {"max_len": [4], "c_fail": [6.0]}}
    save_frames(f, tmp_path / "f.npz")
    g = load_frames_npz(tmp_path / "f.npz")
    np.testing.assert_array_equal(g.max_len, f.max_len)
    np.testing.assert_array_equal(g.c_fail, f.c_fail)
    assert load_frames(tmp_path / "f.npz", 8, max_len=None).num_episodes == 2
    with pytest.raises(ValueError, match=r"--max-len 8 differs from the max length 4 that .*f.npz stores for "
                                         r"episode 1 \('touch the blue"):
        load_frames(tmp_path / "f.npz", 8, max_len=8)


def test_frames_refuse_returns_normalised_by_another_length():
    a, _ = two_task_frames()
    with pytest.raises(ValueError, match=r"episode 0 frame 0: return_normalized -0.375 is not clip\(return -3 / "
                                         r"max_len 6, -1, 0\) \(3 frames disagree\)"):  # the last, 0, agrees
        replace(a, max_len=np.full(4, 6))
