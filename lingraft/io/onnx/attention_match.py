"""Find exported local-attention blocks (SASA, ACmix) in an ONNX graph by their structure (no values read).

:mod:`lingraft.models.attention` exports, per block with input x [1, C_in, H, W] (views = Reshape, Flatten,
Squeeze, Unsqueeze, Identity, which reinterpret a tensor in row-major order)::

    q  = views(Conv_q(x)) [* s]                       -> [1, h, d, 1, P]
    kb = views(Gather(views(Conv_k(x)), idx)) [+ c]   -> [1, h, d, K, P]   (idx: constant window indices)
    v  = views(Gather(views(Conv_v(x)), idx))         -> [1, h, d, K, P]
    a  = Softmax(Where(mask, -inf, ReduceSum(q * kb, axis 2)), axis 2)    [1, h, K, P]
    o  = views(ReduceSum(views(a) * v, axis 3))       -> the block output (SASA)

and ACmix adds ``r1 * o + r2 * Conv_shift(views(Transpose(Conv_fc(Concat(views(q), views(k), views(v))))))``.
This module finds those nodes from every input-dependent Softmax (:func:`find_attention_regions`) and checks
that the block is closed: its inner values feed nothing outside it but Shape/Size. Shapes and constants are
checked later, when the importer has them (:mod:`lingraft.io.onnx.attention_fusion`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lingraft.io.onnx.common import node_label, real_input

__all__ = ["AttentionRegion", "ConvPath", "Operand", "analysis_view", "find_attention_regions"]

VIEW_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"})
_SHAPE_OPS = frozenset({"Shape", "Size"})


class NoMatch(Exception):
    """The nodes around a Softmax are not a local-attention block; the message says why."""


@dataclass
class Operand:
    """One projected operand of the attention: conv (1x1 Conv of x) -> views [-> Gather -> views] [-> Mul/Add const].

    out: the ONNX name the block's Mul reads; gather: the window Gather (keys, values) or None (query); const_op:
    the Mul by the query scale or the Add of the key bias, or None.
    """

    conv: Any
    gather: Any | None
    const_op: Any | None
    out: str
    nodes: list = field(default_factory=list)


@dataclass
class ConvPath:
    """ACmix's convolution path and output mix: add = rate1 * attention + rate2 * shift_conv(...)."""

    concat: Any
    fc: Any
    transpose: Any
    shift_conv: Any
    rate1: Any
    rate2: Any
    add: Any
    nodes: list = field(default_factory=list)


@dataclass
class AttentionRegion:
    """The nodes of one local-attention block; ``exit_name`` is the one value used outside it."""

    softmax: Any
    where: Any | None
    logits_sum: Any  # ReduceSum over d of q * kb
    logits_mul: Any
    weights_mul: Any  # views(softmax) * v
    out_sum: Any  # ReduceSum over K
    query: Operand
    keys: Operand
    values: Operand
    att_out: str  # the attention output after its views
    conv_path: ConvPath | None
    entry: str
    exit_name: str
    nodes: list = field(default_factory=list)

    @property
    def kind(self) -> str:
        return "ACmix" if self.conv_path is not None else "SASA"

    @property
    def label(self) -> str:
        return node_label(self.softmax)


class _Graph:
    """Producers, consumers and input dependence of the values of an ONNX graph."""

    def __init__(self, model):
        g = model.graph
        self.producer: dict[str, Any] = {}
        self.consumers: dict[str, list] = {}
        self.outputs = {o.name for o in g.output}
        self.dep = {real_input(model).name}
        for n in g.node:
            for o in n.output:
                self.producer[o] = n
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
            if n.op_type not in _SHAPE_OPS and any(i in self.dep for i in n.input):
                self.dep.update(o for o in n.output if o)

    def users(self, name: str) -> list:
        """The consumers of a value that read more than its shape."""
        return [c for c in self.consumers.get(name, []) if c.op_type not in _SHAPE_OPS]

    def dep_inputs(self, n) -> list[bool]:
        return [bool(i) and i in self.dep for i in n.input]

    def back_views(self, name: str, nodes: list) -> Any:
        """Walk back from `name` through view ops (appended to nodes); returns the first non-view producer."""
        n = self.producer.get(name)
        while n is not None and n.op_type in VIEW_OPS and self.dep_inputs(n)[:1] == [True]:
            if any(self.dep_inputs(n)[1:]):
                raise NoMatch(f"{n.op_type} node '{node_label(n)}' has an input-dependent shape")
            nodes.append(n)
            n = self.producer.get(n.input[0])
        return n

    def fwd_views(self, name: str, nodes: list) -> str:
        """Walk forward from `name` while its one user is a view op (appended to nodes); returns the last name."""
        while name not in self.outputs:
            users = self.users(name)
            if len(users) != 1 or users[0].op_type not in VIEW_OPS or users[0].input[0] != name:
                break
            nodes.append(users[0])
            name = users[0].output[0]
        return name

    def only_user(self, name: str, op: str, what: str) -> Any:
        users = self.users(name)
        if len(users) != 1 or users[0].op_type != op:
            raise NoMatch(f"{what} must feed one {op} node")
        return users[0]

    def const_operand(self, n, op: str) -> str | None:
        """If n is `op` of one input-dependent and one constant operand: the dependent input name, else None."""
        if n is None or n.op_type != op or len(n.input) != 2 or self.dep_inputs(n).count(True) != 1:
            return None
        return n.input[0] if self.dep_inputs(n)[0] else n.input[1]


