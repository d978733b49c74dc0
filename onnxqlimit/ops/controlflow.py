"""Control flow. The Mirror builds each subgraph as a mirror of its own and hands it to the
converter in place of the graph attribute; the tensors a subgraph reads from the scope
around its node arrive as `scope` (ONNX lets a subgraph read them without declaring them).
"""
from __future__ import annotations

import torch

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


@register("Loop")
def _loop(node: Node):
    body = node.attr("body")
    if not hasattr(body, "run_subgraph"):
        raise node.unsupported("body graph missing")
    carried_count = len(node.inputs) - 2

    def fn(trips=None, cond=None, *initial, scope=None):
        # Eager, as onnxruntime runs it: the trip count and the condition are read each step.
        limit = int(trips) if trips is not None else None
        going = bool(cond) if cond is not None else True
        carried, scans, i = list(initial), None, 0
        while going and (limit is None or i < limit):
            step = torch.tensor(i, dtype=torch.int64, device=initial[0].device if initial else None)
            outs = body.run_subgraph(scope or {}, [step, torch.tensor(going), *carried])
            going, carried = bool(outs[0]), list(outs[1:1 + carried_count])
            scans = [[] for _ in outs[1 + carried_count:]] if scans is None else scans
            for collected, value in zip(scans, outs[1 + carried_count:]):
                collected.append(value)
            i += 1
        scan_count = len(node.outputs) - carried_count
        if scans is None:  # no iteration ran: empty scan outputs (their element shape is unknown here)
            stacked = [torch.zeros(0) for _ in range(scan_count)]
        else:
            stacked = [torch.stack(values) for values in scans]
        return (*carried, *stacked)
    return fn


@register("Scan")
def _scan(node: Node):
    body, m = node.attr("body"), node.attr("num_scan_inputs")
    if not hasattr(body, "run_subgraph") or m is None:
        raise node.unsupported("body graph or num_scan_inputs missing")
    if node.opset < 9:
        raise node.unsupported("opset < 9 (the form with a batch axis and sequence_lens)")
    in_axes, in_dirs = node.attr("scan_input_axes") or [0] * m, node.attr("scan_input_directions") or [0] * m

    def fn(*inputs, scope=None):
        n = len(inputs) - m
        states, scans = list(inputs[:n]), inputs[n:]
        axes = [a % s.dim() for a, s in zip(in_axes, scans)]
        length = scans[0].shape[axes[0]] if scans else 0
        collected: list[list] = []
        for t in range(length):
            slices = [s.select(axis, length - 1 - t if reverse else t)
                      for s, axis, reverse in zip(scans, axes, in_dirs)]
            outs = body.run_subgraph(scope or {}, [*states, *slices])
            states = list(outs[:n])
            collected = collected or [[] for _ in outs[n:]]
            for values, value in zip(collected, outs[n:]):
                values.append(value)
        k = len(node.outputs) - n
        out_axes = node.attr("scan_output_axes") or [0] * k
        out_dirs = node.attr("scan_output_directions") or [0] * k
        stacked = []
        for values, axis, reverse in zip(collected, out_axes, out_dirs):
            joined = torch.stack(values[::-1] if reverse else values)  # reverse: each element is prepended
            stacked.append(joined.movedim(0, axis % joined.dim()))
        return (*states, *stacked)
    return fn
