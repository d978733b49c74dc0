"""Hand-written reference architectures (plain torch.nn) and ONNX export helpers.

These exist so tests and the sample zoo can produce realistic ONNX graphs without
torchvision or downloads:

* ``ResNet`` / ``resnet18``: torchvision's ResNet-18 layout; the same class builds a
  small CIFAR-style ResNet (3x3 stem, no max-pool).
* ``MobileNetV2`` / ``mobilenet_v2``: inverted residuals, depthwise 3x3, ReLU6,
  linear bottlenecks; the same class builds a small variant.
* ``BertEncoder``: a BERT-style encoder with attention written out as
  MatMul/Softmax, so the exported graph has the ops a quantizer must handle.
* ``FaceNet24``: MTCNN's 24x24 refinement net (PReLU, ceil-mode pools, two heads).
* ``YoloV8``: a YOLOv8n-style anchor-free detector (C2f, SPPF, PAN-FPN, Detect) with
  the DFL/box decode in the graph, so the exported file ends like an Ultralytics one.
* ``export_onnx`` / ``export_reference_models`` / ``export_yolo`` / ``export_facenet``:
  export through the legacy TorchScript exporter (``dynamo=False``), which gives
  stable, simple graphs.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

# ----------------------------------------------------------------------------- ResNet


class BasicBlock(nn.Module):
    """Two 3x3 conv+BN, identity or 1x1-conv+BN shortcut, ReLU after the add."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet with BasicBlocks. ``stem="imagenet"``: 7x7/2 conv + max-pool;
    ``stem="cifar"``: 3x3/1 conv, no pool. Stage i>0 starts with stride 2."""

    def __init__(self, block_counts, widths, num_classes: int = 1000, stem: str = "imagenet", in_channels: int = 3):
        super().__init__()
        if stem == "imagenet":
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, widths[0], 7, 2, 3, bias=False), nn.BatchNorm2d(widths[0]),
                nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        elif stem == "cifar":
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]),
                nn.ReLU(inplace=True))
        else:
            raise ValueError(f"unknown stem {stem!r}")
        stages, cin = [], widths[0]
        for i, (n, w) in enumerate(zip(block_counts, widths)):
            blocks = [BasicBlock(cin, w, 1 if i == 0 else 2)] + [BasicBlock(w, w) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = w
        self.layers = nn.Sequential(*stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.avgpool(self.layers(self.stem(x)))
        return self.fc(torch.flatten(x, 1))


def resnet18(num_classes: int = 1000) -> ResNet:
    return ResNet([2, 2, 2, 2], [64, 128, 256, 512], num_classes, stem="imagenet")


# ----------------------------------------------------------------------- MobileNetV2


def _make_divisible(v: float, divisor: int = 8) -> int:
    """Round channels as torchvision does (never drop more than 10%)."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


