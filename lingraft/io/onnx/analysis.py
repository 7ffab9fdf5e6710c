"""Static analysis of an ONNX graph: which input-dependent nodes the importer cannot convert, found before building.

Every problem is collected first so that one error lists them all.
"""

from __future__ import annotations

from lingraft.errors import UnsupportedModelError
from lingraft.io.onnx.common import (
    InputInfo,
    input_info,
    node_attrs,
    node_label,
    read_model,
    real_input,
)

__all__ = ["SUPPORTED_ONNX_OPS", "analyze", "check_supported", "list_unsupported_ops", "raise_problems"]

#: ONNX ops accepted on input-dependent tensors (anything may appear in constant sub-graphs, which are folded).
SUPPORTED_ONNX_OPS = frozenset(
    {
        "Add",
        "AveragePool",
        "BatchNormalization",
        "Cast",
        "Concat",
        "Conv",
        "Div",
        "Dropout",
        "Flatten",
        "Gemm",
        "GlobalAveragePool",
        "Identity",
        "MatMul",
        "MaxPool",
        "Mul",
        "Neg",
        "Pad",
        "Relu",
        "Reshape",
        "Shape",
        "Size",
        "Squeeze",
        "Sub",
        "Sum",
        "Transpose",
        "Unsqueeze",
    }
)


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
    if op in ("Conv", "MaxPool", "AveragePool") and any(x != 1 for x in a.get("dilations", [])):
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
    return None


def analyze(model, input_name: str) -> list[tuple[str, str, str]]:
    """Walk the graph once: (op_type, node label, detail) for every input-dependent node we cannot convert."""
    g = model.graph
    data = {input_name}
    problems = []
    for node in g.node:
        dep = [bool(i) and i in data for i in node.input]
        if not any(dep):
            continue  # constant sub-graph: folded
        if node.op_type in ("Shape", "Size") and node.domain in ("", "ai.onnx"):
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


def list_unsupported_ops(path) -> list[tuple[str, str]]:
    """(op_type, node_name) of every input-dependent ONNX node that :func:`load_onnx` cannot convert.

    Shape-level problems found only while building (e.g. a Conv on a 3-D tensor) are not listed; load_onnx
    reports those. Unreadable files raise LingraftError.
    """
    model = read_model(path)
    return [(op, name) for op, name, _ in analyze(model, real_input(model).name)]
