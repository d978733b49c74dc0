"""Hand-written reference architectures (plain torch.nn) and ONNX export helpers.

These exist so tests and the sample zoo can produce realistic ONNX graphs without
torchvision or downloads:

* ``ResNet`` / ``resnet18``: torchvision's ResNet-18 layout; the same class builds a
  small CIFAR-style ResNet (3x3 stem, no max-pool).
* ``MobileNetV2`` / ``mobilenet_v2``: inverted residuals, depthwise 3x3, ReLU6,
  linear bottlenecks; the same class builds a small variant.
* ``BertEncoder``: a BERT-style encoder with attention written out as
  MatMul/Softmax, so the exported graph has the ops a quantizer must handle.
* ``export_onnx`` / ``export_reference_models``: export through the legacy
  TorchScript exporter (``dynamo=False``), which gives stable, simple graphs.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path

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
