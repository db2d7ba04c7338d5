"""Policy latency: ms per action chunk per backend, ONNX Runtime vs torch eager, and the CFG overhead.

CPU (default): the committed ``tiny`` bundle on torch and onnxruntime, β = 1 (conditional only) and β = 2
(batched CFG). Prints the median ms per chunk, the ORT speed-up over torch eager (goal ≥ 3×) and the CFG
overhead vs β = 1 (goal ≤ 10 % when batched on a GPU; on a CPU the second branch is compute-bound).

GPU (``--gpu``): a random-weight ``pi06`` bundle (3 × 448² views, 5 steps, β = 2) through TensorRT; prints the
ms per chunk and the device (goal ≤ 25 ms on an H100). The bundle is written to ``--workdir`` (≈ 35 GB: bf16
safetensors + fp32 ONNX) and its engines are cached there, so a second run skips export and build.

    python bench/policy_latency.py --duration 5
    python bench/policy_latency.py --gpu --workdir /tmp/pi06 --precision bf16
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from recap_ros.policy import load_policy

PROMPT = "touch the red marker with the left gripper"


def measure(configs: dict, duration: float, min_iters: int = 5, steps: int | None = None) -> dict:
    """configs: {label: (policy, beta)}. Round-robin over the configurations (one chunk each per round) so that
    load changes on a shared machine hit every configuration alike; returns {label: [ms, ...]}."""
    rng = np.random.default_rng(0)
    inputs = {}
    for label, (pol, beta) in configs.items():
        views = [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in pol.info.camera_roles]
        inputs[label] = (views, np.zeros(pol.info.state_dim))
        for i in range(2):  # warm-up (lazy session / engine creation)
            pol.infer(*inputs[label], PROMPT, beta=beta, seed=i, steps=steps)
    times = {label: [] for label in configs}
    t_end = time.perf_counter() + duration * len(configs)
    while min(len(t) for t in times.values()) < min_iters or time.perf_counter() < t_end:
        for label, (pol, beta) in configs.items():
            t0 = time.perf_counter()
            pol.infer(*inputs[label], PROMPT, beta=beta, seed=len(times[label]), steps=steps)
            times[label].append((time.perf_counter() - t0) * 1e3)
    return times


def report(name: str, times: list[float]) -> float:
    med = statistics.median(times)
    print(f"  {name:34s} median {med:8.2f} ms  p90 {np.percentile(times, 90):8.2f} ms  (n={len(times)})")
    return med


def cpu(args) -> None:
    configs = {}
    for backend in ("torch", "onnxruntime"):
        pol = load_policy(args.bundle, backend=backend, threads=args.threads)
        print(f"{backend} on {pol.info.device}: bundle {pol.info.name} ({pol.info.bundle_id}), "
              f"{pol.info.denoise_steps} steps")
        for beta in (1.0, 2.0):
            configs[backend, beta] = (pol, beta)
    times = measure(configs, args.duration)
    results = {key: report(f"{key[0]} beta={key[1]:g}", t) for key, t in times.items()}
    print("ratios (measured in this run):")
    for beta in (1.0, 2.0):
        r = results["torch", beta] / results["onnxruntime", beta]
        print(f"  beta={beta:g}: onnxruntime is {r:.1f}x faster than torch eager (goal >= 3x)")
    for backend in ("torch", "onnxruntime"):
        over = 100 * (results[backend, 2.0] / results[backend, 1.0] - 1)
        print(f"  {backend}: CFG (beta=2, batched) overhead vs beta=1: {over:+.0f} % (goal <= 10 % on GPU)")


def gpu(args) -> None:
    from recap_ros.policy.backends import tensorrt_available
    from recap_ros.policy.bundle import open_bundle, random_bundle

    if not tensorrt_available():
        sys.exit("--gpu needs the tensorrt package and a CUDA GPU")
    import torch

    work = Path(args.workdir)
    bdir = work / "pi06_random"
    try:
        open_bundle(bdir, verify=False)
    except Exception:  # not written yet (or incomplete): write it
        print(f"writing a random-weight pi06 bundle to {bdir} (export takes minutes)")
        t0 = time.perf_counter()
        random_bundle("pi06", bdir, seed=0, weights_dtype="bfloat16")
        print(f"  done in {time.perf_counter() - t0:.0f} s")
    t0 = time.perf_counter()
    pol = load_policy(bdir, backend="tensorrt", precision=args.precision, verify=False)
    print(f"TensorRT engines ready in {time.perf_counter() - t0:.0f} s on {torch.cuda.get_device_name()}")
    times = measure({beta: (pol, beta) for beta in (1.0, 2.0)}, args.duration)
    med = {beta: report(f"pi06 tensorrt {args.precision} beta={beta:g}", t) for beta, t in times.items()}
    print(f"pi06, 3 x 448^2 views, {pol.info.denoise_steps} steps, beta=2: {med[2.0]:.1f} ms per chunk on "
          f"{torch.cuda.get_device_name()} (goal <= 25 ms on an H100); CFG overhead vs beta=1: "
          f"{100 * (med[2.0] / med[1.0] - 1):+.0f} %")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", default="tiny", help="CPU run: bundle name or path")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds of timing per configuration")
    ap.add_argument("--quick", action="store_true", help="1 s per configuration")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for both backends")
    ap.add_argument("--gpu", action="store_true", help="pi06 random weights through TensorRT")
    ap.add_argument("--workdir", default="/tmp/recap_pi06_bench")
    ap.add_argument("--precision", default="bf16", choices=("bf16", "fp16", "fp32"))
    args = ap.parse_args(argv)
    if args.quick:
        args.duration = 1.0
    gpu(args) if args.gpu else cpu(args)


if __name__ == "__main__":
    main()
