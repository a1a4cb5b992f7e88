"""Fold the small ONNX Runtime nodes between a decoder layer's matrix products into the pltkit.RowsMatMulNBits
and pltkit.RowsMatMul nodes beside them (rows_matmul.c, "Fused forms"; rows_f32.c). Each is a node ONNX Runtime
would run on its own, at a few microseconds a node and a step, for some thousand values:

- the residual add and the RMSNorm before a product (Add, then the Pow, ReduceMean, Add, Sqrt, Div and Mul that
  ONNX Runtime fuses into one SimplifiedLayerNormalization) go into that product's node: inputs skip and norm,
  attribute epsilon, and the sum as its output 1 where other nodes read it;
- the SwiGLU after the packed gate and up product (a Split, Sigmoid, Mul and Mul; QuickGelu and Mul in ONNX
  Runtime) goes into that product's node: attribute swiglu.

Only exact matches are folded: every value in between read by the pattern alone, the norm's weight and epsilon
constants, the gate and up halves equal and of whole groups of 16 columns. The graph is changed in place.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

DOMAIN, OPS = "pltkit", ("RowsMatMulNBits", "RowsMatMul")


class Graph:
    """Who makes and who reads each value of an ONNX graph of these `nodes`, and its constants."""

    def __init__(self, graph, nodes: list):
        self.made = {o: n for n in nodes for o in n.output}
        self.readers: dict[str, list] = {}
        for n in nodes:
            for i in n.input:
                self.readers.setdefault(i, []).append(n)
        self.outputs = {o.name for o in graph.output}
        self.initializers = {t.name: t for t in graph.initializer}

    def only_reader(self, value: str, op: str):
        """The node reading `value`, where exactly one does, it is an `op` and the value is no graph output."""
        readers = self.readers.get(value, [])
        if len(readers) == 1 and readers[0].op_type == op and value not in self.outputs:
            return readers[0]
        return None

    def maker(self, value: str, op: str):
        node = self.made.get(value)
        return node if node is not None and node.op_type == op and not node.domain else None

    def first_maker(self, values, op: str):
        """The `op` node that makes the first of `values` one makes, or None."""
        return next((m for m in (self.maker(v, op) for v in values) if m is not None), None)

    def constant(self, value: str) -> np.ndarray | None:
        if value in self.initializers:
            return numpy_helper.to_array(self.initializers[value])
        node = self.made.get(value)
        if node is not None and node.op_type == "Constant" and node.attribute[0].name == "value":
            return numpy_helper.to_array(node.attribute[0].t)
        return None


def attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def fold_swiglu(g: Graph, rows) -> list | None:
    """The nodes of rows' SwiGLU (Split, Sigmoid, Mul, Mul), rows' output taken over by the last; or None."""
    n = attrs(rows)["N"]
    split = g.only_reader(rows.output[0], "Split")
    if split is None or n % 32 or len(split.output) != 2 or len(split.input) != 2:
        return None
    sizes = g.constant(split.input[1])
    if sizes is None or sizes.tolist() != [n // 2, n // 2] or attrs(split).get("axis") not in (-1,):
        return None
    gate, up = split.output
    readers = g.readers.get(gate, [])
    sigmoid = next((r for r in readers if r.op_type == "Sigmoid"), None)
    mul = next((r for r in readers if r.op_type == "Mul"), None)
    if (len(readers) != 2 or gate in g.outputs or sigmoid is None or mul is None
            or g.only_reader(sigmoid.output[0], "Mul") is not mul
            or sorted(mul.input) != sorted([gate, sigmoid.output[0]])):
        return None
    last = g.only_reader(mul.output[0], "Mul")
    if last is None or g.only_reader(up, "Mul") is not last or sorted(last.input) != sorted([mul.output[0], up]):
        return None
    rows.output[0] = last.output[0]
    rows.attribute.append(helper.make_attribute("swiglu", 1))
    return [split, sigmoid, mul, last]


def fold_norm(g: Graph, rows) -> tuple[list, object] | None:
    """The nodes of the RMSNorm before rows and of the residual add before it, where there is one, rows reading
    their inputs; and the node whose place rows takes (the add, or None). An add of two computed values is taken
    for a residual add, of one shape (as in pltkit's graphs): the kernel refuses a broadcast one when run."""
    k = attrs(rows)["K"]
    mul = g.maker(rows.input[0], "Mul")
    if mul is None or g.only_reader(rows.input[0], rows.op_type) is not rows:
        return None
    div = g.first_maker(mul.input, "Div")
    weight = next((i for i in mul.input if div is None or i != div.output[0]), None)
    w = g.initializers.get(weight)
    if (div is None or w is None or w.data_type != TensorProto.FLOAT or list(w.dims) != [k]
            or g.only_reader(div.output[0], "Mul") is not mul):
        return None
    s, root = div.input
    sqrt = g.maker(root, "Sqrt")
    add = sqrt and g.maker(sqrt.input[0], "Add")
    mean = add and g.first_maker(add.input, "ReduceMean")
    if mean is None or g.only_reader(root, "Div") is not div or g.only_reader(sqrt.input[0], "Sqrt") is not sqrt:
        return None
    eps = g.constant(next(i for i in add.input if i != mean.output[0]))
    axes = g.constant(mean.input[1]) if len(mean.input) > 1 else np.array(attrs(mean).get("axes", []))
    power = g.maker(mean.input[0], "Pow")
    if (eps is None or eps.size != 1 or axes is None or axes.tolist() != [-1] or attrs(mean).get("keepdims", 1) != 1
            or g.only_reader(mean.output[0], "Add") is not add or power is None or power.input[0] != s
            or g.only_reader(power.output[0], "ReduceMean") is not mean):
        return None
    two = g.constant(power.input[1])
    if two is None or two.size != 1 or float(two.ravel()[0]) != 2.0:
        return None
    nodes, residual = [power, mean, add, sqrt, div, mul], g.maker(s, "Add")
    others = [r for r in g.readers.get(s, []) if r is not power and r is not div]
    rows.attribute.append(helper.make_attribute("epsilon", float(eps.ravel()[0])))
    computed = residual is not None and len(residual.input) == 2 and all(g.constant(i) is None for i in residual.input)
    if not computed:
        rows.input[0] = s
        rows.input.extend(["", weight])
        return nodes, None
    rows.input[0] = residual.input[0]
    rows.input.extend([residual.input[1], weight])
    if others or s in g.outputs:
        rows.output.append(s)
    return [*nodes, residual], residual


def fuse_rows(graph) -> int:
    """Fold what fold_swiglu and fold_norm find around each pltkit.RowsMatMulNBits and RowsMatMul node of `graph`
    (an onnx GraphProto, changed in place). Returns how many nodes went."""
    nodes = list(graph.node)
    before = len(nodes)
    for rows in [n for n in nodes if n.op_type in OPS and n.domain == DOMAIN and len(n.input) == 3]:
        nodes = _without(nodes, fold_swiglu(Graph(graph, nodes), rows) or [])
        gone, place = fold_norm(Graph(graph, nodes), rows) or ([], None)
        nodes = _without(nodes, gone, rows, place)
    del graph.node[:]
    graph.node.extend(nodes)
    return before - len(nodes)


def _without(nodes: list, gone: list, rows=None, place=None) -> list:
    """nodes less those `gone`; rows moved to the place of the node `place` (one of those gone), if given."""
    kept = []
    for n in nodes:
        if place is not None and n is place:
            kept.append(rows)
        elif not any(n is x for x in gone) and not (place is not None and n is rows):
            kept.append(n)
    return kept
