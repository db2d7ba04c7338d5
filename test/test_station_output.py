"""What `./dev station` prints: where the bags go, one line per finished episode, a summary at exit (Ctrl-C),
readable log times, no WARN for the routine holds of each episode start, no rosout error at exit."""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import REPO, wait_for

from recap_ros import paths

EPISODE = re.compile(r"^\[recap-station\] episode (\d+) +(success|failure|unlabelled) +(\d+\.\d) s  "
                     r"(autonomous|human \d+ ticks \(\d+ takeovers?\))  '([^']+)'  (\S+)$", re.M)


GRACE = ["--grace", "60"]  # a node stopped while it starts finishes starting first: slow on a loaded machine


def _dev_command(station: Path) -> tuple[list[str], dict]:
    """``./dev station <yaml>`` when this test runs in ./dev's venv; elsewhere (a ROS machine's own Python) the
    runner as ./dev runs it, with the log format ./dev sets."""
    env = {k: v for k, v in os.environ.items() if k != "RCUTILS_CONSOLE_OUTPUT_FORMAT"}
    venv = (REPO / os.environ.get("RECAP_VENV", ".venv")).resolve()
    if Path(sys.prefix).resolve() == venv:
        return [str(REPO / "dev"), "station", str(station), *GRACE], env
    env["RCUTILS_CONSOLE_OUTPUT_FORMAT"] = "[{severity}] [{date_time_with_ms}] [{name}]: {message}"
    return [sys.executable, "-m", "recap_ros.runner", str(station), *GRACE], env


def _ctrl_c_station(station: Path, log_path: Path, ready, timeout_s: float, what: str, settle_s: float = 0.0,
                    stop_timeout_s: float = 30) -> tuple[int, str]:
    """Start `./dev station <station>`, wait until ``ready(log text)``, press Ctrl-C (SIGINT to the process
    group, as a terminal does) and return (exit code, log)."""
    cmd, env = _dev_command(station)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO,
                                env=env)
        try:
            wait_for(lambda: proc.poll() is None and ready(log_path.read_text()), timeout_s, what)
            time.sleep(settle_s)
            os.killpg(proc.pid, signal.SIGINT)
            rc = proc.wait(timeout=stop_timeout_s)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return rc, log_path.read_text()


@pytest.mark.ros
@pytest.mark.timeout(90)
def test_dev_station_prints_episode_lines_and_a_summary_at_ctrl_c(rclpy_context, tmp_path):
    data = yaml.safe_load(paths.station_file("sim").read_text())
    bags = tmp_path / "bags"
    data["recorder"]["output_dir"] = str(bags)
    data["sim"]["episode_timeout_s"] = 1.5  # short episodes: two finish within seconds of the start
    station = tmp_path / "sim.yaml"
    station.write_text(yaml.safe_dump(data))

    def running(text):  # two episodes have ended, one of them since the policy drives (its server is up)
        return len(EPISODE.findall(text)) >= 2 and "[policy_server]: executing chunks" in text and \
            EPISODE.search(text, text.index("[policy_server]: executing chunks")) is not None

    rc, out = _ctrl_c_station(station, tmp_path / "station.log", running, 60,
                              "two episode lines, one since the policy drives", settle_s=0.3)
    assert rc == 0, out[-3000:]
    assert f"[recap-station] episode bags go to {bags}\n" in out, out[:2000]
    episodes = EPISODE.findall(out)
    numbers = [int(e[0]) for e in episodes]
    assert numbers == list(range(len(numbers))), numbers  # each once, in order
    for number, outcome, duration, _, prompt, bag in episodes:
        assert (bags / bag).is_dir() and bag.endswith(f"_ep{int(number):04d}"), bag
        assert 0 <= float(duration) < 5.0, duration  # 1.5 s episodes; the first bag may start late (the recorder
        #                                              joins an episode under way), stop events may lag on a busy CPU
        if int(number) < len(episodes) - 1:  # the last one may be cut short, unlabelled, by Ctrl-C
            assert outcome != "unlabelled", (number, outcome, duration)
    summary = out[out.rindex("[recap-station] episode "):]
    m = re.search(r"\[recap-station\] (\d+) episodes?: (\d+) success, (\d+) failure, (\d+) unlabelled", summary)
    assert m, out[-2000:]
    assert int(m[1]) == len(episodes) == int(m[2]) + int(m[3]) + int(m[4])
    assert int(m[2]) == sum(e[1] == "success" for e in episodes)
    assert re.search(r"\[recap-station\] interventions: \d+ takeovers? in \d+ episodes?, \d+ human-driven ticks; "
                     r"\d+\.\d s recorded", summary), summary
    assert f"[recap-station] bags: {bags} ({episodes[0][5]} .. {episodes[-1][5]})" in summary, summary
    assert summary.rstrip().endswith("[recap-station] stopped (SIGINT)"), summary
    assert re.search(r"^\[INFO\] \[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}\] \[sim_robot\]", out, re.M), out[:2000]
    assert not re.search(r"^\[WARN\].*holding: waiting for", out, re.M), "routine holds are INFO"
    assert "Failed to publish log message to rosout" not in out and "Traceback" not in out, out[-3000:]


@pytest.mark.ros
@pytest.mark.timeout(90)
def test_ctrl_c_while_the_nodes_start_stops_them_cleanly(rclpy_context, tmp_path):
    """Ctrl-C a second after `./dev station`: the nodes are still importing (policy_server loads its model);
    each finishes starting, stops, and exits 0, without a KeyboardInterrupt traceback."""
    data = yaml.safe_load(paths.station_file("sim").read_text())
    data["recorder"]["output_dir"] = str(tmp_path / "bags")
    station = tmp_path / "sim.yaml"
    station.write_text(yaml.safe_dump(data))
    rc, out = _ctrl_c_station(station, tmp_path / "station.log",
                              lambda text: text.count("[recap-station] started ") >= 4, 30, "the nodes' start",
                              stop_timeout_s=60)
    assert rc == 0 and "Traceback" not in out and "KeyboardInterrupt" not in out, out[-3000:]
    assert "exit codes other than 0" not in out and out.rstrip().endswith("[recap-station] stopped (SIGINT)"), out
