"""Inference backends behind one interface: ``torch`` (reference), ``onnxruntime`` (CPU),
``onnxruntime-cuda`` / ``onnxruntime-trt`` (ONNX Runtime's CUDA / TensorRT execution providers) and
``tensorrt`` (strongly typed engines built from reduced-precision graphs, :mod:`recap_ros.policy.precision`,
cached by :mod:`recap_ros.policy.engine_cache`). ``auto`` picks the first usable one in :data:`AUTO_ORDER`.

Every backend runs one chunk from host-prepared inputs (numpy, batch 1, the export I/O contract):
``images, tokens, token_mask, adv_tokens, adv_mask, state, noise`` (+ ``beta`` when guided) and returns the
normalised actions (1, chunk_len, action_dim) float32. ``beta is None`` runs the conditional branch only.
Two engine calls per chunk: prefix -> KV cache, then the whole unrolled Euler loop (with batched CFG).
"""
from __future__ import annotations

import hashlib
import importlib.util
import tempfile
from pathlib import Path

import numpy as np

from recap_ros.policy.bundle import Bundle
from recap_ros.policy.engine_cache import EngineCache, EngineKey, cache_dir
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
ORT_BACKENDS = {  # backend name -> execution providers, in ONNX Runtime's order of preference
    "onnxruntime": ("CPUExecutionProvider",),
    "onnxruntime-cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
    "onnxruntime-trt": ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
}


def _recipe(module, *versions: str) -> str:
    """Hash of the code that derives a graph (the module's source and the versions of the libraries whose passes it
    runs): part of a derived graph's file name, so a changed rewrite derives the graph anew instead of loading one
    made by older code."""
    h = hashlib.sha256(Path(module.__file__).read_bytes())
    for v in versions:
        h.update(v.encode())
    return h.hexdigest()[:8]


def graph_for(bundle: Bundle, onnx_path: Path, precision: str, out_dir: Path, fuse: bool = False) -> Path:
    """The bundle's fp32 graph itself, or a derived one under out_dir, named after the source graph's hash
    (a re-exported bundle gets new files) and the deriving code's (:func:`_recipe`): its ``precision`` variant
    (:mod:`recap_ros.policy.precision`), or with ``fuse`` (fp32 only) ONNX Runtime's fusions
    (:mod:`recap_ros.policy.ort_graph`). Derived once, then reused; deriving one removes the same graph's variants
    of the same kind made from an older export or by older code (a bf16 pi06 graph is gigabytes)."""
    if precision == "fp32" and not fuse:
        return onnx_path
    from recap_ros.policy import ort_graph, precision as reduced

    sha = bundle.manifest["files"][onnx_path.relative_to(bundle.dir).as_posix()]["sha256"][:12]
    if precision == "fp32":  # ONNX Runtime's fusions: its own passes run too (TensorRT's graphs do not need it)
        import onnxruntime

        kind, recipe = "fused", _recipe(ort_graph, onnxruntime.__version__)
    else:
        kind, recipe = precision, _recipe(reduced)
    dst = out_dir / f"{onnx_path.stem}.{sha}.{kind}-{recipe}.onnx"
    if dst.is_file():
        return dst
    if kind == "fused":
        ort_graph.fuse_for_ort(onnx_path, dst)
    else:
        reduced.write_reduced(onnx_path, precision, dst)
    for stale in out_dir.glob(f"{onnx_path.stem}.*.{kind}-*.onnx*"):
        if stale.name not in (dst.name, dst.name + ".data"):
            stale.unlink(missing_ok=True)
    return dst


