"""recap-export's command line: a help text without raw markup or doubled defaults, help for every option,
robot time = frames / fps in the summary, short per-bag lines (details with -v)."""
import io
import re

from recap_ros.dataset.reader import RecapDataset
from recap_ros.export import cli
from recap_ros.export.exporter import BagResult
from recap_ros.export.synth import SynthEpisode, write_episode_bag
from recap_ros.station import load_station


def option_blocks(help_text: str) -> dict[str, str]:
    """Each option's help from the rendered --help: '--name' -> its text (the lines up to the next option)."""
    body = help_text.split("options:\n", 1)[1].split("\n\n", 1)[0]
    blocks = re.split(r"\n(?=  -)", body)
    out = {}
    for b in blocks:
        m = re.match(r"\s+(?:-\w, )?(--[\w-]+|-h)", b)
        out[m[1]] = " ".join(b.split())
    return out


def test_help_is_clean_and_every_option_has_help():
    text = cli.build_parser().format_help()
    assert "``" not in text and "`" not in text, "raw reStructuredText markup"
    blocks = option_blocks(text)
    options = {o for a in cli.build_parser()._actions for o in a.option_strings if o.startswith("--")}
    assert options - {"--help"} <= set(blocks), options - set(blocks)
    for name, block in blocks.items():
        assert block.count("(default:") <= 1, block
        words = block.split(None, 1)[1] if " " in block else ""
        assert len(re.sub(r"^[A-Z_=\[\]{},a-z-]+ ", "", words)) > 10, f"{name} has no help: {block!r}"
    assert "(default: None)" not in text
    assert blocks["--bins"].endswith("(default: 201)") and blocks["--min-segment-s"].endswith("(default: 1.0)")


def test_summary_robot_time_is_frames_over_fps(tmp_path):
    station = load_station("sim")
    bags = tmp_path / "bags"
    write_episode_bag(bags, station, SynthEpisode(duration_s=3.0, episode=0,
                                                  camera_gaps={"cam_high": [(1.2, 1.6)]}))
    out = io.StringIO()
    code, res = cli.run(cli.build_parser().parse_args([str(bags), "--out", str(tmp_path / "ds"), "--quiet",
                                                       "--max-len", "200"]), out=out)
    assert code == 0 and res[0].status == "exported"
    frames = RecapDataset(tmp_path / "ds").num_frames  # read back from the dataset
    assert frames < 150, "the gap's ticks are not in the dataset"
    summary = out.getvalue().strip().splitlines()[-1]
    assert f"({frames} frames = {frames / 50:.1f} s of robot time at 50 fps, 2 episodes; " in summary, summary
    assert "the bags recorded 3.0 s)" in summary, summary
    line = out.getvalue().splitlines()[0]
    assert line.startswith(f"exported: {res[0].bag}: ") and "split at gaps" in line and len(line) < 160, line


def test_bag_lines_short_by_default_full_with_verbose():
    long = "; ".join(["split at gaps: cam_high: gap at 1.20..1.60 s (0.40 s > 0.10 s)",
                      "/joint_states: gap at 1.3..1.4 s (0.1 s > 0.05 s)", "trimmed 2 + 3 edge ticks"])
    ok = BagResult("sim_20260101-120000_ep0001", "exported", long)
    assert cli.bag_line(ok) == "exported: sim_20260101-120000_ep0001: split at gaps; trimmed 2 + 3 edge ticks"
    assert cli.bag_line(ok, verbose=True) == f"exported: sim_20260101-120000_ep0001: {long}"
    bad = BagResult("sim_x_ep0002", "failed", "/data/bags/sim_x_ep0002: missing topic(s) /joint_states; the bag "
                    "records ...", kind="missing_topic")
    assert cli.bag_line(bad) == "failed: sim_x_ep0002: missing topic"
    assert cli.bag_line(bad, verbose=True) == f"failed: {bad.message}"