def _expect(g: _Graph, n, op: str, what: str) -> Any:
    if n is None or n.op_type != op or n.domain not in ("", "ai.onnx") or not g.dep_inputs(n)[:1] == [True]:
        raise NoMatch(f"{what} (found {n.op_type if n is not None else 'a graph input'})")
    return n


def _operand(g: _Graph, name: str, windowed: bool, const_op: str | None) -> Operand:
    """Match name = views([const_op c] views(Gather?(views(Conv(x))))) (Gather iff windowed)."""
    op = Operand(None, None, None, name)
    n = g.back_views(name, op.nodes)
    inner = g.const_operand(n, const_op) if const_op else None
    if inner is not None:
        op.const_op = n
        op.nodes.append(n)
        n = g.back_views(inner, op.nodes)
    if windowed:
        op.gather = _expect(g, n, "Gather", "keys and values must be gathered windows")
        if g.dep_inputs(n)[1:] != [False]:
            raise NoMatch("the window indices must be constant")
        op.nodes.append(n)
        n = g.back_views(n.input[0], op.nodes)
    op.conv = _expect(g, n, "Conv", "queries, keys and values must be Conv projections")
    if any(g.dep_inputs(n)[1:]):
        raise NoMatch(f"Conv node '{node_label(n)}' has input-dependent weights")
    op.nodes.append(n)
    return op


def _logits(g: _Graph, softmax, nodes: list) -> tuple[Any, Any, Any, Operand, Operand]:
    """Softmax <- views <- [Where(mask, -inf, .)] <- views <- ReduceSum <- views <- Mul(q, kb)."""
    n = g.back_views(softmax.input[0], nodes)
    where = None
    if n is not None and n.op_type == "Where":
        where = n
        d = g.dep_inputs(n)
        if d not in ([False, False, True], [False, True, False]):
            raise NoMatch("the Where before it must mask the logits with constants")
        nodes.append(n)
        n = g.back_views(n.input[2] if d[2] else n.input[1], nodes)
    r1 = _expect(g, n, "ReduceSum", "its logits must be a ReduceSum of queries times keys")
    nodes.append(r1)
    mul = _expect(g, g.back_views(r1.input[0], nodes), "Mul", "its logits must sum queries times keys")
    nodes.append(mul)
    if g.dep_inputs(mul) != [True, True]:
        raise NoMatch("its logits must multiply two input-dependent tensors")
    try:
        keys, query = _operand(g, mul.input[0], True, "Add"), _operand(g, mul.input[1], False, "Mul")
    except NoMatch:
        keys, query = _operand(g, mul.input[1], True, "Add"), _operand(g, mul.input[0], False, "Mul")
    return where, r1, mul, query, keys


def _conv_path(g: _Graph, att_out: str, convs: list) -> ConvPath | None:
    """ACmix's tail after the attention output, or None when the block ends at att_out (SASA)."""
    users = g.users(att_out)
    if len(users) != 1 or g.const_operand(users[0], "Mul") != att_out:
        return None
    r1 = users[0]
    adds = g.users(r1.output[0])
    if len(adds) != 1 or adds[0].op_type != "Add" or g.dep_inputs(adds[0]) != [True, True]:
        return None
    add = adds[0]
    r2 = g.producer.get(add.input[1] if add.input[0] == r1.output[0] else add.input[0])
    inner = g.const_operand(r2, "Mul")
    if inner is None:
        return None
    nodes: list = [r1, add, r2]
    try:
        shift = _expect(g, g.producer.get(inner), "Conv", "")
        tr = _expect(g, g.back_views(shift.input[0], nodes), "Transpose", "")
        fc = _expect(g, g.back_views(tr.input[0], nodes), "Conv", "")
        cat = _expect(g, g.back_views(fc.input[0], nodes), "Concat", "")
    except NoMatch:
        return None
    if len(cat.input) != 3 or any(any(g.dep_inputs(c)[1:]) for c in (shift, fc)):
        return None
    for inp, conv in zip(cat.input, convs):
        if g.back_views(inp, nodes) is not conv:
            return None
    return ConvPath(cat, fc, tr, shift, r1, r2, add, nodes + [shift, tr, fc, cat])


