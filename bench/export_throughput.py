"""Export throughput: episode bags -> LeRobot v3 dataset, in frames/s and x real time (goal >= 10x).

Writes --episodes synthetic episode bags (real rosbag2 MCAP bags through the recorder's BagWriter: three
textured 224x224 JPEG cameras at 30 fps, joint states / commands at 50 Hz, mux state, events) of
--duration seconds each, or uses --bags DIR (e.g. real recorder bags), then times ``recap-export`` on them and
the training reader decoding the result. Prints measured figures; no pass/fail.

    .venv/bin/python bench/export_throughput.py --quick
    .venv/bin/python bench/export_throughput.py --episodes 4 --duration 12
"""
from __future__ import annotations

import argparse
import io
import shutil
import tempfile
import time
from pathlib import Path

from recap_ros.dataset.reader import RecapDataset
from recap_ros.dataset.writer import VideoOptions
from recap_ros.export import cli
from recap_ros.export.synth import SynthEpisode, write_episode_bag
from recap_ros.station import load_station

NS = 1_000_000_000


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--episodes", type=int, default=3)
    p.add_argument("--duration", type=float, default=12.0, help="seconds per synthetic episode")
    p.add_argument("--quick", action="store_true", help="2 episodes of 4 s")
    p.add_argument("--bags", help="export these bags instead of synthetic ones")
    p.add_argument("--station", default="sim")
    p.add_argument("--vcodec", default="libx264")
    p.add_argument("--preset", default=VideoOptions.preset)
    args = p.parse_args(argv)
    if args.quick:
        args.episodes, args.duration = 2, 4.0
    work = Path(tempfile.mkdtemp(prefix="recap_export_bench_"))
    try:
        station = load_station(args.station)
        if args.bags:
            bags = Path(args.bags)
        else:
            bags = work / "bags"
            t = time.perf_counter()
            for ep in range(args.episodes):
                write_episode_bag(bags, station, SynthEpisode(
                    duration_s=args.duration, episode=ep, outcome="success" if ep % 2 == 0 else "failure",
                    interventions=[(args.duration / 3, args.duration / 2)] if ep % 2 else [], textured=True,
                    start_ns=1_700_000_000 * NS + ep * 1000 * NS))
            print(f"wrote {args.episodes} bags x {args.duration:.1f} s in {time.perf_counter() - t:.1f} s "
                  f"({sum(f.stat().st_size for f in bags.rglob('*.mcap')) / 1e6:.1f} MB)")
        out = io.StringIO()
        t = time.perf_counter()
        code, results = cli.run(cli.build_parser().parse_args(
            [str(bags), "--out", str(work / "ds"), "--quiet", "--vcodec", args.vcodec, "--preset", args.preset]), out=out)
        wall = time.perf_counter() - t
        print(out.getvalue().strip())
        frames = sum(r.frames for r in results)
        robot_s = sum(r.duration_s for r in results if r.status == "exported")
        if not frames:
            print("nothing exported")
            return 1
        print(f"export: {frames} frames ({robot_s:.1f} s of robot time, 3 cameras) in {wall:.2f} s = "
              f"{frames / wall:.0f} frames/s = {robot_s / wall:.1f}x real time (goal >= 10x)")
        t = time.perf_counter()
        ds = RecapDataset(work / "ds")
        decoded = 0
        for e in range(ds.num_episodes):
            decoded += sum(v.shape[0] for v in ds.images(e).values())
        rt = time.perf_counter() - t
        print(f"reader: {ds.num_frames} frames, {decoded} images decoded in {rt:.2f} s = "
              f"{ds.num_frames / rt:.0f} frames/s ({decoded / rt:.0f} images/s); "
              f"dataset {sum(f.stat().st_size for f in (work / 'ds').rglob('*') if f.is_file()) / 1e6:.1f} MB")
        t = time.perf_counter()
        small = RecapDataset(work / "ds", image_size=(112, 112))
        for e in range(small.num_episodes):
            small.images(e)
        print(f"reader at 112x112: {small.num_frames / (time.perf_counter() - t):.0f} frames/s")
        return code
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
