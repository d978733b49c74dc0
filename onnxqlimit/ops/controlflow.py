"""Control flow. The Mirror builds each subgraph as a mirror of its own and hands it to the
converter in place of the graph attribute; the tensors a subgraph reads from the scope
around its node arrive as `scope` (ONNX lets a subgraph read them without declaring them).
"""
from __future__ import annotations

from .registry import Node, register


@register("If")
def _if(node: Node):
    branches = node.attr("then_branch"), node.attr("else_branch")
    if not all(hasattr(b, "run_subgraph") for b in branches):
        raise node.unsupported("then_branch and else_branch are both required")

    def fn(cond, scope=None):
        # The branch is chosen on the runtime value, as onnxruntime does: calibration sees the
        # branch each batch takes (a batch is one condition).
        taken = branches[0] if bool(cond.reshape(-1)[0]) else branches[1]
        return tuple(taken.run_subgraph(scope or {}))
    return fn
