"""Write an artifact folder: the ONNX graphs, their weights, the tokenizer and the manifest.

    ARTIFACT/
      pltkit.json       manifest: format version, PLTConfig, source checksum, precision,
                        opset, custom ops, graph I/O, sha256 of every file
      prefill.onnx      chunk of S tokens, loops one after another
      decode.onnx       one token, the L loops as L rows of one pass
      prefill.gqa.onnx, decode.gqa.onnx
                        both graphs on ONNX Runtime's GroupQueryAttention kernels, the
                        global cache as buffers written in place (the CPU fast path)
      prefill.kvbuffer.onnx, decode.kvbuffer.onnx
                        both graphs with the global cache as buffers written in place
                        (LoopAttention kv_buffer = 1): what TensorRT engines are built from
      weights.bin       the initializers of both graphs, stored once (ONNX external data)
      tokenizer.json or tokenizer.model, tokenizer_config.json, generation_config.json,
      special_tokens_map.json, added_tokens.json, chat_template.jinja (those the checkpoint has)

Everything is written into a hidden temporary folder beside the target (`.NAME.partial-PID`) and
renamed into place at the end, so a failed or interrupted export leaves no artifact behind. An
existing artifact (--force) is renamed aside (`.NAME.old-PID`) just before and removed just after,
so the target is always a complete artifact or, for an instant, missing. Each run removes the
leftovers of killed runs (PID no longer running) and puts back an old artifact left aside.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper
from tqdm import tqdm

import pltkit
from pltkit.export import gqa
from pltkit.export import loop_attention as la
from pltkit.export.builder import state_names, state_shapes
from pltkit.export.plt_onnx import decode_graph, prefill_graph, rope_tables
from pltkit.model.checkpoint import TOKENIZER_FILES, open_checkpoint, read_tensor
from pltkit.model.formats import ARTIFACT_FORMAT, ARTIFACT_VERSION, MANIFEST, float_type
from pltkit.model.folders import kill_point, staged_folder
from pltkit.model.paths import checkpoint_sha256, file_sha256, resolve_model_path

log = logging.getLogger(__name__)

OPSET = 21
IR_VERSION = 10
WEIGHTS = "weights.bin"
ALIGN = 64
# Graph sets: "function" (LoopAttention nodes with their function body: portable, the reference),
# "gqa" (ONNX Runtime's GroupQueryAttention kernels for decode and prefill's loop 0, over cache
# buffers updated in place: the fast path there) and "kvbuffer" (LoopAttention over cache buffers
# updated in place: the TensorRT form).
GRAPHS = [("prefill.onnx", "prefill", "function", prefill_graph), ("decode.onnx", "decode", "function", decode_graph),
          ("prefill.gqa.onnx", "prefill", "gqa", prefill_graph), ("decode.gqa.onnx", "decode", "gqa", decode_graph),
          ("prefill.kvbuffer.onnx", "prefill", "kvbuffer", prefill_graph),
          ("decode.kvbuffer.onnx", "decode", "kvbuffer", decode_graph)]
PORTABLE = ("function", "kvbuffer")  # graph sets of standard ops and LoopAttention only


class ExportError(Exception):
    """Export refused before any work: bad source or destination."""


class WeightStore:
    """Initializers written once to weights.bin, handed to every graph that uses them."""

    def __init__(self, path: Path, source):
        self.path, self._source = path, source
        self.file = open(path, "wb")
        self._protos: dict[str, TensorProto] = {}
        self._packed: dict[str, list[str]] = {}
        self._shapes: dict[str, tuple] = {}

    def source(self, name: str) -> np.ndarray:
        """A tensor of the checkpoint, or of a packed projection (see pack)."""
        parts = self._packed.get(name)
        return np.concatenate([self._source(p) for p in parts]) if parts else self._source(name)

    def shape(self, name: str) -> tuple:
        """The shape of source(name), read once (every graph asks; a packed tensor is not concatenated for it)."""
        if name not in self._shapes:
            parts = [self.source(p).shape for p in self._packed.get(name, [name])]
            self._shapes[name] = (sum(s[0] for s in parts), *parts[0][1:])
        return self._shapes[name]

    def pack(self, prefixes: list[str]) -> str:
        """The prefix of one projection whose weight (and bias) rows are those of `prefixes`, in order."""
        name = "+".join(prefixes)
        for t in (".weight", ".bias"):
            self._packed[name + t] = [p + t for p in prefixes]
        return name

    def get(self, name: str, transpose: bool = False, dtype=np.float32) -> tuple[str, TensorProto]:
        """A tensor of the checkpoint in float `dtype` (transposed for MatMul when asked)."""
        dtype = np.dtype(dtype)
        key = name + (".T" if transpose else "") + ("" if dtype == np.float32 else f".{dtype.name}")
        return self.derived(key, lambda: np.asarray(self.source(name).T if transpose else self.source(name),
                                                    np.float32).astype(dtype))

    def derived(self, key: str, make) -> tuple[str, TensorProto]:
        """A tensor computed once by make() (e.g. quantized weights), stored under `key`."""
        if key not in self._protos:
            arr = np.require(make(), requirements="C")  # (ascontiguousarray turns a scalar into [1])
            self.file.write(b"\0" * (-self.file.tell() % ALIGN))
            offset = self.file.tell()
            self.file.write(arr.tobytes())
            proto = TensorProto(name=key, dims=arr.shape, data_type=helper.np_dtype_to_tensor_dtype(arr.dtype))
            proto.data_location = TensorProto.EXTERNAL
            for k, v in (("location", self.path.name), ("offset", offset), ("length", arr.nbytes)):
                proto.external_data.add(key=k, value=str(v))
            self._protos[key] = proto
        return key, self._protos[key]

    def derived_together(self, keys: list[str], make) -> list[tuple[str, TensorProto]]:
        """Tensors computed together once by make() (one array per key, in order: a quantized
        weight and its scales, say), stored under `keys`."""
        if keys[0] not in self._protos:
            for key, arr in zip(keys, make(), strict=True):
                self.derived(key, lambda arr=arr: arr)
        return [self.derived(key, None) for key in keys]

    def close(self):
        self.file.close()


def _model_proto(graph, name: str, dtype: str) -> onnx.ModelProto:
    own = [helper.make_opsetid(gqa.KERNEL_DOMAIN, 1)] if graph.functions else []
    return helper.make_model(
        graph.graph(name), producer_name="pltkit", producer_version=pltkit.__version__, ir_version=IR_VERSION,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(la.DOMAIN, la.VERSION),
                       helper.make_opsetid("com.microsoft", 1), *own],
        functions=[la.function_proto(OPSET, dtype), *graph.functions.values()])


def _io(graph) -> dict:
    def shape(vi):
        return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]
    return {"inputs": {vi.name: shape(vi) for vi in graph.inputs},
            "outputs": {vi.name: shape(vi) for vi in graph.outputs}}


def export(ckpt: str | os.PathLike, out: str | os.PathLike, *, force: bool = False, quant=None,
           dtype: str = "float32") -> Path:
    """Export checkpoint `ckpt` (a folder or 'default') to the artifact folder `out`, in float
    `dtype` (float32, float16 or bfloat16: weights, activations and state), or float32 with the
    linear layers quantized by `quant` (a scheme of pltkit.quant.schemes)."""
    if quant is not None and dtype != "float32":
        raise ExportError(f"{quant.name} keeps its float parts in float32: export it without a dtype")
    float_type(dtype)  # a known one
    try:
        src = resolve_model_path(ckpt)
    except ValueError as e:
        raise ExportError(str(e)) from None
    out = Path(out)
    with staged_folder(out, check=lambda out: check_output(out, force)) as tmp:
        kill_point("start")
        _write(src, tmp, quant, dtype)
    return out


def check_output(out: Path, force: bool) -> None:
    """Refuse a non-empty output folder (or a file) unless forced: plt-export calls it before
    calibrating too."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise ExportError(f"{out} exists and is not empty (use --force to replace it)")


