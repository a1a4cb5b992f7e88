"""pltkit's own ONNX Runtime kernels: C sources in this folder, built on first use with the machine's C
compiler into pltkit's cache, and loaded into the sessions that run them.

One kernel for now, `pltkit.RowsMatMulNBits` (rows_matmul.c): MatMulNBits of 8 and 4 bits for the one to few
rows of a decode step, which reads each line of weights once for two rows (PLT-2's loops). `rows_graph` puts it in place of the
MatMulNBits nodes it can run; the artifact on disk is unchanged.
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

import numpy as np

from pltkit.model.paths import user_cache_dir

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("rows_matmul.c")
FLAGS = ["-O3", "-std=c11", "-fPIC", "-shared"]  # the kernel's functions name their AVX-512 targets themselves
DOMAIN, OP = "pltkit", "RowsMatMulNBits"
# MatMulNBits attributes the kernel computes exactly as ONNX Runtime does
REPLACEABLE = {"block_size": 32, "accuracy_level": 4}
BITS = (8, 4)


class KernelUnavailable(RuntimeError):
    """pltkit's kernels cannot run here: no C compiler, a failed build, or a CPU without AVX-512 VNNI."""


@functools.cache
def library() -> Path:
    """The built library (built once per source and compiler), or KernelUnavailable saying why not."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise KernelUnavailable(f"pltkit's kernels are for x86-64 CPUs (this is {platform.machine()})")
    cc = shutil.which(os.environ.get("CC") or "cc") or (None if os.environ.get("CC") else shutil.which("gcc"))
    if not cc:
        raise KernelUnavailable("no C compiler (cc or gcc) to build pltkit's kernels")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode() + version.encode()).hexdigest()[:16]
    path = user_cache_dir() / "kernels" / f"rows_matmul-{key}.so"
    if not path.exists():
        log.info("building pltkit's kernels into %s (once)", path.parent)
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            out = Path(tmp) / path.name
            done = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", str(out), "-lm"], capture_output=True, text=True)
            if done.returncode:
                raise KernelUnavailable(f"building {SOURCE.name} failed:\n{done.stderr.strip()}")
            os.replace(out, path)  # whole or not at all, whoever builds it at the same time
    if not ctypes.CDLL(str(path)).pltkit_rows_supported():
        raise KernelUnavailable("this CPU lacks AVX-512 VNNI, which pltkit.RowsMatMulNBits needs")
    return path


def available() -> bool:
    try:
        library()
        return True
    except KernelUnavailable:
        return False


def rows_graph(model, folder=None) -> int:
    """Put pltkit.RowsMatMulNBits in place of each MatMulNBits node of `model` (an onnx ModelProto, changed in
    place) that it computes exactly: 8 or 4 bits, block 32, accuracy level 4, K a multiple of 32, weights and
    scales initializers, no bias, and zero points, if any, one value for every block (an initializer; read
    from the external data in `folder` where it lies there). Returns how many it replaced."""
    from onnx import helper, numpy_helper

    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    count = 0
    for node in graph.node:
        if node.op_type != "MatMulNBits" or node.domain != "com.microsoft":
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        bits = attrs.get("bits")
        if (any(attrs.get(k) != v for k, v in REPLACEABLE.items()) or bits not in BITS or attrs["K"] % 32
                or not 3 <= len(node.input) <= 4 or not set(node.input[1:]) <= set(initializers)):
            continue
        zero = 1 << (bits - 1)  # MatMulNBits' default
        if len(node.input) == 4:
            codes = numpy_helper.to_array(initializers[node.input[3]], base_dir=str(folder or ""))
            codes = np.stack([codes & 15, codes >> 4]) if bits == 4 else codes
            if codes.size == 0 or (codes != codes.flat[0]).any():
                continue
            zero = int(codes.flat[0])
            del node.input[3]
        node.op_type, node.domain = OP, DOMAIN
        del node.attribute[:]
        node.attribute.extend(helper.make_attribute(k, v) for k, v in
                              (("K", attrs["K"]), ("N", attrs["N"]), ("bits", bits),
                               ("block_size", attrs["block_size"]), ("zero_point", zero)))
        count += 1
    if count and not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return count
