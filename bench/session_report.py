"""A short live station session, its report, and the report checked in a real headless browser.

Runs ``recap-station <station> --duration S --bag-dir <tmp>/bags`` (all nodes, DDS, recorder; a ROS domain of
its own), then ``recap-report <tmp>/bags --check`` (export, plots, page, headless Chromium: every image must load),
and prints the station's summary, the report's lines and where the page is.

    ./dev run python bench/session_report.py [--station sim] [--duration 60] [--value BUNDLE] [--out DIR]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from procs import private_domain

from recap_ros.report.cli import main as report_main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--station", default="sim", help="station name or YAML (default: sim)")
    ap.add_argument("--duration", type=float, default=60.0, help="station seconds (default: 60)")
    ap.add_argument("--value", help="value bundle for the value curves (when the bags record no /value)")
    ap.add_argument("--out", help="work directory: bags/, dataset/, report/ (default: a new temporary one)")
    a = ap.parse_args()
    work = Path(a.out or tempfile.mkdtemp(prefix="session-report-"))
    print(f"[bench] ROS_DOMAIN_ID={private_domain()}; work directory {work}", flush=True)
    run = subprocess.run([sys.executable, "-m", "recap_ros.runner", a.station, "--duration", str(a.duration),
                          "--bag-dir", str(work / "bags")], capture_output=True, text=True)
    station_lines = [line for line in run.stdout.splitlines() if line.startswith("[recap-station]")]
    print("\n".join(station_lines[-4:]))
    if run.returncode != 0:
        print(f"[bench] recap-station exited with {run.returncode}:\n{run.stderr[-2000:]}", file=sys.stderr)
        return 1
    args = [str(work / "bags"), "--out", str(work / "report"), "--dataset", str(work / "dataset"), "--check"]
    rc = report_main(args + (["--value", a.value] if a.value else []))
    print(f"[bench] report: {work / 'report' / 'index.html'} (recap-report exit code {rc})")
    return rc


if __name__ == "__main__":
    sys.exit(main())
