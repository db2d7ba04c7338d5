"""Inference backends behind one interface: ``torch`` (reference), ``onnxruntime`` (CPU / CUDA / TensorRT
execution providers) and ``tensorrt`` (engines built from the bundle's ONNX, cached under ``engine_cache/``).

Every backend runs one chunk from host-prepared inputs (numpy, batch 1, the export I/O contract):
``images, tokens, token_mask, adv_tokens, adv_mask, state, noise`` (+ ``beta`` when guided) and returns the
normalised actions (1, chunk_len, action_dim) float32. ``beta is None`` runs the conditional branch only.
Two engine calls per chunk: prefix -> KV cache, then the whole unrolled Euler loop (with batched CFG).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from recap_ros.policy.bundle import Bundle, sha256_file
from recap_ros.policy.errors import PolicyError

PREFIX_INPUTS = ("images", "tokens", "token_mask", "adv_tokens", "adv_mask", "state")
PRECISIONS = ("fp16", "bf16", "fp32")


class Backend:
    name = "?"
    device = "cpu"

    def run(self, feeds: dict[str, np.ndarray], steps: int, beta: float | None) -> np.ndarray:
        raise NotImplementedError


# --------------------------------------------------------------------------------------------- torch
class TorchBackend(Backend):
    """Eager PyTorch (the reference). Any step count; ``device`` 'cpu' or 'cuda'."""

    name = "torch"

    def __init__(self, bundle: Bundle, device: str | None = None, threads: int | None = None):
        import torch

        self.torch = torch
        self.device = device or "cpu"
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise PolicyError(f"torch backend: device '{self.device}' requested but no CUDA GPU is available")
        if threads:
            torch.set_num_threads(threads)
        self.model = bundle.load_model().to(self.device)
        self.state_in_prefix = bundle.config.state_input == "prefix"

    def run(self, feeds, steps, beta):
        t = self.torch
        x = {k: t.from_numpy(np.ascontiguousarray(v)).to(self.device) for k, v in feeds.items()}
        with t.inference_mode():
            keys, values, kv_mask = self.model.encode_prefix(x["images"], x["tokens"], x["token_mask"],
                                                             x["adv_tokens"], x["adv_mask"],
                                                             x["state"] if self.state_in_prefix else None)
            out = self.model.denoise(keys, values, kv_mask, None if self.state_in_prefix else x["state"],
                                     x["noise"], steps, None if beta is None else x["beta"])
        return out.float().cpu().numpy()


# --------------------------------------------------------------------------------------------- onnxruntime
ORT_PROVIDER_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


class OrtBackend(Backend):
    """ONNX Runtime. ``providers`` default: every available one of TensorRT, CUDA, CPU (in that order; the
    TensorRT EP runs fp32/TF32 with its engine cache in ``engine_cache/ort_trt``; use the ``tensorrt`` backend
    for BF16 / FP16). The KV cache passes between the two sessions through IOBinding (it stays on the device
    with the CUDA / TensorRT EPs)."""

    name = "onnxruntime"

    def __init__(self, bundle: Bundle, providers: list[str] | None = None, threads: int | None = None):
        import onnxruntime as ort

        self.ort, self.bundle = ort, bundle
        available = ort.get_available_providers()
        if providers is None:
            providers = [p for p in ORT_PROVIDER_ORDER if p in available]
        unknown = [p for p in providers if p not in available]
        if unknown:
            raise PolicyError(f"onnxruntime backend: providers {unknown} are not available here "
                              f"(available: {available})")
        self.providers = []
        for p in providers:
            if p == "TensorrtExecutionProvider":
                cache = bundle.dir / "engine_cache" / "ort_trt"
                cache.mkdir(parents=True, exist_ok=True)
                self.providers.append((p, {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache)}))
            else:
                self.providers.append(p)
        self.device = "cuda" if any(p in providers for p in ORT_PROVIDER_ORDER[:2]) else "cpu"
        self.options = ort.SessionOptions()
        self.options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            self.options.intra_op_num_threads = threads
        # A station shares its CPUs with cameras, the mux and the recorder: worker threads that spin while
        # waiting for work would take their cores for nothing between chunks.
        self.options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        self.sessions: dict = {}
        self.prefix = self._session(bundle.onnx_path("prefix"))
        for graph in ("cond", "cfg"):  # load now: no first-chunk latency spike, and a broken graph fails early
            self._session(bundle.onnx_path(graph, bundle.config.denoise_steps))

    def _session(self, path: Path):
        if path not in self.sessions:
            try:
                self.sessions[path] = self.ort.InferenceSession(str(path), self.options, providers=self.providers)
            except Exception as e:  # onnxruntime raises its own Fail / InvalidGraph / RuntimeException types
                raise PolicyError(f"{path}: onnxruntime cannot load this graph ({e})") from None
        return self.sessions[path]

    def run(self, feeds, steps, beta):
        sess = self._session(self.bundle.onnx_path("cond" if beta is None else "cfg", steps))
        if self.device == "cpu":  # plain run: less per-call overhead than IOBinding when everything is host memory
            kv = dict(zip(("keys", "values", "kv_mask"), self.prefix.run(None, {
                i.name: feeds[i.name] for i in self.prefix.get_inputs()})))
            return sess.run(["actions"], {i.name: kv.get(i.name, feeds.get(i.name)) for i in sess.get_inputs()})[0]
        bind = self.prefix.io_binding()  # IOBinding: the KV cache stays where the prefix EP produced it
        for i in self.prefix.get_inputs():
            bind.bind_cpu_input(i.name, np.ascontiguousarray(feeds[i.name]))
        for name in ("keys", "values", "kv_mask"):
            bind.bind_output(name, self.device)
        self.prefix.run_with_iobinding(bind)
        kv = dict(zip(("keys", "values", "kv_mask"), bind.get_outputs()))
        bind2 = sess.io_binding()
        for i in sess.get_inputs():
            if i.name in kv:
                bind2.bind_ortvalue_input(i.name, kv[i.name])
            else:
                bind2.bind_cpu_input(i.name, np.ascontiguousarray(feeds[i.name]))
        bind2.bind_output("actions", "cpu")
        sess.run_with_iobinding(bind2)
        return bind2.copy_outputs_to_cpu()[0]


# --------------------------------------------------------------------------------------------- tensorrt
def gpu_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def tensorrt_available() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return gpu_available()


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", s).strip("-")


class EngineCache:
    """Engines under ``<bundle>/engine_cache/``, keyed by ONNX sha256 + GPU name + TensorRT version + precision.
    A key mismatch means a rebuild; an engine is never loaded for another ONNX, GPU or TensorRT version."""

    def __init__(self, bundle: Bundle, gpu_name: str, trt_version: str, precision: str):
        self.bundle, self.gpu, self.trt_version, self.precision = bundle, gpu_name, trt_version, precision
        self.dir = bundle.dir / "engine_cache"

    def key(self, onnx_path: Path) -> dict:
        rel = onnx_path.relative_to(self.bundle.dir).as_posix()
        sha = self.bundle.manifest["files"][rel]["sha256"]
        return {"onnx": rel, "onnx_sha256": sha, "gpu": self.gpu, "tensorrt": self.trt_version,
                "precision": self.precision}

    def path(self, onnx_path: Path) -> Path:
        k = self.key(onnx_path)
        return self.dir / (f"{onnx_path.stem}-{k['onnx_sha256'][:16]}-{_slug(self.gpu)}-trt{_slug(self.trt_version)}"
                           f"-{self.precision}.engine")

    def lookup(self, onnx_path: Path) -> Path | None:
        path = self.path(onnx_path)
        meta = path.with_suffix(".json")
        if path.is_file() and meta.is_file():
            try:
                if json.loads(meta.read_text()) == {**self.key(onnx_path), "engine_sha256": sha256_file(path)}:
                    return path
            except ValueError:
                pass
        return None

    def store(self, onnx_path: Path, engine: bytes) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        for old in self.dir.glob(f"{onnx_path.stem}-*-{self.precision}.*"):  # other ONNX / GPU / TRT versions
            old.unlink()
        path = self.path(onnx_path)
        path.write_bytes(engine)
        path.with_suffix(".json").write_text(json.dumps({**self.key(onnx_path),
                                                         "engine_sha256": sha256_file(path)}))
        return path


class TensorRTBackend(Backend):
    """TensorRT engines (BF16 default / FP16 / FP32) built from the bundle's ONNX graphs on first use and cached.
    Tensors live on the GPU as torch CUDA tensors; the KV cache never leaves the device. BF16 is the default
    because Gemma-class residual streams overflow FP16 (|x|² > 65504 in RMSNorm) with real weights."""

    name = "tensorrt"

    def __init__(self, bundle: Bundle, precision: str = "bf16", steps: tuple[int, ...] | None = None,
                 log=print):
        try:
            import tensorrt as trt
        except ImportError:
            raise PolicyError("tensorrt backend: the tensorrt Python package is not installed "
                              "(pip install tensorrt; needs an NVIDIA GPU)") from None
        if not gpu_available():
            raise PolicyError("tensorrt backend: TensorRT requested but no CUDA GPU is available to this process")
        if precision not in PRECISIONS:
            raise PolicyError(f"tensorrt backend: precision '{precision}' must be one of {', '.join(PRECISIONS)}")
        import torch

        self.trt, self.torch, self.bundle, self.log = trt, torch, bundle, log
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.device = f"cuda ({torch.cuda.get_device_name()})"
        self.cache = EngineCache(bundle, torch.cuda.get_device_name(), trt.__version__, precision)
        self.precision = precision
        self.stream = torch.cuda.Stream()
        self.engines: dict = {}
        self._engine(bundle.onnx_path("prefix"))
        for s in steps or (bundle.config.denoise_steps,):
            for graph in ("cond", "cfg"):
                self._engine(bundle.onnx_path(graph, s))

    def build(self, onnx_path: Path) -> bytes:
        trt = self.trt
        builder = trt.Builder(self.logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise PolicyError(f"{onnx_path}: TensorRT cannot parse this graph ({errors})")
        config = builder.create_builder_config()
        if self.precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        elif self.precision == "bf16":
            config.set_flag(trt.BuilderFlag.BF16)
        engine = builder.build_serialized_network(network, config)
        if engine is None:
            raise PolicyError(f"{onnx_path}: TensorRT engine build failed (see the TensorRT log above)")
        return bytes(engine)

    def _engine(self, onnx_path: Path):
        if onnx_path in self.engines:
            return self.engines[onnx_path]
        path = self.cache.lookup(onnx_path)
        if path is None:
            self.log(f"building TensorRT {self.precision} engine for {onnx_path.name} on {self.cache.gpu} "
                     f"(TensorRT {self.cache.trt_version}); cached under {self.cache.dir}")
            path = self.cache.store(onnx_path, self.build(onnx_path))
        engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise PolicyError(f"{path}: TensorRT could not deserialize this engine; delete it to rebuild")
        context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        io = {n: (engine.get_tensor_mode(n) == self.trt.TensorIOMode.INPUT, tuple(engine.get_tensor_shape(n)),
                  self._dtype(engine.get_tensor_dtype(n))) for n in names}
        self.engines[onnx_path] = (engine, context, io)
        return self.engines[onnx_path]

    def _dtype(self, dt):
        trt, torch = self.trt, self.torch
        table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
                 trt.int64: torch.int64, trt.int32: torch.int32, trt.bool: torch.bool, trt.uint8: torch.uint8}
        return table[dt]

    def _execute(self, onnx_path: Path, tensors: dict) -> dict:
        torch = self.torch
        _, context, io = self._engine(onnx_path)
        outputs = {}
        for name, (is_input, shape, dtype) in io.items():
            if is_input:
                t = tensors[name]
                if t.dtype != dtype or tuple(t.shape) != shape:
                    raise PolicyError(f"{onnx_path.name}: input {name} is {tuple(t.shape)} {t.dtype}, engine wants "
                                      f"{shape} {dtype}")
                context.set_tensor_address(name, t.data_ptr())
            else:
                outputs[name] = torch.empty(shape, dtype=dtype, device="cuda")
                context.set_tensor_address(name, outputs[name].data_ptr())
        if not context.execute_async_v3(self.stream.cuda_stream):
            raise PolicyError(f"{onnx_path.name}: TensorRT execution failed")
        return outputs

    def run(self, feeds, steps, beta):
        torch = self.torch
        with torch.cuda.stream(self.stream):
            x = {k: torch.from_numpy(np.ascontiguousarray(v)).to("cuda", non_blocking=True) for k, v in feeds.items()}
            kv = self._execute(self.bundle.onnx_path("prefix"), x)
            out = self._execute(self.bundle.onnx_path("cond" if beta is None else "cfg", steps), {**x, **kv})
            actions = out["actions"].float().cpu()
        self.stream.synchronize()
        return actions.numpy()


BACKENDS = ("auto", "torch", "onnxruntime", "tensorrt")


def make_backend(bundle: Bundle, backend: str, **options) -> Backend:
    """``auto``: tensorrt when tensorrt + a GPU are available, else onnxruntime, else torch."""
    if backend not in BACKENDS:
        raise PolicyError(f"unknown policy backend '{backend}' (choose one of {', '.join(BACKENDS)})")
    requested = backend
    if backend == "auto":
        if tensorrt_available():
            backend = "tensorrt"
        else:
            try:
                import onnxruntime  # noqa: F401
                backend = "onnxruntime"
            except ImportError:
                backend = "torch"
    allowed = {"torch": {"device", "threads"}, "onnxruntime": {"providers", "threads"},
               "tensorrt": {"precision", "steps"}}[backend]
    extra = sorted(k for k, v in options.items() if v is not None and k not in allowed)
    if extra and requested != "auto":  # auto: options for the backends it did not pick are ignored
        raise PolicyError(f"backend '{backend}' does not take options {extra} (it takes {sorted(allowed)})")
    opts = {k: v for k, v in options.items() if k in allowed and v is not None}
    cls = {"torch": TorchBackend, "onnxruntime": OrtBackend, "tensorrt": TensorRTBackend}[backend]
    return cls(bundle, **opts)
