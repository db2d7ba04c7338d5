"""Parity with LeRobot's own π0.5: the same random PI05Policy run by LeRobot and, imported with
recap-import-checkpoint, by this stack, on the same observation, prompt tokens and noise (goal: max abs difference
of the action chunks <= 1e-3 in fp32). Then the imported bundle's ONNX export under ONNX Runtime against torch.

LeRobot runs in a virtual environment of its own (never a project dependency), created on first use under
--venv with --python (Python >= 3.12: LeRobot >= 0.5 uses 3.12 syntax; default: the first python3.12/3.13 on PATH
or under ~/.pyenv): lerobot 0.5.1 with its pinned transformers 5.3 and torch < 2.11 (~8 GB, minutes). LeRobot
0.4.x would run on 3.11 but needs a transformers branch from GitHub that PyPI does not have. The worker (bench/lerobot_pi05_worker.py) builds the smallest variants
(gemma_300m backbone + gemma_300m expert, SigLIP So400m/14 at 224 px: ~1.1 B parameters) with random weights.
Prints measured figures; no pass/fail.

    nice .venv/bin/python bench/lerobot_parity.py --dir /tmp/lerobot_parity
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

LEROBOT = "lerobot[pi]==0.5.1"
TORCH = "torch>=2.7,<2.11"
HERE = Path(__file__).resolve().parent


def find_python() -> str | None:
    """A working Python >= 3.12: python3.12 / python3.13 on PATH, else one under ~/.pyenv/versions."""
    candidates = [shutil.which(n) for n in ("python3.12", "python3.13")]
    candidates += [str(p) for p in sorted(Path.home().glob(".pyenv/versions/3.1[23]*/bin/python3"))]
    for c in candidates:
        if c and subprocess.run([c, "-c", "pass"], capture_output=True).returncode == 0:
            return c
    return None


def ensure_venv(venv: Path, python: str | None) -> Path:
    py = venv / "bin" / "python"
    marker = venv / ".recap-lerobot"
    if marker.is_file() and marker.read_text() == LEROBOT:
        return py
    if not py.exists():
        if python is None:
            raise SystemExit("LeRobot >= 0.5 needs Python >= 3.12: none found (pass --python)")
        subprocess.run([python, "-m", "venv", str(venv)], check=True)
    env = {**os.environ, "PIP_CONSTRAINT": ""}  # this project's torch pin does not apply to LeRobot's environment
    subprocess.run([str(py), "-m", "pip", "install", "-q", LEROBOT, TORCH], check=True, env=env)
    marker.write_text(LEROBOT)
    return py


def ours_actions(model, io: dict, steps: int = 10) -> np.ndarray:
    """Our torch model on the worker's inputs: image in [-1, 1] -> [0, 1] (the model maps it back), the prompt
    tokens and mask, no advantage segment (π0.5 has none), the same noise."""
    c = model.config
    img = torch.from_numpy((io["image"][0].transpose(1, 2, 0) + 1.0) / 2.0)[None, None]
    tokens, mask = torch.from_numpy(io["tokens"]), torch.from_numpy(io["masks"])
    adv = torch.zeros(1, c.max_advantage_tokens, dtype=torch.long)
    with torch.no_grad():
        keys, values, kv_mask = model.encode_prefix(img, tokens, mask, adv, adv.bool())
        return model.denoise(keys, values, kv_mask, None, torch.from_numpy(io["noise"]), steps).numpy()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", required=True, help="work directory (LeRobot's saved policy, the imported bundle)")
    p.add_argument("--venv", default=str(Path.home() / ".cache" / "recap_ros" / "lerobot-0.5.1-py312"))
    p.add_argument("--python", default=find_python(), help="Python >= 3.12 for LeRobot's environment")
    p.add_argument("--no-onnx", action="store_true", help="skip the ONNX export + ONNX Runtime comparison")
    a = p.parse_args(argv)
    work = Path(a.dir)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    py = ensure_venv(Path(a.venv), a.python)
    print(f"LeRobot environment: {a.venv} ({time.monotonic() - t0:.0f} s)")
    subprocess.run([str(py), str(HERE / "lerobot_pi05_worker.py"), str(work)], check=True)
    io = dict(np.load(work / "io.npz"))

    from safetensors.torch import load_file

    from recap_ros.policy.import_checkpoint import identity_stats, import_checkpoint
    from recap_ros.policy.model import Pi06Policy
    from recap_ros.policy.normalize import save_norm_stats

    stats = work / "norm_stats.json"
    save_norm_stats({"state": identity_stats(32), "actions": identity_stats(32)}, stats)
    t0 = time.monotonic()
    import_checkpoint(work / "policy", work / "bundle", "lerobot", overrides={"camera_roles": ["base"]},
                      norm_stats=stats, dtype="float32", onnx=False)
    cfg = json.loads((work / "bundle" / "config.json").read_text())["model"]
    from recap_ros.policy.config import PolicyConfig

    model = Pi06Policy(PolicyConfig.from_json(cfg)).eval()
    model.load_state_dict(load_file(str(work / "bundle" / "model.safetensors")))
    print(f"imported with recap-import-checkpoint in {time.monotonic() - t0:.0f} s: {model.num_parameters()}")
    ours = ours_actions(model, io)
    diff = np.abs(ours - io["actions"]).max()
    print(f"LeRobot PI05 vs imported bundle (torch, fp32, 10 steps): max abs difference of the action chunk "
          f"{diff:.3g} (goal <= 1e-3; chunk max abs {np.abs(io['actions']).max():.3g})")
    if a.no_onnx:
        return 0
    from recap_ros.policy.bundle import save_bundle
    from recap_ros.policy.runtime import load_policy

    t0 = time.monotonic()
    save_bundle(model, work / "onnx_bundle", {"state": identity_stats(32), "actions": identity_stats(32)},
                steps=(10,))
    print(f"ONNX export: {time.monotonic() - t0:.0f} s")
    views = [((io["image"][0].transpose(1, 2, 0) + 1.0) * 127.5).round().astype(np.uint8)]
    state = np.zeros(32)
    chunks = {b: load_policy(work / "onnx_bundle", backend=b).infer(views, state, "pick up the cube", seed=3)
              for b in ("torch", "onnxruntime")}
    print(f"ONNX Runtime vs torch on the imported bundle: max abs difference "
          f"{np.abs(chunks['torch'] - chunks['onnxruntime']).max():.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
