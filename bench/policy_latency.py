"""Policy latency: ms per action chunk per backend, with (β = 2, batched) and without (β = 1) CFG.

CPU (default): the committed ``tiny`` bundle on torch eager and onnxruntime with the SAME thread count
(``--threads``, default 1: a station's policy server shares 2 cores with cameras, mux and recorder). Prints the
machine load (1-min load average before and after), the median ms per chunk (``Policy.infer`` end to end: host
preprocessing of 3 × 224² camera views + backend), the ONNX Runtime speed-up over torch eager (goal ≥ 3×) and the
CFG overhead (goal ≤ 10 %), all measured in one run: rounds of ``--block`` consecutive chunks per configuration
(a policy server runs one backend back to back; chunk-by-chunk alternation would have each backend start from
the other's caches), round-robin so that load changes hit every configuration alike. Then the host side of a chunk
(``Policy.prepare_inputs``, the same code for both backends) and the backends' ratio without it; the model's work per
chunk (torch's FlopCounterMode) and the rate each backend reaches: batched CFG adds the expert's FLOPs again, so
a backend that is compute-bound cannot have a CFG overhead below that FLOP increase.

GPU (``--gpu``): the device name, then for ``tiny`` and a random-weight ``pi06`` (3 × 448² views, 5 steps) every
GPU backend this machine has: tensorrt (``--precision``, default bf16), onnxruntime-trt, onnxruntime-cuda and
torch (cuda, fp32), β = 1 and β = 2 (goal for pi06 β = 2 on an H100: ≤ 25 ms; CFG overhead ≤ 10 %). A backend
that cannot load here is listed with its reason. The pi06 bundle (bf16 safetensors + fp32 ONNX, ≈ 35 GB) and its
engines are written to ``--workdir`` once; when no ONNX backend is available only torch runs, on the model
itself (no bundle, no export; model-level timing without host preprocessing).

    python bench/policy_latency.py --duration 5
    python bench/policy_latency.py --gpu --workdir /tmp/recap_pi06_bench --presets tiny pi06
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from recap_ros.policy import load_policy
from recap_ros.policy.errors import PolicyError

PROMPT = "touch the red marker with the left gripper"
GPU_BACKENDS = ("tensorrt", "onnxruntime-trt", "onnxruntime-cuda", "torch")


def measure(configs: dict, duration: float, min_iters: int = 5, cpu_times: dict | None = None,
            block: int = 1) -> dict:
    """configs: {label: (policy, beta)}. Round-robin over the configurations (``block`` consecutive chunks each
    per round) so that load changes on a shared machine hit every configuration alike; returns {label: [ms, ...]}
    (wall clock). ``cpu_times``: filled with {label: [ms, ...]} of this thread's CPU time per chunk (with one
    backend thread that is all the chunk's work, and time spent preempted by other processes does not count)."""
    rng = np.random.default_rng(0)
    inputs = {}
    for label, (pol, beta) in configs.items():
        views = [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in pol.info.camera_roles]
        inputs[label] = (views, np.zeros(pol.info.state_dim))
        for i in range(3):  # warm-up (lazy allocations, autotuning)
            pol.infer(*inputs[label], PROMPT, beta=beta, seed=i)
    times = {label: [] for label in configs}
    cpu_times = {} if cpu_times is None else cpu_times
    cpu_times.update({label: [] for label in configs})
    t_end = time.perf_counter() + duration * len(configs)
    while min(len(t) for t in times.values()) < min_iters or time.perf_counter() < t_end:
        for label, (pol, beta) in configs.items():
            for _ in range(block):
                t0, c0 = time.perf_counter(), time.thread_time()
                pol.infer(*inputs[label], PROMPT, beta=beta, seed=len(times[label]))
                cpu_times[label].append((time.thread_time() - c0) * 1e3)
                times[label].append((time.perf_counter() - t0) * 1e3)
    return times


