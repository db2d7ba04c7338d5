"""Training throughput with images decoded while training: samples/s and the share of time waiting for data.

Trains the value function (the tiny model, as ``recap-train-value``) for --steps steps on a LeRobot dataset
(--data, or an export of synthetic episode bags) three ways: images decoded up front (the reference), and
decoded per batch by a DataLoader with 0 and with 2 worker processes (``--workers``). Data wait = the time the
training process spent waiting for a batch's images / the training time. The three runs see the same batches, so
their loss curves must be bit-identical (checked). Prints measured figures; goal: data wait <= 10 % with 2 workers.

    .venv/bin/python bench/train_throughput.py --quick
    .venv/bin/python bench/train_throughput.py --data /path/to/dataset --steps 100 --device cuda
"""
from __future__ import annotations

import argparse
import io
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from recap_ros.export import cli
from recap_ros.export.synth import SynthEpisode, write_episode_bag
from recap_ros.recap import loader
from recap_ros.recap.dataset_io import load_frames
from recap_ros.recap.train_value import train_value
from recap_ros.station import load_station

NS = 1_000_000_000


def synth_dataset(work: Path, episodes: int, duration: float) -> Path:
    station = load_station("sim")
    for ep in range(episodes):
        write_episode_bag(work / "bags", station, SynthEpisode(
            duration_s=duration, episode=ep, outcome="success" if ep % 2 == 0 else "failure", textured=True,
            interventions=[(duration / 3, duration / 2)] if ep % 2 else [],
            start_ns=1_700_000_000 * NS + ep * 1000 * NS))
    code, _ = cli.run(cli.build_parser().parse_args([str(work / "bags"), "--out", str(work / "ds"), "--quiet"]),
                      out=io.StringIO())
    if code:
        raise SystemExit(f"export of the synthetic bags failed (exit {code})")
    return work / "ds"


def run(frames, args, label: str) -> list[float]:
    t = time.perf_counter()
    _, losses = train_value(frames, steps=args.steps, batch_size=args.batch_size, seed=0, device=args.device,
                            progress=False)
    wall = time.perf_counter() - t
    samples = args.steps * args.batch_size
    img = frames.images
    wait, start = getattr(img, "wait_s", 0.0), getattr(img, "startup_s", 0.0)
    extra = (f"; after the first batch ({start:.2f} s, workers starting): {100 * (wait - start) / (wall - start):.1f}"
             f" %; {img.misses} batch(es) off the plan" if hasattr(img, "misses") else "")
    print(f"{label:<22} {samples / wall:8.1f} samples/s   data wait {wait:6.2f} s = {100 * wait / wall:5.1f} % of "
          f"{wall:.2f} s{extra}")
    return losses


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="LeRobot dataset directory (default: export synthetic bags)")
    p.add_argument("--episodes", type=int, default=6)
    p.add_argument("--duration", type=float, default=8.0, help="seconds per synthetic episode")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--device", default=None)
    p.add_argument("--quick", action="store_true", help="4 episodes of 4 s, 20 steps")
    args = p.parse_args(argv)
    if args.quick:
        args.episodes, args.duration, args.steps = 4, 4.0, 20
    work = Path(tempfile.mkdtemp(prefix="recap_train_bench_"))
    try:
        t = time.perf_counter()
        data = Path(args.data) if args.data else synth_dataset(work, args.episodes, args.duration)
        if not args.data:
            print(f"dataset: {args.episodes} synthetic episodes x {args.duration:.0f} s exported in "
                  f"{time.perf_counter() - t:.1f} s")
        print(f"machine: {os.cpu_count()} CPUs, torch {torch.get_num_threads()} threads, device "
              f"{args.device or ('cuda' if torch.cuda.is_available() else 'cpu')}; tiny value model, "
              f"{args.image_size} px, batch {args.batch_size}, {args.steps} steps")
        t = time.perf_counter()
        eager = load_frames(data, args.image_size, progress=False)
        print(f"up front: {len(eager)} frames, {eager.num_episodes} episodes decoded in "
              f"{time.perf_counter() - t:.2f} s ({eager.images.nbytes / 1e6:.0f} MB held)")
        curves = {"decoded up front": run(eager, args, "decoded up front")}
        lazy = load_frames(data, args.image_size, progress=False, decode="lazy")
        for w in args.workers:
            frames = loader.prefetched(lazy, args.steps, args.batch_size, 0, w)
            curves[f"{w} workers"] = run(frames, args, f"DataLoader, {w} workers")
            frames.images.close()
        ref = np.asarray(curves["decoded up front"])
        same = all(np.array_equal(ref, np.asarray(c)) for c in curves.values())
        print(f"loss curves bit-identical across the {len(curves)} runs: {same}")
        return 0 if same else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
