"""The two recurrent models of tools/streaming_models.py: torch modules (trained there) and
the ONNX graphs built from their weights with onnx.helper (opset 17): the VAD with its LSTM
inside an If on the sample rate, the GRU keyword spotter, and the keyword spotter with its
GRU unrolled into per-step nodes (the --time-check twin). Layouts: tools/streaming_models.py.
"""
from __future__ import annotations

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from tools import audio_data as A

CHUNK, OPSET = 512, 17


# ------------------------------------------------------------------------- torch models

class VadNet(nn.Module):
    def __init__(self, hidden: int = 64, ch: int = 32):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv1d(1, ch, 64, stride=16), nn.Conv1d(ch, ch, 3, padding=1)
        self.conv16, self.conv8 = nn.Conv1d(ch, ch, 3, stride=2), nn.Conv1d(ch, ch, 3, padding=1)
        self.lstm, self.head, self.hidden = nn.LSTM(ch, hidden), nn.Linear(hidden, 1), hidden

    def forward(self, x, state, sr16: bool = True):
        """x [B, C, 512]: C consecutive chunks; state [2, B, H] -> (logits [B, C], state).
        The conv front-end does not depend on the state, so one LSTM call over the C chunks'
        steps equals running them one chunk at a time."""
        b, c, n = x.shape
        f = F.relu(self.conv2(F.relu(self.conv1(x.reshape(b * c, 1, n)))))
        f = F.relu((self.conv16 if sr16 else self.conv8)(f))
        t = f.shape[-1]
        seq = f.reshape(b, c, -1, t).permute(1, 3, 0, 2).reshape(c * t, b, -1)
        y, (h, cc) = self.lstm(seq, (state[:1].contiguous(), state[1:].contiguous()))
        return self.head(F.relu(y[t - 1::t]))[..., 0].T, torch.cat([h, cc])


class KwsNet(nn.Module):
    def __init__(self, hidden: int = 64, ch: int = 64, mels: int = A.MELS, classes: int = len(A.KWS_CLASSES)):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv1d(mels, ch, 3, padding=1), nn.Conv1d(ch, ch, 3, stride=2, padding=1)
        self.gru, self.head = nn.GRU(ch, hidden), nn.Linear(hidden, classes)

    def forward(self, x):  # [B, T, mels] -> logits
        f = F.relu(self.conv2(F.relu(self.conv1(x.transpose(1, 2)))))
        return self.head(self.gru(f.permute(2, 0, 1))[1][0])


# ------------------------------------------------------------------------- ONNX builders

def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().astype(np.float32)


def layer_weights(net: nn.Module, *names: str) -> dict[str, np.ndarray]:
    """{name_w, name_b} of the named conv/linear layers."""
    return {f"{n}_{k}": _np(getattr(getattr(net, n), a)) for n in names for k, a in (("w", "weight"), ("b", "bias"))}


def rnn_weights(rnn: nn.Module, order: list[int]) -> dict[str, np.ndarray]:
    """torch single-layer LSTM/GRU -> ONNX W, R, B with the gate blocks in `order`."""
    h = rnn.hidden_size
    idx = np.concatenate([np.arange(g * h, (g + 1) * h) for g in order])
    return {"W": _np(rnn.weight_ih_l0)[idx][None], "R": _np(rnn.weight_hh_l0)[idx][None],
            "B": np.concatenate([_np(rnn.bias_ih_l0)[idx], _np(rnn.bias_hh_l0)[idx]])[None]}


LSTM_ORDER, GRU_ORDER = [0, 3, 1, 2], [1, 0, 2]  # torch i,f,g,o -> ONNX i,o,f,c; r,z,n -> z,r,h


