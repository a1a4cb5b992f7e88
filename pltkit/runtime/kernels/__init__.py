"""pltkit's own ONNX Runtime kernels: C sources in this folder, built on first use with the machine's C
compiler into pltkit's cache, and loaded into the sessions that run them.

Four kernels, one library (library.c; ort_abi.h declares the pieces of ONNX Runtime's C API they use):
- `pltkit.RowsMatMulNBits` (rows_matmul.c): MatMulNBits of 8 and 4 bits for the one to few rows of a decode
  step, which reads each line of weights once for two rows (PLT-2's loops). `rows_graph` puts it in place of
  the MatMulNBits nodes it can run, and `fuse.fuse_rows` folds the residual adds, RMSNorms and SwiGLUs around
  them into them; the artifact on disk is unchanged.
- `pltkit.RowsMatMul` (rows_f32.c): the same for float32 MatMul, B read from the external data file
  (`float_rows_graph`).
- `pltkit.StepAttention` (step_attention.c): the global attention of a decode step's rows over the cache buffer,
  written in place.
- `pltkit.RingMix` (ring_mix.c): the rows of loops >= 1 of a decode step over their rings, mixed with the global
  attention.
The exporter writes the last two with function bodies, which ONNX Runtime runs where the library is not loaded.
`kernel_model` readies a decode graph file for them and counts the nodes they run, and `load_into` readies
session options for the result.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import NamedTuple

import numpy as np

from pltkit.model.paths import user_cache_dir

log = logging.getLogger(__name__)
HERE = Path(__file__).parent
SOURCES = [HERE / n for n in ("library.c", "rows_matmul.c", "rows_f32.c", "step_attention.c", "ring_mix.c")]
HEADERS = [HERE / n for n in ("ort_abi.h", "attend.h", "rows.h")]
FLAGS = ["-O3", "-std=c11", "-fPIC", "-shared"]  # the kernel's functions name their AVX-512 targets themselves
DOMAIN, OP, OP_F32, STEP, RING_MIX = "pltkit", "RowsMatMulNBits", "RowsMatMul", "StepAttention", "RingMix"
BIAS = 7  # StepAttention's attention_bias input
POSITIONS = 11  # RingMix's position_ids input
RING_LENGTHS = (7, 8)  # RingMix's seqlens_k and total_sequence_length inputs
# MatMulNBits attributes the kernel computes exactly as ONNX Runtime does
REPLACEABLE = {"block_size": 32, "accuracy_level": 4}
BITS = (8, 4)


class KernelUnavailable(RuntimeError):
    """pltkit's kernels cannot run here: no C compiler, a failed build, or a CPU without AVX-512 VNNI."""


def library() -> Path:
    """The built library (built once per source and compiler), or KernelUnavailable saying why not; a
    failure is remembered for the process, so a broken compiler is not run again at every session."""
    path, why = _built()
    if why:
        raise KernelUnavailable(why)
    return path


def compiler() -> str | None:
    """The C compiler the kernels are built with: $CC where it is set, else cc, else gcc."""
    return shutil.which(os.environ.get("CC") or "cc") or (None if os.environ.get("CC") else shutil.which("gcc"))


@functools.cache
def _built() -> tuple[Path | None, str | None]:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None, f"pltkit's kernels are for x86-64 CPUs (this is {platform.machine()})"
    cc = compiler()
    if not cc:
        return None, "no C compiler (cc or gcc) to build pltkit's kernels"
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
        code = b"".join(f.read_bytes() for f in (*SOURCES, *HEADERS))
        key = hashlib.sha256(code + " ".join(FLAGS).encode() + version.encode()).hexdigest()[:16]
        path = user_cache_dir() / "kernels" / f"pltkit-kernels-{key}.so"
        if not path.exists():
            log.info("building pltkit's kernels into %s (once)", path.parent)
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
                out = Path(tmp) / path.name
                done = subprocess.run([cc, *FLAGS, *map(str, SOURCES), "-o", str(out), "-lm"], capture_output=True,
                                      text=True)
                if done.returncode:
                    return None, f"building pltkit's kernels failed:\n{done.stderr.strip()}"
                os.replace(out, path)  # whole or not at all, whoever builds it at the same time
        if not ctypes.CDLL(str(path)).pltkit_kernels_supported():
            return None, "this CPU lacks AVX-512 VNNI, which pltkit's kernels need"
    except OSError as e:  # an unwritable cache, a library that does not load (noexec), ...
        return None, f"building or loading pltkit's kernels failed: {e}"
    return path, None


TIMED_OPS = (OP, STEP, RING_MIX)  # the ops pltkit_cycles counts, in its order


