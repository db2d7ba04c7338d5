"""Safetensors read and written one tensor at a time, without memory-mapping and without the whole model in memory.

A 4B-parameter checkpoint is ~8 GB in bf16: :class:`TensorFile` reads the header, checks every tensor's byte range
lies inside the file (a truncated download names its first cut tensor), and reads one tensor on request with plain
``read`` calls (no mmap, so the resident size is what the caller keeps). :func:`write_streaming` writes the header
from the (name, dtype, shape) list first and then each tensor as a producer yields it.

Format (huggingface/safetensors): u64 little-endian header length, a JSON header
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`` padded with spaces to 8 bytes,
then the tensor bytes, contiguous in header order.
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Callable

import torch

from recap_ros.policy.errors import PolicyError

DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
          "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}
NAMES = {v: k for k, v in DTYPES.items()}


class TensorFile:
    """The tensors of one ``.safetensors`` file, read on demand."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                n = struct.unpack("<Q", f.read(8))[0]
                if n > size - 8:
                    raise ValueError(f"header length {n} exceeds the file")
                header = json.loads(f.read(n))
        except (OSError, ValueError, struct.error) as e:
            raise PolicyError(f"{self.path}: not a readable safetensors file ({e})") from None
        header.pop("__metadata__", None)
        self.base = 8 + n
        self.entries = {}
        for name, e in header.items():
            begin, end = e["data_offsets"]
            if e["dtype"] not in DTYPES:
                raise PolicyError(f"{self.path}: tensor {name} has unsupported dtype {e['dtype']}")
            if self.base + end > size:
                raise PolicyError(f"{self.path}: tensor {name} is cut off (file truncated at {size} bytes, the tensor "
                                  f"ends at {self.base + end})")
            self.entries[name] = (DTYPES[e["dtype"]], tuple(e["shape"]), begin, end)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def get(self, name: str) -> torch.Tensor:
        dtype, shape, begin, end = self.entries[name]
        buf = bytearray(end - begin)
        with open(self.path, "rb") as f:
            f.seek(self.base + begin)
            f.readinto(buf)
        if not buf:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(shape)


class TensorFolder:
    """Every ``*.safetensors`` file of a checkpoint folder (a single file or shards) as one name -> tensor map."""

    def __init__(self, folder: str | Path, pattern: str = "*.safetensors"):
        self.folder = Path(folder)
        files = sorted(self.folder.glob(pattern))
        if not files:
            raise PolicyError(f"{self.folder}: no {pattern} files (not a safetensors checkpoint folder)")
        self.where: dict[str, TensorFile] = {}
        for p in files:
            tf = TensorFile(p)
            for name in tf.entries:
                self.where[name] = tf

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def keys(self):
        return self.where.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.where[name].shape(name)

    def get(self, name: str) -> torch.Tensor:
        return self.where[name].get(name)


def write_streaming(path: str | Path, specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
                    produce: Callable[[str], torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file whose tensors (name, dtype, shape) come from ``produce(name)`` one at a time."""
    header, offset = {}, 0
    for name, dtype, shape in specs:
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, dtype, shape in specs:
            t = produce(name)
            if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise PolicyError(f"{path}: tensor {name} came as {t.dtype} {tuple(t.shape)}, expected {dtype} "
                                  f"{tuple(shape)}")
            f.write(_bytes(t))


def _bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().contiguous().cpu()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")
