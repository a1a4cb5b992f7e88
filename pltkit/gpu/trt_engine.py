"""TensorRT engines from an artifact's ONNX graphs (TensorRT 10.x / 11.x Python API).

- The engines are built from the `kvbuffer` graphs (prefill.kvbuffer.onnx, decode.kvbuffer.onnx):
  the global cache is a buffer of `capacity` positions that each call writes in place at
  `past_len`. With the plugin a decode step writes only its own positions; the inlined function
  (no plugin) rewrites the buffer.
- The network is strongly typed: precision comes from the graph. That is the artifact's float
  type, or the Q/DQ of the `int8-qdq` / `fp8` exports (`plt-export --int8 --target trt`, `--fp8`).
  ONNX Runtime's contrib ops (MatMulNBits, GroupQueryAttention, DynamicQuantizeMatMul) are not TensorRT's,
  so the int8/int4/int8-dq ORT forms cannot be built.
- LoopAttention nodes carry `plugin_namespace="pltkit"`. With the pltkit plugin registered
  (pltkit.gpu.trt_plugin), the parser maps them to it: ahead-of-time PTX where TensorRT supports
  it, else the JIT Python callback. Without it, the nodes' attribute is dropped so that the
  parser inlines the local function (the portable decomposition).
- Optimization profiles come from the graphs' symbolic dimensions: batch, prefill chunk, cache
  capacity and ring length.
- A timing cache is kept in the artifact (`engines/timing.cache`).
- Plans are stored under `engines/<key>/`, key = GPU name, compute capability and TensorRT
  version, and recorded in the manifest. A plan built for another key is never loaded: the
  engines are rebuilt. The folder is written beside itself and renamed into place, as an export
  is (pltkit.model.folders): a kill leaves the old engines or none, never a part of new ones.

Nothing here runs without an NVIDIA GPU and TensorRT: `require()` says what is missing.
"""

from __future__ import annotations

import re
from pathlib import Path

from tqdm import tqdm

from pltkit.model.folders import repair_leftovers, staged_folder
from pltkit.runtime.artifact import Artifact, update_manifest

ENGINES = "engines"
PHASES = ("prefill", "decode")
GRAPHS = "kvbuffer"  # the graph set engines are built from
CONTRIB_OPS = {"MatMulNBits", "GroupQueryAttention", "DynamicQuantizeMatMul"}


class GpuUnavailable(RuntimeError):
    """No usable NVIDIA GPU or TensorRT; the message says what is missing and how to get it."""


def require():
    """(tensorrt, torch) when an NVIDIA GPU and TensorRT are both usable; else GpuUnavailable."""
    try:
        import tensorrt as trt
    except ImportError:
        raise GpuUnavailable("TensorRT is not installed: on a machine with an NVIDIA GPU, "
                             "pip uninstall onnxruntime && pip install 'pltkit[gpu]'") from None
    try:
        import torch
    except ImportError:
        raise GpuUnavailable("the TensorRT backend needs PyTorch with CUDA: pip install torch") from None
    if not torch.cuda.is_available():
        raise GpuUnavailable("no NVIDIA GPU is visible to PyTorch (torch.cuda.is_available() is False)")
    return trt, torch


def device_key(trt, torch) -> str:
    """GPU name, compute capability and TensorRT version: a plan is valid only for its key."""
    major, minor = torch.cuda.get_device_capability()
    name = re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name()).strip("-")
    return f"{name}-sm{major}{minor}-trt{trt.__version__}"