def cycles(reset: bool = False) -> dict[str, tuple[int, int]]:
    """Each op's calls and time-stamp counter cycles in this process so far (all sessions); reset: then zero
    them. ONNX Runtime's profiler slows some kernels more than others; these counters cost two reads of the
    counter a call."""
    counts = (ctypes.c_uint64 * (2 * len(TIMED_OPS)))()
    ctypes.CDLL(str(library())).pltkit_cycles(counts, int(reset))  # the library the sessions loaded
    return {op: (counts[2 * i], counts[2 * i + 1]) for i, op in enumerate(TIMED_OPS)}


def counter_hz(seconds: float = 0.05) -> float:
    """The time-stamp counter's rate, against the clock over `seconds`."""
    import time

    tsc = ctypes.CDLL(str(library())).pltkit_tsc
    tsc.restype = ctypes.c_uint64
    c0, t0 = tsc(), time.perf_counter()
    time.sleep(seconds)
    return (tsc() - c0) / (time.perf_counter() - t0)


def available() -> bool:
    try:
        library()
        return True
    except KernelUnavailable:
        return False


def rows_graph(model, folder=None) -> int:
    """Put pltkit.RowsMatMulNBits in place of each MatMulNBits node of `model` (an onnx ModelProto, changed in
    place) that it computes exactly: 8 or 4 bits, block 32, accuracy level 4, K a multiple of 32, weights and
    scales initializers of MatMulNBits' shapes, no bias, and zero points, if any, a uint8 initializer with one
    value for every block (read from the external data in `folder` where it lies there). Zero points left
    unread are dropped. Returns how many nodes it replaced."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}

    def shaped(name: str, dtype: int, dims: tuple) -> bool:
        t = initializers.get(name)
        return t is not None and t.data_type == dtype and tuple(t.dims) == dims

    count, dropped = 0, set()
    for node in graph.node:
        if node.op_type != "MatMulNBits" or node.domain != "com.microsoft":
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        bits, k, n = attrs.get("bits"), attrs.get("K", 0), attrs.get("N", 0)
        if (any(attrs.get(key) != v for key, v in REPLACEABLE.items()) or bits not in BITS or k < 32 or k % 32
                or n < 1 or not 3 <= len(node.input) <= 4
                or not shaped(node.input[1], TensorProto.UINT8, (n, k // 32, 32 * bits // 8))
                or not shaped(node.input[2], TensorProto.FLOAT, (n, k // 32))
                and not shaped(node.input[2], TensorProto.FLOAT, (n * k // 32,))):
            continue
        zero = 1 << (bits - 1)  # MatMulNBits' default
        if len(node.input) == 4:
            z = node.input[3]
            if not shaped(z, TensorProto.UINT8, (n, -(-(k // 32) * bits // 8))):
                continue
            codes = numpy_helper.to_array(initializers[z], base_dir=str(folder or ""))
            if bits == 4:  # two a byte, low nibble first; the last byte of a row may hold a padding nibble
                codes = np.stack([codes & 15, codes >> 4], -1).reshape(n, -1)[:, :k // 32]
            if (codes != codes.flat[0]).any():
                continue
            zero = int(codes.flat[0])
            dropped.add(z)
            del node.input[3]
        node.op_type, node.domain = OP, DOMAIN
        del node.attribute[:]
        node.attribute.extend(helper.make_attribute(key, v) for key, v in
                              (("K", k), ("N", n), ("bits", bits), ("block_size", 32), ("zero_point", zero)))
        count += 1
    return _replaced(model, dropped - {i for node in graph.node for i in node.input}, count)


def float_rows_graph(model, folder: Path) -> int:
    """Put pltkit.RowsMatMul in place of each MatMul node of `model` (changed in place) whose B is a float32
    initializer [K, N] in the external data in `folder`, K a multiple of 16, read by that node alone. B leaves the
    graph: the kernel reads it from the file at session start, so that ONNX Runtime holds no copy of it. Returns
    how many nodes it replaced."""
    from onnx import TensorProto, helper

    from pltkit.runtime.kernels.fuse import Graph

    g = Graph(model.graph, model.graph.node)
    count, gone = 0, set()
    for node in model.graph.node:
        b = g.initializers.get(node.input[1]) if node.op_type == "MatMul" and not node.domain else None
        if (b is None or b.data_type != TensorProto.FLOAT or len(b.dims) != 2 or b.dims[0] % 16
                or b.data_location != TensorProto.EXTERNAL or len(g.readers[b.name]) != 1 or b.name in g.outputs):
            continue
        where = {e.key: e.value for e in b.external_data}
        k, n = b.dims
        node.op_type, node.domain = OP_F32, DOMAIN
        node.input[:] = [node.input[0], "", ""]
        node.attribute.extend(helper.make_attribute(key, v) for key, v in (
            ("K", k), ("N", n), ("location", str((Path(folder) / where["location"]).resolve())),
            ("offset", int(where.get("offset", 0)))))
        gone.add(b.name)
        count += 1
    return _replaced(model, gone, count)


def _replaced(model, gone: set, count: int) -> int:
    """`model` less the initializers named in `gone`, and with pltkit's domain where `count` of its nodes are
    pltkit's; returns count."""
    from onnx import helper

    kept = [t for t in model.graph.initializer if t.name not in gone]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    if count and not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return count


