"""RECAP command-line tools: ``recap-train-value``, ``recap-label``, ``recap-train-policy`` (progress bars via tqdm).

Data (``DATA``) is an exported LeRobot dataset directory (``recap-export``) or a frames cache (.npz) from
``recap-sim-demos`` / the sim iteration bench. Under ``torchrun`` the training commands run data-parallel (DDP).
Each episode's maximum length M and C_fail come with the data (no flag sets them; ``--max-len`` is only checked
against them). A training run keeps its checkpoints, ``metrics.csv`` and TensorBoard events in ``OUT.run``
(``--run-dir``); ``--resume`` continues it from its newest checkpoint. ``recap-train-value`` holds out 20 % of the
successful and of the failed episodes and prints how well V ranks their frames by return and how well it is
calibrated (also written to the bundle's README.md).

    recap-train-value DATA --out models/value_it1 [--init models/value_pre | --init-backbone models/sim_sft]
        [--workers 2] [--plots plots/]
    recap-label DATA --value models/value_it1 --mode finetune --out labels.parquet [--plots plots/]
    recap-train-policy DATA --init models/sim_sft --labels labels.parquet --out models/sim_it1
    recap-train-policy DATA --sft --preset tiny --out models/sim_sft
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", help="LeRobot dataset directory or frames file (.npz)")
    p.add_argument("--stride", type=int, default=1, help="use every N-th frame of each episode (+ its last)")
    p.add_argument("--max-len", type=int, default=None,
                   help="a check only: refused unless it equals every episode's max length stored with the data "
                        "(returns are always normalised by the stored one, per episode)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)


def _run_flags(p: argparse.ArgumentParser) -> None:
    """Flags of a training run: warm-up, checkpoints, resume, where its checkpoints and metrics go."""
    p.add_argument("--warmup", type=int, default=50, help="linear learning-rate warm-up steps")
    p.add_argument("--run-dir", default=None, help="checkpoints/, metrics.csv and tensorboard/ of the run "
                   "(default: OUT.run beside the bundle)")
    p.add_argument("--checkpoint-every", type=int, default=0,
                   help="write a checkpoint every N steps (always one at the end); the newest two are kept")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in the run directory (model, optimizer, schedule, "
                        "step, data position), on any number of ranks")


def _run_dir(a: argparse.Namespace):
    from recap_ros.recap.trainer import RunDir

    path = Path(a.run_dir) if a.run_dir else Path(a.out).with_name(Path(a.out).name + ".run")
    return RunDir(path, a.checkpoint_every, a.resume)


def _threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


def _report(text: str) -> None:
    """Print on the main process only (torchrun starts one process per device)."""
    if os.environ.get("RANK", "0") == "0":
        print(text)


def _fail(prog: str, e: Exception) -> int:
    print(f"{prog}: {e}", file=sys.stderr)
    return 2


def plot_values(frames, values: np.ndarray, out_dir: str | Path, max_episodes: int = 6) -> list[Path]:
    """Fig. 4-style PNGs for the first few episodes (successes and failures mixed)."""
    from recap_ros.recap.plots import plot_episode_value

    out = []
    eps = np.unique(frames.episode_index)
    succ = [e for e in eps if frames.episode_success[frames.episode_index == e][0]]
    fail = [e for e in eps if e not in set(succ)]
    pick = (fail[:max_episodes // 2] + succ)[:max_episodes]
    for e in pick:
        m = frames.episode_index == e
        if m.sum() < 2:
            continue
        fi = frames.frame_index[m]
        rate = 50.0 / max(1, int(np.median(np.diff(fi))))
        i = int(np.flatnonzero(m)[0])
        out.append(plot_episode_value(values[m], Path(out_dir) / f"value_ep{int(e):04d}.png",
                                      frames.return_normalized[m], frames.intervention[m], rate_hz=rate,
                                      title=f"episode {int(e)}: {frames.prompts[frames.task_index[i]]} "
                                            f"(M {frames.max_len[i]}, C_fail {frames.c_fail[i]:g})",
                                      success=bool(frames.episode_success[i])))
    return out


def _workers_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, default=None,
                   help="decode the videos while training, in N DataLoader processes (0: in the training process) "
                        "instead of all up front (datasets only)")


def train_value_main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="recap-train-value", description="Train the distributional value function "
                                "p(V | o, l) over 201 return bins (cross-entropy, Eq. 1).")
    _common(p)
    p.add_argument("--out", required=True, help="output value bundle directory")
    init = p.add_mutually_exclusive_group()
    init.add_argument("--init", default=None, help="value bundle to fine-tune from (the pre-trained checkpoint)")
    init.add_argument("--init-backbone", default=None, metavar="BUNDLE",
                      help="policy bundle whose backbone (architecture, vision + language weights, tokenizer) a new "
                           "VLM value function starts from (default: a small value model from scratch)")
    p.add_argument("--image-size", type=int, default=32, help="value model input size (new small models)")
    _workers_flag(p)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-4)
    _run_flags(p)
    p.add_argument("--holdout", type=float, default=0.2,
                   help="fraction of the successful and of the failed episodes held out of training to measure V "
                        "on (0: train on all, no figures)")
    p.add_argument("--plots", default=None, help="directory for value-over-episode PNGs (of held-out episodes "
                   "when there are some)")
    a = p.parse_args(argv)
    _threads(a.threads)
    from recap_ros.recap import value_quality
    from recap_ros.recap.dataset_io import load_frames
    from recap_ros.recap.train_value import train_value
    from recap_ros.recap.value import load_value, predict_values

    try:
        if a.init_backbone:
            from recap_ros.policy.bundle import open_bundle

            size = open_bundle(a.init_backbone).config.image_size
        else:
            size = load_value(a.init).cfg.backbone.image_size if a.init else a.image_size
        frames = load_frames(a.data, size, stride=a.stride, max_len=a.max_len,
                             decode="upfront" if a.workers is None else "lazy")
        held = value_quality.holdout_episodes(frames.episode_index, frames.episode_success, a.holdout, a.seed)
        train = frames.subset(~held)
        model, losses = train_value(train, a.out, init=a.init, steps=a.steps, batch_size=a.batch_size, lr=a.lr,
                                    seed=a.seed, device=a.device, warmup=a.warmup, run=_run_dir(a),
                                    init_backbone=a.init_backbone, workers=a.workers or 0)
    except (ValueError, OSError, RuntimeError, FloatingPointError) as e:
        return _fail(p.prog, e)
    if os.environ.get("RANK", "0") != "0":
        return 0
    lines = [f"value: {len(train)} frames, {train.num_episodes} episodes (+ {int(held.sum())} frames of "
             f"{len(np.unique(frames.episode_index[held]))} held-out episodes); loss {np.mean(losses[:20]):.3f} -> "
             f"{np.mean(losses[-20:]):.3f}; bundle {a.out}"]
    lines += [f"task '{t}': max length M {n['max_len']}, C_fail {n['c_fail']}"
              for t, n in frames.normalisation().items()]
    shown = frames.subset(held) if held.any() else None
    if shown is not None:
        v = predict_values(model, shown.images, shown.state, shown.prompts, shown.task_index)
        lines += value_quality.format_report(value_quality.report(v, shown.ret, shown.max_len, shown.episode_index,
                                                                  shown.episode_success))
    else:
        lines.append("no held-out episodes (--holdout 0, or one episode per outcome): no value quality figures")
    print("\n".join(lines))
    write_value_readme(a.out, a.data, lines, failures_flat=bool((frames.c_fail >= frames.max_len).all()))
    if a.plots:
        if shown is None:
            shown = frames
            v = predict_values(model, shown.images, shown.state, shown.prompts, shown.task_index)
        for path in plot_values(shown, v, a.plots):
            print(f"plot {path}")
    return 0


def write_value_readme(out: str | Path, data: str, lines: list[str], failures_flat: bool) -> Path:
    """The bundle's README.md: what it was trained on, the normalisation and the held-out figures.
    ``failures_flat``: C_fail >= M for every episode (every failure frame's target is -1)."""
    cfail = ("C_fail >= M for every episode (the export's default is C_fail = M): every frame of a failed episode "
             "has the target -1 (bin 0), so V is not taught progress inside a failure; the failures' Spearman rho "
             "above measures how much it ranks their frames anyway." if failures_flat else
             "C_fail < M for some episodes: a failure's last M - C_fail steps have targets above -1, so V is taught "
             "progress there, and those frames overlap with slow successes.")
    path = Path(out) / "README.md"
    path.write_text("\n".join([
        "# RECAP value function", "",
        f"`recap-train-value {data}`: p(V | o, l) over 201 bins of the normalised return clip(R_t / M, -1, 0), "
        "M and C_fail per episode from the data's metadata.", "", "```", *lines, "```", "",
        f"{cfail} See docs/ARCHITECTURE.md, RECAP labels, for the choice of C_fail and its measured effect.", ""]))
    return path


def label_main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="recap-label", description="Advantages A and indicators I_t = 1(A > eps_l) "
                                "(per-task threshold; human interventions always positive).")
    _common(p)
    p.add_argument("--value", required=True, help="value bundle directory (recap-train-value)")
    p.add_argument("--mode", choices=("finetune", "pretrain"), default="finetune",
                   help="finetune: N-step advantage, 40%% positive; pretrain: whole-episode, 30%% positive")
    p.add_argument("--positive-fraction", type=float, default=None)
    p.add_argument("--n", type=int, default=50, help="N of the N-step advantage")
    p.add_argument("--out", required=True, help="labels file (.parquet)")
    p.add_argument("--plots", default=None, help="directory for value-over-episode PNGs")
    a = p.parse_args(argv)
    _threads(a.threads)
    from recap_ros.recap import advantage
    from recap_ros.recap.dataset_io import load_frames, write_labels
    from recap_ros.recap.value import load_value, predict_values

    try:
        model = load_value(a.value)
        frames = load_frames(a.data, model.cfg.backbone.image_size, stride=a.stride, max_len=a.max_len)
        v = predict_values(model, frames.images, frames.state, frames.prompts, frames.task_index)
        lab = advantage.label(v, frames.episode_index, frames.task_index, frames.intervention, frames.max_len,
                              a.mode, a.positive_fraction, ret=frames.ret, frame_index=frames.frame_index, n=a.n,
                              seed=a.seed)
        write_labels(a.out, frames, lab.advantage, lab.indicator, lab.thresholds, a.mode)
    except (ValueError, OSError, RuntimeError) as e:
        return _fail(p.prog, e)
    auto = ~frames.intervention
    print(json.dumps({"frames": len(frames), "mode": a.mode, "positive": round(lab.positive_fraction(), 4),
                      "positive_autonomous": round(lab.positive_fraction(auto), 4),
                      "interventions": int(frames.intervention.sum()),
                      "thresholds": {frames.prompts[k]: round(t, 5) for k, t in lab.thresholds.items()},
                      "normalisation": frames.normalisation(), "out": a.out}))
    if a.plots:
        for path in plot_values(frames, v, a.plots):
            print(f"plot {path}")
    return 0


