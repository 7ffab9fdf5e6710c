"""The nodes of the bound engine's graph (built by :mod:`lingraft.bounds.graph`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from lingraft.bounds.ops.base import BoundOp


@dataclass
class GraphNode:
    """One operator applied to earlier nodes. ``shape`` is the per-sample output shape (no batch)."""

    name: str
    op: BoundOp | None  # None for the input node
    inputs: list[int]
    shape: tuple
    module_name: str | None = None
    consumers: list[int] = field(default_factory=list)

    @property
    def bound_op(self) -> BoundOp:
        """The operator of a node that has one (every node but the input)."""
        if self.op is None:
            raise RuntimeError(f"graph node {self.name!r} is the input; it has no operator")
        return self.op


def renumber(nodes: list[GraphNode], order: list[int]) -> list[GraphNode]:
    """Keep nodes[order] (ascending, closed under inputs), renumber their inputs and refill consumers."""
    remap = {old: new for new, old in enumerate(order)}
    out = []
    for old in order:
        nd = nodes[old]
        nd.inputs = [remap[i] for i in nd.inputs]
        nd.consumers = []
        out.append(nd)
    for i, nd in enumerate(out):
        for j in nd.inputs:
            out[j].consumers.append(i)
    return out
