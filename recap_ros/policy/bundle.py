"""Model bundles: ``models/<name>/`` (or any directory) holding everything a policy needs.

Layout::

    config.json        {"format": "recap_ros.policy/1", "name", "model": PolicyConfig, "tokenizer": {...},
                        "onnx": {"prefix": "onnx/prefix.onnx", "denoise": {"5": {"cond": ..., "cfg": ...}}},
                        "action_space": "absolute_joint_positions" | "delta_joint_positions",
                        "joint_names": [...] | null, "description"}
    norm_stats.json    openpi format (state, actions: mean/std/q01/q99), see recap_ros.policy.normalize
    tokenizer.model    SentencePiece model (only for tokenizer type "sentencepiece"; "byte" needs no file)
    model.safetensors  weights (safetensors only, never pickle)
    onnx/*.onnx        exported graphs, I/O contract in recap_ros.policy.export
    manifest.json      sha256 + size of every file above; ``bundle_id`` = hash of this manifest
    README.md          generated description incl. the ONNX I/O contract
    engine_cache/      TensorRT engines built on this machine (not part of the bundle, git-ignored)

Every problem raises :class:`PolicyError` naming the bundle path and the bad file / key / value.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recap_ros import paths
from recap_ros.policy.config import PolicyConfig
from recap_ros.policy.errors import PolicyError
from recap_ros.policy.normalize import Stats, load_norm_stats, save_norm_stats
from recap_ros.policy.tokenizer import NEGATIVE, POSITIVE, ByteTokenizer, PromptEncoder, load_tokenizer

FORMAT = "recap_ros.policy/1"
CONFIG, NORM_STATS, WEIGHTS, MANIFEST, README = ("config.json", "norm_stats.json", "model.safetensors",
                                                 "manifest.json", "README.md")
ONNX_DIR = "onnx"
ACTION_SPACE = "absolute_joint_positions"
# the model's action output: absolute joint positions, or positions relative to the observed state (openpi's
# DeltaActions; the runtime adds the state back, so a server always receives absolute positions)
ACTION_SPACES = (ACTION_SPACE, "delta_joint_positions")

FULL_HASH_LIMIT = 1 << 30  # files above 1 GiB are size-checked only, unless verify=True


def check_action_space(value, where: str) -> str:
    """``value`` if it is one of ACTION_SPACES, else PolicyError naming it and where it came from."""
    if value not in ACTION_SPACES:
        raise PolicyError(f"{where}: action_space {value!r} is not one of {', '.join(ACTION_SPACES)}")
    return value


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class Bundle:
    dir: Path
    name: str
    config: PolicyConfig
    meta: dict
    norm_stats: dict[str, Stats]
    tokenizer: object
    manifest: dict
    bundle_id: str

    @property
    def action_space(self) -> str:
        return self.meta.get("action_space", ACTION_SPACE)

    @property
    def prompt_encoder(self) -> PromptEncoder:
        return PromptEncoder(self.tokenizer, self.config.max_text_tokens, self.config.max_advantage_tokens)

    @property
    def onnx_steps(self) -> tuple[int, ...]:
        return tuple(sorted(int(s) for s in self.meta["onnx"]["denoise"]))

    def onnx_path(self, graph: str, steps: int | None = None) -> Path:
        """graph: 'prefix', 'cond' or 'cfg' (the last two per denoise step count)."""
        onnx = self.meta["onnx"]
        if graph == "prefix":
            return self.dir / onnx["prefix"]
        entry = onnx["denoise"].get(str(steps))
        if entry is None:
            raise PolicyError(f"{self.dir}: no exported denoise graph for {steps} steps (exported: "
                              f"{list(self.onnx_steps)}); run `recap-build-engine {self.dir} --steps {steps}` or "
                              f"use backend='torch'")
        return self.dir / entry[graph]

    def load_model(self):
        """The torch model with the bundle's weights (eval mode, fp32, CPU)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from recap_ros.policy.model import Pi06Policy

        model = Pi06Policy(self.config)
        try:
            state = load_file(str(self.dir / WEIGHTS))
        except (SafetensorError, OSError) as e:
            raise PolicyError(f"{self.dir / WEIGHTS}: not a readable safetensors file ({e})") from None
        expected = model.state_dict()
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or unexpected:
            raise PolicyError(f"{self.dir / WEIGHTS}: weights do not match config.json (missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]})")
        for k, v in state.items():
            if tuple(v.shape) != tuple(expected[k].shape):
                raise PolicyError(f"{self.dir / WEIGHTS}: tensor {k} has shape {tuple(v.shape)}, config.json "
                                  f"implies {tuple(expected[k].shape)}")
        model.load_state_dict({k: v.float() for k, v in state.items()})
        return model.eval()


