"""Recurrent ONNX ops: RNN, GRU, LSTM, run as eager loops over time.

One step function per op follows the ONNX equations (gate order and bias layout as the
spec gives them); the shared driver handles directions, `layout`, `sequence_lens`,
initial states and the outputs. Each step is one matmul per input and per state for all
gates together, so a time step costs two small GEMMs, not one per gate.

`sequence_lens`: an entry shorter than the sequence keeps its state from its last valid
step and gets zeros in Y after it; the reverse direction starts at each entry's own last
valid step, as onnxruntime runs it.
"""
from __future__ import annotations

from typing import Callable

import torch

from .registry import Node, get_converter, register

Activation = Callable[[torch.Tensor], torch.Tensor]

# Activation name -> (takes alpha, takes beta). Those that are ONNX ops run through the op's
# own converter (its defaults are the ones the recurrent ops use); Affine and ScaledTanh,
# which are not ops, are defined here.
_ACTIVATIONS: dict[str, tuple[bool, bool]] = {
    "Sigmoid": (False, False), "Tanh": (False, False), "Relu": (False, False), "Softsign": (False, False),
    "Softplus": (False, False), "LeakyRelu": (True, False), "ThresholdedRelu": (True, False), "Elu": (True, False),
    "HardSigmoid": (True, True), "Affine": (True, True), "ScaledTanh": (True, True),
}
_NOT_OPS: dict[str, Callable[..., Activation]] = {
    "Affine": lambda alpha=1.0, beta=0.0: lambda x: alpha * x + beta,
    "ScaledTanh": lambda alpha=1.0, beta=1.0: lambda x: alpha * torch.tanh(beta * x),
}


def _activation(name: str, attrs: dict) -> Activation:
    if name in _NOT_OPS:
        return _NOT_OPS[name](**attrs)
    return get_converter(name)(Node(name, f"{name}_activation", ("x",), ("y",), attrs))


def _activations(node: Node, defaults: list[str], directions: int) -> list[list[Activation]]:
    """Per direction, the op's activation functions. alpha/beta values are consumed, in
    order, by the functions that take them (as onnxruntime reads the attributes)."""
    names = node.attr("activations") or defaults * directions
    if len(names) != len(defaults) * directions:
        raise node.unsupported(f"{len(names)} activations given, {len(defaults) * directions} expected")
    alphas, betas = list(node.attr("activation_alpha") or []), list(node.attr("activation_beta") or [])
    canonical = {k.lower(): k for k in _ACTIVATIONS}
    found = []
    for given in names:
        name = canonical.get(given.lower())
        if name is None:
            raise node.unsupported(f"activation {given} (supported: {', '.join(sorted(canonical))})")
        takes_alpha, takes_beta = _ACTIVATIONS[name]
        attrs = {}
        if takes_alpha and alphas:
            attrs["alpha"] = alphas.pop(0)
        if takes_beta and betas:
            attrs["beta"] = betas.pop(0)
        found.append(_activation(name, attrs))
    k = len(defaults)
    return [found[d * k:(d + 1) * k] for d in range(directions)]


def _lstm_step(acts: list[Activation], hidden: int, clip: float | None, input_forget: bool):
    f, g, h = acts

    def step(x_proj, state, r, rb, p):
        h_prev, c_prev = state
        gates = x_proj + h_prev @ r.T + rb
        i, o, fg, c = gates.split(hidden, dim=-1)
        if p is not None:
            pi, po, pf = p.split(hidden)
            i, fg = i + pi * c_prev, fg + pf * c_prev
        if clip is not None:  # the spec clips every activation's input
            i, fg, c = (t.clamp(-clip, clip) for t in (i, fg, c))
        i = f(i)
        fg = 1 - i if input_forget else f(fg)
        c_new = fg * c_prev + i * g(c)
        if p is not None:
            o = o + po * c_new
        if clip is not None:
            o = o.clamp(-clip, clip)
        h_new = f(o) * h(c_new)
        return h_new, (h_new, c_new)
    return step


def _gru_step(acts: list[Activation], hidden: int, clip: float | None, linear_before_reset: bool):
    f, g = acts

    def step(x_proj, state, r, rb, p):
        (h_prev,) = state
        xz, xr, xh = x_proj.split(hidden, dim=-1)
        rz, rr, rh = r.split(hidden)
        bz, br, bh = rb.split(hidden)
        z, rg = xz + h_prev @ rz.T + bz, xr + h_prev @ rr.T + br
        if clip is not None:
            z, rg = z.clamp(-clip, clip), rg.clamp(-clip, clip)
        z, rg = f(z), f(rg)
        cand = xh + (rg * (h_prev @ rh.T + bh) if linear_before_reset else (rg * h_prev) @ rh.T + bh)
        if clip is not None:
            cand = cand.clamp(-clip, clip)
        h_new = (1 - z) * g(cand) + z * h_prev
        return h_new, (h_new,)
    return step


