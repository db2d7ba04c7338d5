"""Bundle validation, station checks and input errors of recap_ros.policy: every failure is a clear PolicyError."""
import dataclasses
import json

import numpy as np
import pytest

from recap_ros.policy import PolicyError, load_policy
from recap_ros.policy.backends import tensorrt_available
from recap_ros.policy.bundle import open_bundle, random_bundle, write_manifest
from recap_ros.station import load_station

PROMPT = "touch the red marker with the left gripper"


@pytest.fixture(scope="module")
def policy():
    return load_policy("tiny", backend="onnxruntime")


def views():
    return [np.zeros((48, 64, 3), np.uint8)] * 3


def test_tiny_bundle_info(policy):
    i = policy.info
    assert (i.chunk_len, i.action_dim, i.state_dim) == (50, 14, 14)
    assert i.camera_roles == ("base", "left_wrist", "right_wrist")
    assert i.backend == "onnxruntime" and i.action_space == "absolute_joint_positions"
    assert len(i.bundle_id) == 16 and i.bundle_id == open_bundle("tiny").bundle_id  # stable
    policy.check_station(load_station("sim"))
    policy.check_station(load_station("bimanual_aloha"))


def test_bundle_id_changes_with_weights(tiny_copy):
    before = open_bundle(tiny_copy).bundle_id
    assert open_bundle(tiny_copy).bundle_id == before
    cfg = json.loads((tiny_copy / "config.json").read_text())
    cfg["description"] = "retrained"
    (tiny_copy / "config.json").write_text(json.dumps(cfg))
    write_manifest(tiny_copy)
    assert open_bundle(tiny_copy).bundle_id != before


def test_missing_bundle():
    with pytest.raises(PolicyError, match="not found"):
        load_policy("no_such_bundle")


def test_missing_config(tiny_copy):
    (tiny_copy / "config.json").unlink()
    with pytest.raises(PolicyError, match="config.json is missing"):
        load_policy(tiny_copy)


def test_corrupt_config(tiny_copy):
    (tiny_copy / "config.json").write_text("{not json")
    with pytest.raises(PolicyError, match="not readable JSON"):
        load_policy(tiny_copy)


def test_unknown_action_space(tiny_copy):
    cfg = json.loads((tiny_copy / "config.json").read_text())
    cfg["action_space"] = "joint_velocities"
    (tiny_copy / "config.json").write_text(json.dumps(cfg))
    write_manifest(tiny_copy)
    with pytest.raises(PolicyError, match="action_space 'joint_velocities' is not one of absolute_joint_positions"):
        load_policy(tiny_copy)


def test_corrupt_weights_detected(tiny_copy):
    w = tiny_copy / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-100] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(PolicyError, match="model.safetensors does not match its sha256"):
        load_policy(tiny_copy, backend="torch")


def test_truncated_onnx_detected(tiny_copy):
    p = tiny_copy / "onnx" / "prefix.onnx"
    p.write_bytes(p.read_bytes()[:1000])
    with pytest.raises(PolicyError, match="onnx/prefix.onnx is 1000 bytes"):
        load_policy(tiny_copy, backend="onnxruntime")


def test_missing_weights(tiny_copy):
    (tiny_copy / "model.safetensors").unlink()
    with pytest.raises(PolicyError, match="model.safetensors is missing"):
        load_policy(tiny_copy, backend="torch")


def test_norm_stats_dim_mismatch(tiny_copy):
    p = tiny_copy / "norm_stats.json"
    d = json.loads(p.read_text())
    for f in ("mean", "std", "q01", "q99"):
        d["norm_stats"]["state"][f] += [0.0, 0.0]
    p.write_text(json.dumps(d))
    write_manifest(tiny_copy)
    with pytest.raises(PolicyError, match="state statistics have 16 dims"):
        load_policy(tiny_copy)


def test_unknown_backend():
    with pytest.raises(PolicyError, match="unknown policy backend 'tflite'"):
        load_policy("tiny", backend="tflite")


@pytest.mark.skipif(tensorrt_available(), reason="this machine has TensorRT and a GPU")
def test_tensorrt_without_gpu():
    with pytest.raises(PolicyError, match="tensorrt backend"):
        load_policy("tiny", backend="tensorrt")


def test_auto_backend_without_gpu_is_onnxruntime():
    if tensorrt_available():
        pytest.skip("auto picks TensorRT here")
    assert load_policy("tiny", backend="auto").info.backend == "onnxruntime"