class OrtBackend(Backend):
    """ONNX Runtime on one of :data:`ORT_BACKENDS`. On a GPU the KV cache passes between the two sessions
    through IOBinding and stays on the device (in the compute precision with ``precision`` fp16 / bf16, which
    runs the reduced-precision graphs of :mod:`recap_ros.policy.precision`). The TensorRT EP keeps its engines
    and timing cache in the engine cache folder (``ort_trt/``)."""

    def __init__(self, bundle: Bundle, backend: str = "onnxruntime", threads: int | None = None,
                 precision: str = "fp32", device: str | None = None):
        import onnxruntime as ort

        if precision not in PRECISIONS:
            raise PolicyError(f"{backend} backend: precision '{precision}' must be one of {', '.join(PRECISIONS)}")
        self.ort, self.bundle, self.name, self.precision = ort, bundle, backend, precision
        wanted = ORT_BACKENDS[backend]
        available = ort.get_available_providers()
        if wanted[0] not in available:
            raise PolicyError(f"{backend} backend: ONNX Runtime here has no {wanted[0]} (available: {available}; "
                              "pip install .[gpu] brings onnxruntime-gpu)")
        device_id = 0 if backend == "onnxruntime" else _cuda_index(device)  # CPU: device is not used
        self.cache = cache_dir(bundle)
        self.providers = []
        for p in wanted:
            if p == "TensorrtExecutionProvider":
                trt_dir = self.cache / "ort_trt"
                trt_dir.mkdir(parents=True, exist_ok=True)
                self.providers.append((p, {"device_id": device_id, "trt_engine_cache_enable": True,
                                           "trt_engine_cache_path": str(trt_dir), "trt_timing_cache_enable": True,
                                           "trt_timing_cache_path": str(trt_dir)}))
            elif p == "CUDAExecutionProvider":
                self.providers.append((p, {"device_id": device_id}))
            else:
                self.providers.append(p)
        self.device = "cpu" if backend == "onnxruntime" else f"cuda:{device_id}"
        self.options = ort.SessionOptions()
        self.options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        if threads:
            self.options.intra_op_num_threads = threads
        self.options.inter_op_num_threads = 1  # sequential graph: one pool, no second set of idle threads
        # A station shares its CPUs with cameras, the mux and the recorder: worker threads that spin while
        # waiting for work would take their cores for nothing between chunks.
        self.options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        # CPU: ONNX Runtime's SkipLayerNormalization kernel is slow when its skip input broadcasts (the vision
        # tower's position embedding over the views: 67 µs for the tiny bundle's 3 x 64 x 64 against ~15 µs as the
        # Add + LayerNormalization it replaces; prefix 1.24 -> 1.18 ms)
        self.disabled_optimizers = ["SkipLayerNormFusion"] if backend == "onnxruntime" else []
        self.sessions: dict = {}
        self.input_names: dict = {}  # session -> its input names (get_inputs() builds new objects on every call)
        self.prefix = self._session(bundle.onnx_path("prefix"))
        for graph in ("cond", "cfg"):  # load now: no first-chunk latency spike, and a broken graph fails early
            self._session(bundle.onnx_path(graph, bundle.config.denoise_steps))

    def _session(self, path: Path):
        if path not in self.sessions:
            graph = graph_for(self.bundle, path, self.precision, self.cache / "onnx",
                              fuse=self.name == "onnxruntime")
            try:
                self.sessions[path] = self.ort.InferenceSession(str(graph), self.options, providers=self.providers,
                                                                disabled_optimizers=self.disabled_optimizers)
            except Exception as e:  # onnxruntime raises its own Fail / InvalidGraph / RuntimeException types
                raise PolicyError(f"{graph}: onnxruntime ({self.name}) cannot load this graph ({e})") from None
            self.input_names[self.sessions[path]] = [i.name for i in self.sessions[path].get_inputs()]
        return self.sessions[path]

    def run(self, feeds, steps, beta):
        sess = self._session(self.bundle.onnx_path("cond" if beta is None else "cfg", steps))
        if self.device == "cpu":  # plain run: less per-call overhead than IOBinding when everything is host memory
            kv = dict(zip(("keys", "values", "kv_mask"), self.prefix.run(None, {
                n: feeds[n] for n in self.input_names[self.prefix]})))
            return sess.run(["actions"], {n: kv.get(n, feeds.get(n)) for n in self.input_names[sess]})[0]
        bind = self.prefix.io_binding()  # IOBinding: the KV cache stays where the prefix EP produced it
        for name in self.input_names[self.prefix]:
            bind.bind_cpu_input(name, np.ascontiguousarray(feeds[name]))
        for name in ("keys", "values", "kv_mask"):
            bind.bind_output(name, "cuda", self.providers[0][1]["device_id"])
        self.prefix.run_with_iobinding(bind)
        kv = dict(zip(("keys", "values", "kv_mask"), bind.get_outputs()))
        bind2 = sess.io_binding()
        for name in self.input_names[sess]:
            if name in kv:
                bind2.bind_ortvalue_input(name, kv[name])
            else:
                bind2.bind_cpu_input(name, np.ascontiguousarray(feeds[name]))
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
    return importlib.util.find_spec("tensorrt") is not None and gpu_available()