def profile_ranges(artifact: Artifact, max_batch: int = 1, max_chunk: int = 512) -> dict[str, tuple]:
    """(min, opt, max) for each symbolic dimension of the graphs."""
    cfg = artifact.config
    ctx = cfg.max_position_embeddings
    window = cfg.window_left if cfg.plt_num_loops > 1 else 0
    return {"batch": (1, 1, max_batch), "seq": (1, 64, max_chunk), "capacity": (1, ctx // 2, ctx),
            "ring": (0, window, window)}


def _shapes(inputs: dict, ranges: dict) -> dict[str, tuple[list, list, list]]:
    out = {}
    for name, shape in inputs.items():
        dims = [[ranges[d][i] if isinstance(d, str) else d for d in shape] for i in range(3)]
        out[name] = tuple(dims)
    return out


def _graph_for_tensorrt(artifact: Artifact, phase: str, plugin: bool) -> Path:
    """The phase's ONNX file as TensorRT will parse it: with the plugin, as exported; without,
    a copy (beside the weight file it references) whose LoopAttention nodes have no
    plugin_namespace, so that the parser inlines their function."""
    import onnx

    if GRAPHS not in artifact.attention_variants:
        raise ValueError(f"{artifact.path} has no {GRAPHS} graphs (exported by an older pltkit): export it again")
    src = artifact.graph_path(phase, GRAPHS)
    model = onnx.load(src, load_external_data=False)
    ops = {n.op_type for n in model.graph.node}
    if ops & CONTRIB_OPS:
        raise ValueError(f"{src.name} uses ONNX Runtime contrib ops ({', '.join(sorted(ops & CONTRIB_OPS))}): "
                         f"export the TensorRT form (plt-export --int8 --target trt, or --fp8, or float32)")
    if plugin:
        return src
    for node in model.graph.node:
        kept = [a for a in node.attribute if a.name not in ("plugin_namespace", "plugin_version")]
        del node.attribute[:]
        node.attribute.extend(kept)
    out = artifact.path / f".{phase}.trt-inline.onnx"
    onnx.save(model, out)
    return out


def build(artifact_path, *, plugin: bool | None = None, max_batch: int = 1, max_chunk: int = 512,
          workspace_gb: float = 4.0) -> Path:
    """Build (or reuse) this machine's engines for an artifact; returns their folder."""
    trt, torch = require()
    artifact = Artifact.open(artifact_path)
    key = device_key(trt, torch)
    folder = artifact.path / ENGINES / key
    repair_leftovers(folder)  # a build killed while it replaced the folder: the old one put back
    recorded = artifact.manifest.get("engines", {}).get(key)
    if recorded and all((folder / f"{p}.plan").is_file() for p in PHASES):
        return folder
    if plugin is None:
        from pltkit.gpu import trt_plugin
        plugin = trt_plugin.register()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    cache_path = artifact.path / ENGINES / "timing.cache"
    ranges = profile_ranges(artifact, max_batch, max_chunk)
    try:
        with staged_folder(folder) as tmp:  # the plans appear together, or not at all
            config = _config(builder, trt, workspace_gb)
            config.set_timing_cache(config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b""),
                                    ignore_mismatch=False)
            aot = plugin and hasattr(trt.NetworkDefinitionCreationFlag, "PREFER_AOT_PYTHON_PLUGINS")
            how = "aot plugin" if aot else "jit plugin" if plugin else "inlined function"
            for phase in (bar := tqdm(PHASES, desc=f"TensorRT engines (LoopAttention: {how})", unit="engine",
                                      disable=None)):
                bar.set_postfix_str(phase)
                network = builder.create_network(_network_flags(trt, aot))
                parser = trt.OnnxParser(network, logger)
                onnx_path = _graph_for_tensorrt(artifact, phase, plugin)
                if not parser.parse_from_file(str(onnx_path)):
                    errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
                    raise RuntimeError(f"TensorRT could not parse {onnx_path.name}: {errors}")
                profile = builder.create_optimization_profile()
                inputs = artifact.manifest["graphs"][GRAPHS][phase]["inputs"]
                for name, (lo, opt, hi) in _shapes(inputs, ranges).items():
                    profile.set_shape(name, lo, opt, hi)
                config.add_optimization_profile(profile)
                plan = builder.build_serialized_network(network, config)
                if plan is None:
                    raise RuntimeError(f"TensorRT could not build the {phase} engine (see its log above)")
                (tmp / f"{phase}.plan").write_bytes(bytes(plan))
                config = _config(builder, trt, workspace_gb, config.get_timing_cache())
            cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    finally:
        for phase in PHASES:
            (artifact.path / f".{phase}.trt-inline.onnx").unlink(missing_ok=True)
    _record(artifact, key, {"gpu": torch.cuda.get_device_name(),
                            "compute_capability": "{}.{}".format(*torch.cuda.get_device_capability()),
                            "tensorrt": trt.__version__, "graphs": GRAPHS,
                            "loop_attention": how,
                            "profiles": ranges, "files": [f"{ENGINES}/{key}/{p}.plan" for p in PHASES]})
    return folder


def _network_flags(trt, aot: bool) -> int:
    flags = trt.NetworkDefinitionCreationFlag
    bits = 0
    if hasattr(flags, "STRONGLY_TYPED"):  # 10.x; 11 is always strongly typed
        bits |= 1 << int(flags.STRONGLY_TYPED)
    if aot:  # the plugin has both implementations: bake the PTX into the engine
        bits |= 1 << int(flags.PREFER_AOT_PYTHON_PLUGINS)
    return bits


def _config(builder, trt, workspace_gb: float, cache=None):
    """A builder config: workspace, the aliased plugin I/O the in-place cache needs, and the
    timing cache shared by both networks (a profile belongs to one network)."""
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if hasattr(trt.PreviewFeature, "ALIASED_PLUGIN_IO_10_03"):
        config.set_preview_feature(trt.PreviewFeature.ALIASED_PLUGIN_IO_10_03, True)
    if cache is not None:
        config.set_timing_cache(cache, ignore_mismatch=False)
    return config


def _record(artifact: Artifact, key: str, entry: dict) -> None:
    update_manifest(artifact.path, lambda m: m.setdefault("engines", {}).update({key: entry}))
