"""The report page: PNG plots (matplotlib, Agg) and one self-contained HTML file that shows them.

Plots: success rate and throughput over the session, takeovers per episode, durations, and the value curve of
each episode with its human-driven stretches shaded (:func:`recap_ros.recap.plots.plot_episode_value`, the
paper's Fig. 4 style).
"""
from __future__ import annotations

import html
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from recap_ros.recap.plots import plot_episode_value
from recap_ros.report.session import EpisodeRow, over_time, session_stats

COLOUR = {"success": "#2ca02c", "failure": "#d62728", "unlabelled": "#9e9e9e"}


@dataclass(frozen=True)
class PageInput:
    title: str
    source: str              # what the report was made from (bag folders, a dataset)
    rows: list[EpisodeRow]
    rate_hz: float           # control rate: ticks -> seconds
    value_source: str        # where V came from; "" when there is none
    notes: tuple[str, ...] = ()


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_session(rows: list[EpisodeRow], path: Path) -> Path:
    """Success rate (so far, and over the last 10 labelled episodes) and successes per hour over the session."""
    t = over_time(rows)
    fig, (a, b) = plt.subplots(2, 1, figsize=(8, 4.6), dpi=100, sharex=True)
    a.plot(t["minutes"], 100 * t["rate"], "-o", ms=3, label="so far")
    a.plot(t["minutes"], 100 * t["rolling"], "-", alpha=0.7, label="last 10 episodes")
    a.set_ylim(-5, 105)
    a.set_ylabel("success rate [%]")
    a.legend(fontsize=8, loc="lower right")
    b.plot(t["minutes"], t["per_hour"], "-o", ms=3, color="#9467bd")
    b.set_ylabel("successes / hour")
    b.set_xlabel("session time [min] (episode ends)")
    for ax in (a, b):
        ax.grid(alpha=0.3)
    return _save(fig, path)


def _episode_bars(rows: list[EpisodeRow], values: list[float], ylabel: str, path: Path, mean: bool) -> Path:
    fig, ax = plt.subplots(figsize=(8, 3), dpi=100)
    x = np.arange(len(rows))
    ax.bar(x, values, color=[COLOUR.get(r.outcome, "#9e9e9e") for r in rows])
    if mean and values:
        ax.axhline(float(np.mean(values)), color="black", lw=1, ls="--", label=f"mean {np.mean(values):.1f}")
        ax.legend(fontsize=8)
    ax.set_xticks(x, [str(i + 1) for i in x], fontsize=7, rotation=90 if len(rows) > 30 else 0)
    ax.set_xlabel("episode, in order of start (green: success, red: failure, grey: unlabelled)")
    ax.set_ylim(0, max(1.0, 1.1 * max(values, default=0)))
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def _table(rows: list[EpisodeRow], rate_hz: float) -> str:
    head = ("<tr><th>#</th><th>episode</th><th>prompt</th><th>outcome</th><th>duration [s]</th><th>takeovers</th>"
            "<th>human-driven [s]</th><th>bag</th></tr>")
    body = "".join(
        f"<tr class='{r.outcome}'><td>{i + 1}</td><td>{r.episode}</td><td>{html.escape(r.prompt)}</td>"
        f"<td>{r.outcome}</td>"
        f"<td>{r.duration_s:.1f}</td><td>{r.takeovers}</td><td>{r.human_ticks / rate_hz:.1f}</td>"
        f"<td>{html.escape(r.key)}</td></tr>" for i, r in enumerate(rows))
    return f"<table>{head}{body}</table>"


CSS = """body{font-family:sans-serif;max-width:60em;margin:2em auto;color:#222}
table{border-collapse:collapse;font-size:.85em}td,th{border:1px solid #ccc;padding:.2em .5em;text-align:left}
tr.success td:nth-child(4){color:#2ca02c}tr.failure td:nth-child(4){color:#d62728}
img{max-width:100%;display:block;margin:.5em 0}.note{color:#555;font-style:italic}"""


def write_report(page: PageInput, out_dir: str | Path, max_value_plots: int = 40) -> Path:
    """Write index.html and its PNGs into out_dir; returns the page's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = page.rows
    st = session_stats(rows)
    parts = [f"<h1>{html.escape(page.title)}</h1>",
             f"<p>From {html.escape(page.source)}; made {time.strftime('%Y-%m-%d %H:%M')}.</p>"]
    if not rows:
        parts.append("<p class='note'>No episodes.</p>")
    else:
        parts.append(
            f"<p><b>{st.episodes} episodes</b>: {st.successes} success, {st.failures} failure, "
            f"{st.episodes - st.successes - st.failures} unlabelled; success rate {100 * st.success_rate:.0f} % "
            f"of the labelled; {st.successes_per_hour:.0f} successes per hour over {st.span_s / 60:.1f} min; "
            f"{st.takeovers} takeovers in {st.helped} episodes ({st.human_ticks / page.rate_hz:.1f} s "
            f"human-driven); {st.recorded_s:.1f} s recorded.</p>")
        images = [("Success rate and throughput over the session", plot_session(rows, out / "session.png")),
                  ("Takeovers per episode", _episode_bars(rows, [r.takeovers for r in rows], "takeovers",
                                                          out / "interventions.png", mean=False)),
                  ("Episode durations", _episode_bars(rows, [r.duration_s for r in rows], "duration [s]",
                                                      out / "durations.png", mean=True))]
        for title, path in images:
            parts.append(f"<h2>{title}</h2><img src='{path.name}' alt='{title}'>")
        parts.append("<h2>Value over each episode</h2>")
        parts.append(_value_section(page, out, max_value_plots))
        parts.append("<h2>Episodes</h2>" + _table(rows, page.rate_hz))
    if page.notes:
        parts.append(f"<details><summary>Notes ({len(page.notes)})</summary><ul>"
                     + "".join(f"<li>{html.escape(n)}</li>" for n in page.notes) + "</ul></details>")
    doc = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(page.title)}</title>"
           f"<style>{CSS}</style></head><body>{''.join(parts)}</body></html>\n")
    index = out / "index.html"
    index.write_text(doc, encoding="utf-8")
    return index


def _value_section(page: PageInput, out: Path, max_plots: int) -> str:
    if not page.value_source:
        return ("<p class='note'>No value curves: the episodes have no recorded value (dataset column "
                "monitor.value, from the value monitor) and no value bundle was given (recap-report --value "
                "BUNDLE).</p>")
    with_v = [r for r in page.rows if r.value is not None and np.isfinite(r.value).sum() >= 2]
    parts = [f"<p>V(o_t) from {html.escape(page.value_source)}: green where it rises, red where it drops; "
             "shaded: a human drives (each shaded stretch starts at a takeover).</p>"]
    for r in with_v[:max_plots]:
        path = plot_episode_value(r.value, out / f"value_{r.key}.png", intervention=r.intervention,
                                  rate_hz=page.rate_hz, title=f"{r.key}: {r.prompt}",
                                  success=None if r.outcome == "unlabelled" else r.outcome == "success")
        parts.append(f"<img src='{path.name}' alt='value over episode {r.episode}'>")
    missing = len(page.rows) - len(with_v)
    if len(with_v) > max_plots:
        parts.append(f"<p class='note'>{len(with_v) - max_plots} more episodes not shown "
                     f"(--max-value-plots {max_plots}).</p>")
    if missing:
        parts.append(f"<p class='note'>{missing} episodes have no value curve: not exported (see the notes) or "
                     "no value recorded in them.</p>")
    return "".join(parts)