def _cuda_index(device: str | None) -> int:
    """'cuda' / 'cuda:N' / None -> N (0 by default)."""
    if device in (None, "cuda"):
        return 0
    if device.startswith("cuda:") and device[5:].isdigit():
        return int(device[5:])
    raise PolicyError(f"device '{device}': expected 'cuda' or 'cuda:N'")


WORKSPACE_GB = 8.0  # TensorRT builder scratch memory limit (tactics needing more are skipped)


class TensorRTBackend(Backend):
    """Strongly typed TensorRT engines (bf16 default / fp16 / fp32). The precision lives in the graph
    (:func:`recap_ros.policy.precision.reduce_precision`: fp32 islands for positions, norms and softmax); the
    network is created STRONGLY_TYPED (required on TensorRT 10.x for a typed graph, the only mode of 11.x) and
    no builder precision flag is set (TensorRT 11 removed them).

    Engines for the prefix and the cond + cfg graphs of each of ``steps`` are loaded (built when missing, with
    a progress line) HERE, at start-up; ``run`` never builds: an unbuilt step count is a PolicyError naming
    ``recap-build-engine``. The KV cache stays on the device in the compute precision between the two engines;
    inputs go through pinned host buffers, outputs are allocated once per engine. BF16 is the default because
    Gemma-class residual streams overflow FP16 with real weights."""

    name = "tensorrt"

    def __init__(self, bundle: Bundle, precision: str = "bf16", steps: tuple[int, ...] | None = None,
                 device: str | None = None, workspace_gb: float = WORKSPACE_GB, log=print):
        try:
            import tensorrt as trt
        except ImportError:
            raise PolicyError("tensorrt backend: the tensorrt Python package is not installed "
                              "(pip install .[gpu]; needs an NVIDIA GPU)") from None
        if not gpu_available():
            raise PolicyError("tensorrt backend: TensorRT requested but no CUDA GPU is available to this process")
        if precision not in PRECISIONS:
            raise PolicyError(f"tensorrt backend: precision '{precision}' must be one of {', '.join(PRECISIONS)}")
        import torch

        self.trt, self.torch, self.bundle, self.log = trt, torch, bundle, log
        self.cuda = torch.device("cuda", _cuda_index(device))
        torch.cuda.set_device(self.cuda)
        gpu = torch.cuda.get_device_name(self.cuda)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.device = f"{self.cuda} ({gpu})"
        self.gpu, self.precision, self.workspace = gpu, precision, int(workspace_gb * (1 << 30))
        self.cache = EngineCache(cache_dir(bundle))
        self.stream = torch.cuda.Stream(self.cuda)
        self.engines: dict = {}
        self.pinned: dict = {}
        self.steps = tuple(sorted(set(steps or (bundle.config.denoise_steps,))))
        self._load(bundle.onnx_path("prefix"), None)
        for s in self.steps:
            for graph in ("cond", "cfg"):
                self._load(bundle.onnx_path(graph, s), s)

    def key(self, onnx_path: Path, steps: int | None) -> EngineKey:
        return EngineKey.of(self.bundle, onnx_path, self.trt.__version__, self.gpu, self.precision, steps)

    def build(self, onnx_path: Path) -> bytes:
        """One strongly typed engine from the bundle graph (converted to the precision first)."""
        trt = self.trt
        builder = trt.Builder(self.logger)
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, self.logger)
        with tempfile.TemporaryDirectory(dir=self.cache.root, prefix=".convert-") as tmp:
            graph = graph_for(self.bundle, onnx_path, self.precision, Path(tmp))
            if not parser.parse_from_file(str(graph)):
                errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
                raise PolicyError(f"{graph}: TensorRT cannot parse this graph ({errors})")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.workspace)
        timing_path = self.cache.timing_cache_path(self.gpu, trt.__version__)
        timing = config.create_timing_cache(timing_path.read_bytes() if timing_path.is_file() else b"")
        config.set_timing_cache(timing, ignore_mismatch=False)
        engine = builder.build_serialized_network(network, config)
        if engine is None:
            raise PolicyError(f"{onnx_path}: TensorRT engine build failed (see the TensorRT log above)")
        self.cache.save_timing_cache(timing_path, bytes(config.get_timing_cache().serialize()))
        return bytes(engine)

    def _load(self, onnx_path: Path, steps: int | None):
        """Deserialize (building when missing) one engine and bind its I/O once: device buffers for its tensors,
        except that a denoise engine reads the KV cache straight from the prefix engine's output buffers."""
        path = self.cache.get_or_build(self.key(onnx_path, steps), lambda: self.build(onnx_path), log=self.log)
        engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise PolicyError(f"{path}: TensorRT could not deserialize this engine; delete it to rebuild")
        torch = self.torch
        context = engine.create_execution_context()
        prefix_out = self.engines[self.bundle.onnx_path("prefix")][2] if steps is not None else {}
        inputs, outputs = {}, {}
        for i in range(engine.num_io_tensors):
            n = engine.get_tensor_name(i)
            shape, dtype = tuple(engine.get_tensor_shape(n)), self._dtype(engine.get_tensor_dtype(n))
            is_input = engine.get_tensor_mode(n) == self.trt.TensorIOMode.INPUT
            if is_input and n in prefix_out:
                buf = prefix_out[n]
                if tuple(buf.shape) != shape or buf.dtype != dtype:
                    raise PolicyError(f"{path}: input {n} is {shape} {dtype} but the prefix engine writes "
                                      f"{tuple(buf.shape)} {buf.dtype} (engines of different exports?)")
            else:
                buf = torch.empty(shape, dtype=dtype, device=self.cuda)
                if is_input:
                    inputs[n] = buf
                    if n not in self.pinned:  # host staging in page-locked memory: asynchronous copies
                        self.pinned[n] = torch.empty(shape, dtype=dtype, pin_memory=True)
                else:
                    outputs[n] = buf
            context.set_tensor_address(n, buf.data_ptr())
        if "actions" in outputs and "actions" not in self.pinned:
            self.pinned["actions"] = torch.empty(outputs["actions"].shape, dtype=outputs["actions"].dtype,
                                                 pin_memory=True)
        self.engines[onnx_path] = (context, inputs, outputs)

    def _dtype(self, dt):
        trt, torch = self.trt, self.torch
        table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
                 trt.int64: torch.int64, trt.int32: torch.int32, trt.bool: torch.bool, trt.uint8: torch.uint8}
        return table[dt]

    def _engine(self, graph: str, steps: int | None):
        path = self.bundle.onnx_path(graph, steps)
        if path not in self.engines:
            raise PolicyError(f"tensorrt backend: no engine loaded for {steps} denoise steps (loaded: "
                              f"{list(self.steps)}); engines are built at start-up, never during inference: run "
                              f"`recap-build-engine {self.bundle.dir} --steps {steps}` and list it in the "
                              "backend's steps")
        return self.engines[path]

    def run(self, feeds, steps, beta):
        torch = self.torch
        pctx, pin, _ = self._engine("prefix", None)
        dctx, din, dout = self._engine("cond" if beta is None else "cfg", steps)
        with torch.cuda.stream(self.stream):
            for name, buf in list(pin.items()) + list(din.items()):
                host = self.pinned[name]
                if feeds[name].shape != tuple(host.shape):
                    raise PolicyError(f"tensorrt backend: input {name} has shape {feeds[name].shape}, the engine "
                                      f"wants {tuple(host.shape)}")
                host.numpy()[...] = feeds[name]
                buf.copy_(host, non_blocking=True)
            if not pctx.execute_async_v3(self.stream.cuda_stream):
                raise PolicyError("tensorrt backend: prefix engine execution failed")
            if not dctx.execute_async_v3(self.stream.cuda_stream):  # reads the KV cache where the prefix wrote it
                raise PolicyError(f"tensorrt backend: denoise engine ({steps} steps) execution failed")
            out = self.pinned["actions"]
            out.copy_(dout["actions"], non_blocking=True)
        self.stream.synchronize()
        return out.numpy().astype(np.float32)