def _conv_bn_relu6(cin, cout, k, stride, groups=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    """1x1 expand (skipped if t=1) -> depthwise 3x3 -> linear 1x1 project; residual
    add only when the shape is unchanged."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers = [] if expand == 1 else [_conv_bn_relu6(cin, hidden, 1, 1)]
        layers += [_conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


# (expansion t, channels c, repeats n, first stride s) as in the MobileNetV2 paper.
MBV2_IMAGENET = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                 (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


class MobileNetV2(nn.Module):
    def __init__(self, settings=MBV2_IMAGENET, num_classes: int = 1000, width_mult: float = 1.0,
                 stem_channels: int = 32, last_channels: int = 1280, stem_stride: int = 2,
                 in_channels: int = 3, dropout: float = 0.2):
        super().__init__()
        cin = _make_divisible(stem_channels * width_mult)
        last = _make_divisible(last_channels * max(1.0, width_mult))
        layers = [_conv_bn_relu6(in_channels, cin, 3, stem_stride)]
        for t, c, n, s in settings:
            cout = _make_divisible(c * width_mult)
            for i in range(n):
                layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        layers.append(_conv_bn_relu6(cin, last, 1, 1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def mobilenet_v2(num_classes: int = 1000, width_mult: float = 1.0) -> MobileNetV2:
    return MobileNetV2(MBV2_IMAGENET, num_classes, width_mult)


# ------------------------------------------------------------------------------ BERT


class _EncoderLayer(nn.Module):
    def __init__(self, hidden: int, heads: int, ffn: int):
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.query, self.key, self.value = (nn.Linear(hidden, hidden) for _ in range(3))
        self.attn_out = nn.Linear(hidden, hidden)
        self.ln1 = nn.LayerNorm(hidden, eps=1e-12)
        self.ffn_in = nn.Linear(hidden, ffn)
        self.ffn_out = nn.Linear(ffn, hidden)
        self.ln2 = nn.LayerNorm(hidden, eps=1e-12)

    def _split(self, x):  # [B,S,H] -> [B,heads,S,head_dim]
        b, s, _ = x.shape
        return x.view(b, s, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x, mask_bias):
        b, s, h = x.shape
        q, k, v = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim) + mask_bias
        ctx = torch.matmul(torch.softmax(scores, dim=-1), v).transpose(1, 2).reshape(b, s, h)
        x = self.ln1(x + self.attn_out(ctx))
        return self.ln2(x + self.ffn_out(nn.functional.gelu(self.ffn_in(x))))  # exact (erf) GELU


class BertEncoder(nn.Module):
    """forward(input_ids, attention_mask, token_type_ids) -> last_hidden_state [B,S,H]."""

    def __init__(self, vocab_size=1000, hidden=128, layers=2, heads=4, ffn=512, max_len=128, type_vocab=2):
        super().__init__()
        self.word = nn.Embedding(vocab_size, hidden)
        self.position = nn.Embedding(max_len, hidden)
        self.token_type = nn.Embedding(type_vocab, hidden)
        self.ln = nn.LayerNorm(hidden, eps=1e-12)
        self.layers = nn.ModuleList(_EncoderLayer(hidden, heads, ffn) for _ in range(layers))

    def forward(self, input_ids, attention_mask, token_type_ids):
        # arange(S) traced from the input shape keeps the sequence length dynamic.
        pos = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        x = self.ln(self.word(input_ids) + self.position(pos) + self.token_type(token_type_ids))
        mask_bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -10000.0  # [B,1,1,S]
        for layer in self.layers:
            x = layer(x, mask_bias)
        return x


# ---------------------------------------------------------------------- MTCNN RNet


class FaceNet24(nn.Module):
    """MTCNN's refinement net ("RNet") on a 24x24 RGB crop: three unpadded convs with
    per-channel PReLU, ceil-mode max-pools, a 128-wide FC layer, then two heads.
    forward(x) -> (prob [B,2] after softmax, box [B,4]). No BatchNorm, as in MTCNN."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 28, 3), nn.PReLU(28), nn.MaxPool2d(3, 2, ceil_mode=True),  # 22 -> 11
            nn.Conv2d(28, 48, 3), nn.PReLU(48), nn.MaxPool2d(3, 2, ceil_mode=True),  # 9 -> 4
            nn.Conv2d(48, 64, 2), nn.PReLU(64))  # 3x3x64
        self.fc = nn.Sequential(nn.Linear(64 * 3 * 3, 128), nn.PReLU(128))
        self.prob = nn.Linear(128, 2)
        self.box = nn.Linear(128, 4)
        # Kaiming (fan_in) keeps the activation scale through the stack; the PyTorch
        # default (weight variance 1/(3*fan_in)) shrinks it layer by layer, leaving the
        # softmax at 0.5 +- 0.04 for every crop.
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="leaky_relu", a=0.25)
                nn.init.normal_(m.bias, 0, 0.1)

    def forward(self, x):
        x = self.fc(torch.flatten(self.features(x), 1))
        return torch.softmax(self.prob(x), dim=1), self.box(x)


# -------------------------------------------------------------------------- YOLOv8


