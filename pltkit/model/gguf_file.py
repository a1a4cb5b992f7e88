"""Reading a llama.cpp GGUF file: its header checked before gguf's reader sees it, the metadata as
Python values, and each tensor dequantized to float32 with gguf's own code."""

from __future__ import annotations

import math
import os
import struct
from pathlib import Path

import numpy as np

from pltkit.model.paths import GGUF_MAGIC, ImportModelError

_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}  # struct formats
_STRING, _ARRAY = 8, 9
GGUF_MAX_DIMS = 4
_GGML_TYPES: set[int] = set()  # tensor types gguf knows the block size of, filled on first use


def gguf_package():
    """The gguf package (an optional dependency)."""
    try:
        import gguf
    except ImportError:
        raise ImportError("importing GGUF files needs the gguf package: pip install 'pltkit[gguf]'") from None
    return gguf


def open_gguf(path: Path, gguf) -> tuple[object, GGUFMeta]:
    """(gguf's reader, the metadata) of a GGUF file whose header has been checked (gguf_size)."""
    if not path.is_file():
        raise ImportModelError(f"{path}: no such file")
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ImportModelError(f"{path}: not a GGUF file")
    expected, size = gguf_size(path, gguf), path.stat().st_size
    if size < expected:
        raise ImportModelError(f"{path}: file truncated at byte {size}, expected {expected} bytes")
    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as e:  # the reader raises ValueError, struct errors, ...
        raise ImportModelError(f"{path}: cannot read the GGUF file ({type(e).__name__}: {e})") from None
    return reader, GGUFMeta(reader, gguf, path)


class _Header:
    """Reads a GGUF header, or names the byte where the file ends too early."""

    def __init__(self, f, path: Path):
        self.f, self.path, self.size, self.order = f, path, path.stat().st_size, "<"

    def truncated(self):
        raise ImportModelError(f"{self.path}: file truncated at byte {self.size}, inside its header")

    def read(self, fmt: str) -> tuple:
        n = struct.calcsize(self.order + fmt)
        if self.f.tell() + n > self.size:
            self.truncated()
        return struct.unpack(self.order + fmt, self.f.read(n))

    def forward(self, n: int) -> None:
        """Past n bytes that must be in the file (a count read from it)."""
        if n > self.size - self.f.tell():
            self.truncated()
        self.f.seek(n, os.SEEK_CUR)

    def text(self) -> str:
        n = self.read("Q")[0]
        if n > self.size - self.f.tell():
            self.truncated()
        return self.f.read(n).decode("utf-8", errors="replace")

    def skip(self, vtype: int):
        """Past a metadata value; returns a scalar's value."""
        if vtype == _STRING:
            self.forward(self.read("Q")[0])
        elif vtype == _ARRAY:
            itype, n = self.read("IQ")
            if itype in _SCALARS:
                self.forward(n * struct.calcsize(self.order + _SCALARS[itype]))
            else:
                for _ in range(n):
                    self.skip(itype)
        else:
            return self.read(_SCALARS[vtype])[0]

    def version(self) -> int:
        self.f.seek(4)
        version = self.read("I")[0]
        if not version & 0xFFFF:  # written on a big-endian machine
            self.order, version = ">", int.from_bytes(version.to_bytes(4, "little"), "big")
        return version


