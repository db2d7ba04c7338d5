"""Command line tools of recap_ros.policy.

``recap-build-engine <bundle> [--steps 5 10] [--precision bf16 fp16] [--station sim] [--device cuda:0] [--export-only]``
    Exports any missing denoise graphs (for the requested step counts) and builds the strongly typed TensorRT
    engines for every requested precision and step count (prefix + cond + cfg), cached by graph + external data
    + TensorRT version + GPU + precision + steps (``<bundle>/engine_cache/``, or the user cache when the bundle is
    read-only). ``--station`` adds the station's ``policy.denoise_steps``. The only other place engines are built
    is a tensorrt policy's start-up; inference never builds.

``python -m recap_ros.policy.cli random <preset> <out_dir> [--seed 0]``
    Writes a random-weight bundle (this is how ``models/tiny`` was made).
"""
from __future__ import annotations

import argparse
import sys
import time

from recap_ros.policy.errors import PolicyError


def build_engine_main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="recap-build-engine", description=__doc__.split("\n\n")[1].strip())
    ap.add_argument("bundle", help="bundle name under models/ or a path")
    ap.add_argument("--steps", type=int, nargs="+", help="denoise step counts (default: the bundle's)")
    ap.add_argument("--precision", nargs="+", default=["bf16"], choices=("bf16", "fp16", "fp32"))
    ap.add_argument("--station", help="station name or YAML: also build for its policy.denoise_steps")
    ap.add_argument("--device", default=None, help="cuda or cuda:N (default cuda:0)")
    ap.add_argument("--workspace-gb", type=float, default=None, help="TensorRT builder workspace limit")
    ap.add_argument("--export-only", action="store_true", help="only export missing ONNX graphs (no GPU needed)")
    args = ap.parse_args(argv)
    from recap_ros.policy.backends import TensorRTBackend
    from recap_ros.policy.bundle import add_denoise_steps, open_bundle
    from recap_ros.station import StationConfigError, load_station

    try:
        bundle = open_bundle(args.bundle, verify=True)
        steps = set(args.steps or ())
        if args.station:
            steps.add(load_station(args.station).policy.denoise_steps)
        steps = tuple(sorted(steps or {bundle.config.denoise_steps}))
        if any(s < 1 or s > 100 for s in steps):
            raise PolicyError(f"--steps {list(steps)}: each must be in [1, 100]")
        if not set(steps) <= set(bundle.onnx_steps):
            print(f"exporting denoise graphs for steps {sorted(set(steps) - set(bundle.onnx_steps))}")
            bundle = add_denoise_steps(bundle, list(steps))
        if args.export_only:
            print(f"{bundle.dir}: ONNX graphs for steps {list(bundle.onnx_steps)} (bundle_id {bundle.bundle_id})")
            return 0
        for precision in dict.fromkeys(args.precision):
            t0 = time.monotonic()
            backend = TensorRTBackend(bundle, precision=precision, steps=steps, device=args.device,
                                      **({"workspace_gb": args.workspace_gb} if args.workspace_gb else {}))
            print(f"{bundle.dir}: {len(backend.engines)} TensorRT {precision} engines (steps {list(steps)}) ready "
                  f"on {backend.device} in {time.monotonic() - t0:.1f} s ({backend.cache.root})")
        return 0
    except (PolicyError, StationConfigError) as e:
        print(f"recap-build-engine: {e}", file=sys.stderr)
        return 2


def random_bundle_main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m recap_ros.policy.cli random")
    ap.add_argument("preset", choices=("tiny", "pi06"))
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from recap_ros.policy.bundle import random_bundle

    b = random_bundle(args.preset, args.out_dir, seed=args.seed)
    print(f"{b.dir}: bundle_id {b.bundle_id}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "random":
        sys.exit(random_bundle_main(sys.argv[2:]))
    sys.exit(build_engine_main())