def _check_closed(g: _Graph, region: AttentionRegion) -> None:
    """Every inner value feeds only block nodes (or Shape/Size); every input-dependent input comes from inside."""
    ids = {id(n) for n in region.nodes}
    inner = {o for n in region.nodes for o in n.output if o}
    for n in region.nodes:
        for o in n.output:
            if o == region.exit_name or not o:
                continue
            if o in g.outputs:
                raise NoMatch(f"its inner value '{o}' is a graph output")
            for c in g.users(o):
                if id(c) not in ids:
                    raise NoMatch(f"its inner value '{o}' is also used by {c.op_type} node '{node_label(c)}'")
        for i, d in zip(n.input, g.dep_inputs(n)):
            if d and i not in inner and i != region.entry:
                raise NoMatch(f"{n.op_type} node '{node_label(n)}' reads '{i}' from outside the block")


def _match(g: _Graph, softmax) -> AttentionRegion:
    nodes: list = [softmax]
    where, r1, m1, query, keys = _logits(g, softmax, nodes)
    a = g.fwd_views(softmax.output[0], nodes)
    m2 = g.only_user(a, "Mul", "the attention weights")
    if g.dep_inputs(m2) != [True, True]:
        raise NoMatch("the attention weights must multiply the gathered values")
    values = _operand(g, m2.input[1] if m2.input[0] == a else m2.input[0], True, None)
    r2 = g.only_user(g.fwd_views(m2.output[0], nodes), "ReduceSum", "the weighted values")
    nodes += [m2, r2]
    att_out = g.fwd_views(r2.output[0], nodes)
    convs = [query.conv, keys.conv, values.conv]
    entry = convs[0].input[0]
    if any(c.input[0] != entry for c in convs):
        raise NoMatch("queries, keys and values must project the same tensor")
    if len({id(c) for c in convs}) != 3 or keys.gather is values.gather:
        raise NoMatch("queries, keys and values must have their own projections and windows")
    path = _conv_path(g, att_out, convs)
    exit_name = path.add.output[0] if path is not None else att_out
    for op in (query, keys, values):
        nodes += op.nodes
    nodes += path.nodes if path is not None else []
    uniq = list({id(n): n for n in nodes}.values())
    region = AttentionRegion(softmax, where, r1, m1, m2, r2, query, keys, values, att_out, path, entry, exit_name, uniq)
    _check_closed(g, region)
    return region


def find_attention_regions(model) -> tuple[list[AttentionRegion], list[str]]:
    """(regions, refusals): the local-attention blocks around input-dependent Softmax nodes, and one reason
    ("Softmax node 'n' is not ...: why") for each input-dependent Softmax that is not such a block."""
    g = _Graph(model)
    regions: list[AttentionRegion] = []
    refusals: list[str] = []
    taken: set[int] = set()
    for n in model.graph.node:
        if n.op_type != "Softmax" or n.domain not in ("", "ai.onnx") or not g.dep_inputs(n)[:1] == [True]:
            continue
        try:
            r = _match(g, n)
            if taken & {id(x) for x in r.nodes}:
                raise NoMatch("it shares nodes with another attention block")
        except NoMatch as e:
            refusals.append(
                f"Softmax node '{node_label(n)}' is not a local-attention block lingraft can import "
                f"(SASA or ACmix as lingraft exports them): {e}"
            )
            continue
        taken |= {id(x) for x in r.nodes}
        regions.append(r)
    return regions, refusals


def _fill_constants(regions: list[AttentionRegion]) -> set[str]:
    """The names of the Where fill values (-inf, checked when fusing) of the blocks."""
    names = set()
    for r in regions:
        if r.where is not None:
            names.update(i for i in r.where.input[1:] if i and i not in {n.output[0] for n in r.nodes})
    return names


def analysis_view(model, regions: list[AttentionRegion]):
    """A copy of the model in which every block is one Identity(entry) -> exit, for the unsupported-op and the
    non-finite-weight analyses (the -inf fill of the block's mask, used by nothing else, is left out too)."""
    import onnx

    if not regions:
        return model
    drop = {id(n) for r in regions for n in r.nodes}
    exits = {id(n): r for r in regions for n in r.nodes if r.exit_name in n.output}
    nodes = []
    for n in model.graph.node:
        if id(n) in exits:
            r = exits[id(n)]
            nodes.append(onnx.helper.make_node("Identity", [r.entry], [r.exit_name], name=f"{r.label}_fused"))
        elif id(n) not in drop:
            nodes.append(n)
    used = {i for n in nodes for i in n.input} | {o.name for o in model.graph.output}
    unused_fill = _fill_constants(regions) - used
    nodes = [n for n in nodes if not (n.op_type == "Constant" and set(n.output) <= unused_fill)]
    view = onnx.ModelProto()
    view.CopyFrom(model)
    del view.graph.node[:]
    view.graph.node.extend(nodes)
    inits = [t for t in view.graph.initializer if t.name not in unused_fill]
    del view.graph.initializer[:]
    view.graph.initializer.extend(inits)
    inputs = [i for i in view.graph.input if i.name not in unused_fill]
    del view.graph.input[:]
    view.graph.input.extend(inputs)
    return view
