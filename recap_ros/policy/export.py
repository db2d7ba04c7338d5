"""ONNX export of the policy: TWO engine calls per action chunk.

Graph split (static shapes, batch 1, fp32 graphs; :mod:`recap_ros.policy.precision` derives the fp16 / bf16 graphs
of strongly typed TensorRT engines from them):

``onnx/prefix.onnx`` — vision + prompt + advantage segment -> prefix KV cache (once per chunk)
    ==============  =======  ==========================================  =============================================
    name            dtype    shape                                       meaning
    ==============  =======  ==========================================  =============================================
    images          uint8    (1, n_cams, S, S, 3)                        RGB views in ``camera_roles`` order, resized
    tokens          int64    (1, max_text_tokens)                        BOS "Task: <prompt>\\n", padded
    token_mask      bool     (1, max_text_tokens)                        True on real tokens
    adv_tokens      int64    (1, max_advantage_tokens)                   "Advantage: positive\\n", padded
    adv_mask        bool     (1, max_advantage_tokens)                   True on real tokens
    state           float32  (1, state_dim)                              normalised state (only if state_input=prefix)
    -> keys         float32  (depth, 1, kv_heads, prefix_len, head_dim)  per-layer keys (the KV cache)
    -> values       float32  (depth, 1, kv_heads, prefix_len, head_dim)  per-layer values
    -> kv_mask      bool     (1, prefix_len)                             valid KV positions (last max_advantage_tokens
                                                                         = the advantage segment)
    ==============  =======  ==========================================  =============================================

``onnx/denoise_s{N}.onnx`` — the whole unrolled N-step Euler loop, conditional branch only (β = 1)
``onnx/denoise_s{N}_cfg.onnx`` — the same with classifier-free guidance, cond + uncond as ONE batch of 2
    ==============  =======  ==========================================  =============================================
    keys, values, kv_mask    as output by prefix.onnx
    noise           float32  (1, chunk_len, action_dim)                  initial noise x_1 (shared by both branches)
    state           float32  (1, state_dim)                              normalised state (only if state_input=suffix)
    beta            float32  (1,)                                        guidance weight β (``_cfg`` graph only)
    -> actions      float32  (1, chunk_len, action_dim)                  NORMALISED action chunk x_0
    ==============  =======  ==========================================  =============================================

prefix_len = n_cams·vision_tokens + max_text_tokens (+1 state token) + max_advantage_tokens. The uncond branch
is the same KV with the advantage segment masked out (see :meth:`Pi06Policy.cfg_batch`). Host side
(:mod:`recap_ros.policy.runtime`): resize, tokenise, normalise the state, draw the noise from the seed, and
de-normalise ``actions`` to robot units (absolute joint positions). Graphs larger than 2 GB keep their weights
in ``<graph>.onnx.data`` next to the graph (ONNX external data).
"""
from __future__ import annotations

import logging
import os
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from recap_ros.policy.errors import PolicyError
from recap_ros.policy.model import Pi06Policy

OPSET = 18
PREFIX_FILE = "prefix.onnx"
EXPORTERS = ("dynamo", "torchscript")
EXTERNAL_DATA_BYTES = 1_000_000_000  # graphs with more weight bytes keep them in <graph>.onnx.data (protobuf: < 2 GB)
# RECAP_ONNX_EXPORTER picks the default: dynamo (torch.export + onnxscript, the maintained exporter) unless set to
# torchscript. The test suite sets torchscript: dynamo takes 4-6x longer (tiny: ~60 s vs ~15 s on 2 busy cores).
EXPORTER_ENV = "RECAP_ONNX_EXPORTER"


def denoise_file(steps: int, cfg: bool) -> str:
    return f"denoise_s{steps}{'_cfg' if cfg else ''}.onnx"


class PrefixGraph(nn.Module):
    def __init__(self, model: Pi06Policy):
        super().__init__()
        self.model = model

    def forward(self, images, tokens, token_mask, adv_tokens, adv_mask, state=None):
        return self.model.encode_prefix(images, tokens, token_mask, adv_tokens, adv_mask, state)


class DenoiseGraph(nn.Module):
    def __init__(self, model: Pi06Policy, steps: int, cfg: bool):
        super().__init__()
        self.model, self.steps, self.cfg = model, steps, cfg

    def forward(self, keys, values, kv_mask, noise, *extra):
        """extra = (state,)? + (beta,)? following the I/O contract."""
        state = extra[0] if self.model.config.state_input == "suffix" else None
        beta = extra[-1] if self.cfg else None
        return self.model.denoise(keys, values, kv_mask, state, noise, self.steps, beta)


def example_inputs(model: Pi06Policy) -> dict[str, torch.Tensor]:
    """Dummy inputs with the contract's shapes and dtypes (batch 1)."""
    c = model.config
    g = torch.Generator().manual_seed(0)
    return {
        "images": torch.randint(0, 256, (1, c.num_cameras, c.image_size, c.image_size, 3), dtype=torch.uint8,
                                generator=g),
        "tokens": torch.randint(0, c.vocab_size, (1, c.max_text_tokens), generator=g),
        "token_mask": torch.ones(1, c.max_text_tokens, dtype=torch.bool),
        "adv_tokens": torch.randint(0, c.vocab_size, (1, c.max_advantage_tokens), generator=g),
        "adv_mask": torch.ones(1, c.max_advantage_tokens, dtype=torch.bool),
        "state": torch.zeros(1, c.state_dim),
        "noise": torch.randn(1, c.chunk_len, c.action_dim, generator=g),
        "beta": torch.ones(1),
    }


