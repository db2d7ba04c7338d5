"""One RECAP iteration through the live sim station: station -> bags -> recap-export -> recap-train-value ->
recap-label -> recap-train-policy -> the new bundle back on the station, evaluated live before and after.

    ./dev run python bench/station_recap.py [--station sim] [--collect 60] [--demos 40] [--eval 50] [--steps 1000]
                                            [--out DIR] [--reuse]

1. Collect ``--collect`` episodes live with the scripted corrector (recorded as bags; its ticks are
   interventions) and ``--demos`` episodes driven by the scripted expert through the policy's input (the
   demonstrations π0.6* retrains on with its roll-outs), on seeds of their own (2,000,000 on).
2. The README's commands, run as processes: ``recap-export`` of all bags into one dataset,
   ``recap-train-value``, ``recap-label``, ``recap-train-policy --labels`` from the station's bundle (RECAP),
   and ``recap-train-policy --sft`` on the same data for the same steps (the control: no advantage labels).
3. Live evaluation (corrector off) of the station's bundle, the RECAP bundle and the control on the same
   held-out seeds (5,000,000 on), through ``bench/station_eval.py``'s live path.

Prints each command and the table: success (Wilson 95 % CI), failure reasons and throughput per bundle.
``--reuse`` keeps every step whose output already exists under ``--out`` (e.g. to re-run only the live evaluation
on a quiet machine after training elsewhere); each live phase's summary is kept in ``<phase>/summary.json``.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from procs import private_domain  # noqa: E402
from sim_policy_eval import HELD_OUT_SEED, wilson  # noqa: E402
from recap_ros.station import load_station  # noqa: E402
from station_eval import TAKEOVER_RE, run_live, station_file  # noqa: E402

COLLECT_SEED = 2_000_000


def sh(cmd: list[str], log: list[str]) -> None:
    line = " ".join(shlex.quote(c) for c in cmd)
    log.append(line)
    print(f"$ {line}", flush=True)
    t0 = time.monotonic()
    subprocess.run(cmd, check=True)
    print(f"  ({time.monotonic() - t0:.0f} s)", flush=True)


def live(out: Path, name: str, station: str, bundle: str | None, seeds: list[int], corrector: bool, expert: bool,
         reuse: bool) -> dict:
    """One live phase on ``seeds``; with ``reuse``, a phase already run under ``out`` is read back instead."""
    d = out / name
    summary = d / "summary.json"
    if reuse and summary.exists():
        res = json.loads(summary.read_text())
        res["reasons"], res["takeovers"] = Counter(res["reasons"]), Counter(res["takeovers"])
        print(f"[{name}] reused {summary}: {res['k']}/{res['n']} successes", flush=True)
        return res
    if reuse and name in ("collect", "demos") and any((d / "bags").glob("*")):
        # bags from a run that predates summary.json: the outcome is in the bags, the takeovers in the log
        takeovers = Counter(m.group(1).strip() for m in TAKEOVER_RE.finditer((d / "station.log").read_text()))
        n = sum(1 for _ in (d / "bags").glob("*/metadata.yaml"))
        print(f"[{name}] reused {n} bags under {d / 'bags'}", flush=True)
        return {"n": n, "k": None, "takeovers": takeovers, "reasons": Counter(), "per_hour": 0.0}
    d.mkdir(parents=True, exist_ok=True)
    yml = station_file(station, d, bundle, corrector)
    t0 = time.monotonic()
    res = run_live(yml, seeds, expert, d / "station.log", timeout_s=len(seeds) * 20 + 120)
    out_res = {key: res[key] for key in ("n", "k", "per_hour", "reasons", "takeovers")}
    per_task = Counter(), Counter()
    for e in res["ends"]:
        per_task[0][e.get("task", "")] += 1
        per_task[1][e.get("task", "")] += int(e["success"])
    out_res.update(bundle=bundle, seeds=seeds, tasks={t: [per_task[1][t], n] for t, n in per_task[0].items()})
    summary.write_text(json.dumps(out_res, indent=1))
    print(f"[{name}] {res['k']}/{res['n']} successes, takeovers {sum(res['takeovers'].values())}, "
          f"{time.monotonic() - t0:.0f} s", flush=True)
    return out_res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--station", default="sim")
    ap.add_argument("--bundle", default=None, help="the bundle to improve (default: the station's)")
    ap.add_argument("--collect", type=int, default=60, help="episodes collected live with the corrector")
    ap.add_argument("--demos", type=int, default=40, help="expert-driven episodes recorded live")
    ap.add_argument("--eval", type=int, default=50, help="held-out episodes per evaluated bundle")
    ap.add_argument("--steps", type=int, default=1000, help="policy training steps (RECAP and control)")
    ap.add_argument("--value-steps", type=int, default=1000)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--export-arg", action="append", default=[],
                    help="extra recap-export argument, repeatable (e.g. --export-arg=--camera-tol-s=0.5)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--reuse", action="store_true", help="keep every step whose output exists under --out")
    a = ap.parse_args(argv)
    print(f"[bench] ROS_DOMAIN_ID={private_domain()}", flush=True)
    out = Path(a.out or tempfile.mkdtemp(prefix="station-recap-"))
    out.mkdir(parents=True, exist_ok=True)
    cmds: list[str] = []
    t0 = time.monotonic()

    bundle = a.bundle or load_station(a.station).policy.bundle

    def step(cmd: list[str], output: Path) -> None:
        if a.reuse and output.exists():
            print(f"[reuse] {output}", flush=True)
            cmds.append(" ".join(shlex.quote(c) for c in cmd))
        else:
            sh(cmd, cmds)

    seeds = list(range(COLLECT_SEED, COLLECT_SEED + a.collect))
    collected = live(out, "collect", a.station, bundle, seeds, True, False, a.reuse)
    demo_seeds = list(range(COLLECT_SEED + a.collect, COLLECT_SEED + a.collect + a.demos))
    if a.demos:
        live(out, "demos", a.station, bundle, demo_seeds, False, True, a.reuse)
    data, value, labels = out / "dataset", out / "value", out / "labels.parquet"
    bags = [str(out / "collect" / "bags")] + ([str(out / "demos" / "bags")] if a.demos else [])
    threads = ["--threads", str(a.threads)]
    step(["recap-export", *bags, "--out", str(data), "--station", a.station, "--quiet", *a.export_arg], data)
    step(["recap-train-value", str(data), "--out", str(value), "--steps", str(a.value_steps), *threads], value)
    step(["recap-label", str(data), "--value", str(value), "--out", str(labels), *threads], labels)
    common = [str(data), "--init", bundle, "--steps", str(a.steps), "--lr", str(a.lr), *threads]
    step(["recap-train-policy", *common, "--labels", str(labels), "--out", str(out / "recap_policy")],
         out / "recap_policy")
    step(["recap-train-policy", *common, "--sft", "--out", str(out / "control_policy")], out / "control_policy")

    held_out = list(range(HELD_OUT_SEED, HELD_OUT_SEED + a.eval))
    rows = [(f"before ({bundle})", live(out, "eval_before", a.station, bundle, held_out, False, False, a.reuse)),
            ("after: RECAP", live(out, "eval_recap", a.station, str(out / "recap_policy"), held_out, False, False,
                                  a.reuse)),
            ("control: same data, SFT", live(out, "eval_control", a.station, str(out / "control_policy"), held_out,
                                             False, False, a.reuse))]
    k_collect = "?" if collected["k"] is None else collected["k"]
    print(f"\ncollected live on {a.station}: {collected['n']} episodes with the corrector ({k_collect} successes, "
          f"{sum(collected['takeovers'].values())} takeovers, by reason {dict(collected['takeovers'])}), "
          f"{a.demos} expert demos; total {time.monotonic() - t0:.0f} s")
    print("commands:\n  " + "\n  ".join(cmds))
    print(f"\n| run | live success ({a.eval} held-out seeds) | 95% CI | failures | throughput (successes/h) |")
    print("|---|---|---|---|---|")
    for name, r in rows:
        lo, hi = wilson(r["k"], r["n"])
        print(f"| {name} | {r['k']}/{r['n']} | {lo:.2f}-{hi:.2f} | {dict(r['reasons'])} | {r['per_hour']:.0f} |")
    tasks = sorted({t for _, r in rows for t in r.get("tasks", {}) if t})
    if len(tasks) > 1:
        print("\n| run | " + " | ".join(f"{t} (95% CI)" for t in tasks) + " |")
        print("|---|" + "---|" * len(tasks))
        for name, r in rows:
            cells = []
            for t in tasks:
                k, n = r.get("tasks", {}).get(t, (0, 0))
                lo, hi = wilson(k, n)
                cells.append(f"{k}/{n} ({lo:.2f}-{hi:.2f})")
            print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