def _write(src: Path, tmp: Path, quant, dtype: str) -> None:
    graph_files = [g for g in GRAPHS if dtype != "bfloat16" or g[2] != "gqa"]  # no bfloat16 GQA on the CPU
    stages = tqdm(total=4 + len(graph_files) / 2, desc="export", unit="stage", bar_format="{l_bar}{bar}| {postfix}",
                  disable=None)
    stages.set_postfix_str("validate")
    cfg, files = open_checkpoint(src)  # tensors are read one at a time while the graphs are written
    tables = rope_tables(cfg)
    store = WeightStore(tmp / WEIGHTS, lambda n: tables[n] if n in tables else read_tensor(files[n], n).numpy())
    stages.update()

    graphs = {attention: {} for _, _, attention, _ in graph_files}
    functions = {}  # pltkit's own ops -> the graph files that use them
    for file, phase, attention, build in graph_files:
        stages.set_postfix_str(file)
        g = build(cfg, store, OPSET, attention, quant, dtype)
        onnx.save_model(_model_proto(g, f"pltkit_{phase}", dtype), tmp / file)
        for name in g.functions:
            functions.setdefault(name, []).append(file)
        graphs[attention][phase] = {"file": file, **_io(g), **g.meta}
        stages.update(0.5)
        kill_point(file)
    store.close()
    kill_point(WEIGHTS)

    stages.set_postfix_str("check")
    for attention in PORTABLE:
        for g in graphs[attention].values():
            onnx.checker.check_model(str(tmp / g["file"]), full_check=True)
    stages.update()
    kill_point("checked")

    stages.set_postfix_str("checksums")
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, tmp / name)
    kill_point("tokenizer")
    manifest = {
        "format": ARTIFACT_FORMAT, "format_version": ARTIFACT_VERSION, "pltkit_version": pltkit.__version__,
        "config": cfg.to_dict(),
        "source": {"name": src.name, "sha256": checkpoint_sha256(src)},
        "precision": quant.name if quant else float_type(dtype).short, "quantization": quant.manifest() if quant else None,
        "opset": OPSET, "ir_version": IR_VERSION,
        "custom_ops": [{"domain": la.DOMAIN, "op": la.OP, "version": la.VERSION,
                        "plugin_namespace": la.PLUGIN_NAMESPACE, "plugin_version": la.PLUGIN_VERSION,
                        "spec": "docs/loop-attention-op.md"},
                       *({"domain": gqa.KERNEL_DOMAIN, "op": name, "version": gqa.OWN_OPS[name][1], "graphs": files,
                          "function_body": True, "spec": gqa.OWN_OPS[name][0]}
                         for name, files in functions.items())],
        "graphs": graphs,
        "state": {"names": state_names(cfg), "shapes": state_shapes(cfg), "dtype": dtype},
        "max_context": cfg.max_position_embeddings,
        "tokenizer": [n for n in TOKENIZER_FILES if (tmp / n).is_file()],
    }
    manifest["files"] = {f.name: file_sha256(f) for f in sorted(tmp.iterdir())}
    manifest["sizes"] = {f.name: f.stat().st_size for f in sorted(tmp.iterdir())}  # checked at every open
    stages.update()
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    stages.set_postfix_str("done")
    stages.update()
    stages.close()
