"""recap-import-checkpoint: bundles from checkpoints written by transformers' own classes (save_pretrained), and
one-line refusals of truncated or mismatched checkpoints."""
import json
import struct

import numpy as np
import pytest
import torch

import transformers  # the test extra installs it: a missing install fails here, it never skips
import hf_models
from safetensors.torch import load_file, save_file

from recap_ros.policy.bundle import open_bundle
from recap_ros.policy.errors import PolicyError
from recap_ros.policy.import_checkpoint import import_checkpoint, main, plan_import, write_weights

SMALL = {"expert_width": 32, "expert_mlp_dim": 48, "max_text_tokens": 64, "chunk_len": 8, "denoise_steps": 2}


@pytest.fixture(scope="module")
def gemma3_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("gemma3")
    hf = hf_models.gemma3()
    hf.save_pretrained(d)
    return d, hf


def test_gemma3_folder_becomes_a_bundle_with_resized_positions(gemma3_dir, tmp_path):
    src, hf = gemma3_dir
    bundle = import_checkpoint(src, tmp_path / "b", "hf", overrides={**SMALL, "image_size": 56})
    again = open_bundle(tmp_path / "b")
    assert again.bundle_id == bundle.bundle_id and bundle.config.image_size == 56
    assert "## Provenance" in (tmp_path / "b" / "README.md").read_text()
    stored = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert stored["prefix.layers.0.attn.q_norm.weight"].dtype == torch.bfloat16  # bf16 by default
    # 28 px / 7 = 4x4 learned positions resized to the bundle's 8x8 grid as transformers resizes them
    emb = hf.model.vision_tower.embeddings
    with torch.no_grad():
        want = emb.interpolate_pos_encoding(torch.zeros(1, 64, 32), 56, 56)
    assert torch.allclose(stored["prefix.vision.pos"].float(), want, atol=1e-2)
    assert torch.equal(stored["prefix.embed.weight"],
                       hf.model.language_model.embed_tokens.weight.detach().to(torch.bfloat16))


def _one_line(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_truncated_checkpoint_is_refused_naming_the_cut_tensor(gemma3_dir, tmp_path):
    src, _ = gemma3_dir
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "config.json").write_text((src / "config.json").read_text())
    raw = (src / "model.safetensors").read_bytes()
    (tmp_path / "t" / "model.safetensors").write_bytes(raw[:len(raw) - 1000])
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    cut = min((k for k in header if k != "__metadata__" and 8 + n + header[k]["data_offsets"][1] > len(raw) - 1000),
              key=lambda k: header[k]["data_offsets"][0])
    with pytest.raises(PolicyError) as e:
        plan_import(tmp_path / "t", "hf", SMALL)
    assert f"tensor {cut} is cut off" in _one_line(e)