def model_flops(bundle) -> dict:
    """Floating-point operations of the model per chunk (torch.utils.flop_counter on the bundle's model, batch 1):
    {'prefix': n, 1.0: denoise without CFG, 2.0: denoise with batched CFG}."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from recap_ros.policy.bundle import open_bundle
    from recap_ros.policy.export import example_inputs

    b = open_bundle(bundle)
    model = b.load_model().eval()
    x = example_inputs(model)
    state = x["state"] if b.config.state_input == "prefix" else None
    out = {}
    with torch.inference_mode():
        with FlopCounterMode(display=False) as fc:
            kv = model.encode_prefix(x["images"], x["tokens"], x["token_mask"], x["adv_tokens"], x["adv_mask"], state)
        out["prefix"] = fc.get_total_flops()
        for beta in (1.0, 2.0):
            with FlopCounterMode(display=False) as fc:
                model.denoise(*kv, None if state is not None else x["state"], x["noise"], b.config.denoise_steps,
                              None if beta == 1.0 else x["beta"] * beta)
            out[beta] = fc.get_total_flops()
    return out


def host_preprocessing(pol, n: int = 300) -> float:
    """Median ms of the host side of a chunk (input checks, camera views resized to the model's size, prompt
    tokens, noise) on 3 x 224^2 views."""
    rng = np.random.default_rng(1)
    views = [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in pol.info.camera_roles]
    state, times = np.zeros(pol.info.state_dim), []
    for i in range(n):
        t0 = time.perf_counter()
        pol.prepare_inputs(views, state, PROMPT, seed=i, beta=None)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def report(name: str, times: list[float]) -> float:
    med = statistics.median(times)
    print(f"  {name:40s} median {med:8.2f} ms  p90 {np.percentile(times, 90):8.2f} ms  (n={len(times)})")
    return med


def cfg_line(name: str, med: dict) -> None:
    print(f"  {name}: CFG (beta=2, batched) overhead vs beta=1: {100 * (med[2.0] / med[1.0] - 1):+.0f} % "
          "(goal <= 10 %)")


def cpu(args) -> None:
    print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; threads per backend: "
          f"{args.threads}")
    configs = {}
    for backend in ("torch", "onnxruntime"):
        pol = load_policy(args.bundle, backend=backend, threads=args.threads)
        print(f"{backend} on {pol.info.device}: bundle {pol.info.name} ({pol.info.bundle_id}), "
              f"{pol.info.denoise_steps} steps")
        for beta in (1.0, 2.0):
            configs[backend, beta] = (pol, beta)
    cpu_times = {}
    times = measure(configs, args.duration, cpu_times=cpu_times, block=args.block)
    print("wall clock per chunk:")
    med = {key: report(f"{key[0]} beta={key[1]:g}", t) for key, t in times.items()}
    print("CPU time of the calling thread per chunk" + (" (= all of the chunk's work with 1 thread):"
                                                        if args.threads == 1 else ":"))
    cpu_med = {key: report(f"{key[0]} beta={key[1]:g}", t) for key, t in cpu_times.items()}
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    for name, m in (("wall clock", med), ("CPU time", cpu_med)):
        print(f"ratios, {name} (measured in this run):")
        for beta in (1.0, 2.0):
            r = m["torch", beta] / m["onnxruntime", beta]
            print(f"  beta={beta:g}: onnxruntime is {r:.2f}x faster than torch eager (goal >= 3x)")
        for backend in ("torch", "onnxruntime"):
            cfg_line(backend, {b: m[backend, b] for b in (1.0, 2.0)})
    prep = host_preprocessing(configs["onnxruntime", 1.0][0])
    print(f"host preprocessing per chunk (Policy.prepare_inputs: 3 x 224^2 views resized, prompt, noise; the same "
          f"code for both backends): median {prep:.2f} ms; the backends alone (chunk minus it), beta=1: "
          f"onnxruntime {med['onnxruntime', 1.0] - prep:.2f} ms vs torch {med['torch', 1.0] - prep:.2f} ms = "
          f"{(med['torch', 1.0] - prep) / (med['onnxruntime', 1.0] - prep):.2f}x")
    flops = model_flops(args.bundle)
    chunk = {beta: flops["prefix"] + flops[beta] for beta in (1.0, 2.0)}
    print(f"model work per chunk (torch FlopCounterMode): prefix {flops['prefix'] / 1e6:.1f} MFLOP, denoise "
          f"{flops[1.0] / 1e6:.1f} (beta=1) / {flops[2.0] / 1e6:.1f} (beta=2): batched CFG adds "
          f"{100 * (chunk[2.0] / chunk[1.0] - 1):.0f} % to the chunk's FLOPs, the least CFG overhead a compute-bound "
          "backend can have")
    for key, ms in med.items():
        print(f"  {key[0]} beta={key[1]:g}: {chunk[key[1]] / ms / 1e6:.0f} GFLOP/s over the whole chunk "
              "(host preprocessing included)")
    print(f"  for scale: torch.mm multiplies fp32 matrices of the prefix MLP's shape at {matmul_rate():.0f} GFLOP/s "
          "here, same threads")


def matmul_rate(seconds: float = 1.0) -> float:
    """GFLOP/s of a (169 x 128) @ (128 x 256) fp32 product (the tiny prefix MLP's) by torch.mm, on the threads the
    torch backend set (``--threads``)."""
    import torch

    a, b = torch.randn(169, 128), torch.randn(128, 256)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        torch.mm(a, b)
        n += 1
    return n * 2 * 169 * 128 * 256 / (time.perf_counter() - t0) / 1e9


def gpu_policy(bundle, backend: str, precision: str):
    opts = {"device": "cuda"}
    if backend == "tensorrt":
        opts["precision"] = precision
    return load_policy(bundle, backend=backend, verify=False, **opts)


def ort_gpu_usable() -> bool:
    from recap_ros.policy.backends import tensorrt_available

    try:
        import onnxruntime
    except ImportError:
        return tensorrt_available()
    return tensorrt_available() or "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def pi06_bundle(work: Path):
    from recap_ros.policy.bundle import open_bundle, random_bundle

    bdir = work / "pi06_random"
    try:
        return open_bundle(bdir, verify=False).dir
    except PolicyError:  # not written yet (or incomplete): write it
        print(f"writing a random-weight pi06 bundle to {bdir} (export takes minutes)", flush=True)
        t0 = time.perf_counter()
        random_bundle("pi06", bdir, seed=0, weights_dtype="bfloat16")
        print(f"  done in {time.perf_counter() - t0:.0f} s", flush=True)
        return bdir


def torch_model_only(duration: float) -> None:
    """pi06 random weights on torch (cuda, fp32): encode_prefix + denoise on the model, no bundle."""
    import torch

    from recap_ros.policy.config import preset
    from recap_ros.policy.export import example_inputs
    from recap_ros.policy.model import Pi06Policy

    torch.manual_seed(0)
    with torch.device("cuda"):  # random init on the GPU: 5 B parameters initialise in seconds there
        model = Pi06Policy(preset("pi06")).eval()
    x = {k: v.cuda() for k, v in example_inputs(model).items()}
    x["beta"] = torch.full((1,), 2.0, device="cuda")
    med = {}
    for beta in (1.0, 2.0):
        times = []
        t_end = time.perf_counter() + duration
        with torch.inference_mode():
            while len(times) < 5 or time.perf_counter() < t_end:
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                kv = model.encode_prefix(x["images"], x["tokens"], x["token_mask"], x["adv_tokens"], x["adv_mask"],
                                         x["state"])
                model.denoise(*kv, None, x["noise"], 5, None if beta == 1.0 else x["beta"])
                torch.cuda.synchronize()
                times.append((time.perf_counter() - t0) * 1e3)
        med[beta] = report(f"pi06 torch (model only) beta={beta:g}", times[2:])
    cfg_line("pi06 torch", med)


def gpu(args) -> None:
    from recap_ros.policy.backends import gpu_available

    if not gpu_available():
        sys.exit("--gpu needs a CUDA GPU visible to torch")
    import torch

    name = torch.cuda.get_device_name()
    print(f"device: {name}")
    for preset_name in args.presets:
        if preset_name == "pi06" and not ort_gpu_usable():
            print("pi06: neither tensorrt nor onnxruntime-gpu is usable here: torch only, on the model")
            torch_model_only(args.duration)
            continue
        bundle = "tiny" if preset_name == "tiny" else pi06_bundle(Path(args.workdir))
        results = {}
        for backend in args.backends:
            t0 = time.perf_counter()
            try:
                pol = gpu_policy(bundle, backend, args.precision)
            except PolicyError as e:
                print(f"{preset_name} {backend}: unavailable ({e})")
                continue
            label = f"{preset_name} {backend}" + (f" {args.precision}" if backend == "tensorrt" else "")
            print(f"{label}: ready on {pol.info.device} in {time.perf_counter() - t0:.0f} s", flush=True)
            times = measure({beta: (pol, beta) for beta in (1.0, 2.0)}, args.duration)
            results[backend] = {beta: report(f"{label} beta={beta:g}", t) for beta, t in times.items()}
            cfg_line(label, results[backend])
            del pol
            torch.cuda.empty_cache()
        print(f"{preset_name} summary, ms per chunk on {name} (beta=1 / beta=2):")
        for backend, med in results.items():
            print(f"  {backend:18s} {med[1.0]:8.2f} / {med[2.0]:8.2f}")
        if preset_name == "pi06" and "tensorrt" in results:
            print(f"pi06, 3 x 448^2 views, 5 steps, beta=2 on TensorRT {args.precision}: {results['tensorrt'][2.0]:.1f} "
                  f"ms per chunk on {name} (goal <= 25 ms on an H100)")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", default="tiny", help="CPU run: bundle name or path")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds of timing per configuration")
    ap.add_argument("--quick", action="store_true", help="1 s per configuration")
    ap.add_argument("--threads", type=int, default=1, help="CPU run: threads of both torch and onnxruntime")
    ap.add_argument("--block", type=int, default=20, help="CPU run: consecutive chunks per configuration and round")
    ap.add_argument("--gpu", action="store_true", help="GPU backends on tiny and pi06 (random weights)")
    ap.add_argument("--presets", nargs="+", default=["tiny", "pi06"], choices=("tiny", "pi06"))
    ap.add_argument("--backends", nargs="+", default=list(GPU_BACKENDS), choices=GPU_BACKENDS)
    ap.add_argument("--workdir", default="/tmp/recap_pi06_bench")
    ap.add_argument("--precision", default="bf16", choices=("bf16", "fp16", "fp32"))
    ap.add_argument("--write-pi06", action="store_true",
                    help="only write the random-weight pi06 bundle into --workdir (no GPU needed; bench/gpu_check.sh "
                         "runs this in the background while the tiny checks use the GPU)")
    args = ap.parse_args(argv)
    if args.quick:
        args.duration = 1.0
    if args.write_pi06:
        pi06_bundle(Path(args.workdir))
        return
    gpu(args) if args.gpu else cpu(args)


if __name__ == "__main__":
    main()
