"""Import memory: peak RSS of ``recap-import-checkpoint`` on a random bf16 Gemma 3 4B checkpoint (goal <= 1.3x its
size on disk, i.e. no fp32 copy and no second copy of the model in memory).

Writes a Hugging Face-layout ``Gemma3ForConditionalGeneration`` checkpoint with random bf16 tensors (Gemma 3 4B's
decoder + SigLIP So400m/14 at 896 px + the multimodal projector: ~8.6 GB, tensor by tensor), then runs the importer
in a child process (``--no-onnx``: weights, config and norm stats of a pi06 bundle whose ~860 M action expert is
freshly initialised, SigLIP positions resized to 448 px) and reads the child's peak RSS from the kernel
(``getrusage(RUSAGE_CHILDREN).ru_maxrss``). Needs ~20 GB of disk in --dir. Prints measured figures; no pass/fail.

    nice .venv/bin/python bench/import_memory.py --dir /tmp/import_memory
    .venv/bin/python bench/import_memory.py --dir /tmp/im --small   # the same at a toy size (seconds)
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from recap_ros.policy.safetensors_stream import write_streaming

GEMMA3_4B = {"hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 34, "num_attention_heads": 8,
             "num_key_value_heads": 4, "head_dim": 256, "vocab_size": 262208, "sliding_window": 1024,
             "query_pre_attn_scalar": 256, "rope_theta": 1_000_000.0, "rope_local_base_freq": 10000.0,
             "rope_scaling": {"rope_type": "linear", "factor": 8.0}, "model_type": "gemma3_text"}
SO400M_896 = {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16,
              "image_size": 896, "patch_size": 14, "model_type": "siglip_vision_model"}
SMALL_TEXT = {**GEMMA3_4B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 6, "head_dim": 16,
              "query_pre_attn_scalar": 16, "vocab_size": 1000}
SMALL_VISION = {**SO400M_896, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                "image_size": 112}
SMALL_OVERRIDES = ["image_size=56", "vision_heads=4", "expert_width=32", "expert_mlp_dim=64"]


def checkpoint_specs(text: dict, vision: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of a Gemma3ForConditionalGeneration checkpoint (the Hub's names)."""
    w, hd, mlp = text["hidden_size"], text["head_dim"], text["intermediate_size"]
    q, kv = text["num_attention_heads"] * hd, text["num_key_value_heads"] * hd
    t = "language_model.model."
    out = [(f"{t}embed_tokens.weight", (text["vocab_size"], w)), (f"{t}norm.weight", (w,))]
    for i in range(text["num_hidden_layers"]):
        p = f"{t}layers.{i}."
        out += [(f"{p}self_attn.q_proj.weight", (q, w)), (f"{p}self_attn.k_proj.weight", (kv, w)),
                (f"{p}self_attn.v_proj.weight", (kv, w)), (f"{p}self_attn.o_proj.weight", (w, q)),
                (f"{p}self_attn.q_norm.weight", (hd,)), (f"{p}self_attn.k_norm.weight", (hd,)),
                (f"{p}mlp.gate_proj.weight", (mlp, w)), (f"{p}mlp.up_proj.weight", (mlp, w)),
                (f"{p}mlp.down_proj.weight", (w, mlp))]
        out += [(f"{p}{n}.weight", (w,)) for n in ("input_layernorm", "post_attention_layernorm",
                                                   "pre_feedforward_layernorm", "post_feedforward_layernorm")]
    vw, vm, ps = vision["hidden_size"], vision["intermediate_size"], vision["patch_size"]
    v = "vision_tower.vision_model."
    out += [(f"{v}embeddings.patch_embedding.weight", (vw, 3, ps, ps)), (f"{v}embeddings.patch_embedding.bias", (vw,)),
            (f"{v}embeddings.position_embedding.weight", ((vision["image_size"] // ps) ** 2, vw)),
            (f"{v}post_layernorm.weight", (vw,)), (f"{v}post_layernorm.bias", (vw,))]
    for j in range(vision["num_hidden_layers"]):
        p = f"{v}encoder.layers.{j}."
        for n, shape in (("self_attn.q_proj", (vw, vw)), ("self_attn.k_proj", (vw, vw)), ("self_attn.v_proj", (vw, vw)),
                         ("self_attn.out_proj", (vw, vw)), ("mlp.fc1", (vm, vw)), ("mlp.fc2", (vw, vm))):
            out += [(f"{p}{n}.weight", shape), (f"{p}{n}.bias", (shape[0],))]
        out += [(f"{p}{n}.{k}", (vw,)) for n in ("layer_norm1", "layer_norm2") for k in ("weight", "bias")]
    out += [("multi_modal_projector.mm_input_projection_weight", (vw, w)),
            ("multi_modal_projector.mm_soft_emb_norm.weight", (vw,))]
    return out


def write_checkpoint(folder: Path, text: dict, vision: dict, tokens: int = 256) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    specs = checkpoint_specs(text, vision)
    gen = torch.Generator().manual_seed(0)
    write_streaming(folder / "model.safetensors", [(n, torch.bfloat16, s) for n, s in specs],
                    lambda name: (torch.randn(dict(specs)[name], generator=gen) * 0.02).to(torch.bfloat16))
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "mm_tokens_per_image": tokens,
        "text_config": text, "vision_config": vision}, indent=1))
    return (folder / "model.safetensors").stat().st_size


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", required=True, help="scratch directory (removed afterwards unless --keep)")
    p.add_argument("--small", action="store_true", help="a toy-size checkpoint (checks the bench itself)")
    p.add_argument("--keep", action="store_true")
    a = p.parse_args(argv)
    root = Path(a.dir)
    text, vision = (SMALL_TEXT, SMALL_VISION) if a.small else (GEMMA3_4B, SO400M_896)
    t0 = time.monotonic()
    size = write_checkpoint(root / "gemma3", text, vision, 4 if a.small else 256)
    print(f"random bf16 checkpoint: {size / 1e9:.3f} GB on disk, written in {time.monotonic() - t0:.0f} s")
    cmd = [sys.executable, "-m", "recap_ros.policy.import_checkpoint", str(root / "gemma3"), str(root / "bundle"),
           "--format", "hf", "--no-onnx"] + [f"--set={s}" for s in (SMALL_OVERRIDES if a.small else [])]
    t0 = time.monotonic()
    subprocess.run(cmd, check=True)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # kB on Linux
    out = (root / "bundle" / "model.safetensors").stat().st_size
    print(f"import: {time.monotonic() - t0:.0f} s, bundle weights {out / 1e9:.3f} GB (backbone + fresh expert)")
    print(f"peak RSS of the import: {peak / 1e9:.3f} GB = {peak / size:.2f} x the checkpoint on disk (goal <= 1.3)")
    if not a.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
