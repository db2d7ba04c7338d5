"""One RECAP iteration on the sim station, measured: SFT policy -> collect with the scripted corrector -> train V ->
label -> retrain the policy from the SAME SFT checkpoint with advantage conditioning -> evaluate before/after.

    .venv/bin/python bench/recap_iteration.py [--sft sim_policy] [--demos 1000 | demos.npz] [--collect 150]
                                              [--autonomous 50] [--eval 100] [--control] [--quick]

Collection and evaluation are ROS-free roll-outs at simulation speed (recap_ros.recap.rollout: the station's
chunk executor and teleop mux, the sim's corrector taking over when the policy stalls or is about to break a
keep-out rule). ``--collect`` episodes run with the corrector, ``--autonomous`` more without it (their failures
teach V what failing looks like). Collected episodes are written as a frames cache (.npz), then go through the
same code paths as `recap-train-value`, `recap-label` and `recap-train-policy`. As in π0.6*, the retraining data
also holds demonstrations (``--demos``: a frames file, or a number of scripted demos recorded here from the SFT
data's seed range; 0 = roll-outs only, which makes both runs forget: measured 92 -> 79 / 85 of 100). Evaluation
is autonomous (no corrector) on the same held-out seeds before and after, with "Advantage: positive" (beta = 1)
and optionally CFG (--beta). ``--control`` also trains, in a second process, the same SFT checkpoint on the same
data for the same steps WITHOUT advantage labels (all positive, as SFT): it separates what the advantage
conditioning adds from what more data and more training steps add.
Prints success rate and throughput (successes per hour of simulated station time) before and after.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sim_policy_eval import HELD_OUT_SEED, evaluate, report, wilson

COLLECT_SEED = 2_000_000
DEMO_SEED = 1_005_000  # inside the bundled sim_policy's demonstration seeds (1,000,000-1,005,999)


def _train_control(data_path: str, image_size: int, out: str, init: str, steps: int, lr: float, threads: int):
    """The same-data SFT control (runs in its own process, next to the RECAP retraining)."""
    import torch

    from recap_ros.recap.dataset_io import load_frames
    from recap_ros.recap.train_policy import train_policy

    torch.set_num_threads(threads)
    _, loss = train_policy(load_frames(data_path, image_size), out, init=init, sft=True, steps=steps,
                           batch_size=32, lr=lr, device="cpu", progress=False,
                           description="control: SFT on the RECAP iteration's data (no advantage labels)")
    return float(np.mean(loss[:20])), float(np.mean(loss[-20:]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sft", default="sim_policy", help="the SFT policy bundle = the checkpoint both runs start from")
    p.add_argument("--demos", default="1000", help="demonstrations added to the training data: a frames file "
                   "(.npz) or a number of scripted demos to record (seeds from DEMO_SEED; 0: none)")
    p.add_argument("--collect", type=int, default=150, help="episodes collected with the corrector")
    p.add_argument("--autonomous", type=int, default=50, help="episodes collected without the corrector")
    p.add_argument("--control", action="store_true", help="also train and evaluate the same-data SFT control")
    p.add_argument("--eval", type=int, default=100, help="held-out evaluation episodes (before and after)")
    p.add_argument("--stride", type=int, default=5, help="record a training frame every N ticks")
    p.add_argument("--value-steps", type=int, default=1500)
    p.add_argument("--policy-steps", type=int, default=3000)
    p.add_argument("--policy-lr", type=float, default=1e-4, help="fine-tuning learning rate (from the SFT weights)")
    p.add_argument("--positive-fraction", type=float, default=0.4)
    p.add_argument("--beta", type=float, default=None, help="also evaluate the retrained policy with CFG at beta")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workdir", default="/tmp/recap_iteration")
    p.add_argument("--quick", action="store_true", help="10 collected, 10 eval episodes, 50 training steps")
    a = p.parse_args(argv)
    import torch

    from recap_ros.policy import load_policy
    from recap_ros.recap import advantage
    from recap_ros.recap.cli import plot_values
    from recap_ros.recap.data import concat, load_frames_npz, save_frames
    from recap_ros.recap.dataset_io import apply_labels, load_frames, write_labels
    from recap_ros.recap.rollout import Roller, rollouts
    from recap_ros.recap.train_policy import train_policy
    from recap_ros.recap.train_value import train_value
    from recap_ros.recap.value import predict_values
    from recap_ros.station import load_station

    torch.set_num_threads(a.threads)
    if a.quick:
        a.collect, a.autonomous, a.eval, a.value_steps, a.policy_steps = 10, 4, 10, 50, 50
        a.demos = a.demos if not a.demos.isdigit() else str(min(int(a.demos), 5))
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    # 1. the SFT policy on held-out seeds
    before, wall_b = evaluate(a.sft, a.eval, HELD_OUT_SEED, desc="eval before")
    report("before (SFT)", before, wall_b)

    # 2. collect with the corrector intervening
    station = load_station("sim")
    policy = load_policy(a.sft, backend="auto")
    roller = Roller(station, policy.info.image_size, policy, corrector=True)
    coll = rollouts(roller, range(COLLECT_SEED, COLLECT_SEED + a.collect), record=True, frame_stride=a.stride,
                    desc="collect")
    corrected = sum(e.interventions > 0 for e in coll.episodes)
    print(f"collected {coll.n} episodes with the corrector: {coll.successes} successes ({corrected} with corrector "
          f"interventions), reasons {coll.reasons()}")
    episodes = list(coll.episodes)
    if a.autonomous:
        auto_roller = Roller(station, policy.info.image_size, policy, corrector=False)
        first = COLLECT_SEED + a.collect
        auto = rollouts(auto_roller, range(first, first + a.autonomous), record=True, frame_stride=a.stride,
                        desc="collect autonomous")
        print(f"collected {auto.n} autonomous episodes: {auto.successes} successes, reasons {auto.reasons()}")
        episodes += auto.episodes
    rollout_frames = concat([e.frames for e in episodes])
    data_path = work / "iteration_data.npz"
    if a.demos.isdigit():
        n = int(a.demos)
        demos = [] if n == 0 else [concat([e.frames for e in rollouts(
            Roller(station, policy.info.image_size), range(DEMO_SEED, DEMO_SEED + n), record=True,
            frame_stride=6, scripted=True, desc="demos").episodes if e.success])]  # stride of the SFT demos
    else:
        demos = [load_frames_npz(a.demos)]
    parts = [rollout_frames] + demos
    save_frames(concat(parts), data_path)

    # 3. V on all data (as recap-train-value does)
    frames = load_frames(data_path, policy.info.image_size)
    print(f"training data: {len(frames)} frames, {frames.num_episodes} episodes "
          f"({int(frames.intervention.sum())} intervention frames)")
    vmodel, vloss = train_value(frames, work / "value", steps=a.value_steps, batch_size=64, lr=5e-4, device="cpu")
    print(f"value loss {np.mean(vloss[:20]):.3f} -> {np.mean(vloss[-20:]):.3f}")

    # 4. labels (as recap-label does): N-step advantages, 40 % positive per task, interventions positive
    v = predict_values(vmodel, frames.images, frames.state, frames.prompts, frames.task_index)
    lab = advantage.label(v, frames.episode_index, frames.task_index, frames.intervention, frames.max_len,
                          "finetune", a.positive_fraction, ret=frames.ret, frame_index=frames.frame_index)
    write_labels(work / "labels.parquet", frames, lab.advantage, lab.indicator, lab.thresholds, "finetune")
    plots = plot_values(frames, v, work / "plots")
    auto = ~frames.intervention
    succ = frames.episode_success
    print(f"labels: positive {lab.positive_fraction():.3f} overall, {lab.positive_fraction(auto):.3f} of autonomous "
          f"frames; positive in successful episodes {lab.indicator[succ & auto].mean():.3f}, in failed "
          f"{lab.indicator[~succ & auto].mean() if (~succ & auto).any() else float('nan'):.3f}; "
          f"value mean success {v[succ].mean():.3f} / failure {v[~succ].mean() if (~succ).any() else float('nan'):.3f};"
          f" {len(plots)} plots in {work / 'plots'}")

    # 5. retrain from the SAME SFT checkpoint with advantage conditioning (and the control next to it)
    control = None
    if a.control:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        control = pool.submit(_train_control, str(data_path), policy.info.image_size, str(work / "control"),
                              a.sft, a.policy_steps, a.policy_lr, a.threads)
    labelled = apply_labels(frames, work / "labels.parquet")
    _, ploss = train_policy(labelled, work / "policy_it1", init=a.sft, steps=a.policy_steps, batch_size=32,
                            lr=a.policy_lr, device="cpu", description="RECAP iteration 1 on the sim station")
    print(f"policy loss {np.mean(ploss[:20]):.4f} -> {np.mean(ploss[-20:]):.4f}")
    if control is not None:
        c0, c1 = control.result()
        pool.shutdown()
        print(f"control (same data, SFT) loss {c0:.4f} -> {c1:.4f}")

    # 6. evaluate on the same held-out seeds
    after, wall_a = evaluate(str(work / "policy_it1"), a.eval, HELD_OUT_SEED, desc="eval after")
    report("after (RECAP it. 1, beta 1)", after, wall_a)
    results = {"before": before, "after": after}
    if a.beta:
        cfg, wall_c = evaluate(str(work / "policy_it1"), a.eval, HELD_OUT_SEED, beta=a.beta, desc="eval cfg")
        report(f"after (RECAP it. 1, beta {a.beta})", cfg, wall_c)
        results[f"after_beta{a.beta}"] = cfg
    if control is not None:
        ctl, wall_s = evaluate(str(work / "control"), a.eval, HELD_OUT_SEED, desc="eval control")
        report("control (same data, SFT)", ctl, wall_s)
        results["control_sft"] = ctl
    print("\n=== RECAP iteration on the sim station (same held-out seeds) ===")
    for name, s in results.items():
        lo, hi = wilson(s.successes, s.n)
        print(f"{name:>16}: success {s.success_rate:.3f} [{lo:.2f}, {hi:.2f}] ({s.successes}/{s.n}), "
              f"throughput {s.throughput_per_hour:.1f} successes/h")
    print(f"ratio after/before: success {after.success_rate / max(before.success_rate, 1e-9):.2f}x, "
          f"throughput {after.throughput_per_hour / max(before.throughput_per_hour, 1e-9):.2f}x; "
          f"total wall {time.perf_counter() - t_start:.0f} s")
    (work / "results.json").write_text(json.dumps({k: {"success_rate": s.success_rate, "n": s.n,
                                                        "throughput_per_hour": s.throughput_per_hour,
                                                        "reasons": s.reasons()} for k, s in results.items()},
                                                   indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
