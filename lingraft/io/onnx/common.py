"""What the ONNX importer, exporter and runtime share: reading a file, node attributes and labels, the input.

The input follows the batch convention of the package docstring: :class:`InputInfo` says whether ONNX dim 0 is
the batch (*explicit*) or the whole ONNX tensor is one sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lingraft.errors import LingraftError, UnsupportedModelError

__all__ = ["InputInfo", "first_line", "input_info", "node_attrs", "node_label", "read_model", "real_input"]


def first_line(e: BaseException) -> str:
    """The first line of an exception message (at most 300 characters), for one-line errors."""
    s = str(e).strip().splitlines()
    return (s[0] if s else type(e).__name__)[:300]


def read_model(path) -> Any:
    """Load and check an ONNX file; any problem -> LingraftError with one line."""
    import onnx

    p = Path(path)
    if not p.exists():
        raise LingraftError(f"ONNX file not found: {p}; check the path")
    if p.is_dir():
        raise LingraftError(f"ONNX path is a directory: {p}; give the .onnx file itself")
    if p.stat().st_size == 0:
        raise LingraftError(f"ONNX file is empty: {p}; re-export the model")
    try:
        model = onnx.load(str(p))
    except Exception as e:  # DecodeError, bad external data, ...
        raise LingraftError(
            f"cannot parse {p} as ONNX ({type(e).__name__}: {first_line(e)}); is it an ONNX model file?"
        ) from None
    max_opset = onnx.defs.onnx_opset_version()
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx") and not 7 <= imp.version <= max_opset:
            raise LingraftError(
                f"{p} uses ONNX opset {imp.version}; lingraft reads opsets 7..{max_opset}: re-export it (e.g. opset 13)"
            )
    if len(model.graph.node) == 0 or len(model.graph.output) == 0:
        raise LingraftError(f"{p} is not a usable ONNX model (no graph nodes/outputs); is it an ONNX model file?")
    try:
        onnx.checker.check_model(str(p))
    except Exception as e:
        raise LingraftError(f"invalid ONNX model {p}: {first_line(e)}; re-export it") from None
    return model


def node_attrs(node) -> dict[str, Any]:
    """The attributes of an ONNX node as Python values (bytes for strings)."""
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def node_label(node) -> str:
    """How error messages name an ONNX node: its name, else its first output."""
    return node.name or (f"<{node.output[0]}>" if node.output else "<unnamed>")


@dataclass
class InputInfo:
    """The one ONNX input tensor, read with the batch convention."""

    name: str
    dims: list  # the ONNX dims (int, or str for symbolic)
    explicit: bool  # dim 0 is the batch
    per_sample: tuple  # the shape without batch
    np_dtype: Any


def real_input(model):
    """The one graph input that is not an initializer (old IR versions list initializers as inputs too)."""
    g = model.graph
    inits = {i.name for i in g.initializer}
    real = [i for i in g.input if i.name not in inits]
    if len(real) != 1:
        raise UnsupportedModelError(
            f"ONNX model has {len(real)} inputs ({', '.join(i.name for i in real)}); "
            "lingraft supports exactly one input tensor"
        )
    return real[0]


def input_info(model) -> InputInfo:
    """Name, dims, batch flag, per-sample shape and dtype of the model's input; UnsupportedModelError if unusable."""
    import onnx

    vi = real_input(model)
    if not vi.type.HasField("tensor_type"):
        raise UnsupportedModelError(f"ONNX input '{vi.name}' is not a tensor; lingraft needs one float tensor input")
    tt = vi.type.tensor_type
    dtypes = {
        onnx.TensorProto.FLOAT: np.float32,
        onnx.TensorProto.DOUBLE: np.float64,
        onnx.TensorProto.FLOAT16: np.float16,
    }
    if tt.elem_type not in dtypes:
        raise UnsupportedModelError(
            f"ONNX input '{vi.name}' has element type "
            f"{onnx.TensorProto.DataType.Name(tt.elem_type)}; lingraft needs a float input"
        )
    if not tt.HasField("shape"):
        raise UnsupportedModelError(f"ONNX input '{vi.name}' has no shape; re-export with a fixed input shape")
    dims = [
        d.dim_value if (d.HasField("dim_value") and d.dim_value > 0) else (d.dim_param or "?") for d in tt.shape.dim
    ]
    explicit = len(dims) >= 2 and (isinstance(dims[0], str) or dims[0] == 1)
    per = dims[1:] if explicit else dims
    if any(isinstance(d, str) for d in per):
        raise UnsupportedModelError(
            f"ONNX input '{vi.name}' has dynamic non-batch dims {dims}; lingraft needs a "
            "fixed per-sample shape (only dim 0 may be symbolic): re-export with static shapes"
        )
    return InputInfo(vi.name, dims, explicit, tuple(int(d) for d in per), dtypes[tt.elem_type])