def _rnn_step(acts: list[Activation], hidden: int, clip: float | None):
    (f,) = acts

    def step(x_proj, state, r, rb, p):
        pre = x_proj + state[0] @ r.T + rb
        h_new = f(pre.clamp(-clip, clip) if clip is not None else pre)
        return h_new, (h_new,)
    return step


def _recurrent(node: Node, gates: int, defaults: list[str], make_step, n_states: int):
    """The converter shared by the three ops: `gates` blocks of hidden rows in W and R,
    `make_step(activations, hidden, clip)` the per-direction step."""
    direction = node.attr("direction", "forward")
    if direction not in ("forward", "reverse", "bidirectional"):
        raise node.unsupported(f"direction {direction!r}")
    directions = 2 if direction == "bidirectional" else 1
    hidden = node.attr("hidden_size")
    if hidden is None:
        raise node.unsupported("hidden_size attribute missing")
    layout = node.attr("layout", 0)
    clip = node.attr("clip")
    steps = [make_step(acts, hidden, clip) for acts in _activations(node, defaults, directions)]
    reverse = [direction == "reverse" or d == 1 for d in range(directions)]

    def fn(x, w, r, b=None, seq_lens=None, *states_and_p):
        initial = list(states_and_p[:n_states]) + [None] * (n_states - len(states_and_p[:n_states]))
        p = states_and_p[n_states] if len(states_and_p) > n_states else None
        if layout == 1:  # [batch, seq, input] -> [seq, batch, input]
            x = x.transpose(0, 1)
            initial = [s.transpose(0, 1) if s is not None else None for s in initial]
        seq, batch = x.shape[0], x.shape[1]
        if b is None:
            b = x.new_zeros(directions, 2 * gates * hidden)
        lens = seq_lens.long().to(x.device) if seq_lens is not None else None
        ys, finals = [], []
        for d in range(directions):
            wb, rb = b[d].split(gates * hidden)
            x_proj = x @ w[d].T + wb  # every step's input projection at once: [seq, batch, gates*hidden]
            state = tuple(s[d] if s is not None else x.new_zeros(batch, hidden) for s in initial)
            out = x.new_zeros(seq, batch, hidden)
            rows = torch.arange(batch, device=x.device)
            for t in range(seq):
                if lens is None:
                    src = seq - 1 - t if reverse[d] else t
                    h_new, new_state = steps[d](x_proj[src], state, r[d], rb, p[d] if p is not None else None)
                    out[src], state = h_new, new_state
                    continue
                # Per entry: the step it reads (reverse: from its own last valid step), and whether it is valid.
                valid = (t < lens).unsqueeze(-1)
                src = ((lens - 1 - t).clamp(min=0) if reverse[d] else torch.full_like(lens, t)).clamp(max=seq - 1)
                step_in = x_proj[src, rows]
                h_new, new_state = steps[d](step_in, state, r[d], rb, p[d] if p is not None else None)
                state = tuple(torch.where(valid, n, o) for n, o in zip(new_state, state))
                out = out.index_put((src, rows), torch.where(valid, h_new, out[src, rows]))
            ys.append(out)
            finals.append(state)
        y = torch.stack(ys, dim=1)  # [seq, num_directions, batch, hidden]
        final = [torch.stack([s[i] for s in finals]) for i in range(n_states)]  # [num_directions, batch, hidden]
        if layout == 1:
            y, final = y.permute(2, 0, 1, 3), [s.transpose(0, 1) for s in final]
        return (y, *final)

    return fn


@register("RNN")
def _rnn(node: Node):
    return _recurrent(node, 1, ["Tanh"], _rnn_step, 1)


@register("GRU")
def _gru(node: Node):
    linear_before_reset = bool(node.attr("linear_before_reset", 0))
    return _recurrent(node, 3, ["Sigmoid", "Tanh"],
                      lambda acts, hidden, clip: _gru_step(acts, hidden, clip, linear_before_reset), 1)


@register("LSTM")
def _lstm(node: Node):
    input_forget = bool(node.attr("input_forget", 0))
    return _recurrent(node, 4, ["Sigmoid", "Tanh", "Tanh"],
                      lambda acts, hidden, clip: _lstm_step(acts, hidden, clip, input_forget), 2)