# --------------------------------------------------------------------------------------------- choice
BACKENDS = ("auto", "torch", *ORT_BACKENDS, "tensorrt")
# ``auto``: the first usable of these. Native TensorRT first (strongly typed bf16 engines, KV cache in bf16 on the
# device), then ONNX Runtime's TensorRT EP (TensorRT's kernels, fp32 graph by default), its CUDA EP, its CPU EP,
# and torch eager last (the reference: always there).
AUTO_ORDER = ("tensorrt", "onnxruntime-trt", "onnxruntime-cuda", "onnxruntime", "torch")
OPTIONS = {"torch": {"device", "threads"}, "tensorrt": {"precision", "steps", "device", "workspace_gb"},
           **{b: {"threads", "precision", "device"} for b in ORT_BACKENDS}}


def pick_backend(tensorrt_ok: bool, gpu_ok: bool, ort_providers: list[str] | None) -> str:
    """The ``auto`` choice, from what this process has: the tensorrt package (+ a GPU), a CUDA GPU, and ONNX
    Runtime's available providers (None: onnxruntime not importable)."""
    for backend in AUTO_ORDER:
        if backend == "tensorrt" and tensorrt_ok:
            return backend
        if backend in ORT_BACKENDS and ort_providers is not None and ORT_BACKENDS[backend][0] in ort_providers \
                and (backend == "onnxruntime" or gpu_ok):
            return backend
    return "torch"


def _ort_providers() -> list[str] | None:
    try:
        import onnxruntime
    except ImportError:
        return None
    return onnxruntime.get_available_providers()


def make_backend(bundle: Bundle, backend: str, **options) -> Backend:
    """One of :data:`BACKENDS`; ``auto`` -> :func:`pick_backend`. Options a backend does not take are an error,
    except under ``auto`` (they are meant for the backends it did not pick)."""
    if backend not in BACKENDS:
        raise PolicyError(f"unknown policy backend '{backend}' (choose one of {', '.join(BACKENDS)})")
    requested = backend
    if backend == "auto":
        backend = pick_backend(tensorrt_available(), gpu_available(), _ort_providers())
    allowed = OPTIONS[backend]
    extra = sorted(k for k, v in options.items() if v is not None and k not in allowed)
    if extra and requested != "auto":
        raise PolicyError(f"backend '{backend}' does not take options {extra} (it takes {sorted(allowed)})")
    opts = {k: v for k, v in options.items() if k in allowed and v is not None}
    if backend == "torch":
        return TorchBackend(bundle, **opts)
    if backend == "tensorrt":
        return TensorRTBackend(bundle, **opts)
    return OrtBackend(bundle, backend, **opts)
