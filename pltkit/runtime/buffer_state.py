"""The decode state of the graph backends (ONNX Runtime, the ONNX reference evaluator, TensorRT).

The global KV cache lives in buffers allocated once per state and grown by doubling, `pos`
entries valid; the rings and carries are kept as the graphs take them: a ring's entries oldest first, or,
while decode steps write full rings in place (pltkit.RingMix on the ONNX Runtime backend), position t's
entry at slot t % window. The arrays are numpy arrays or torch CUDA tensors: a state makes them only
through the ArrayOps it is given.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from pltkit.model.formats import float_type
from pltkit.runtime.artifact import Artifact

MIN_CAPACITY = 256
# bytes a numpy state array starts on: whole cache lines, so that pltkit's kernels load no vector of keys, values
# or ring entries across two lines (numpy's own start 16 or 32 bytes into one: StepAttention with two rows took
# 1.07x the time, docs/benchmarks.md)
ALIGN = 64


def aligned(shape, dtype, make=np.zeros) -> np.ndarray:
    """make(shape, dtype) (np.zeros or np.empty) starting on an ALIGN-byte boundary: a view into a slightly longer
    array (numpy starts an array on a multiple of its item size)."""
    n, size = math.prod(shape), np.dtype(dtype).itemsize
    buf = make(n + ALIGN // size, dtype)
    start = -buf.ctypes.data % ALIGN // size
    return buf[start:start + n].reshape(shape)


def aligned_copy(a: np.ndarray) -> np.ndarray:
    out = aligned(a.shape, a.dtype, np.empty)
    np.copyto(out, a)
    return out


@dataclass(frozen=True)
class ArrayOps:
    """The three array calls a BufferState makes."""
    new: Callable[[list, str], Any]  # (shape, float type name) -> zeros
    copy: Callable[[Any], Any]  # array -> a copy of it
    zeros: Callable[[Any, tuple], Any]  # (like, shape) -> zeros of like's type, on like's device


NUMPY = ArrayOps(new=lambda shape, dtype: aligned(shape, float_type(dtype).numpy), copy=aligned_copy,
                 zeros=lambda like, shape: aligned(shape, like.dtype))


@dataclass
class BufferState:
    """The state of one or more sequences (batch) over an artifact's graphs."""
    pos: int  # valid positions in the global cache
    kv: dict[str, Any]  # key.i / value.i: [B, Hkv, capacity, Dh] buffers
    other: dict[str, Any]  # rings and carry, exactly as the graphs take them
    ops: ArrayOps = field(default=NUMPY, repr=False, compare=False)
    circular: bool = False  # the rings (numpy) hold position t at slot t % window, not oldest first

    @classmethod
    def empty(cls, artifact: Artifact, batch: int, ops: ArrayOps = NUMPY) -> BufferState:
        """No tokens yet: zero caches of no capacity (reserve grows them), empty rings, zero carries."""
        state = artifact.manifest["state"]

        def size(d):
            return batch if d == "batch" else 0 if isinstance(d, str) else d
        arrays = {n: ops.new([size(d) for d in state["shapes"][n]], state.get("dtype", "float32"))
                  for n in state["names"]}
        kv = {n: a for n, a in arrays.items() if n.startswith(("key.", "value."))}
        return cls(0, kv, {n: a for n, a in arrays.items() if n not in kv}, ops)

    def clone(self) -> BufferState:
        return dataclasses.replace(self, kv={k: self.ops.copy(v) for k, v in self.kv.items()},
                                   other=self.snapshot(), circular=False)

    def nbytes(self) -> int:
        return sum(a.nbytes for a in (*self.kv.values(), *self.other.values()))

    def snapshot(self) -> dict:
        """What a prefix needs besides the global cache: rings (oldest first) and carries (small)."""
        return {k: self._oldest_first(v) if self.circular and k.startswith("ring_") else self.ops.copy(v)
                for k, v in self.other.items()}

    def rewind(self, pos: int, snapshot: dict) -> None:
        """Back to `pos` tokens; snapshot must have been taken at pos."""
        self.pos, self.other, self.circular = pos, {k: self.ops.copy(v) for k, v in snapshot.items()}, False

    def set_circular(self, circular: bool) -> None:
        """Rings (numpy) with position t at slot t % window (circular), or oldest first, rearranged in place."""
        if circular != self.circular:
            for k, v in self.other.items():
                if k.startswith("ring_"):
                    v[...] = np.roll(v, self._turn(v) if circular else -self._turn(v), 3)
            self.circular = circular

    def _oldest_first(self, ring: np.ndarray) -> np.ndarray:
        """A copy of a circular (numpy) ring with its entries oldest first: np.roll(ring, -turn, 3), written once."""
        turn, out = self._turn(ring), aligned(ring.shape, ring.dtype, np.empty)
        rest = ring.shape[3] - turn
        out[:, :, :, :rest], out[:, :, :, rest:] = ring[:, :, :, turn:], ring[:, :, :, :turn]
        return out

    def _turn(self, ring) -> int:
        """The slot of a full ring's oldest entry, position pos - window, where position t is at t % window."""
        return self.pos % ring.shape[3] if ring.shape[3] else 0

    def reserve(self, n: int, limit: int, spare: int = 0) -> None:
        """Make room for n positions and `spare` more after them (capacity doubles, up to limit, the
        model's context, plus spare: ValueError past it)."""
        if n > limit:
            raise ValueError(f"context of {n} tokens exceeds the model's {limit}")
        cap = next(iter(self.kv.values())).shape[2]
        if n + spare <= cap:
            return
        new_cap = min(limit, max(n, 2 * cap, MIN_CAPACITY)) + spare
        for name, buf in self.kv.items():
            grown = self.ops.zeros(buf, tuple(buf.shape[:2]) + (new_cap,) + tuple(buf.shape[3:]))
            grown[:, :, :self.pos] = buf[:, :, :self.pos]
            self.kv[name] = grown