def _torch_export(module: nn.Module, args: tuple, names: list[str], outputs: list[str], raw: Path,
                  exporter: str) -> None:
    """Export with ``exporter``. dynamo -> TorchScript fallback: the
    TorchScript exporter is deprecated, but torch.export cannot trace every model (data-dependent control flow,
    ops without an ONNX translation), and a bundle must still get its graphs; the reason is warned about."""
    module = module.eval()
    if exporter == "dynamo":
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(module, args, str(raw), input_names=names, output_names=outputs,
                                  opset_version=OPSET, dynamo=True, external_data=True, verbose=False)
            return
        except Exception as e:  # torch.export / onnxscript raise many types (Unsupported, TorchExportError, ...)
            warnings.warn(f"{raw.name}: the dynamo exporter failed ({type(e).__name__}: {str(e)[:300]}); "
                          "falling back to the TorchScript exporter")
            for stale in raw.parent.iterdir():
                stale.unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(raw), input_names=names, output_names=outputs,
                          opset_version=OPSET, dynamo=False, do_constant_folding=True)


def _tidy(model) -> None:
    """Fold what is constant, keep one initializer per distinct weight, drop dead nodes (in place, an onnx_ir
    Model). The dynamo exporter folds only small tensors, so the flow-time conditioning of every unrolled denoise
    step (time MLP + adaRMS modulations: constants at batch 1) stayed as Gemms on the weights, which ONNX Runtime
    cannot fold in an fp16 graph on CPU; and it writes the weights it folds (e.g. transposed for MatMul) once per
    use: the tiny bundle's 5-step graph held 56 duplicates (1.2 MB of 2.9 MB), a pi06 one would hold 4 extra
    copies of the expert. Identical tensors are merged by content hash (onnx_ir's pass)."""
    import onnxscript.optimizer
    from onnx_ir.passes.common import DeduplicateHashedInitializersPass, RemoveUnusedNodesPass

    folding = logging.getLogger("onnxscript.optimizer._constant_folding")
    level = folding.level
    folding.setLevel(logging.ERROR)  # one "Skipping ... Split with multiple outputs" warning per adaRMS norm
    try:
        onnxscript.optimizer.optimize(model, input_size_limit=1 << 62, output_size_limit=1 << 62,
                                      onnx_shape_inference=False)  # (protobuf shape inference: < 2 GB graphs only)
    finally:
        folding.setLevel(level)
    DeduplicateHashedInitializersPass()(model)
    RemoveUnusedNodesPass()(model)


def _export(module: nn.Module, args: tuple, names: list[str], outputs: list[str], path: Path, exporter: str) -> None:
    """Export one graph. Models over 2 GB come out of torch with their weights in one or more side files; they
    are re-saved with all weights in a single ``<graph>.onnx.data`` next to the graph."""
    import onnx_ir as ir

    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in (path, path.with_name(path.name + ".data")):
        stale.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".export-") as tmp:
        raw = Path(tmp) / path.name
        _torch_export(module, args, names, outputs, raw, exporter)
        model = ir.load(str(raw))  # external data (if any) stays memory-mapped until saved
        _tidy(model)
        if sum(v.const_value.nbytes for v in model.graph.initializers.values()) > EXTERNAL_DATA_BYTES:
            ir.save(model, str(path), external_data=path.name + ".data", size_threshold_bytes=1024)
        else:  # weights inside the graph file (read out of the temporary side file first)
            ir.save(ir.external_data.load_to_model(model), str(path))


def default_exporter() -> str:
    exporter = os.environ.get(EXPORTER_ENV, "dynamo")
    if exporter not in EXPORTERS:
        raise PolicyError(f"{EXPORTER_ENV}={exporter!r}: expected one of {', '.join(EXPORTERS)}")
    return exporter


def export_onnx(model: Pi06Policy, out_dir: str | Path, steps: tuple[int, ...] | list[int],
                exporter: str | None = None) -> dict:
    """Write prefix.onnx and, for each step count, denoise_s{N}.onnx + denoise_s{N}_cfg.onnx into out_dir.
    ``exporter``: dynamo | torchscript (default: :func:`default_exporter`).

    Returns the ``onnx`` entry of the bundle's config.json (paths relative to out_dir's parent)."""
    exporter = exporter or default_exporter()
    out_dir = Path(out_dir)
    c = model.config
    model = model.eval().float()
    x = example_inputs(model)
    prefix_in = ["images", "tokens", "token_mask", "adv_tokens", "adv_mask"]
    if c.state_input == "prefix":
        prefix_in.append("state")
    kv_out = ["keys", "values", "kv_mask"]
    with torch.no_grad():
        _export(PrefixGraph(model), tuple(x[n] for n in prefix_in), prefix_in, kv_out, out_dir / PREFIX_FILE,
                exporter)
        keys, values, kv_mask = model.encode_prefix(*(x[n] for n in prefix_in))
        kv = {"keys": keys, "values": values, "kv_mask": kv_mask}
        entry = {"prefix": f"{out_dir.name}/{PREFIX_FILE}", "denoise": {}}
        for n in sorted(set(int(s) for s in steps)):
            files = {}
            for cfg in (False, True):
                names = ["keys", "values", "kv_mask", "noise"]
                args = [kv["keys"], kv["values"], kv["kv_mask"], x["noise"]]
                if c.state_input == "suffix":
                    names.append("state")
                    args.append(x["state"])
                if cfg:
                    names.append("beta")
                    args.append(x["beta"])
                _export(DenoiseGraph(model, n, cfg), tuple(args), names, ["actions"], out_dir / denoise_file(n, cfg),
                        exporter)
                files["cfg" if cfg else "cond"] = f"{out_dir.name}/{denoise_file(n, cfg)}"
            entry["denoise"][str(n)] = files
    return entry