def train_policy_main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="recap-train-policy", description="Advantage-conditioned flow-matching "
                                "training (indicator dropped 30%% of the time) or SFT; writes a policy bundle.")
    _common(p)
    p.add_argument("--out", required=True, help="output policy bundle directory")
    p.add_argument("--init", default=None, help="policy bundle to fine-tune from (the pre-trained checkpoint)")
    p.add_argument("--preset", default="tiny", help="model preset for a new model (without --init)")
    p.add_argument("--model", default="{}", help='JSON overrides of the preset, e.g. \'{"image_size": 48}\'')
    from recap_ros.policy.bundle import ACTION_SPACE, ACTION_SPACES

    p.add_argument("--action-space", default=ACTION_SPACE, choices=ACTION_SPACES,
                   help="what a new model outputs (with --init: the checkpoint's)")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--labels", help="labels file from recap-label")
    mode.add_argument("--sft", action="store_true", help="supervised fine-tuning: I_t = positive for all")
    p.add_argument("--drop", type=float, default=0.3, help="probability of dropping the indicator")
    p.add_argument("--tokenizer", choices=("byte", "bpe"), default=None,
                   help="a new model's tokenizer: byte (default) or bpe (SentencePiece BPE trained on the data's "
                        "prompts, stored in the bundle); with --init the checkpoint's")
    p.add_argument("--goal-weight", type=float, default=1.0,
                   help="weight of the goal head's loss (models with goal_dim, frames with goals)")
    p.add_argument("--knowledge-insulation", action="store_true",
                   help="stop the action expert's gradient into the backbone (π0.5 / π0.6 knowledge insulation: "
                        "an imported VLM backbone is kept, or learns from the goal head only)")
    _workers_flag(p)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-4)
    _run_flags(p)
    a = p.parse_args(argv)
    _threads(a.threads)
    from recap_ros.policy.bundle import open_bundle
    from recap_ros.policy.config import preset
    from recap_ros.policy.errors import PolicyError
    from recap_ros.recap.dataset_io import apply_labels, load_frames
    from recap_ros.recap.train_policy import train_policy

    try:
        overrides = json.loads(a.model)
        cfg = open_bundle(a.init).config if a.init else preset(a.preset, **overrides)
        frames = load_frames(a.data, cfg.image_size, cfg.chunk_len, stride=a.stride, max_len=a.max_len,
                             decode="upfront" if a.workers is None else "lazy", resize=cfg.image_resize)
        if a.labels:
            frames = apply_labels(frames, a.labels)
        _, losses = train_policy(frames, a.out, init=a.init, preset_name=a.preset, sft=a.sft, drop_prob=a.drop,
                                 steps=a.steps, batch_size=a.batch_size, lr=a.lr, seed=a.seed, device=a.device,
                                 model_overrides=overrides, action_space=a.action_space,
                                 tokenizer=a.tokenizer, goal_weight=a.goal_weight, warmup=a.warmup,
                                 knowledge_insulation=a.knowledge_insulation,
                                 run=_run_dir(a), workers=a.workers or 0,
                                 description=f"recap-train-policy {'SFT' if a.sft else 'advantage-conditioned'} "
                                             f"on {a.data} ({len(frames)} frames)")
    except (ValueError, OSError, RuntimeError, FloatingPointError, PolicyError) as e:
        return _fail(p.prog, e)
    _report(f"policy: {len(frames)} frames; loss {np.mean(losses[:20]):.4f} -> {np.mean(losses[-20:]):.4f}; "
          f"bundle {a.out}")
    return 0