class Conv(nn.Module):
    """YOLOv8's Conv: Conv2d (no bias, 'same' padding) + BatchNorm + SiLU."""

    def __init__(self, cin: int, cout: int, k: int = 1, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3, momentum=0.03)  # Ultralytics' BN settings
        self.act = nn.SiLU(inplace=True)

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    def __init__(self, c: int, shortcut: bool):
        super().__init__()
        self.cv1, self.cv2 = Conv(c, c, 3), Conv(c, c, 3)
        self.add = shortcut

    def forward(self, x):
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    """1x1 conv, split in two halves; each bottleneck extends the list from the last
    tensor; every piece is concatenated into a final 1x1 conv."""

    def __init__(self, cin: int, cout: int, n: int = 1, shortcut: bool = False):
        super().__init__()
        self.c = cout // 2
        self.cv1 = Conv(cin, 2 * self.c, 1)
        self.cv2 = Conv((2 + n) * self.c, cout, 1)
        self.m = nn.ModuleList(Bottleneck(self.c, shortcut) for _ in range(n))

    def forward(self, x):
        y = list(self.cv1(x).split((self.c, self.c), 1))  # fixed sizes export as one Split node
        for m in self.m:
            y.append(m(y[-1]))
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    """Spatial pyramid pooling, fast: three chained 5x5/1 max-pools stand in for 5/9/13."""

    def __init__(self, cin: int, cout: int, k: int = 5):
        super().__init__()
        hidden = cin // 2
        self.cv1 = Conv(cin, hidden, 1)
        self.cv2 = Conv(hidden * 4, cout, 1)
        self.m = nn.MaxPool2d(k, 1, k // 2)

    def forward(self, x):
        y = [self.cv1(x)]
        for _ in range(3):
            y.append(self.m(y[-1]))
        return self.cv2(torch.cat(y, 1))


class Detect(nn.Module):
    """Anchor-free decoupled head with the decode in the graph.

    Per level: box branch -> 4*reg_max bin logits, class branch -> nc logits. DFL turns
    each side's bins into an expected distance (softmax, then a fixed 1x1 conv whose
    weights are 0..reg_max-1, as Ultralytics exports it); distances to the cell centre
    become xywh in pixels. Output [B, 4+nc, A], class scores after sigmoid.
    """

    def __init__(self, nc: int, channels, strides, reg_max: int = 16):
        super().__init__()
        self.nc, self.reg_max, self.strides = nc, reg_max, tuple(strides)
        c2, c3 = max(16, channels[0] // 4, 4 * reg_max), max(channels[0], min(nc, 100))
        self.box = nn.ModuleList(nn.Sequential(Conv(c, c2, 3), Conv(c2, c2, 3), nn.Conv2d(c2, 4 * reg_max, 1))
                                 for c in channels)
        self.cls = nn.ModuleList(nn.Sequential(Conv(c, c3, 3), Conv(c3, c3, 3), nn.Conv2d(c3, nc, 1))
                                 for c in channels)
        self.dfl = nn.Conv2d(reg_max, 1, 1, bias=False).requires_grad_(False)
        self.dfl.weight.data.copy_(torch.arange(reg_max, dtype=torch.float).view(1, reg_max, 1, 1))

    @staticmethod
    def _grid(sizes, strides):
        """Cell centres [2, A] and strides [1, A] for the (h, w) of each level. Built in
        numpy so the tracer sees finished constants (the grid is fixed for a fixed input
        size, as in an Ultralytics export) rather than a chain of Range/Expand ops."""
        points, scale = [], []
        for (h, w), s in zip(sizes, strides):
            ys, xs = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing="ij")
            points.append(np.stack((xs.ravel(), ys.ravel())))
            scale.append(np.full((1, h * w), s))
        return (torch.from_numpy(np.concatenate(a, 1).astype(np.float32)) for a in (points, scale))

    def raw(self, feats):
        """Head outputs before the decode, [B, 4*reg_max + nc, A] (bin and class logits;
        what a training loss reads), and the (h, w) of each level."""
        # Python-int sizes and -1 for the batch: constant Reshape shapes, dynamic batch.
        sizes = [(int(f.shape[2]), int(f.shape[3])) for f in feats]
        x = torch.cat([torch.cat((bx(f), cl(f)), 1).reshape(-1, 4 * self.reg_max + self.nc, h * w)
                       for f, bx, cl, (h, w) in zip(feats, self.box, self.cls, sizes)], 2)
        return x, sizes

    def forward(self, feats):
        x, sizes = self.raw(feats)
        anchors = sum(h * w for h, w in sizes)
        bins, logits = x.split((4 * self.reg_max, self.nc), 1)
        # [B, 4*R, A] -> [B, R, 4, A] so the bins are channels of the DFL conv.
        bins = bins.reshape(-1, 4, self.reg_max, anchors).transpose(1, 2).softmax(1)
        dist = self.dfl(bins).reshape(-1, 4, anchors)
        points, strides = self._grid(sizes, self.strides)
        lt, rb = dist.split((2, 2), 1)
        x1y1, x2y2 = points - lt, points + rb
        box = torch.cat(((x1y1 + x2y2) / 2, x2y2 - x1y1), 1) * strides
        return torch.cat((box, logits.sigmoid()), 1)


class YoloV8(nn.Module):
    """YOLOv8 detector (backbone P1-P5 at strides 2..32, PAN-FPN neck, Detect head).
    Defaults are YOLOv8n's scaling (width 0.25, depth 0.33 -> channels 16..256).
    forward(images [B,3,H,W], H and W multiples of 32) -> [B, 4+nc, A]."""

    def __init__(self, num_classes: int = 80, width: float = 0.25, depth: float = 0.33, max_channels: int = 1024,
                 reg_max: int = 16):
        super().__init__()

        def ch(c):  # width scaling, rounded up to a multiple of 8 like Ultralytics
            return math.ceil(min(c, max_channels) * width / 8) * 8

        def n(k):  # depth scaling, at least one block
            return max(round(k * depth), 1)

        c1, c2, c3, c4, c5 = ch(64), ch(128), ch(256), ch(512), ch(1024)
        self.p2 = nn.Sequential(Conv(3, c1, 3, 2), Conv(c1, c2, 3, 2), C2f(c2, c2, n(3), True))
        self.p3 = nn.Sequential(Conv(c2, c3, 3, 2), C2f(c3, c3, n(6), True))
        self.p4 = nn.Sequential(Conv(c3, c4, 3, 2), C2f(c4, c4, n(6), True))
        self.p5 = nn.Sequential(Conv(c4, c5, 3, 2), C2f(c5, c5, n(3), True), SPPF(c5, c5))
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.top4 = C2f(c5 + c4, c4, n(3))  # top-down path
        self.top3 = C2f(c4 + c3, c3, n(3))
        self.down3, self.out4 = Conv(c3, c3, 3, 2), C2f(c3 + c4, c4, n(3))  # bottom-up path
        self.down4, self.out5 = Conv(c4, c4, 3, 2), C2f(c4 + c5, c5, n(3))
        self.detect = Detect(num_classes, (c3, c4, c5), (8, 16, 32), reg_max)
        # For the head's plain 1x1 convs, so the logits reach a useful spread; the
        # Conv+BN layers are rescaled by fit_conv_scales anyway.
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and m is not self.detect.dfl:
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")

    def features(self, x):
        """The neck's three outputs at strides 8, 16, 32 (what the head reads)."""
        p3 = self.p3(self.p2(x))
        p4 = self.p4(p3)
        p5 = self.p5(p4)
        t4 = self.top4(torch.cat((self.up(p5), p4), 1))
        t3 = self.top3(torch.cat((self.up(t4), p3), 1))
        o4 = self.out4(torch.cat((self.down3(t3), t4), 1))
        o5 = self.out5(torch.cat((self.down4(o4), p5), 1))
        return [t3, o4, o5]

    def forward(self, x):
        return self.detect(self.features(x))


# ---------------------------------------------------------------------------- export


def export_onnx(model: nn.Module, example_args: tuple, path, opset: int, input_names, output_names, dynamic_axes,
                fold_bn: bool = False):
    """Export with the legacy TorchScript exporter in eval mode; returns the Path.

    With ``training=EVAL`` that exporter silently fuses Conv+BatchNorm. By default we
    export with ``PRESERVE`` on an eval-mode model instead, which keeps inference-mode
    ``BatchNormalization`` nodes in the graph so the quantizer's own BN folding has
    work to do; ``fold_bn=True`` gives the exporter's pre-fused graph.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # dynamo=False is deprecated but still works
        # PRESERVE makes the exporter warn about constant folding "in training mode"; the model is in eval.
        warnings.filterwarnings("ignore", message="It is recommended that constant folding be turned off")
        torch.onnx.export(model, tuple(example_args), str(path), dynamo=False, opset_version=opset,
                          input_names=list(input_names), output_names=list(output_names),
                          dynamic_axes=dynamic_axes, do_constant_folding=True,
                          training=torch.onnx.TrainingMode.EVAL if fold_bn else torch.onnx.TrainingMode.PRESERVE)
    return path


def randomize_bn_stats(model: nn.Module, gen: torch.Generator) -> None:
    """Give every BatchNorm non-trivial running stats and affine params so BN folding
    is really exercised (defaults 0/1 would make folding a no-op)."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=gen) * 0.5 + 0.75)
            m.weight.data.copy_(torch.rand(n, generator=gen) * 0.5 + 0.75)
            m.bias.data.copy_(torch.randn(n, generator=gen) * 0.1)


def export_reference_models(outdir, opset: int) -> dict[str, Path]:
    """Export random-weight ResNet-18, MobileNetV2 and BertEncoder to ``outdir``.

    Image models: input "input" [B,3,224,224] -> "logits", dynamic batch.
    BERT: input_ids/attention_mask/token_type_ids [B,S] int64 -> "last_hidden_state",
    dynamic batch and sequence. Weights come from torch.manual_seed(0).
    """
    outdir = Path(outdir)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    paths: dict[str, Path] = {}
    img = torch.randn(1, 3, 224, 224, generator=gen)
    for name, ctor in (("resnet18", resnet18), ("mobilenet_v2", mobilenet_v2)):
        model = ctor()
        randomize_bn_stats(model, gen)
        paths[name] = export_onnx(model, (img,), outdir / f"{name}_opset{opset}.onnx", opset, ["input"], ["logits"],
                                  {"input": {0: "batch"}, "logits": {0: "batch"}})
    bert = BertEncoder()
    b, s = 2, 16
    ids = torch.randint(0, 1000, (b, s), generator=gen)
    mask = torch.ones(b, s, dtype=torch.int64)
    mask[1, 12:] = 0
    types = torch.zeros(b, s, dtype=torch.int64)
    types[:, 8:] = 1
    names = ["input_ids", "attention_mask", "token_type_ids"]
    axes = {n: {0: "batch", 1: "sequence"} for n in names + ["last_hidden_state"]}
    paths["bert"] = export_onnx(bert, (ids, mask, types), outdir / f"bert_opset{opset}.onnx", opset, names,
                                ["last_hidden_state"], axes)
    return paths


def fit_conv_scales(model: nn.Module, x: torch.Tensor) -> None:
    """Rescale every Conv(+BN+SiLU) block's weights, in forward order, so that on `x` each
    output channel's std before the BN equals the BN's running std, as in a trained net.

    With random weights and random BN stats nothing renormalises the signal: with Kaiming
    init the activations of YOLOv8n fade to std ~0.1 (BN biases dominate, the input hardly
    matters), and a 20% larger gain already blows them up through the residuals and concats.
    """
    def rescale(block, args):
        y = block.conv(args[0])
        std = y.transpose(0, 1).flatten(1).std(1).clamp_min(1e-6)
        block.conv.weight.mul_((block.bn.running_var.sqrt() / std).view(-1, 1, 1, 1))

    hooks = [m.register_forward_pre_hook(rescale) for m in model.modules() if isinstance(m, Conv)]
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in hooks:
            h.remove()


def reference_yolo(size: int = 320, seed: int = 0) -> YoloV8:
    """Random-weight YOLOv8n in eval mode: seeded init, random BN stats, conv scales
    fitted on random images of `size`."""
    torch.manual_seed(seed)
    model = YoloV8()
    gen = torch.Generator().manual_seed(seed)
    randomize_bn_stats(model, gen)
    fit_conv_scales(model, torch.rand(4, 3, size, size, generator=gen))
    return model


def export_yolo(path, size: int = 320, opset: int = 13, seed: int = 0) -> Path:
    """Random-weight YOLOv8n: "images" [B,3,size,size] -> "output0" [B,84,A], dynamic batch.
    The anchor grid is baked in for `size`, as in an Ultralytics export."""
    model = reference_yolo(size, seed)
    images = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(seed))
    with warnings.catch_warnings():
        # Detect reads the feature sizes as Python ints on purpose (constant grid).
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return export_onnx(model, (images,), path, opset, ["images"], ["output0"],
                           {"images": {0: "batch"}, "output0": {0: "batch"}})


def export_facenet(path, opset: int = 13, seed: int = 0) -> Path:
    """Random-weight FaceNet24: "input" [B,3,24,24] -> "prob" [B,2], "box" [B,4], dynamic batch."""
    torch.manual_seed(seed)
    model = FaceNet24().eval()
    crops = torch.rand(1, 3, 24, 24, generator=torch.Generator().manual_seed(seed))
    return export_onnx(model, (crops,), path, opset, ["input"], ["prob", "box"],
                       {n: {0: "batch"} for n in ("input", "prob", "box")})