def _vi(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def _model(nodes, inputs, outputs, inits: dict) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(np.asarray(v), k)
                                                            for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def vad_onnx(net: VadNet) -> onnx.ModelProto:
    h = net.hidden
    inits = {**layer_weights(net, "conv1", "conv2", "conv16", "conv8", "head"), "axis1": np.array([1], np.int64),
             **{f"lstm_{k}": v for k, v in rnn_weights(net.lstm, LSTM_ORDER).items()},
             "axis0": np.array([0], np.int64), "halves": np.array([1, 1], np.int64),
             "sr16k": np.array(16000, np.int64)}

    def branch(name: str, **conv):
        return helper.make_graph(
            [helper.make_node("Conv", ["feat", f"{name}_w", f"{name}_b"], [f"{name}_y"], **conv),
             helper.make_node("Relu", [f"{name}_y"], [f"{name}_act"]),
             helper.make_node("Transpose", [f"{name}_act"], [f"{name}_seq"], perm=[2, 0, 1]),
             helper.make_node("LSTM", [f"{name}_seq", "lstm_W", "lstm_R", "lstm_B", "", "h0", "c0"],
                              ["", f"{name}_h", f"{name}_c"], hidden_size=h)],
            name, [], [_vi(f"{name}_h", [1, "batch", h]), _vi(f"{name}_c", [1, "batch", h])])

    nodes = [helper.make_node("Unsqueeze", ["input", "axis1"], ["x3"]),
             helper.make_node("Conv", ["x3", "conv1_w", "conv1_b"], ["c1"], strides=[16]),
             helper.make_node("Relu", ["c1"], ["a1"]),
             helper.make_node("Conv", ["a1", "conv2_w", "conv2_b"], ["c2"], pads=[1, 1]),
             helper.make_node("Relu", ["c2"], ["feat"]),
             helper.make_node("Split", ["state", "halves"], ["h0", "c0"], axis=0),
             helper.make_node("Equal", ["sr", "sr16k"], ["is16k"]),
             helper.make_node("If", ["is16k"], ["h", "c"], then_branch=branch("conv16", strides=[2]),
                              else_branch=branch("conv8", pads=[1, 1])),
             helper.make_node("Concat", ["h", "c"], ["stateN"], axis=0),
             helper.make_node("Squeeze", ["h", "axis0"], ["last"]),
             helper.make_node("Relu", ["last"], ["last_act"]),
             helper.make_node("Gemm", ["last_act", "head_w", "head_b"], ["logit"], transB=1),
             helper.make_node("Sigmoid", ["logit"], ["prob"])]
    inputs = [_vi("input", ["batch", CHUNK]), _vi("state", [2, "batch", h]), _vi("sr", [], TensorProto.INT64)]
    return _model(nodes, inputs, [_vi("prob", ["batch", 1]), _vi("stateN", [2, "batch", h])], inits)


def kws_onnx(net: KwsNet, frames: int = A.FRAMES, unrolled: bool = False) -> onnx.ModelProto:
    """The KWS graph; unrolled=True: the GRU as per-step MatMul/Add/Split/Sigmoid/Tanh/Mul nodes."""
    h, classes = net.gru.hidden_size, net.head.out_features
    w = rnn_weights(net.gru, GRU_ORDER)
    inits = {**layer_weights(net, "conv1", "conv2", "head"), "axis0": np.array([0], np.int64)}
    nodes = [helper.make_node("Transpose", ["feats"], ["x"], perm=[0, 2, 1]),
             helper.make_node("Conv", ["x", "conv1_w", "conv1_b"], ["c1"], pads=[1, 1]),
             helper.make_node("Relu", ["c1"], ["a1"]),
             helper.make_node("Conv", ["a1", "conv2_w", "conv2_b"], ["c2"], pads=[1, 1], strides=[2]),
             helper.make_node("Relu", ["c2"], ["a2"]),
             helper.make_node("Transpose", ["a2"], ["seq"], perm=[2, 0, 1])]
    if not unrolled:
        inits.update({f"gru_{k}": v for k, v in w.items()})
        nodes.append(helper.make_node("GRU", ["seq", "gru_W", "gru_R", "gru_B"], ["", "h"], hidden_size=h,
                                      linear_before_reset=1))
    else:
        nodes += _unrolled_gru(w, (frames - 1) // 2 + 1, inits)
    nodes += [helper.make_node("Squeeze", ["h", "axis0"], ["last"]),
              helper.make_node("Gemm", ["last", "head_w", "head_b"], ["logits"], transB=1)]
    return _model(nodes, [_vi("feats", ["batch", frames, net.conv1.in_channels])], [_vi("logits", ["batch", classes])],
                  inits)


def _unrolled_gru(w: dict, steps: int, inits: dict) -> list:
    """GRU (linear_before_reset=1, zero initial state) over `seq` [steps, B, C] -> `h` [1, B, H]:
    z = s(xz + hz), r = s(xr + hr), n = tanh(xn + r * hn), h' = n + z * (h - n), where
    x* = x W^T + Wb (one MatMul for all steps) and h* = h R^T + Rb (one MatMul per step)."""
    hid = w["R"].shape[-1]
    wb, rb = w["B"][0, :3 * hid], w["B"][0, 3 * hid:]
    inits.update({"gru_Wt": w["W"][0].T.copy(), "gru_Wb": wb, "gru_Rt": w["R"][0].T.copy(), "gru_Rb": rb,
                  "gru_Rb_z": rb[:hid], "gru_Rb_r": rb[hid:2 * hid], "gru_Rb_n": rb[2 * hid:],
                  "gates": np.array([hid] * 3, np.int64), "steps": np.ones(steps, np.int64)})
    mk = helper.make_node
    nodes = [mk("MatMul", ["seq", "gru_Wt"], ["gx_mm"]), mk("Add", ["gx_mm", "gru_Wb"], ["gx"]),
             mk("Split", ["gx", "steps"], [f"gx{t}" for t in range(steps)], axis=0)]
    prev = None
    for t in range(steps):
        s = f"_{t}"
        nodes.append(mk("Split", [f"gx{t}", "gates"], ["xz" + s, "xr" + s, "xn" + s], axis=2))
        if prev is None:
            hz, hr, hn = "gru_Rb_z", "gru_Rb_r", "gru_Rb_n"
        else:
            hz, hr, hn = "hz" + s, "hr" + s, "hn" + s
            nodes += [mk("MatMul", [prev, "gru_Rt"], ["gh_mm" + s]), mk("Add", ["gh_mm" + s, "gru_Rb"], ["gh" + s]),
                      mk("Split", ["gh" + s, "gates"], [hz, hr, hn], axis=2)]
        nodes += [mk("Add", ["xz" + s, hz], ["zp" + s]), mk("Sigmoid", ["zp" + s], ["z" + s]),
                  mk("Add", ["xr" + s, hr], ["rp" + s]), mk("Sigmoid", ["rp" + s], ["r" + s]),
                  mk("Mul", ["r" + s, hn], ["rh" + s]), mk("Add", ["xn" + s, "rh" + s], ["np" + s]),
                  mk("Tanh", ["np" + s], ["n" + s])]
        out = "h" if t == steps - 1 else "h" + s
        if prev is None:
            nodes += [mk("Mul", ["z" + s, "n" + s], ["zn" + s]), mk("Sub", ["n" + s, "zn" + s], [out])]
        else:
            nodes += [mk("Sub", [prev, "n" + s], ["d" + s]), mk("Mul", ["z" + s, "d" + s], ["zd" + s]),
                      mk("Add", ["n" + s, "zd" + s], [out])]
        prev = out
    return nodes