def _rewritten(src, dst, change):
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(str(src / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


def test_mis_shaped_tensor_is_refused_in_one_line(gemma3_dir, tmp_path):
    src, _ = gemma3_dir
    name = next(k for k in load_file(str(src / "model.safetensors")) if k.endswith("layers.2.mlp.up_proj.weight"))
    bad = _rewritten(src, tmp_path / "s", lambda t: t.__setitem__(name, torch.zeros(95, 64)))
    plan = plan_import(bad, "hf", SMALL)
    with pytest.raises(PolicyError) as e:
        write_weights(plan, tmp_path / "w.safetensors")
    assert f"{name} has shape (95, 64)" in _one_line(e) and "prefix.layers.2.mlp.up.weight" in str(e.value)
    assert not (tmp_path / "w.safetensors").exists()  # refused before writing


def test_missing_tensor_is_refused_in_one_line_and_the_cli_exits_2(gemma3_dir, tmp_path, capsys):
    src, _ = gemma3_dir
    name = next(k for k in load_file(str(src / "model.safetensors")) if k.endswith("layers.1.self_attn.k_norm.weight"))
    bad = _rewritten(src, tmp_path / "m", lambda t: t.pop(name))
    assert main([str(bad), str(tmp_path / "out"), "--format", "hf", "--no-onnx"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"checkpoint tensor {name} is missing" in err


def _pi05_folder(d, state_dim=3, action_dim=4):
    """A LeRobot pi05 policy folder: PaliGemma backbone + Gemma expert (transformers' classes) under LeRobot's
    names, the expert's adaptive norms as `dense` layers, LeRobot's normaliser statistics."""
    d.mkdir()
    g = torch.Generator().manual_seed(3)
    tensors = {f"model.paligemma_with_expert.paligemma.{k}": v.clone()
               for k, v in hf_models.paligemma().state_dict().items() if not k.startswith("lm_head")}
    expert = hf_models.randomize(transformers.GemmaModel(hf_models.gemma_text(layers=2, width=32)))
    for k, v in expert.state_dict().items():
        if k.endswith("layernorm.weight") or k == "norm.weight":
            base = k[:-len("weight")]
            k_w, k_b = f"{base}dense.weight", f"{base}dense.bias"
            tensors[f"model.paligemma_with_expert.gemma_expert.model.{k_w}"] = torch.randn(96, 32, generator=g) * 0.1
            tensors[f"model.paligemma_with_expert.gemma_expert.model.{k_b}"] = torch.randn(96, generator=g) * 0.1
        elif not k.startswith("embed_tokens"):
            tensors[f"model.paligemma_with_expert.gemma_expert.model.{k}"] = v.contiguous()
    for name, shape in (("action_in_proj", (32, action_dim)), ("action_out_proj", (action_dim, 32)),
                        ("time_mlp_in", (32, 32)), ("time_mlp_out", (32, 32))):
        tensors[f"model.{name}.weight"] = torch.randn(*shape, generator=g) * 0.1
        tensors[f"model.{name}.bias"] = torch.randn(shape[0], generator=g) * 0.1
    save_file(tensors, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({"type": "pi05", "max_state_dim": state_dim, "max_action_dim":
                                               action_dim, "chunk_size": 5, "tokenizer_max_length": 48,
                                               "num_inference_steps": 3}))
    stats = {}
    for key, dim in (("observation.state", 2), ("action", 3)):  # fewer dims than the model: padded
        for s, v in (("mean", 0.1), ("std", 2.0), ("q01", -3.0), ("q99", 5.0), ("min", -9.0)):
            stats[f"{key}.{s}"] = torch.full((dim,), v)
    save_file(stats, str(d / "policy_preprocessor_step_2_normalizer_processor.safetensors"))
    return d, tensors


def test_lerobot_pi05_folder_becomes_a_bundle(tmp_path):
    src, tensors = _pi05_folder(tmp_path / "pi05")
    bundle = import_checkpoint(src, tmp_path / "b", "lerobot", overrides={"heads": 4, "kv_heads": 1, "head_dim": 16,
                                                                          "camera_roles": ["base"]}, dtype="float32")
    c = bundle.config
    assert (c.time_conditioning, c.state_input, c.expert_width, c.depth, c.state_dim, c.action_dim) == (
        "adarms", "tokens", 32, 2, 3, 4)
    assert (c.chunk_len, c.max_text_tokens, c.denoise_steps, c.vision_tokens) == (5, 48, 3, 16)
    stored = load_file(str(tmp_path / "b" / "model.safetensors"))
    e = "model.paligemma_with_expert.gemma_expert.model."
    assert torch.equal(stored["expert.layers.1.norm2.mod.weight"],
                       tensors[f"{e}layers.1.post_attention_layernorm.dense.weight"])
    assert torch.equal(stored["expert.norm.mod.bias"], tensors[f"{e}norm.dense.bias"])
    assert torch.equal(stored["expert.time_in.weight"], tensors["model.time_mlp_in.weight"])
    st = bundle.norm_stats["state"]
    np.testing.assert_allclose(st.q01, [-3, -3, -1])  # third dim: padding, identity statistics
    np.testing.assert_allclose(bundle.norm_stats["actions"].q99, [5, 5, 5, 1])


def test_openpi_checkpoint_with_norm_stats_json(tmp_path):
    """openpi's PyTorch layout (LeRobot's names without the leading 'model.'), no config.json, openpi's
    norm_stats.json (q01/q99 used by π0.5's quantile normalisation)."""
    _, tensors = _pi05_folder(tmp_path / "lr")
    src = tmp_path / "openpi"
    src.mkdir()
    save_file({k.removeprefix("model."): v for k, v in tensors.items()}, str(src / "model.safetensors"))
    stats = {"norm_stats": {k: {"mean": [0.0] * 2, "std": [1.0] * 2, "q01": [-2.0, -4.0], "q99": [2.0, 4.0]}
                            for k in ("state", "actions")}}
    (tmp_path / "norm_stats.json").write_text(json.dumps(stats))
    with pytest.raises(PolicyError, match="needs --norm-stats"):
        plan_import(src, "openpi", {"heads": 4, "kv_heads": 1, "head_dim": 16})
    plan = plan_import(src, "openpi", {"heads": 4, "kv_heads": 1, "head_dim": 16, "state_dim": 2},
                       norm_stats=tmp_path / "norm_stats.json")
    assert plan.config.time_conditioning == "adarms" and plan.config.action_dim == 4
    np.testing.assert_allclose(plan.norm_stats["actions"].q99, [2, 4, 1, 1])
    write_weights(plan, tmp_path / "w.safetensors", torch.float32)
    stored = load_file(str(tmp_path / "w.safetensors"))
    assert torch.equal(stored["expert.action_in.weight"], tensors["model.action_in_proj.weight"])
