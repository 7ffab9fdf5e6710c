"""Static analysis of an ONNX graph: which input-dependent nodes the importer cannot convert, found before building.

Every problem is collected first so that one error lists them all.
"""

from __future__ import annotations

from lingraft.bounds.registry import onnx_entries
from lingraft.errors import UnsupportedModelError
from lingraft.io.onnx.common import (
    InputInfo,
    input_info,
    node_attrs,
    node_label,
    real_input,
)
from lingraft.io.onnx.import_ops import OpConverters

__all__ = [
    "SHAPE_QUERY_OPS",
    "SUPPORTED_ONNX_OPS",
    "analyze",
    "check_supported",
    "input_normalization",
    "onnx_non_finite",
    "raise_problems",
]

_ONNX_ENTRIES = onnx_entries()  # ONNX op type -> registry entry

#: ONNX ops the importer evaluates itself (shapes are static, so their outputs are constants): no handler
SHAPE_QUERY_OPS = frozenset({"Shape", "Size"})


def _supported_onnx_ops() -> frozenset[str]:
    """Op types with an ``op_<OpType>`` handler on OpConverters AND a registry entry (lingraft.bounds.registry)
    that names them, plus :data:`SHAPE_QUERY_OPS`."""
    return frozenset(t for t in _ONNX_ENTRIES if callable(getattr(OpConverters, f"op_{t}", None))) | SHAPE_QUERY_OPS


#: ONNX ops accepted on input-dependent tensors (anything may appear in constant sub-graphs, which are folded).
#: Derived from the bound engine's registry, so the importer accepts exactly what the engine can bound.
SUPPORTED_ONNX_OPS = _supported_onnx_ops()


def _static_problem(node, dep: list[bool]) -> str | None:
    """Why an input-dependent node cannot be converted ('' = op not supported at all), or None when fine.

    dep[i]: whether input i of the node depends on the model input.
    """
    if node.domain not in ("", "ai.onnx"):
        return f"domain {node.domain}"
    op = node.op_type
    if op not in SUPPORTED_ONNX_OPS:
        return ""
    a = node_attrs(node)
    d = dep + [False] * 6
    if op in ("MatMul", "Mul") and d[0] and d[1]:
        return "two input-dependent operands"
    if op == "Div" and d[1]:
        return "division by an input-dependent tensor"
    if op == "Gemm":
        if d[1] or d[2]:
            return "input-dependent weights"
        if a.get("transA", 0):
            return "transA=1 on the input"
    if op in ("Conv", "BatchNormalization", "Pad", "Reshape", "Squeeze", "Unsqueeze") and any(d[1:]):
        return "input-dependent weights/parameters"
    if op == "Conv" and a.get("group", 1) != 1:
        return f"group={a['group']}"
    if op == "Conv" and any(x != 1 for x in a.get("dilations", [])):
        return "dilation != 1"
    if op == "Pad":
        mode = a.get("mode", b"constant")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        if mode != "constant":
            return f"mode={mode}"
    if op == "BatchNormalization" and a.get("training_mode", 0):
        return "training_mode=1"
    if op == "Concat" and not all(dep):
        return "concatenation with a constant"
    entry = _ONNX_ENTRIES.get(op)
    return None if entry is None or entry.onnx_check is None else entry.onnx_check(op, a)


def analyze(model, input_name: str) -> list[tuple[str, str, str]]:
    """Walk the graph once: (op_type, node label, detail) for every input-dependent node we cannot convert."""
    g = model.graph
    data = {input_name}
    problems = []
    for node in g.node:
        dep = [bool(i) and i in data for i in node.input]
        if not any(dep):
            continue  # constant sub-graph: folded
        if node.op_type in SHAPE_QUERY_OPS and node.domain in ("", "ai.onnx"):
            continue  # shapes are static, so their outputs are constants
        data.update(o for o in node.output if o)
        why = _static_problem(node, dep)
        if why is not None:
            problems.append((node.op_type, node_label(node), why))
    return problems