def test_unexported_step_count(policy):
    with pytest.raises(PolicyError, match="no exported denoise graph for 7 steps"):
        policy.infer(views(), np.zeros(14), PROMPT, steps=7)
    assert load_policy("tiny", backend="torch").infer(views(), np.zeros(14), PROMPT, steps=7).shape == (50, 14)


def test_station_joint_count_mismatch(tmp_path):
    sim = load_station("sim")
    robot = dataclasses.replace(sim.robot, joints=sim.robot.joints + sim.robot.joints[:2])
    b = random_bundle("tiny", tmp_path / "tiny16", station=dataclasses.replace(sim, robot=robot),
                      state_dim=16, action_dim=16, depth=1, vision_depth=1)
    pol = load_policy(b.dir, backend="onnxruntime")
    assert pol.info.action_dim == 16
    with pytest.raises(PolicyError, match="the station has 14 joints but the model's state/action dim is 16/16"):
        pol.check_station(sim)
    with pytest.raises(PolicyError, match=r"state: expected shape \(16,\)"):
        pol.infer(views(), np.zeros(14), PROMPT)


def test_station_camera_and_joint_name_mismatch(policy):
    sim = load_station("sim")
    with pytest.raises(PolicyError, match="no camera with role \\['right_wrist'\\]"):
        policy.check_station(dataclasses.replace(sim, cameras=sim.cameras[:2]))
    joints = list(sim.robot.joints)
    joints[3] = dataclasses.replace(joints[3], name="left_wrist_roll")
    with pytest.raises(PolicyError, match="joint 3 is 'left_wrist_roll' on the station but 'left_forearm_roll'"):
        policy.check_station(dataclasses.replace(sim, robot=dataclasses.replace(sim.robot, joints=tuple(joints))))


@pytest.mark.parametrize("kwargs, match", [
    (dict(images=views()[:2]), "expected a list of 3 views"),
    (dict(images=[np.zeros((48, 64, 3), np.float32)] * 3), r"images\[base\]: expected an HxWx3 uint8"),
    (dict(images=[np.zeros((48, 64), np.uint8)] * 3), r"images\[base\]"),
    (dict(state=np.r_[np.zeros(13), np.nan]), r"non-finite joint positions at indices \[13\]"),
    (dict(state=np.zeros(16)), r"state: expected shape \(14,\), got \(16,\)"),
    (dict(prompt=""), "must be a non-empty string"),
    (dict(prompt="x" * 200), "the model takes at most"),
    (dict(beta=float("nan")), "beta: expected a finite number"),
    (dict(seed=-1), "seed: expected a non-negative integer"),
    (dict(steps=0), r"steps: expected an integer in \[1, 100\]"),
])
def test_bad_inputs(policy, kwargs, match):
    args = dict(images=views(), state=np.zeros(14), prompt=PROMPT)
    args.update(kwargs)
    with pytest.raises(PolicyError, match=match):
        policy.infer(**args)


def test_output_in_robot_units(policy):
    a = policy.infer(views(), np.zeros(14), PROMPT, beta=1.0, seed=0)
    assert a.shape == (50, 14) and a.dtype == np.float64 and np.isfinite(a).all()
    st = open_bundle("tiny").norm_stats["actions"]
    # quantile de-normalisation maps the normalised [-1, 1] range onto [q01, q99] per joint
    np.testing.assert_allclose(st.unnormalize(np.ones(14), "quantile"), st.q99, atol=1e-5)


def test_build_engine_cli_exports_steps(tiny_copy, capsys):
    from recap_ros.policy.cli import build_engine_main

    before = open_bundle(tiny_copy).bundle_id
    assert build_engine_main([str(tiny_copy), "--steps", "3", "--export-only"]) == 0
    b = open_bundle(tiny_copy, verify=True)
    assert b.onnx_steps == (3, 5) and b.bundle_id != before
    pol = load_policy(tiny_copy, backend="onnxruntime")
    ref = load_policy(tiny_copy, backend="torch")
    args = (views(), np.zeros(14), PROMPT)
    np.testing.assert_allclose(pol.infer(*args, beta=2.0, steps=3), ref.infer(*args, beta=2.0, steps=3), atol=1e-4)
    if not tensorrt_available():
        assert build_engine_main([str(tiny_copy)]) == 2
        assert "tensorrt backend" in capsys.readouterr().err
