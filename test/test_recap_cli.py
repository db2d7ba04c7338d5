"""recap-train-value -> recap-label -> recap-train-policy on a small frames file, plus the sim demos CLI."""
import json

import pyarrow.parquet as pq
import pytest

from recap_ros.recap import cli
from recap_ros.recap.data import load_frames_npz
from recap_ros.sim.cli import demos_main

SMALL = {"image_size": 16, "patch_size": 8, "vision_tokens": 4, "vision_depth": 1, "depth": 1, "width": 32,
         "head_dim": 16, "mlp_dim": 64, "expert_width": 32, "expert_mlp_dim": 64, "max_text_tokens": 64}


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    path = tmp_path_factory.mktemp("demos") / "demos.npz"
    assert demos_main(["--episodes", "2", "--image-size", "16", "--stride", "10", "--out", str(path)]) == 0
    return path


def test_demos_file(demos):
    f = load_frames_npz(demos)
    assert f.num_episodes == 2 and f.episode_success.all() and not f.intervention.any()
    assert f.images.shape[1:] == (3, 16, 16, 3)
    # every frame carries its task's goal: the named marker's top (for a goal head's auxiliary loss)
    from recap_ros.sim.kinematics import Bimanual
    from recap_ros.sim.task import sample_task
    from recap_ros.station import load_station

    st = load_station("sim")
    first = sample_task(1_000_000, Bimanual(st.robot, st.file))
    assert f.goal.shape == (len(f), 3)
    assert (f.goal[f.episode_index == 0] == first.target.astype("float32")).all()


def test_bpe_film_goal_policy_and_fine_tune(demos, tmp_path, capsys):
    """A new model with a BPE tokenizer of the data's prompts, FiLM-conditioned keypoints and a goal head: the
    bundle carries the tokenizer, fine-tuning keeps it (and refuses a new one)."""
    from recap_ros.policy.bundle import open_bundle

    model = dict(SMALL, vision_encoder="keypoints", vision_film=True, goal_dim=3, max_text_tokens=24,
                 max_advantage_tokens=8)
    assert cli.train_policy_main([str(demos), "--sft", "--model", json.dumps(model), "--tokenizer", "bpe",
                                  "--steps", "2", "--device", "cpu", "--out", str(tmp_path / "bpe")]) == 0
    b = open_bundle(tmp_path / "bpe")
    assert b.tokenizer.kind == "sentencepiece" and (tmp_path / "bpe" / "tokenizer.model").is_file()
    assert b.config.vocab_size == b.tokenizer.vocab_size and b.config.goal_dim == 3
    assert cli.train_policy_main([str(demos), "--init", str(tmp_path / "bpe"), "--sft", "--steps", "1",
                                  "--device", "cpu", "--out", str(tmp_path / "bpe2")]) == 0
    assert open_bundle(tmp_path / "bpe2").tokenizer.kind == "sentencepiece"
    capsys.readouterr()
    assert cli.train_policy_main([str(demos), "--init", str(tmp_path / "bpe"), "--sft", "--tokenizer", "byte",
                                  "--steps", "1", "--device", "cpu", "--out", str(tmp_path / "bad")]) == 2
    assert "keeps the checkpoint's" in capsys.readouterr().err


def test_value_label_policy_chain(demos, tmp_path, capsys):
    assert cli.train_value_main([str(demos), "--out", str(tmp_path / "v"), "--image-size", "16", "--steps", "3",
                                 "--device", "cpu", "--plots", str(tmp_path / "plots")]) == 0
    assert list((tmp_path / "plots").glob("*.png"))
    assert cli.label_main([str(demos), "--value", str(tmp_path / "v"), "--out", str(tmp_path / "l.parquet"),
                           "--mode", "pretrain"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["positive"] == pytest.approx(0.3, abs=0.1)
    t = pq.read_table(str(tmp_path / "l.parquet"))
    assert t.num_rows == report["frames"] and set(t.column_names) >= {"advantage", "indicator"}
    assert cli.train_policy_main([str(demos), "--sft", "--model", json.dumps(SMALL), "--steps", "2",
                                  "--device", "cpu", "--out", str(tmp_path / "sft")]) == 0
    assert cli.train_policy_main([str(demos), "--init", str(tmp_path / "sft"), "--labels", str(tmp_path / "l.parquet"),
                                  "--steps", "2", "--device", "cpu", "--out", str(tmp_path / "it1")]) == 0
    assert (tmp_path / "it1" / "model.safetensors").is_file()


def test_clear_errors(demos, tmp_path, capsys):
    assert cli.label_main([str(demos), "--value", str(tmp_path / "nope"), "--out", str(tmp_path / "l.parquet")]) == 2
    assert "not a value bundle" in capsys.readouterr().err
    assert cli.train_policy_main([str(demos), "--labels", str(tmp_path / "missing.parquet"), "--model",
                                  json.dumps(SMALL), "--out", str(tmp_path / "x"), "--steps", "1"]) == 2
    with pytest.raises(SystemExit):
        demos_main(["--episodes", "0", "--out", str(tmp_path / "d.npz")])
