"""recap-export BAGS... --out DATASET: episode bags -> LeRobot v3.0 dataset with RECAP labels.

Arguments may be bag directories or folders of them (searched recursively for directories holding
metadata.yaml or an .mcap). Incremental: bags already in the dataset (by directory name) are not exported
again. Each bad bag gets one line saying why; the others still export. Exit status 1 if any bag failed
(unreadable, unfinished, missing topics, wrong station, a task whose max length / C_fail differ from those
the dataset already stores for it), 0 otherwise (skipped bags: unlabelled, or gaps with
--on-gap skip, are reported but not failures); 2 for bad arguments.

Output: one short line per bag that was not exported cleanly (its name and the gist; -v: the full text), then
a summary. Its robot time is the exported frames / fps (the data in the dataset); the bags' recorded time,
start to end, is longer by what the export left out (edge ticks, gaps, dropped segments).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tqdm import tqdm

from recap_ros.dataset.writer import DatasetError, VideoOptions
from recap_ros.export.align import Tolerances, camera_tolerance_s
from recap_ros.export.bagread import UNFINISHED
from recap_ros.export.exporter import (
    ON_GAP,
    SOURCE_BAG,
    BagResult,
    ExportConfig,
    export_bag,
    open_writer,
    task_normalisation,
)
from recap_ros.recap.returns import NUM_BINS
from recap_ros.recording import bag as rbag
from recap_ros.station import StationConfigError, load_station


def find_bags(paths: list[str]) -> list[Path]:
    """Bag directories among the arguments (folders are searched), sorted by name, without duplicates."""
    found: dict[str, Path] = {}
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"{p}: no such bag or folder")
        if _is_bag(p):
            found[str(p.resolve())] = p
            continue
        for sub in sorted(p.rglob("*")):
            if sub.is_dir() and _is_bag(sub):
                found[str(sub.resolve())] = sub
    return sorted(found.values(), key=lambda b: b.name)


def _is_bag(p: Path) -> bool:
    return p.is_dir() and ((p / "metadata.yaml").is_file() or any(p.glob("*.mcap")))


def _task_max_len(items: list[str]) -> dict[str, int]:
    out = {}
    for item in items:
        task, sep, steps = item.rpartition("=")
        if not sep or not task or not steps.isdigit() or int(steps) <= 0:
            raise argparse.ArgumentTypeError(f"--task-max-len {item!r}: expected PROMPT=STEPS with STEPS > 0")
        out[task] = int(steps)
    return out


def _station_of(bags: list[Path], given: str | None) -> str:
    if given:
        return given
    for b in bags:
        try:
            name = (rbag.read_metadata(b)["rosbag2_bagfile_information"].get("custom_data") or {}).get(rbag.K_STATION)
        except rbag.BagError:
            continue
        if name:
            return name
    return "sim"


def _repair(bag: Path) -> str | None:
    """Run the recorder's repair on an unfinished bag; returns an error text, None when repaired."""
    try:
        from recap_ros.recording import repair
    except ImportError:
        return "recap_ros.recording.repair is not available in this installation"
    try:
        repair.repair_bag(bag)
    except Exception as e:  # the repair tool reports its own failure kinds
        return f"repair failed: {e}"
    return None


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends "(default: X)" to an option's help unless its help already says the default, or it has none."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, [], argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="recap-export", description=__doc__.split("\n\n")[0],
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]).strip(),
                                formatter_class=_HelpFormatter)
    p.add_argument("bags", nargs="+", help="episode bag directories or folders of them")
    p.add_argument("--out", required=True, metavar="DATASET", help="dataset directory (created, or appended to)")
    p.add_argument("--station", help="station name or YAML (default: recap.station of the bags, else sim)")
    p.add_argument("--max-len", type=int, help="task's maximum episode length in steps (default: the station's "
                   "sim episode_timeout_s x control rate)")
    p.add_argument("--task-max-len", action="append", default=[], metavar="PROMPT=STEPS",
                   help="maximum episode length for one task (repeatable)")
    p.add_argument("--c-fail", type=float, help="failure cost on the final step (default: the max length)")
    p.add_argument("--bins", type=int, default=NUM_BINS, help="number of return bins B")
    p.add_argument("--assume-outcome", choices=("success", "failure"),
                   help="label for bags without an outcome (default: skip them)")
    p.add_argument("--on-gap", choices=ON_GAP, default="split",
                   help="gaps beyond tolerance: keep the valid segments as episodes, or skip the episode")
    p.add_argument("--min-segment-s", type=float, default=1.0, help="drop segments shorter than this")
    p.add_argument("--camera-tol-s", type=float, help="a camera frame older than this at a tick is a gap "
                   "(default: 3 frame periods of the station's slowest camera, at least 0.1 s)")
    p.add_argument("--joint-tol-s", type=float, default=Tolerances.joint_s,
                   help="a joint state older than this at a tick is a gap")
    p.add_argument("--command-tol-s", type=float, default=Tolerances.command_s,
                   help="a robot command older than this at a tick is a gap")
    p.add_argument("--edge-tol-s", type=float, default=Tolerances.edge_s,
                   help="ticks at the episode's start and end may miss data for this long (trimmed, not a gap)")
    p.add_argument("--joints", choices=("interpolate", "latest"), default="interpolate",
                   help="joint state at a tick: interpolated between the samples around it, or the latest one")
    p.add_argument("--vcodec", default=VideoOptions.codec, help="video codec: libx264, libsvtav1, hevc, mpeg4")
    p.add_argument("--crf", type=int, default=VideoOptions.crf,
                   help="video quality: constant rate factor (lower: better and larger)")
    p.add_argument("--gop", type=int, default=VideoOptions.gop, help="video keyframe interval in frames")
    p.add_argument("--preset", default=VideoOptions.preset, help="x264/x265 preset (ultrafast .. slow)")
    p.add_argument("--repair", action="store_true", help="repair unfinished bags (recap-bag-repair) and export them")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="each bag's full notes and errors (default: its name and the gist)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