def gguf_size(path: Path, gguf) -> int:
    """The size a GGUF file's header says it has: where its last tensor's data ends. gguf's reader fails
    on a truncated file or an unknown type with numpy's messages, or allocates what a count says; this
    reads the header first and names the byte, the metadata key or the tensor instead."""
    _GGML_TYPES.update(int(t) for t in gguf.GGMLQuantizationType if t in gguf.GGML_QUANT_SIZES)
    with open(path, "rb") as f:
        h = _Header(f, path)
        version = h.version()
        if version not in (2, 3):
            raise ImportModelError(f"{path}: GGUF version {version} (versions 2 and 3 are read)")
        n_tensors, n_kv = h.read("QQ")
        alignment, ends = 32, [0]
        for _ in range(n_kv):
            key, vtype = h.text(), h.read("I")[0]
            if vtype not in _SCALARS and vtype not in (_STRING, _ARRAY):
                raise ImportModelError(f"{path}: metadata {key}: unknown value type {vtype}")
            value = h.skip(vtype)
            if key == "general.alignment":
                alignment = value
        for i in range(n_tensors):
            ends.append(_tensor_end(h, gguf, i, n_tensors))
        if f.tell() > h.size:
            h.truncated()
        if not isinstance(alignment, int) or not 0 < alignment <= 1 << 16 or alignment & (alignment - 1):
            raise ImportModelError(f"{path}: metadata general.alignment = {alignment!r}: must be a power of 2")
        return -(-f.tell() // alignment) * alignment + max(ends)


def _tensor_end(h: _Header, gguf, i: int, n_tensors: int) -> int:
    """Where the data of the header's next tensor (number i) ends, counted from the start of the data."""
    name, n_dims = h.text(), h.read("I")[0]
    if not 1 <= n_dims <= GGUF_MAX_DIMS:
        raise ImportModelError(f"{h.path}: tensor {name!r} (number {i} of the {n_tensors} the header counts): "
                               f"{n_dims} dimensions (GGUF has 1 to {GGUF_MAX_DIMS})")
    dims, ttype = h.read(f"{n_dims}Q"), h.read("I")[0]
    if ttype not in _GGML_TYPES:
        raise ImportModelError(f"{h.path}: tensor {name}: unknown tensor type {ttype}")
    block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ttype)]
    if dims[0] % block:
        raise ImportModelError(f"{h.path}: tensor {name}: {dims[0]} values a row, not whole blocks of {block}")
    return h.read("Q")[0] + math.prod(dims) * type_size // block


def dequantize(gguf, t, path: Path) -> np.ndarray:
    """A GGUF tensor as float32 in numpy's (row-major, HF) shape: GGUF lists dimensions fastest first."""
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    try:
        a = gguf.quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError:
        raise ImportModelError(f"{path}: tensor {t.name} is {t.tensor_type.name}, which gguf cannot dequantize "
                               "(upgrade gguf)") from None
    a = np.asarray(a, dtype=np.float32)
    if a.size != int(np.prod(shape, dtype=np.int64)):
        raise ImportModelError(f"{path}: tensor {t.name} holds {a.size} values, its shape says {list(shape)}")
    return np.array(a.reshape(shape), dtype=np.float32, copy=True)  # a writable copy, not the mapped file


class GGUFMeta:
    """Metadata values of a GGUF file as Python values (strings, numbers, lists)."""

    def __init__(self, reader, gguf, path: Path):
        self._fields, self._types, self.path = reader.fields, gguf.GGUFValueType, path

    def __contains__(self, key):
        return key in self._fields

    def get(self, key, default=None):
        field = self._fields.get(key)
        if field is None or not field.types:
            return default
        vt = field.types[0]
        if vt == self._types.ARRAY:
            item_type = field.types[-1] if len(field.types) > 1 else None
            items = [field.parts[i] for i in field.data]
            if item_type == self._types.STRING:
                return [bytes(p).decode("utf-8", errors="replace") for p in items]
            return [self._scalar(p, item_type) for p in items]
        if vt == self._types.STRING:
            return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
        return self._scalar(field.parts[field.data[0]], vt)

    def _scalar(self, part, vt):
        value = part[0].item()
        if vt == self._types.FLOAT32:  # 1e-5 stored as float32 reads 9.99999974e-06: keep the short form
            value = float(str(np.float32(value)))
        return value

    def need(self, key):
        value = self.get(key)
        if value is None:
            raise ImportModelError(f"{self.path}: metadata {key} is missing")
        return value
