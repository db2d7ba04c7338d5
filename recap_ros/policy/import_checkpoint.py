"""``recap-import-checkpoint``: a policy bundle from a public checkpoint.

Sources (``--format``):

* ``hf`` — a Hugging Face Gemma 3 (``Gemma3ForConditionalGeneration``: SigLIP + multimodal projector + Gemma 3
  decoder) or PaliGemma folder (``config.json`` + ``*.safetensors``). The backbone is taken over; the action
  expert (and any state projection) is freshly initialised. SigLIP's learned positions are resized (bicubic, as
  transformers' ``interpolate_pos_encoding``) when the bundle's ``image_size`` differs (Gemma 3: 896 px -> 448 px).
* ``lerobot`` — a LeRobot ``pi0`` / ``pi05`` policy folder (``model.safetensors``, ``config.json`` and the
  pre/post-processor normaliser ``*.safetensors`` with ``observation.state.*`` / ``action.*`` statistics).
* ``openpi`` — an openpi PyTorch checkpoint folder (``model.safetensors``) with openpi's ``norm_stats.json``
  (``--norm-stats``; q01/q99 are what π0.5 normalises with).

Geometry comes from the tensors' shapes (width, depth, MLP sizes, vocabulary, vision tower, action/state dims) and
from ``config.json`` where shapes cannot tell (Gemma 3's layer types, window, RoPE); the rest from the preset
(``pi06`` for ``hf`` Gemma 3, ``pi05`` otherwise) and ``--set key=value``. Tensors are read and written one at a
time in the bundle's dtype (default bf16, :mod:`recap_ros.policy.safetensors_stream`): no fp32 copy of the model.
A checkpoint that does not fit is refused before anything is written, with ONE line naming the first missing or
mis-shaped tensor.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from recap_ros.policy.config import PolicyConfig, preset
from recap_ros.policy.errors import PolicyError
from recap_ros.policy.normalize import Stats, load_norm_stats
from recap_ros.policy.safetensors_stream import TensorFile, TensorFolder, write_streaming

FORMATS = ("hf", "lerobot", "openpi")


# --------------------------------------------------------------------------------------------- tensor map
@dataclasses.dataclass(frozen=True)
class Src:
    """Where one bundle tensor comes from: source tensor names and how they combine (``copy``, ``qkv``: the three
    SigLIP projections concatenated, ``t``: transposed, ``pos``: SigLIP positions resized to the bundle's grid)."""
    keys: tuple[str, ...]
    how: str = "copy"


def _gemma_layer(src: str, dst: str, gemma3: bool, adarms: bool) -> dict[str, Src]:
    m = {f"{dst}attn.{a}.weight": Src((f"{src}self_attn.{a}_proj.weight",)) for a in "qkvo"}
    m.update({f"{dst}mlp.{a}.weight": Src((f"{src}mlp.{a}_proj.weight",)) for a in ("gate", "up", "down")})
    # Gemma 1 calls its pre-MLP norm post_attention_layernorm; Gemma 3 has pre + post norms around both blocks
    norms = {"norm1": "input_layernorm", "norm2": "pre_feedforward_layernorm" if gemma3 else "post_attention_layernorm"}
    if gemma3:
        norms.update(post_norm1="post_attention_layernorm", post_norm2="post_feedforward_layernorm")
        m.update({f"{dst}attn.{a}_norm.weight": Src((f"{src}self_attn.{a}_norm.weight",)) for a in "qk"})
    for ours, theirs in norms.items():
        if adarms and not ours.startswith("post"):
            m[f"{dst}{ours}.mod.weight"] = Src((f"{src}{theirs}.dense.weight",))
            m[f"{dst}{ours}.mod.bias"] = Src((f"{src}{theirs}.dense.bias",))
        else:
            m[f"{dst}{ours}.weight"] = Src((f"{src}{theirs}.weight",))
    return m


def backbone_map(cfg: PolicyConfig, text: str, vision: str, projector: str) -> dict[str, Src]:
    """Bundle tensor -> source for the SigLIP tower, the projector and the Gemma decoder (HF names after the given
    prefixes, e.g. ``model.language_model.``, ``model.vision_tower.vision_model.``, ``model.multi_modal_projector.``)."""
    m = {"prefix.embed.weight": Src((f"{text}embed_tokens.weight",)), "prefix.norm.weight": Src((f"{text}norm.weight",))}
    for i in range(cfg.depth):
        m.update(_gemma_layer(f"{text}layers.{i}.", f"prefix.layers.{i}.", cfg.qk_norm, False))
    v = "prefix.vision."
    m[f"{v}patch.weight"] = Src((f"{vision}embeddings.patch_embedding.weight",))
    m[f"{v}patch.bias"] = Src((f"{vision}embeddings.patch_embedding.bias",))
    m[f"{v}pos"] = Src((f"{vision}embeddings.position_embedding.weight",), "pos")
    for p in ("weight", "bias"):
        m[f"{v}ln.{p}"] = Src((f"{vision}post_layernorm.{p}",))
        for j in range(cfg.vision_depth):
            s, d = f"{vision}encoder.layers.{j}.", f"{v}blocks.{j}."
            m[f"{d}qkv.{p}"] = Src(tuple(f"{s}self_attn.{a}_proj.{p}" for a in "qkv"), "qkv")
            m[f"{d}proj.{p}"] = Src((f"{s}self_attn.out_proj.{p}",))
            m[f"{d}ln1.{p}"], m[f"{d}ln2.{p}"] = Src((f"{s}layer_norm1.{p}",)), Src((f"{s}layer_norm2.{p}",))
            m[f"{d}fc1.{p}"], m[f"{d}fc2.{p}"] = Src((f"{s}mlp.fc1.{p}",)), Src((f"{s}mlp.fc2.{p}",))
    if cfg.vision_projector == "gemma3":
        m[f"{v}proj_norm.weight"] = Src((f"{projector}mm_soft_emb_norm.weight",))
        m[f"{v}proj.weight"] = Src((f"{projector}mm_input_projection_weight",), "t")
    else:
        m[f"{v}proj.weight"] = Src((f"{projector}linear.weight",))
        m[f"{v}proj.bias"] = Src((f"{projector}linear.bias",))
    return m


def expert_map(cfg: PolicyConfig, expert: str, head: str) -> dict[str, Src]:
    """Bundle tensor -> source for openpi's / LeRobot's action expert (``gemma_expert.model.`` layers) and its
    projections (``action_in_proj``, π0.5 ``time_mlp_*`` | π0 ``action_time_mlp_*`` + ``state_proj``)."""
    adarms = cfg.time_conditioning == "adarms"
    m = {}
    for i in range(cfg.depth):
        m.update(_gemma_layer(f"{expert}layers.{i}.", f"expert.layers.{i}.", cfg.qk_norm, adarms))
    if adarms:
        m["expert.norm.mod.weight"], m["expert.norm.mod.bias"] = (Src((f"{expert}norm.dense.weight",)),
                                                                  Src((f"{expert}norm.dense.bias",)))
    else:
        m["expert.norm.weight"] = Src((f"{expert}norm.weight",))
    time = "time_mlp" if adarms else "action_time_mlp"
    for p in ("weight", "bias"):
        m[f"expert.action_in.{p}"] = Src((f"{head}action_in_proj.{p}",))
        m[f"expert.action_out.{p}"] = Src((f"{head}action_out_proj.{p}",))
        m[f"expert.time_in.{p}"] = Src((f"{head}{time}_in.{p}",))
        m[f"expert.time_out.{p}"] = Src((f"{head}{time}_out.{p}",))
        if cfg.state_input == "suffix":
            m[f"expert.state_proj.{p}"] = Src((f"{head}state_proj.{p}",))
    return m


def _prefix(keys, pattern: str, what: str, folder) -> str:
    for k in sorted(keys):
        hit = re.fullmatch(pattern, k)
        if hit:
            return hit.group(1)
    raise PolicyError(f"{folder}: no {what} tensor (a name matching {pattern}) in the checkpoint")


def resize_positions(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """SigLIP's learned positions (N, D) on a sqrt(N) grid -> (grid², D), bicubic as transformers resizes them."""
    side = math.isqrt(pos.shape[0])
    if side == grid:
        return pos
    x = pos.float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
    x = nn.functional.interpolate(x, size=(grid, grid), mode="bicubic", align_corners=False)
    return x.permute(0, 2, 3, 1).reshape(grid * grid, -1).to(pos.dtype)


def convert_tensor(src: Src, tensors, shape: tuple[int, ...]) -> torch.Tensor:
    parts = [tensors.get(k) for k in src.keys]
    if src.how == "qkv":
        return torch.cat(parts, 0)
    if src.how == "t":
        return parts[0].t().contiguous()
    if src.how == "pos":
        return resize_positions(parts[0], math.isqrt(shape[1]))[None]
    return parts[0]


def source_shape(src: Src, tensors, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape ``src`` yields (without reading the data), to check against the bundle's before writing."""
    shapes = [tuple(tensors.shape(k)) for k in src.keys]
    if src.how == "qkv":
        return (sum(s[0] for s in shapes),) + shapes[0][1:]
    if src.how == "t":
        return tuple(reversed(shapes[0]))
    if src.how == "pos":
        side = math.isqrt(shapes[0][0])
        return (1, shape[1], shapes[0][1]) if side * side == shapes[0][0] else (1,) + shapes[0]
    return shapes[0]


def check_plan(plan: dict[str, Src], tensors, shapes: dict[str, tuple[int, ...]], folder) -> None:
    """One line naming the first missing or mis-shaped tensor (bundle order), else nothing."""
    for ours, src in plan.items():
        for k in src.keys:
            if k not in tensors:
                raise PolicyError(f"{folder}: checkpoint tensor {k} is missing (needed for {ours})")
        got = source_shape(src, tensors, shapes[ours])
        if got != tuple(shapes[ours]):
            raise PolicyError(f"{folder}: checkpoint tensor {src.keys[0]} has shape {got}, the bundle's {ours} needs "
                              f"{tuple(shapes[ours])}")


# --------------------------------------------------------------------------------------------- configs
def _layer_count(keys, pattern: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.fullmatch(pattern, k))}
    return max(found) + 1 if found else 0


def _hf_text_config(text: dict, where) -> dict:
    """PolicyConfig fields of a HF Gemma / Gemma 3 text config (refuses features this stack does not have)."""
    gemma3 = text.get("model_type") == "gemma3_text"
    head_dim = text.get("head_dim", 256)
    if text.get("hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        raise PolicyError(f"{where}: hidden_activation {text.get('hidden_activation')!r} is not gelu_pytorch_tanh")
    if text.get("query_pre_attn_scalar", head_dim) != head_dim:
        raise PolicyError(f"{where}: query_pre_attn_scalar {text['query_pre_attn_scalar']} != head_dim {head_dim} "
                          "(this stack scales attention by head_dim ** -0.5)")
    for key in ("attn_logit_softcapping",):
        if text.get(key) is not None:
            raise PolicyError(f"{where}: {key} {text[key]} is not supported")
    out = {"heads": text.get("num_attention_heads", 8), "kv_heads": text.get("num_key_value_heads", 1),
           "head_dim": head_dim}
    if not gemma3:
        return out
    depth = text["num_hidden_layers"]
    types = text.get("layer_types") or ["sliding_attention" if (i + 1) % text.get("sliding_window_pattern", 6)
                                        else "full_attention" for i in range(depth)]
    every = next((i + 1 for i, t in enumerate(types) if t == "full_attention"), 0)
    if [every == 0 or (i + 1) % every != 0 for i in range(depth)] != [t == "sliding_attention" for t in types]:
        raise PolicyError(f"{where}: layer_types {types} are not a 'one global layer every N' pattern")
    rp = text.get("rope_parameters") or {}
    full, local = rp.get("full_attention") or {}, rp.get("sliding_attention") or {}
    scaling = text.get("rope_scaling") or {}
    factor = full.get("factor", scaling.get("factor", 1.0)) if full.get("rope_type", scaling.get(
        "rope_type", "default")) in ("linear",) else 1.0
    if full.get("rope_type", "linear") not in ("linear", "default"):
        raise PolicyError(f"{where}: rope_type {full['rope_type']!r} of the global layers is not supported")
    out.update(qk_norm=True, sandwich_norm=True, global_every=every, sliding_window=int(text.get("sliding_window")),
               rope_theta=float(full.get("rope_theta", text.get("rope_theta", 1e6))),
               rope_local_theta=float(local.get("rope_theta", text.get("rope_local_base_freq", 1e4))),
               rope_scale=float(factor))
    return out


def infer_config(tensors, base: PolicyConfig, text: str, vision: str, expert: str | None, head: str | None,
                 fields: dict, folder) -> PolicyConfig:
    """The bundle config: shapes of the checkpoint's tensors over ``base`` + ``fields`` (config.json values)."""
    keys = list(tensors.keys())
    vocab, width = tensors.shape(f"{text}embed_tokens.weight")
    patch = tensors.shape(f"{vision}embeddings.patch_embedding.weight")
    n_pos = tensors.shape(f"{vision}embeddings.position_embedding.weight")[0]
    f = dict(vocab_size=vocab, width=width, mlp_dim=tensors.shape(f"{text}layers.0.mlp.gate_proj.weight")[0],
             depth=_layer_count(keys, re.escape(text) + r"layers\.(\d+)\.self_attn\.q_proj\.weight"),
             vision_width=patch[0], patch_size=patch[2],
             vision_depth=_layer_count(keys, re.escape(vision) + r"encoder\.layers\.(\d+)\.layer_norm1\.weight"),
             vision_mlp=tensors.shape(f"{vision}encoder.layers.0.mlp.fc1.weight")[0])
    if base.vision_projector == "linear":  # PaliGemma: every patch is a token, at the checkpoint's resolution
        f.update(vision_tokens=n_pos, image_size=math.isqrt(n_pos) * patch[2])
    if expert is not None:
        ew = tensors.shape(f"{head}action_in_proj.weight")
        f.update(expert_width=ew[0], action_dim=ew[1],
                 expert_mlp_dim=tensors.shape(f"{expert}layers.0.mlp.gate_proj.weight")[0])
        if f"{head}state_proj.weight" in tensors:
            f.update(state_dim=tensors.shape(f"{head}state_proj.weight")[1])
    f.update(fields)
    return dataclasses.replace(base, **f).validate()


# --------------------------------------------------------------------------------------------- norm stats
def identity_stats(dim: int) -> Stats:
    """Stats under which normalising is the identity in both modes (padding dims of π0's 32-dim state/actions)."""
    return Stats(mean=np.zeros(dim), std=np.ones(dim), q01=-np.ones(dim), q99=np.ones(dim))


def pad_stats(stats: Stats, dim: int, what: str) -> Stats:
    if stats.dim > dim:
        raise PolicyError(f"{what}: statistics have {stats.dim} dims, the model takes {dim}")
    pad = identity_stats(dim - stats.dim)
    return Stats(**{k: np.concatenate([getattr(stats, k), getattr(pad, k)]) for k in ("mean", "std", "q01", "q99")})


def lerobot_stats(folder: Path) -> dict[str, Stats]:
    """State and action statistics of LeRobot's processor files (``*normalizer_processor.safetensors``)."""
    found = {}
    for p in sorted(folder.glob("*normalizer_processor*.safetensors")):
        tf = TensorFile(p)
        for name in tf.entries:
            found.setdefault(name, tf)
    out = {}
    for ours, theirs in (("state", "observation.state"), ("actions", "action")):
        values = {}
        for stat in ("mean", "std", "q01", "q99"):
            key = f"{theirs}.{stat}"
            if key not in found:
                raise PolicyError(f"{folder}: normaliser statistic {key} is missing (no *normalizer_processor"
                                  "*.safetensors with it; pass --norm-stats norm_stats.json)")
            values[stat] = found[key].get(key).double().numpy().reshape(-1)
        out[ours] = Stats(**values)
    return out


# --------------------------------------------------------------------------------------------- import
@dataclasses.dataclass
class Plan:
    config: PolicyConfig
    tensors: object
    mapping: dict[str, Src]
    norm_stats: dict[str, Stats] | None
    provenance: str


def plan_import(src: str | Path, fmt: str, overrides: dict | None = None, norm_stats: str | Path | None = None) -> Plan:
    """Read the checkpoint's layout and decide the bundle config and the tensor map (no tensor data read)."""
    folder = Path(src).expanduser()
    if fmt not in FORMATS:
        raise PolicyError(f"--format {fmt!r}: must be one of {', '.join(FORMATS)}")
    if not folder.is_dir():
        raise PolicyError(f"checkpoint folder {folder} does not exist")
    tensors = TensorFolder(folder, "model*.safetensors")
    keys = tensors.keys()
    meta = {}
    if (folder / "config.json").is_file():
        try:
            meta = json.loads((folder / "config.json").read_text())
        except ValueError as e:
            raise PolicyError(f"{folder / 'config.json'}: not readable JSON ({e})") from None
    text = _prefix(keys, r"(.*?)layers\.0\.self_attn\.q_proj\.weight", "language model layer", folder) \
        if fmt == "hf" else _prefix(keys, r"(.*paligemma\..*?)layers\.0\.self_attn\.q_proj\.weight",
                                    "PaliGemma language model layer", folder)
    vision = _prefix(keys, r"(.*?)embeddings\.patch_embedding\.weight", "SigLIP patch embedding", folder)
    projector = _prefix(keys, r"(.*?multi_modal_projector\.).*", "multimodal projector", folder)
    fields: dict = {}
    if fmt == "hf":
        text_cfg = meta.get("text_config", meta)
        gemma3 = text_cfg.get("model_type") == "gemma3_text" or meta.get("model_type") == "gemma3"
        base = preset("pi06" if gemma3 else "pi05")
        fields.update(_hf_text_config({"model_type": "gemma3_text" if gemma3 else "gemma", **text_cfg},
                                      folder / "config.json"))
        fields["vision_heads"] = meta.get("vision_config", {}).get("num_attention_heads", base.vision_heads)
        if gemma3:
            fields["vision_tokens"] = meta.get("mm_tokens_per_image", base.vision_tokens)
        expert = head = None
        what = f"Hugging Face {'Gemma 3' if gemma3 else 'PaliGemma'} checkpoint (backbone; action expert freshly " \
               "initialised)"
    else:
        kind = meta.get("type", "pi05" if any("time_mlp_in" in k for k in keys) else "pi0")
        base = preset("pi05")
        if kind == "pi0":
            base = dataclasses.replace(base, time_conditioning="concat", state_input="suffix")
        expert = _prefix(keys, r"(.*gemma_expert\..*?)layers\.0\.self_attn\.q_proj\.weight", "action expert layer",
                         folder)
        head = _prefix(keys, r"(.*?)action_in_proj\.weight", "action_in_proj", folder)
        if kind == "pi05":
            fields["state_dim"] = meta.get("max_state_dim", base.state_dim)
        if "chunk_size" in meta:
            fields["chunk_len"] = meta["chunk_size"]
        if "tokenizer_max_length" in meta:
            fields["max_text_tokens"] = meta["tokenizer_max_length"]
        if "num_inference_steps" in meta:
            fields["denoise_steps"] = meta["num_inference_steps"]
        what = f"{'LeRobot' if fmt == 'lerobot' else 'openpi'} {kind} policy"
    fields.update(overrides or {})
    cfg = infer_config(tensors, base, text, vision, expert, head, fields, folder)
    mapping = backbone_map(cfg, text, vision, projector)
    if expert is not None:
        mapping.update(expert_map(cfg, expert, head))
    stats = None
    if norm_stats is not None:
        stats = load_norm_stats(Path(norm_stats))
    elif fmt == "lerobot":
        stats = lerobot_stats(folder)
    elif fmt == "openpi":
        raise PolicyError(f"{folder}: an openpi checkpoint needs --norm-stats (openpi's norm_stats.json)")
    if stats is not None:
        stats = {"state": pad_stats(stats["state"], cfg.state_dim, "state"),
                 "actions": pad_stats(stats["actions"], cfg.action_dim, "actions")}
    return Plan(cfg, tensors, mapping, stats, f"{what} from {folder.resolve()}")


def fresh_tensors(cfg: PolicyConfig, names: list[str], dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    """Freshly initialised tensors (the default init of their modules) for bundle tensors the checkpoint lacks;
    a missing expert is built whole in ``dtype`` (never the whole model in fp32)."""
    from recap_ros.policy.model import ActionExpert, Pi06Policy

    torch.manual_seed(seed)
    out = {}
    if any(n.startswith("expert.") for n in names):
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype if dtype.is_floating_point else torch.float32)
        try:
            out.update({f"expert.{k}": v for k, v in ActionExpert(cfg).state_dict().items()})
        finally:
            torch.set_default_dtype(default)
    with torch.device("meta"):
        meta = Pi06Policy(cfg)
    for name in names:
        if name in out:
            continue
        owner = meta.get_submodule(name.rsplit(".", 1)[0])
        owner.to_empty(device="cpu")
        owner.reset_parameters()
        out.update({f"{name.rsplit('.', 1)[0]}.{k}": v.detach().to(dtype) for k, v in owner.state_dict().items()})
    return {n: out[n].to(dtype) for n in names}


def write_weights(plan: Plan, path: Path, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> None:
    """Check the whole tensor map, then write the bundle's ``model.safetensors`` tensor by tensor."""
    from recap_ros.policy.model import Pi06Policy

    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Pi06Policy(plan.config).state_dict().items()}
    unknown = sorted(set(plan.mapping) - set(shapes))
    if unknown:
        raise PolicyError(f"tensor map names {unknown[0]}, which the bundle model does not have")
    check_plan(plan.mapping, plan.tensors, shapes, plan.provenance)
    fresh = fresh_tensors(plan.config, [k for k in shapes if k not in plan.mapping], dtype, seed)
    specs = [(k, dtype, shapes[k]) for k in sorted(shapes)]

    def produce(name):
        if name in fresh:
            return fresh.pop(name)
        return convert_tensor(plan.mapping[name], plan.tensors, shapes[name]).to(dtype)

    write_streaming(path, specs, produce, {"format": "pt"})


def import_checkpoint(src, out_dir, fmt: str, *, overrides: dict | None = None, norm_stats=None, tokenizer=None,
                      dtype: str = "bfloat16", onnx: bool = True, name: str | None = None, seed: int = 0):
    """Write a bundle at ``out_dir`` from the checkpoint ``src``. With ``onnx`` the result is a complete bundle
    (:func:`recap_ros.policy.bundle.save_bundle`, ONNX graphs included); without, only ``model.safetensors``,
    ``config.json`` (model) and ``norm_stats.json`` (a 4B model's weights, for GPU export elsewhere)."""
    from recap_ros.policy.bundle import README, WEIGHTS, save_bundle
    from recap_ros.policy.normalize import save_norm_stats
    from recap_ros.policy.tokenizer import ByteTokenizer, SentencePieceTokenizer

    plan = plan_import(src, fmt, overrides, norm_stats)
    if tokenizer is None and (Path(src).expanduser() / "tokenizer.model").is_file():  # the Hub folders carry it
        tokenizer = Path(src).expanduser() / "tokenizer.model"
    tok = SentencePieceTokenizer(tokenizer) if tokenizer else ByteTokenizer()
    if not tokenizer:  # the byte tokenizer spells the advantage segment in bytes
        need = max(len(tok.encode(s)) for s in ("Advantage: positive\n", "Advantage: negative\n"))
        if plan.config.max_advantage_tokens < need:
            plan.config = dataclasses.replace(plan.config, max_advantage_tokens=need).validate()
    if plan.norm_stats is None:
        plan.norm_stats = {"state": identity_stats(plan.config.state_dim),
                           "actions": identity_stats(plan.config.action_dim)}
        plan.provenance += "; norm stats: identity (none given)"
    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    torch_dtype = getattr(torch, dtype)
    write_weights(plan, out / WEIGHTS, torch_dtype, seed)
    if not onnx:
        save_norm_stats(plan.norm_stats, out / "norm_stats.json")
        (out / "config.json").write_text(json.dumps({"model": plan.config.to_json(), "source": plan.provenance},
                                                    indent=1))
        return None
    from recap_ros.policy.model import Pi06Policy
    from safetensors.torch import load_file

    model = Pi06Policy(plan.config)
    model.load_state_dict({k: v.float() for k, v in load_file(str(out / WEIGHTS)).items()})
    bundle = save_bundle(model, out, plan.norm_stats, tok if tokenizer else None, name=name or out.name,
                         weights_dtype=dtype, description=f"Imported: {plan.provenance}.")
    with open(out / README, "a") as f:
        f.write(f"\n## Provenance\n\n{plan.provenance}; written by recap-import-checkpoint ({dtype} weights).\n")
    return bundle


def _parse_set(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise PolicyError(f"--set {item!r}: expected key=value")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
        if key == "camera_roles" and isinstance(out[key], list):
            out[key] = tuple(out[key])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="recap-import-checkpoint", description=__doc__.split("\n\n")[0])
    ap.add_argument("src", help="checkpoint folder")
    ap.add_argument("out", help="bundle directory to write")
    ap.add_argument("--format", required=True, choices=FORMATS)
    ap.add_argument("--norm-stats", help="openpi norm_stats.json (required for --format openpi)")
    ap.add_argument("--tokenizer", help="SentencePiece tokenizer.model (Gemma's / PaliGemma's); default: the "
                    "checkpoint folder's tokenizer.model, else bytes")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="model config field, e.g. image_size=224 or expert_width=512 (JSON values)")
    ap.add_argument("--no-onnx", action="store_true", help="weights, config and norm stats only (no ONNX export)")
    ap.add_argument("--seed", type=int, default=0, help="seed of freshly initialised tensors")
    a = ap.parse_args(argv)
    try:
        import_checkpoint(a.src, a.out, a.format, overrides=_parse_set(a.set), norm_stats=a.norm_stats,
                          tokenizer=a.tokenizer, dtype=a.dtype, onnx=not a.no_onnx, seed=a.seed)
    except PolicyError as e:
        print(f"recap-import-checkpoint: {e}", file=sys.stderr)
        return 2
    print(f"wrote {Path(a.out).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
