"""``recap-sim-demos``: scripted-expert demonstrations on the sim station, collected ROS-free at simulation speed.

The expert drives through the station's mux (teleop input) and episodes are judged by the sim task; camera views
are rendered at the station's resolution and resized to the policy's input size on every ``--stride``-th tick.
Output: a frames file (.npz, :func:`recap_ros.recap.data.save_frames`) that ``recap-train-policy --sft`` takes.
"""
from __future__ import annotations

import argparse
import sys


def demos_main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="recap-sim-demos", description=__doc__.splitlines()[0])
    p.add_argument("--station", default="sim", help="sim station name or YAML path (default: sim)")
    p.add_argument("--episodes", type=int, default=200)
    p.add_argument("--first-seed", type=int, default=1_000_000, help="task seed of the first demo")
    p.add_argument("--image-size", type=int, default=64, help="policy input size the views are resized to")
    p.add_argument("--stride", type=int, default=5, help="record a training frame every N ticks")
    p.add_argument("--out", required=True, help="output frames file (.npz)")
    a = p.parse_args(argv)
    from recap_ros.recap.data import concat, save_frames
    from recap_ros.recap.rollout import Roller, rollouts
    from recap_ros.station import StationConfigError, load_station

    if a.episodes < 1 or a.stride < 1 or a.image_size < 8:
        p.error(f"--episodes, --stride must be >= 1 and --image-size >= 8 (got {a.episodes}, {a.stride}, "
                f"{a.image_size})")
    try:
        station = load_station(a.station)
    except (StationConfigError, FileNotFoundError) as e:
        print(f"recap-sim-demos: {e}", file=sys.stderr)
        return 2
    if not station.is_sim:
        print(f"recap-sim-demos: {station.file} is not a sim station", file=sys.stderr)
        return 2
    roller = Roller(station, a.image_size)
    s = rollouts(roller, range(a.first_seed, a.first_seed + a.episodes), record=True, frame_stride=a.stride,
                 scripted=True, desc="demos")
    good = [e.frames for e in s.episodes if e.success]
    save_frames(concat(good), a.out)
    print(f"{s.successes}/{s.n} demos succeeded ({s.reasons()}); kept {len(good)} successful episodes, "
          f"{sum(len(f) for f in good)} frames -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(demos_main())