class KernelModel(NamedTuple):
    model: bytes  # the graph, serialized
    count: int  # its nodes that pltkit's kernels run
    rings_in_place: bool  # its RingMix nodes run on pltkit's kernel, each with position_ids: full rings may be
    # bound as both past and present, and are then circular (ring_mix.c)


def kernel_model(path: Path, fuse: bool = True) -> KernelModel:
    """The graph file at `path` with rows_graph applied (and fuse.fuse_rows, unless `fuse` is false), and how many
    of its nodes pltkit's kernels run: those rows_graph replaced and the StepAttention and RingMix nodes of a
    float32 graph (their kernels' only type). StepAttention's kernel reads no attention bias, and RingMix's no
    lengths: the nodes that make them go."""
    import onnx
    from onnx import TensorProto

    from pltkit.runtime.kernels.fuse import fuse_rows

    model = onnx.load(str(path), load_external_data=False)
    count, rings = rows_graph(model, path.parent) + float_rows_graph(model, path.parent), []
    if fuse:
        fuse_rows(model.graph)
    state = [i for i in model.graph.input if i.name.startswith("past_") and i.name != "past_len"]
    if all(i.type.tensor_type.elem_type == TensorProto.FLOAT for i in state):  # caches, rings, carries
        own = [n for n in model.graph.node if n.op_type in (STEP, RING_MIX) and n.domain == DOMAIN]
        for node in own:
            if node.op_type == STEP and len(node.input) > BIAS:
                node.input[BIAS] = ""
            if node.op_type == RING_MIX:  # the ring's lengths: the kernel takes them from the ring
                for i in RING_LENGTHS:
                    node.input[i] = ""
        prune(model.graph)
        direct_outputs(model.graph)
        count += len(own)
        rings = [n for n in model.graph.node if n.op_type == RING_MIX and n.domain == DOMAIN]
    inputs, outputs = {i.name for i in model.graph.input}, {o.name for o in model.graph.output}
    in_place = bool(rings) and all(len(n.input) > POSITIONS and n.input[POSITIONS] and {*n.input[4:6]} <= inputs
                                   and {*n.output[1:3]} <= outputs for n in rings)
    return KernelModel(model.SerializeToString(), count, in_place)


def direct_outputs(graph) -> None:
    """Where an Identity node copies an output of a StepAttention or RingMix node to a graph output, that node
    writes the graph output itself: a buffer bound as the graph's output is then the one the kernel is given
    (ONNX Runtime removes such an Identity today; a ring written in place must not depend on it)."""
    from pltkit.runtime.kernels.fuse import Graph

    nodes = [n for n in graph.node if n.op_type in (STEP, RING_MIX) and n.domain == DOMAIN]
    g, renamed = Graph(graph, graph.node), {}
    for n in graph.node:
        if n.op_type == "Identity" and n.output[0] in g.outputs and len(g.readers.get(n.input[0], [])) == 1:
            renamed[n.input[0]] = n.output[0]
    own = {o for n in nodes for o in n.output}
    renamed = {a: b for a, b in renamed.items() if a in own}
    for n in nodes:
        n.output[:] = [renamed.get(o, o) for o in n.output]
    kept = [n for n in graph.node if not (n.op_type == "Identity" and n.input[0] in renamed)]
    del graph.node[:]
    graph.node.extend(kept)


def prune(graph) -> None:
    """Drop the nodes of an ONNX graph whose outputs nothing reads (pltkit.export.graph.live)."""
    from pltkit.export.graph import live

    kept, _ = live(graph.node, {o.name for o in graph.output})
    del graph.node[:]
    graph.node.extend(kept)


def load_into(so, folder: Path) -> None:
    """ONNX Runtime session options `so` for a kernel_model graph whose external data lie in `folder`: the library
    registered (KernelUnavailable where it cannot run)."""
    so.register_custom_ops_library(str(library()))
    # absolute: ONNX Runtime refuses a relative folder for a model given as bytes
    so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(Path(folder).resolve()))
