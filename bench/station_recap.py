"""One RECAP iteration through the live sim station: station -> bags -> recap-export -> recap-train-value ->
recap-label -> recap-train-policy -> the new bundle back on the station, evaluated live before and after.

    ./dev run python bench/station_recap.py [--collect 60] [--demos 40] [--eval 50] [--steps 1000] [--out DIR]

1. Collect ``--collect`` episodes live with the scripted corrector (recorded as bags; its ticks are
   interventions) and ``--demos`` episodes driven by the scripted expert through the policy's input (the
   demonstrations π0.6* retrains on with its roll-outs), on seeds of their own (2,000,000 on).
2. The README's commands, run as processes: ``recap-export`` of all bags into one dataset,
   ``recap-train-value``, ``recap-label``, ``recap-train-policy --labels`` from the station's bundle (RECAP),
   and ``recap-train-policy --sft`` on the same data for the same steps (the control: no advantage labels).
3. Live evaluation (corrector off) of the station's bundle, the RECAP bundle and the control on the same
   held-out seeds (5,000,000 on), through ``bench/station_eval.py``'s live path.

Prints each command and the table: success (Wilson 95 % CI), failure reasons and throughput per bundle.
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sim_policy_eval import HELD_OUT_SEED, wilson  # noqa: E402
from station_eval import run_live, station_file  # noqa: E402

COLLECT_SEED = 2_000_000


def sh(cmd: list[str], log: list[str]) -> None:
    line = " ".join(shlex.quote(c) for c in cmd)
    log.append(line)
    print(f"$ {line}", flush=True)
    t0 = time.monotonic()
    subprocess.run(cmd, check=True)
    print(f"  ({time.monotonic() - t0:.0f} s)", flush=True)


def live(out: Path, name: str, bundle: str | None, seeds: list[int], corrector: bool, expert: bool) -> dict:
    d = out / name
    d.mkdir(parents=True, exist_ok=True)
    yml = station_file("sim", d, bundle, corrector)
    t0 = time.monotonic()
    res = run_live(yml, seeds, expert, d / "station.log", timeout_s=len(seeds) * 20 + 120)
    ends = res["ends"]
    st = res["station"]
    k = sum(e["success"] for e in ends)
    station_s = sum(e["steps"] for e in ends) * st.robot.period_s + len(ends) * st.sim.reset_pause_s
    res.update(n=len(ends), k=k, per_hour=k / station_s * 3600 if station_s else 0.0, bags=d / "bags",
               reasons=Counter(e["reason"] for e in ends if not e["success"]))
    print(f"[{name}] {k}/{len(ends)} successes, takeovers {sum(res['takeovers'].values())}, "
          f"{time.monotonic() - t0:.0f} s", flush=True)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", default="sim_policy", help="the station's bundle (the SFT checkpoint)")
    ap.add_argument("--collect", type=int, default=60, help="episodes collected live with the corrector")
    ap.add_argument("--demos", type=int, default=40, help="expert-driven episodes recorded live")
    ap.add_argument("--eval", type=int, default=50, help="held-out episodes per evaluated bundle")
    ap.add_argument("--steps", type=int, default=1000, help="policy training steps (RECAP and control)")
    ap.add_argument("--value-steps", type=int, default=1000)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    out = Path(a.out or tempfile.mkdtemp(prefix="station-recap-"))
    out.mkdir(parents=True, exist_ok=True)
    cmds: list[str] = []
    t0 = time.monotonic()

    seeds = list(range(COLLECT_SEED, COLLECT_SEED + a.collect))
    collected = live(out, "collect", a.bundle, seeds, corrector=True, expert=False)
    demo_seeds = list(range(COLLECT_SEED + a.collect, COLLECT_SEED + a.collect + a.demos))
    if a.demos:
        live(out, "demos", a.bundle, demo_seeds, corrector=False, expert=True)
    data, value, labels = out / "dataset", out / "value", out / "labels.parquet"
    bags = [str(collected["bags"])] + ([str(out / "demos" / "bags")] if a.demos else [])
    threads = ["--threads", str(a.threads)]
    sh(["recap-export", *bags, "--out", str(data), "--quiet"], cmds)
    sh(["recap-train-value", str(data), "--out", str(value), "--steps", str(a.value_steps), *threads], cmds)
    sh(["recap-label", str(data), "--value", str(value), "--out", str(labels), *threads], cmds)
    common = [str(data), "--init", a.bundle, "--steps", str(a.steps), "--lr", str(a.lr), *threads]
    sh(["recap-train-policy", *common, "--labels", str(labels), "--out", str(out / "recap_policy")], cmds)
    sh(["recap-train-policy", *common, "--sft", "--out", str(out / "control_policy")], cmds)

    held_out = list(range(HELD_OUT_SEED, HELD_OUT_SEED + a.eval))
    rows = [("before (" + a.bundle + ")", live(out, "eval_before", a.bundle, held_out, False, False)),
            ("after: RECAP", live(out, "eval_recap", str(out / "recap_policy"), held_out, False, False)),
            ("control: same data, SFT", live(out, "eval_control", str(out / "control_policy"), held_out, False,
                                              False))]
    print(f"\ncollected live: {collected['n']} episodes with the corrector ({collected['k']} successes, "
          f"{sum(collected['takeovers'].values())} takeovers by reason {dict(collected['takeovers'])}), "
          f"{a.demos} expert demos; total {time.monotonic() - t0:.0f} s")
    print("commands:\n  " + "\n  ".join(cmds))
    print(f"\n| run | live success ({a.eval} held-out seeds) | 95% CI | failures | throughput (successes/h) |")
    print("|---|---|---|---|---|")
    for name, r in rows:
        lo, hi = wilson(r["k"], r["n"])
        print(f"| {name} | {r['k']}/{r['n']} | {lo:.2f}-{hi:.2f} | {dict(r['reasons'])} | {r['per_hour']:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