def _problems_message(problems) -> str:
    parts = [f"{op} (node '{name}'" + (f", {why})" if why else ")") for op, name, why in problems]
    return (
        "unsupported ONNX ops: "
        + ", ".join(parts)
        + "; lingraft supports: "
        + ", ".join(sorted(SUPPORTED_ONNX_OPS))
        + " (on input-dependent tensors)"
    )


def raise_problems(problems) -> None:
    """UnsupportedModelError listing `problems` ((op, label, detail) triples), if there are any."""
    if problems:
        raise UnsupportedModelError(_problems_message(problems))


def check_supported(model) -> InputInfo:
    """Collect every problem (unsupported ops, dynamic input dims) before converting anything; one error."""
    problems = analyze(model, real_input(model).name)
    try:
        info, shape_error = input_info(model), None
    except UnsupportedModelError as e:
        info, shape_error = None, str(e)
    msgs = ([_problems_message(problems)] if problems else []) + ([shape_error] if shape_error else [])
    if msgs:
        raise UnsupportedModelError("; ".join(msgs))
    return info


def _constants(model) -> dict:
    """name -> TensorProto of every initializer and Constant-node value (read lazily by the callers)."""
    out = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output:
            for a in node.attribute:
                if a.name == "value":
                    out[node.output[0]] = a.t
    return out


#: (op, input index) whose constant may legitimately be +-inf: a Pad value (before a MaxPool), Clip bounds
_INF_ALLOWED = {("Pad", 2), ("Clip", 1), ("Clip", 2)}


def onnx_non_finite(model) -> str | None:
    """ "initializer 'W' holds NaN" (or inf; or a Constant node's output) for the first non-finite weight, else None.
    An infinite constant used only as a Pad value or a Clip bound is fine (NaN never is)."""
    import numpy as np
    from onnx import numpy_helper

    from lingraft.io.loader import first_non_finite

    inits = {i.name for i in model.graph.initializer}
    uses: dict[str, set] = {}
    for node in model.graph.node:
        for k, name in enumerate(node.input):
            uses.setdefault(name, set()).add((node.op_type, k))

    def arrays():
        for name, t in _constants(model).items():
            a = numpy_helper.to_array(t)
            if uses.get(name) and uses[name] <= _INF_ALLOWED and np.issubdtype(a.dtype, np.floating):
                a = np.where(np.isinf(a), 0, a)  # only a NaN counts here
            yield name, a

    found = first_non_finite(arrays())
    if found is None:
        return None
    name, kind = found
    return f"{'initializer' if name in inits else 'Constant'} '{name}' holds {kind}"


def input_normalization(model, input_name: str) -> dict | None:
    """{"mean": [...], "std": [...]} when the input goes first through ``Sub`` of a constant and then ``Div`` (or
    ``Mul``) by a constant, both per channel or scalar: the normalization an exported lingraft model bakes in.
    None for any other start of the graph."""
    import numpy as np
    from onnx import numpy_helper

    nodes = model.graph.node
    consts = _constants(model)

    def only_user(name: str, op_types: tuple[str, ...]):
        users = [n for n in nodes if name in n.input]
        if len(users) != 1 or users[0].op_type not in op_types or len(users[0].input) != 2:
            return None
        n = users[0]
        return n if n.input[0] == name and n.input[1] in consts else None

    sub = only_user(input_name, ("Sub",))
    scale = only_user(sub.output[0], ("Div", "Mul")) if sub is not None else None
    if scale is None:
        return None
    mean = np.asarray(numpy_helper.to_array(consts[sub.input[1]]), dtype=np.float64)
    factor = np.asarray(numpy_helper.to_array(consts[scale.input[1]]), dtype=np.float64)
    if np.squeeze(mean).ndim > 1 or np.squeeze(factor).ndim > 1 or not np.all(factor != 0):
        return None
    std = factor if scale.op_type == "Div" else 1.0 / factor
    return {"mean": mean.ravel().tolist(), "std": std.ravel().tolist()}