GIST_CHARS = 60  # a note's gist in the short per-bag line


def bag_line(r: BagResult, verbose: bool = False) -> str:
    """The line for a bag that was not exported cleanly: ``status: bag: gist`` (the failure's kind, or each
    note up to its first ':', without the items of a list such as each gap, ``cam_high: gap at ...``); with
    ``verbose`` the full message (it names the bag's path and what to do)."""
    if verbose:
        return f"{r.status}: {r.bag}: {r.message}" if r.status == "exported" else f"{r.status}: {r.message}"
    if r.status == "exported" or not r.kind:
        text = r.message[len(r.bag) + 2:] if r.message.startswith(f"{r.bag}: ") else r.message
        heads = [n.split(":")[0][:GIST_CHARS] for n in text.split("; ")]
        gist = "; ".join(h for h in heads if " " in h.strip())  # a bare name before ':' is a list item
    else:
        gist = r.kind.replace("_", " ")
    return f"{r.status}: {r.bag}: {gist}"


def summary_line(results: list[BagResult], fps: float, wall_s: float, out_dir: str) -> str:
    """The export's last line. Robot time = exported frames / fps; recorded = the bags' start-to-end time."""
    by = {s: [r for r in results if r.status == s] for s in ("exported", "present", "skipped", "failed")}
    frames = sum(r.frames for r in by["exported"])
    recorded = sum(r.duration_s for r in by["exported"])
    return (f"recap-export: {len(by['exported'])} exported ({frames} frames = {frames / fps:.1f} s of robot time "
            f"at {fps:g} fps, {sum(len(r.episodes) for r in by['exported'])} episodes; the bags recorded "
            f"{recorded:.1f} s) in {wall_s:.1f} s, {len(by['present'])} already in {out_dir}, "
            f"{len(by['skipped'])} skipped, {len(by['failed'])} failed")


def run(args: argparse.Namespace, out=sys.stdout) -> tuple[int, list[BagResult]]:
    bags = find_bags(args.bags)
    station = load_station(_station_of(bags, args.station))
    cfg = ExportConfig(
        tolerances=Tolerances(camera_tolerance_s([c.fps for c in station.cameras]) if args.camera_tol_s is None
                              else args.camera_tol_s, args.joint_tol_s, args.command_tol_s, args.edge_tol_s),
        joint_mode=args.joints, on_gap=args.on_gap, min_segment_s=args.min_segment_s, max_len=args.max_len,
        task_max_len=_task_max_len(args.task_max_len), c_fail=args.c_fail, num_bins=args.bins,
        assume_outcome=args.assume_outcome,
        video=VideoOptions(codec=args.vcodec, crf=args.crf, gop=args.gop, preset=args.preset))
    results: list[BagResult] = []
    t0 = time.monotonic()
    with open_writer(args.out, station, cfg) as writer:
        for note in writer.notes:
            print(f"note: {note}", file=out)
        present = writer.exported(SOURCE_BAG)
        known = task_normalisation(writer)
        bar = tqdm(bags, unit="bag", disable=args.quiet, file=sys.stderr, desc="recap-export")
        frames = 0
        for bag in bar:
            if bag.name in present:
                results.append(BagResult(bag.name, "present"))
                continue
            r = export_bag(writer, bag, station, cfg, known)
            if r.status == "failed" and r.kind == UNFINISHED and args.repair:
                err = _repair(bag)
                r = export_bag(writer, bag, station, cfg, known) if err is None else BagResult(
                    bag.name, "failed", f"{r.message}; {err}", kind=UNFINISHED)
                if err is None and r.status == "exported":
                    r.message = "; ".join(x for x in ("repaired (recap-bag-repair)", r.message) if x)
            results.append(r)
            frames += r.frames
            bar.set_postfix(frames=frames)
            if r.status != "exported" or r.message:
                tqdm.write(bag_line(r, args.verbose), file=out)
    print(summary_line(results, station.robot.control_rate_hz, time.monotonic() - t0, args.out), file=out)
    return (1 if any(r.status == "failed" for r in results) else 0), results


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code, _ = run(args)
    except (FileNotFoundError, StationConfigError, DatasetError, ValueError, argparse.ArgumentTypeError) as e:
        print(f"recap-export: error: {e}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
