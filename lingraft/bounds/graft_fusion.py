"""Fusing the ONNX form of a grafted ReLU back into one grafted ReLU operator."""

from __future__ import annotations

import torch

from lingraft.bounds.nodes import GraphNode, renumber
from lingraft.bounds.ops import AddOp, ElementwiseAffineOp, ReLUOp


def fuse_grafted_relus(nodes: list[GraphNode]) -> list[GraphNode]:
    """Rewrite relu(s*x) + t*x (+ c) back into one grafted ReLU operator.

    That is how a GraftedReLU is written in ONNX (Mul, Relu, Mul, Add, Add) and how an imported grafted network
    arrives. Fused, its grafted neurons (s = 0) are exact linear maps a = t, b = c that need no pre-activation
    bounds and are never branched on, and the patch-mode conv passes apply again. Only the exact pattern is
    fused: s in {0, 1} per neuron, t = c = 0 where s = 1, every intermediate node used once.
    """

    def scale_only(i):
        """nodes[i]'s op when it is x * scale (no shift) used once, else None."""
        op = nodes[i].op
        if not isinstance(op, ElementwiseAffineOp) or len(nodes[i].consumers) != 1 or bool(op.shift.any()):
            return None
        return op

    replaced: dict[int, GraphNode] = {}  # index of the pattern's last node -> fused node
    removed: set[int] = set()
    for k, nd in enumerate(nodes):
        if not isinstance(nd.op, AddOp) or nd.op.alpha != 1.0 or len(set(nd.inputs)) != 2:
            continue
        for r, m2 in (nd.inputs, nd.inputs[::-1]):
            rop = nodes[r].op
            if not isinstance(rop, ReLUOp) or rop.mask is not None or len(nodes[r].consumers) != 1:
                continue
            m1 = nodes[r].inputs[0]
            op1, op2 = scale_only(m1), scale_only(m2)
            if op1 is None or op2 is None or nodes[m1].inputs != nodes[m2].inputs or m1 in removed or m2 in removed:
                continue
            sc, t = op1.scale, op2.scale
            if not bool(((sc == 0) | (sc == 1)).all()) or bool((t[sc == 1] != 0).any()):
                continue
            last, c = k, torch.zeros_like(t)
            if len(nd.consumers) == 1:
                opc = nodes[nd.consumers[0]].op
                if (
                    isinstance(opc, ElementwiseAffineOp)
                    and bool((opc.scale == 1).all())
                    and not bool((opc.shift.expand_as(t)[sc == 1] != 0).any())
                ):
                    last, c = nd.consumers[0], opc.shift.expand_as(t).clone()
            graft = sc == 0
            fused = GraphNode(
                nodes[r].name,
                ReLUOp(nodes[r].shape, graft, t, c),
                list(nodes[m1].inputs),
                nodes[r].shape,
                nodes[r].module_name,
            )
            replaced[last] = fused
            removed |= {m1, r, m2, k} - {last}
            break
    if not replaced:
        return nodes
    return renumber(
        [replaced.get(i, nd) for i, nd in enumerate(nodes)], [i for i in range(len(nodes)) if i not in removed]
    )
