"""A small helper to write ONNX graphs by hand: one call per node, outputs named after
the node's path-like scope (`/layers.0/attn/q_proj/MatMul`), constants deduplicated."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, helper, numpy_helper

# Slice's end for "to the end of the axis": ONNX has no marker for it, and an end beyond the
# axis' size is clamped to the size, so any bound beyond every axis will do (2**62, clear of int64's limit)
TO_END = 2**62


class Graph:
    def __init__(self, opset: int, prefix: str = ""):
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._scope: list[str] = [prefix] if prefix else []
        self._consts: dict[tuple, str] = {}
        self._shared: dict = {}
        self._count = 0
        self.functions: dict[str, onnx.FunctionProto] = {}  # model-local functions the nodes call, by name
        self.meta: dict = {}  # what the graph tells the manifest about itself (its entry in "graphs")

    # -- naming -----------------------------------------------------------------
    def scope(self, name: str) -> _Scope:
        return _Scope(self, name)

    def _name(self, op: str) -> str:
        self._count += 1
        return "/" + "/".join([*self._scope, f"{op}_{self._count}"])

    # -- nodes ------------------------------------------------------------------
    def op(self, op_type: str, *inputs: str, n_out: int = 1, domain: str = "", **attrs) -> str | list[str]:
        name = self._name(op_type)
        outs = [f"{name}/out{i}" if n_out > 1 else f"{name}/out" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=name, domain=domain, **attrs))
        return outs if n_out > 1 else outs[0]

    def attribute(self, attr: str, kind: int) -> str:
        """In a function body: a Constant whose value is the calling node's attribute `attr` (of
        AttributeProto type INT or FLOAT)."""
        out = self._name(f"attr_{attr}")
        node = helper.make_node("Constant", [], [out], name=out)
        value = {AttributeProto.INT: "value_int", AttributeProto.FLOAT: "value_float"}[kind]
        node.attribute.append(AttributeProto(name=value, ref_attr_name=attr, type=kind))
        self.nodes.append(node)
        return out

    def shared(self, key, build) -> str:
        """A value built once per graph and reused: shape arithmetic that every layer repeats (the
        layers' caches and rings have the same shapes), so the graph runs it once per step."""
        if key not in self._shared:
            self._shared[key] = build()
        return self._shared[key]

    def const(self, value, dtype=np.int64) -> str:
        """A small constant (shapes, axes, scalars) as a Constant node, shared by value."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            name = f"/const_{len(self._consts)}"
            self.nodes.append(helper.make_node("Constant", [], [name], name=name,
                                               value=numpy_helper.from_array(arr, name)))
            self._consts[key] = name
        return self._consts[key]

    def initializer(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def input(self, name: str, elem_type: int, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def output(self, value: str, name: str, elem_type: int, shape: list) -> str:
        self.nodes.append(helper.make_node("Identity", [value], [name], name=f"/output/{name}"))
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def graph(self, name: str) -> onnx.GraphProto:
        """The graph without the nodes nothing reads (a layer builder may write pieces a variant
        does not use; ONNX Runtime warns about each). Nodes are in topological order, so one pass
        from the outputs back finds them."""
        nodes, needed = live(self.nodes, {o.name for o in self.outputs})
        initializers = [t for t in self.initializers if t.name in needed]
        return helper.make_graph(nodes, name, self.inputs, self.outputs, initializers)


def live(nodes, outputs: set[str]) -> tuple[list, set[str]]:
    """Of `nodes` in topological order (no subgraphs), those the names `outputs` need, in order, and every name
    they read: one pass from the outputs back."""
    needed, kept = set(outputs), []
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(node.input)
    return kept[::-1], needed


class _Scope:
    def __init__(self, g: Graph, name: str):
        self.g, self.name = g, name

    def __enter__(self):
        self.g._scope.append(self.name)

    def __exit__(self, *exc):
        self.g._scope.pop()


FLOAT, INT64 = TensorProto.FLOAT, TensorProto.INT64
