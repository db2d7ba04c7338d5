"""recap-report BAGS_OR_DATASET... [--out DIR]: an HTML page with PNG plots of a recorded session.

Arguments: episode bag folders (e.g. what recap-station printed as "episode bags go to ...") or one
recap-export dataset. Bags are exported into a dataset first (--dataset DIR keeps it, and a later run only
adds new bags; default: a temporary one) for the per-tick curves; the episode facts come from the bags.

The page shows the success rate and the throughput over the session, takeovers per episode, durations, a
table of the episodes and the value V over each episode with its human-driven stretches shaded. V is the
dataset column monitor.value (the value monitor's output, recorded live) when present, else the prediction of
--value BUNDLE; without either the page says so. --check opens the page in headless Chromium and fails unless
every image loads.
"""
from __future__ import annotations

import argparse
import io
import sys
import tempfile
from pathlib import Path

from recap_ros.dataset.layout import INFO_PATH
from recap_ros.dataset.reader import DatasetReadError, RecapDataset
from recap_ros.recording.bag import BagError
from recap_ros.recording.episodes import read_episode
from recap_ros.report import browser, page, session


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="recap-report", description=__doc__.split("\n\n")[0],
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]).strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="BAGS_OR_DATASET",
                   help="episode bag directories or folders of them, or one dataset directory")
    p.add_argument("--out", default="recap_report", help="output directory for index.html and the PNGs "
                   "(default: recap_report)")
    p.add_argument("--dataset", help="where bags are exported for the curves (default: a temporary dataset)")
    p.add_argument("--value", metavar="BUNDLE", help="value bundle (recap-train-value) that computes V where the "
                   "dataset has no monitor.value column")
    p.add_argument("--value-stride", type=int, default=5, help="with --value: V on every N-th frame, "
                   "interpolated in between (default: 5)")
    p.add_argument("--station", help="station name or YAML for the export (default: recap.station of the bags)")
    p.add_argument("--title", default="recap_ros session report", help="page title")
    p.add_argument("--max-value-plots", type=int, default=40, help="value curves shown at most (default: 40)")
    p.add_argument("--check", action="store_true",
                   help="open the page in headless Chromium; exit 1 unless every image loads")
    return p


def _is_dataset(path: Path) -> bool:
    return (path / INFO_PATH).is_file()


def _export(bags: list[str], dataset: Path, station: str | None) -> list[str]:
    """recap-export the bags into dataset (incremental); its per-bag lines and summary as notes."""
    from recap_ros.export import cli as export_cli

    args = export_cli.build_parser().parse_args(
        [*bags, "--out", str(dataset), "--quiet", *(["--station", station] if station else [])])
    text = io.StringIO()
    export_cli.run(args, out=text)
    return [line for line in text.getvalue().splitlines() if line.strip()]


def make_report(a: argparse.Namespace) -> tuple[Path, list[str]]:
    """Write the report; returns the page and the lines to print."""
    inputs = [Path(i) for i in a.inputs]
    notes: list[str] = []
    if len(inputs) == 1 and _is_dataset(inputs[0]):
        dataset = inputs[0]
        ds = RecapDataset(dataset)
        rows = session.dataset_rows(ds)
        source = f"dataset {dataset}"
        tmp = None
    else:
        from recap_ros.export.cli import find_bags

        bags = find_bags([str(i) for i in inputs])
        records = []
        for b in bags:
            try:
                records.append(read_episode(b))
            except BagError as e:
                notes.append(f"skipped {b.name}: {e}")
        rows = session.rows_from_records(records)
        source = f"{len(bags)} bags in {', '.join(str(i) for i in inputs)}"
        tmp = None if a.dataset else tempfile.TemporaryDirectory(prefix="recap-report-")
        dataset = Path(a.dataset) if a.dataset else Path(tmp.name) / "dataset"
        notes += [f"export: {line}" for line in _export([str(b) for b in bags], dataset, a.station)]
        ds = RecapDataset(dataset) if _is_dataset(dataset) else None
    try:
        curves = session.dataset_curves(ds) if ds is not None else session.Curves()
        value_source = f"the dataset column {session.VALUE_COLUMN}" if curves.value else ""
        if not curves.value and a.value and ds is not None:
            curves.value = session.predict_value_curves(dataset, a.value, a.value_stride)
            value_source = f"value bundle {a.value} (every {a.value_stride}th frame)"
        rate = float(ds.fps) if ds is not None else 50.0
        index = page.write_report(page.PageInput(a.title, source, session.with_curves(rows, curves), rate,
                                                 value_source, tuple(notes)), a.out, a.max_value_plots)
    finally:
        if tmp is not None:
            tmp.cleanup()
    st = session.session_stats(rows)
    lines = [f"recap-report: {st.episodes} episodes ({st.successes} success, {st.failures} failure), "
             f"{st.takeovers} takeovers, value: {value_source or 'none'} -> {index}"]
    return index, lines


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        index, lines = make_report(a)
    except (FileNotFoundError, DatasetReadError, BagError, ValueError, OSError, RuntimeError) as e:
        print(f"recap-report: error: {e}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    if a.check:
        try:
            check = browser.check_page(index)
        except browser.BrowserCheckError as e:
            print(f"recap-report: browser check: {e}", file=sys.stderr)
            return 1
        print(f"recap-report: headless Chromium shows '{check.title}' with {len(check.images)} images, "
              f"{len(check.images) - len(check.broken)} loaded" + (f"; broken: {check.broken}" if check.broken else ""))
        return 1 if check.broken or not check.images else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