# --------------------------------------------------------------------------------------------- reading
def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise PolicyError(f"{path.parent}: {what} {path.name} is missing (not a policy bundle?)") from None
    except (OSError, ValueError) as e:
        raise PolicyError(f"{path}: {what} is not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise PolicyError(f"{path}: {what} must be a JSON object")
    return data


def _check_manifest(bdir: Path, manifest: dict, verify: bool | None) -> None:
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise PolicyError(f"{bdir / MANIFEST}: 'files' must map file names to their sha256 and size")
    for rel, entry in files.items():
        p = bdir / rel
        if not p.is_file():
            raise PolicyError(f"{bdir}: bundle file {rel} is missing")
        size = p.stat().st_size
        if size != entry.get("bytes"):
            raise PolicyError(f"{bdir}: {rel} is {size} bytes, manifest says {entry.get('bytes')} "
                              "(corrupt, truncated or replaced; re-export with save_bundle / recap-build-engine)")
        if verify or (verify is None and size <= FULL_HASH_LIMIT):
            if sha256_file(p) != entry.get("sha256"):
                raise PolicyError(f"{bdir}: {rel} does not match its sha256 in {MANIFEST} (corrupt or modified)")


def open_bundle(name_or_path: str | Path, verify: bool | None = None) -> Bundle:
    """Read and validate a bundle by name (``models/<name>``) or path. ``verify``: True hashes every file,
    None hashes files up to 1 GiB (size check above), False checks sizes only."""
    bdir = paths.model_dir(name_or_path)
    if not bdir.is_dir():
        raise PolicyError(f"policy bundle '{name_or_path}' not found (looked for directory {bdir})")
    meta = _read_json(bdir / CONFIG, "config")
    if meta.get("format") != FORMAT:
        raise PolicyError(f"{bdir / CONFIG}: format {meta.get('format')!r} is not {FORMAT!r}")
    for key in ("model", "tokenizer", "onnx"):
        if key not in meta:
            raise PolicyError(f"{bdir / CONFIG}: key '{key}' is missing")
    onnx = meta["onnx"]
    if not isinstance(onnx, dict) or "prefix" not in onnx or not isinstance(onnx.get("denoise"), dict) \
            or not onnx["denoise"]:
        raise PolicyError(f"{bdir / CONFIG}: 'onnx' must name a prefix graph and at least one denoise step count")
    config = PolicyConfig.from_json(meta["model"])
    manifest = _read_json(bdir / MANIFEST, "manifest")
    _check_manifest(bdir, manifest, verify)
    stats = load_norm_stats(bdir / NORM_STATS)
    for key, dim in (("state", config.state_dim), ("actions", config.action_dim)):
        if stats[key].dim != dim:
            raise PolicyError(f"{bdir / NORM_STATS}: {key} statistics have {stats[key].dim} dims, the model's "
                              f"{'state_dim' if key == 'state' else 'action_dim'} is {dim}")
    tokenizer = load_tokenizer(meta["tokenizer"], bdir)
    if tokenizer.vocab_size > config.vocab_size:
        raise PolicyError(f"{bdir}: tokenizer has {tokenizer.vocab_size} tokens, model vocab_size is "
                          f"{config.vocab_size}")
    check_action_space(meta.get("action_space", ACTION_SPACE), str(bdir / CONFIG))
    joint_names = meta.get("joint_names")
    if joint_names is not None and (not isinstance(joint_names, list) or len(joint_names) != config.state_dim):
        raise PolicyError(f"{bdir / CONFIG}: joint_names must be null or a list of {config.state_dim} names")
    bundle_id = hashlib.sha256(json.dumps(manifest["files"], sort_keys=True).encode()).hexdigest()[:16]
    bundle = Bundle(dir=bdir, name=str(meta.get("name", bdir.name)), config=config, meta=meta, norm_stats=stats,
                    tokenizer=tokenizer, manifest=manifest, bundle_id=bundle_id)
    bundle.prompt_encoder  # noqa: B018 - validates the advantage segment fits max_advantage_tokens
    return bundle


# --------------------------------------------------------------------------------------------- writing
def write_manifest(bdir: Path) -> dict:
    """(Re)hash every bundle file (everything except README, manifest and engine_cache) into manifest.json."""
    files = {}
    for p in sorted(bdir.rglob("*")):
        rel = p.relative_to(bdir).as_posix()
        if p.is_file() and rel not in (MANIFEST, README) and not rel.startswith("engine_cache/"):
            files[rel] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    manifest = {"format": FORMAT, "files": files}
    (bdir / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def _readme(bdir: Path, meta: dict, n_params: dict) -> str:
    from recap_ros.policy import export

    m = meta["model"]
    return "\n".join([
        f"# Policy bundle `{meta['name']}`", "", meta.get("description", ""), "",
        f"- architecture: π0.6*-style flow-matching VLA, parameters {n_params}",
        f"- cameras (input order): {', '.join(m['camera_roles'])}, {m['image_size']} px ({m['image_resize']})",
        f"- state / action dim: {m['state_dim']} / {m['action_dim']}, chunk {m['chunk_len']}; actions are "
        f"absolute joint positions in robot units (station joint order), normalisation: {m['normalization']}",
        f"- tokenizer: {meta['tokenizer']['type']}; exported denoise step counts: "
        f"{sorted(int(s) for s in meta['onnx']['denoise'])} (default {m['denoise_steps']})",
        "", "Load with `recap_ros.policy.load_policy(<this dir>)`; build TensorRT engines with "
        "`recap-build-engine <this dir>`.", "", "## ONNX I/O contract", "", export.__doc__.strip(), ""])


def save_bundle(model, out_dir: str | Path, norm_stats: dict[str, Stats], tokenizer=None, *, name: str | None = None,
                steps: tuple[int, ...] | None = None, joint_names: list[str] | None = None,
                description: str = "", weights_dtype: str = "float32", action_space: str = ACTION_SPACE) -> Bundle:
    """Write a complete, immediately loadable bundle: config, norm stats, tokenizer, safetensors weights, the ONNX
    graphs (prefix + denoise for ``steps``, default the config's step count) and the manifest.

    ``tokenizer``: None (byte-level) or a :class:`~recap_ros.policy.tokenizer.SentencePieceTokenizer` whose model
    file is copied into the bundle. ``weights_dtype`` ('float32' | 'bfloat16' | 'float16') is the safetensors
    storage type (the ONNX graphs are always fp32; TensorRT picks its precision when building engines).
    ``action_space``: one of ACTION_SPACES; norm_stats['actions'] must describe that space."""
    import torch
    from safetensors.torch import save_file

    from recap_ros.policy.export import export_onnx

    check_action_space(action_space, "save_bundle")
    if weights_dtype not in ("float32", "bfloat16", "float16"):
        raise PolicyError(f"save_bundle: weights_dtype '{weights_dtype}' must be float32, bfloat16 or float16")
    cfg = model.config
    tokenizer = tokenizer or ByteTokenizer()
    for key, dim in (("state", cfg.state_dim), ("actions", cfg.action_dim)):
        if key not in norm_stats or norm_stats[key].dim != dim:
            got = norm_stats[key].dim if key in norm_stats else None
            raise PolicyError(f"save_bundle: norm_stats['{key}'] must have {dim} dims (got {got})")
    PromptEncoder(tokenizer, cfg.max_text_tokens, cfg.max_advantage_tokens)  # validates the segment length
    bdir = Path(out_dir).expanduser().resolve()
    bdir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(bdir / ONNX_DIR, ignore_errors=True)
    shutil.rmtree(bdir / "engine_cache", ignore_errors=True)
    spec = tokenizer.spec()
    if spec["type"] == "sentencepiece" and Path(tokenizer.path).resolve() != (bdir / spec["file"]).resolve():
        shutil.copyfile(tokenizer.path, bdir / spec["file"])
    save_norm_stats(norm_stats, bdir / NORM_STATS)
    model = model.eval().float().cpu()
    dtype = getattr(torch, weights_dtype)
    save_file({k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}, str(bdir / WEIGHTS))
    (bdir / WEIGHTS).chmod(0o644)
    onnx = export_onnx(model, bdir / ONNX_DIR, steps or (cfg.denoise_steps,))
    meta = {"format": FORMAT, "name": name or bdir.name, "description": description, "model": cfg.to_json(),
            "tokenizer": spec, "onnx": onnx, "action_space": action_space,
            "joint_names": list(joint_names) if joint_names is not None else None}
    (bdir / CONFIG).write_text(json.dumps(meta, indent=1))
    write_manifest(bdir)
    (bdir / README).write_text(_readme(bdir, meta, model.num_parameters()))
    return open_bundle(bdir)


def add_denoise_steps(bundle: Bundle, steps: list[int]) -> Bundle:
    """Export denoise graphs for more step counts into an existing bundle (updates config and manifest)."""
    from recap_ros.policy.export import export_onnx

    model = bundle.load_model()
    wanted = sorted(set(bundle.onnx_steps) | {int(s) for s in steps})
    meta = dict(bundle.meta)
    meta["onnx"] = export_onnx(model, bundle.dir / ONNX_DIR, wanted)
    (bundle.dir / CONFIG).write_text(json.dumps(meta, indent=1))
    write_manifest(bundle.dir)
    (bundle.dir / README).write_text(_readme(bundle.dir, meta, model.num_parameters()))
    return open_bundle(bundle.dir)


def random_bundle(preset_name: str, out_dir: str | Path, *, seed: int = 0, station=None,
                  weights_dtype: str = "float32", **overrides) -> Bundle:
    """A random-weight bundle (tests, benchmarks). Norm stats come from uniform samples within the station's
    joint limits (default station: sim)."""
    import torch

    from recap_ros.policy.config import preset
    from recap_ros.policy.model import Pi06Policy
    from recap_ros.policy.normalize import compute_norm_stats
    from recap_ros.station import load_station

    station = station or load_station("sim")
    torch.manual_seed(seed)
    cfg = preset(preset_name, **overrides)
    adv_len = max(len(ByteTokenizer().encode(s)) for s in (POSITIVE, NEGATIVE))
    if cfg.max_advantage_tokens < adv_len:  # presets sized for SentencePiece; random bundles use byte tokens
        cfg = preset(preset_name, **{**overrides, "max_advantage_tokens": adv_len})
    model = Pi06Policy(cfg)
    rng = np.random.default_rng(seed)
    lo, hi = np.array(station.robot.lower), np.array(station.robot.upper)
    samples = lo + (hi - lo) * rng.random((4096, len(lo)))
    return save_bundle(model, out_dir, compute_norm_stats(samples, samples), name=Path(out_dir).name,
                       joint_names=station.robot.joint_names, weights_dtype=weights_dtype,
                       description=f"Random weights ({preset_name} preset, seed {seed}) for tests and benchmarks; "
                                   "its actions are meaningless.")
