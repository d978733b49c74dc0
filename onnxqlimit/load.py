"""Stage 1: read an ONNX model and bring it into the form the mirror and export expect.

checker -> opset raised to a common floor -> onnxsim (falls back with a warning) ->
Constant-held weights turned into initializers -> BatchNormalization folded into the
preceding Conv/ConvTranspose/Gemm -> shape inference. The user's metadata_props survive
(PP-OCR rec keeps its character dictionary there); onnxsim's bookkeeping keys do not.
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

from . import weights
from .errors import QLimitError
from .graph import all_graphs, all_nodes, consumers, node_attr, subgraphs, topological_sort
from .weights import TWO_GB

log = logging.getLogger("onnxqlimit")


@dataclass
class LoadConfig:
    simplify: bool = True
    # Opset 13 brings per-channel Q/DQ (`axis`) and the input forms of Split/Squeeze/...
    min_opset: int = 13
    fold_batchnorm: bool = True


def read_model(source: str | os.PathLike | onnx.ModelProto) -> onnx.ModelProto:
    """Read a model file with a one-line error on failure. External data is read into the
    proto up to weights.IN_MEMORY_LIMIT; above it, tensors stay on disk (weights.py)."""
    if isinstance(source, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(source)
        return model
    path = Path(source)
    if not path.is_file():
        raise QLimitError(f"{path}: no such model file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # protobuf/IO errors come in many types
        raise QLimitError(f"{path}: not a readable ONNX model ({_first_line(err)})") from None
    if not weights.on_disk(model):
        return model
    for tensor in weights.external_tensors(model):
        location = onnx.external_data_helper.ExternalDataInfo(tensor).location
        data = path.parent / location
        if not location or Path(location).is_absolute() or ".." in Path(location).parts:
            raise QLimitError(f"{path}: tensor '{tensor.name}' has external data outside the model's folder ({location!r})")
        if not data.is_file():
            raise QLimitError(f"{path}: external data file {location} (tensor '{tensor.name}') is missing")
    weights.set_basepath(model, path.parent)
    size = weights.model_bytes(model)
    if size <= weights.IN_MEMORY_LIMIT:
        weights.load_data(model)
        return model
    try:  # from the file: the checker finds the data files beside it (see _check)
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as err:
        raise _invalid(err) from None
    log.info("%s: %.1f GB of weights stay on disk, mapped as they are read", path.name, size / 1e9)
    return model


def uses_external_data(source) -> bool:
    """Whether a model file keeps (some of) its tensors in external data files."""
    if isinstance(source, onnx.ModelProto):
        return False
    try:
        model = onnx.load(str(source), load_external_data=False)
    except Exception:  # noqa: BLE001 - read_model reports unreadable files
        return False
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def load_model(source: str | os.PathLike | onnx.ModelProto, config: LoadConfig | None = None) -> onnx.ModelProto:
    config = config or LoadConfig()
    model = read_model(source)
    metadata = [(p.key, p.value) for p in model.metadata_props]
    original_initializers = {t.name for t in model.graph.initializer}
    topological_sort(model.graph)
    large = model.ByteSize() > TWO_GB
    try:
        _check(model)
    except onnx.checker.ValidationError as err:
        raise _invalid(err) from None

    model = _raise_opset(model, config.min_opset)
    constants_to_initializers(model.graph)
    if config.simplify and (large or weights.on_disk(model)):
        log.warning("model weights stay on disk (over 2 GB): skipping onnxsim simplification")
    elif config.simplify:
        model = _simplify(model)
        constants_to_initializers(model.graph)
    fold_subgraph_constants(model)
    if config.fold_batchnorm:
        fold_batchnorm(model.graph)
    _name_nodes(model.graph)
    _name_new_initializers(model.graph, original_initializers)
    model = _infer_shapes(model)

    del model.metadata_props[:]
    for key, value in metadata:
        model.metadata_props.add(key=key, value=value)
    return model


def _check(model: onnx.ModelProto) -> None:
    """onnx.checker on a model in memory. Over 2 GB it cannot serialise the proto, and for
    tensors kept on disk it looks for their files beside the working folder: read_model
    checked such a model from its file instead."""
    if model.ByteSize() <= TWO_GB and not weights.on_disk(model):
        onnx.checker.check_model(model)


def _invalid(err: Exception) -> QLimitError:
    return QLimitError(f"invalid ONNX model: {' '.join(str(err).split())[:300]}")


def _name_nodes(graph: onnx.GraphProto) -> None:
    """Give unnamed nodes unique names: reports, --exclude and --bits refer to nodes by name.
    A node that onnxsim made (a Gemm fused from MatMul + Add) is named after its output,
    which keeps the user's tensor name, rather than after its position."""
    taken = {n.name for n in all_nodes(graph) if n.name}
    for index, node in enumerate(all_nodes(graph)):  # (subgraph nodes too: the policy names them)
        if not node.name:
            name = node.output[0] if node.output and node.output[0] else f"{node.op_type}_{index}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)


_ROLES = {("Conv", 1): "weight", ("Conv", 2): "bias", ("ConvTranspose", 1): "weight", ("ConvTranspose", 2): "bias",
          ("Gemm", 1): "weight", ("Gemm", 2): "bias", ("MatMul", 1): "weight"}


def _name_new_initializers(graph: onnx.GraphProto, original: set[str]) -> None:
    """Initializers made while loading (constants folded by onnxsim, BatchNorm folded into a
    convolution) get generated names such as `_v_81` that map back to nothing in the user's
    model: name each after the node that reads it (`<node>.weight`, `<node>.bias`)."""
    readers = consumers(graph, inside=True)
    in_main = {n.name for n in graph.node}  # (node names are unique across scopes: _name_nodes)
    inputs = {v.name for v in graph.input}
    taken = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output} | \
        inputs | {v.name for v in graph.output}
    for init in graph.initializer:
        found = readers.get(init.name, [])
        # (a constant lifted out of a subgraph keeps the name its Constant gave it)
        if init.name in original or init.name in inputs or len(found) != 1 or found[0].name not in in_main:
            continue
        node = readers[init.name][0]  # one reader, reading it once
        index = list(node.input).index(init.name)
        name = f"{node.name}.{_ROLES.get((node.op_type, index), f'input{index}')}"
        while name in taken:
            name += "_"
        taken.add(name)
        node.input[index], init.name = name, name


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def default_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    return 0


def _raise_opset(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    current = default_opset(model)
    if current >= target:
        return model
    try:
        converted = onnx.version_converter.convert_version(model, target)
        _check(converted)
        return converted
    except Exception as err:
        log.warning("could not convert opset %d -> %d (%s); keeping opset %d", current, target, _first_line(err), current)
        return model


# onnxsim passes that rewrite standard subgraphs into onnxruntime's contrib ops
# (com.microsoft Attention, GroupQueryAttention): the output is to stay a standard ONNX
# file that any runtime takes, and the mirror runs standard ops only.
CONTRIB_FUSIONS = ["fuse_attention", "fuse_gqa"]
# Fusions into newer standard ops, skipped on a second try when the mirror lacks them.
NEWER_OP_FUSIONS = ["fuse_rms_norm", "fuse_rope", "fuse_gelu"]


def _simplify(model: onnx.ModelProto) -> onnx.ModelProto:
    from .mirror import unsupported_op_counts

    before = set(unsupported_op_counts(model))
    for skipped in (CONTRIB_FUSIONS, CONTRIB_FUSIONS + NEWER_OP_FUSIONS):
        simplified = _run_onnxsim(model, skipped)
        if simplified is None:
            return model
        new = sorted(set(unsupported_op_counts(simplified)) - before)
        if not new:
            return simplified
    log.warning("onnxsim fused ops into %s, which cannot be mirrored; continuing with the unsimplified model",
                ", ".join(new))
    return model


def _run_onnxsim(model: onnx.ModelProto, skipped: list[str]) -> onnx.ModelProto | None:
    import onnxsim

    try:
        simplified, ok = onnxsim.simplify(model, skipped_optimizers=list(skipped))
    except Exception as err:  # onnxsim raises anything from protobuf to C++ errors
        log.warning("onnxsim failed (%s); continuing with the unsimplified model", _first_line(err))
        return None
    if not ok:
        log.warning("onnxsim could not validate its result; continuing with the unsimplified model")
        return None
    return simplified


def _infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as err:
        log.warning("shape inference failed (%s); shapes will be known at run time only", _first_line(err))
        return model


# ------------------------------------------------------------------ constants


def _constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name == "value_float":
            return np.array(attr.f, dtype=np.float32)
        if attr.name == "value_floats":
            return np.array(list(attr.floats), dtype=np.float32)
        if attr.name == "value_int":
            return np.array(attr.i, dtype=np.int64)
        if attr.name == "value_ints":
            return np.array(list(attr.ints), dtype=np.int64)
    return None  # sparse or string constants stay nodes


def constants_to_initializers(graph: onnx.GraphProto) -> int:
    """Turn Constant nodes into initializers of the same name; returns how many.

    Exporters such as Paddle's keep every weight in a Constant node; quantizers and the
    QDQ export need weights as initializers. Constants inside subgraphs (a Conv weight in
    an If branch, a Loop body's constant) move up to the main graph too, where the mirror
    and the policy find every weight; a subgraph reads them from the outer scope, as ONNX
    allows. A constant that is its subgraph's output, or whose name another scope also
    uses (sibling subgraphs may reuse a name), stays where it is.
    """
    moved = _lift(graph, graph, {o.name for o in graph.output})
    inner = all_graphs(graph)[1:]
    names = Counter(o for sub in inner for n in sub.node for o in n.output) + \
        Counter(t.name for sub in inner for t in [*sub.initializer, *sub.input])
    main_scope = {t.name for t in graph.initializer} | {v.name for v in graph.input} | \
        {o for n in graph.node for o in n.output}
    clash = {name for name, count in names.items() if count > 1 or name in main_scope}
    return moved + sum(_lift_from_subgraph(graph, sub, clash) for node in graph.node for sub in subgraphs(node))


def _lift(graph: onnx.GraphProto, target: onnx.GraphProto, keep: set[str]) -> int:
    """Constant nodes of `graph` (not named in `keep`) -> initializers of `target`."""
    kept, moved = [], 0
    for node in graph.node:
        value = _constant_value(node) if node.op_type == "Constant" and node.domain in ("", "ai.onnx") else None
        if value is None or node.output[0] in keep:
            kept.append(node)
            continue
        target.initializer.append(numpy_helper.from_array(value, node.output[0]))
        moved += 1
    if moved:
        del graph.node[:]
        graph.node.extend(kept)
    return moved


def _lift_from_subgraph(main: onnx.GraphProto, sub: onnx.GraphProto, clash: set[str]) -> int:
    """Lift `sub`'s constants, then those of the graphs inside it. In that order: rewriting a
    graph's node list copies its nodes, so subgraphs are taken from the list as it now is."""
    keep = clash | {o.name for o in sub.output}
    moved = _lift(sub, main, keep)
    lifted = [t for t in sub.initializer if t.name not in keep]
    if lifted:
        main.initializer.extend(lifted)
        kept = [t for t in sub.initializer if t.name in keep]
        del sub.initializer[:]
        sub.initializer.extend(kept)
    return moved + len(lifted) + sum(_lift_from_subgraph(main, inner, clash)
                                     for node in sub.node for inner in subgraphs(node))


# Ops that only reshape, select or convert constants: exporters put them between a weight and
# its layer inside subgraphs (Unsqueeze of an LSTM's W to add the direction axis), where
# onnxsim does not fold; folded, the layer reads an initializer the policy can quantize.
_FOLDABLE = ("Unsqueeze", "Squeeze", "Reshape", "Transpose", "Concat", "Split", "Slice", "Gather", "Cast",
             "Identity", "Flatten", "Expand", "Tile")


def fold_subgraph_constants(model: onnx.ModelProto) -> int:
    """Evaluate (with onnx's reference implementation) the _FOLDABLE nodes inside subgraphs
    whose inputs are all main-graph initializers, as main-graph initializers of their output
    names; returns how many. Chains fold one link at a time until none is left."""
    graph = model.graph
    inner = all_graphs(graph)[1:]
    reused = Counter(o for sub in inner for n in sub.node for o in n.output)
    folded = 0
    for sub in inner:
        known = {t.name for t in graph.initializer}
        keep = {o.name for o in sub.output}
        kept = []
        for node in sub.node:
            outputs = [o for o in node.output if o]
            if (node.op_type not in _FOLDABLE or node.domain not in ("", "ai.onnx")
                    or not all(t in known for t in node.input if t)
                    or any(o in keep or reused[o] > 1 for o in outputs)):
                kept.append(node)
                continue
            inits = {t.name: t for t in graph.initializer if t.name in node.input}
            evaluated = _evaluate(node, inits, model.opset_import)
            graph.initializer.extend(numpy_helper.from_array(v, o) for o, v in zip(node.output, evaluated) if o)
            known.update(outputs)
            folded += 1
        if len(kept) != len(sub.node):
            del sub.node[:]
            sub.node.extend(kept)
    return folded


def _evaluate(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto], opsets) -> list[np.ndarray]:
    graph = onnx.helper.make_graph([node], "fold", [], [onnx.helper.make_empty_tensor_value_info(o)
                                                        for o in node.output if o], list(inits.values()))
    model = onnx.helper.make_model(graph, opset_imports=opsets)
    return [np.asarray(v) for v in ReferenceEvaluator(model).run(None, {})]


# ------------------------------------------------------------------ batch-norm folding


def fold_batchnorm(graph: onnx.GraphProto) -> int:
    """Fold inference BatchNormalization into a preceding Conv/ConvTranspose/Gemm; returns how many.

    Legal only when the producer's output feeds this BN alone and every operand is a
    float initializer used by that producer alone (so no other node sees changed weights).
    """
    inits = {t.name: t for t in graph.initializer}
    users = consumers(graph)
    graph_outputs = {o.name for o in graph.output}
    producer_of = {out: node for node in graph.node for out in node.output}
    removed: set[int] = set()
    for bn in graph.node:
        if bn.op_type != "BatchNormalization" or len([o for o in bn.output if o]) != 1:
            continue
        if any(a.name == "training_mode" and a.i for a in bn.attribute) or len(bn.input) != 5:
            continue
        prod = producer_of.get(bn.input[0])
        if prod is None or prod.op_type not in ("Conv", "ConvTranspose", "Gemm"):
            continue
        if len(users[bn.input[0]]) != 1 or bn.input[0] in graph_outputs:
            continue
        operands = list(prod.input[1:]) + list(bn.input[1:])
        if not all(n in inits and len(users[n]) == 1 for n in operands if n):
            continue
        if _fold_one(graph, prod, bn, inits):
            prod.output[0] = bn.output[0]
            removed.add(id(bn))
    if removed:
        kept = [n for n in graph.node if id(n) not in removed]
        del graph.node[:]
        graph.node.extend(kept)
        live = {n for node in graph.node for n in node.output}
        stale = [v for v in graph.value_info if v.name not in live]
        for v in stale:
            graph.value_info.remove(v)
    return len(removed)


def _fold_one(graph: onnx.GraphProto, prod: onnx.NodeProto, bn: onnx.NodeProto, inits: dict) -> bool:
    arr = {n: weights.array(inits[n]).astype(np.float64) for n in list(prod.input[1:]) + list(bn.input[1:]) if n}
    gamma, beta, mean, var = (arr[n] for n in bn.input[1:])
    scale = gamma / np.sqrt(var + node_attr(bn, "epsilon", 1e-5))
    weight_name = prod.input[1]
    weight = arr[weight_name]
    dtype = weights.array(inits[weight_name]).dtype
    if dtype.kind != "f":
        return False
    channels = scale.shape[0]
    bias_name = prod.input[2] if len(prod.input) > 2 and prod.input[2] else None
    if prod.op_type == "Conv":
        if weight.shape[0] != channels:
            return False
        weight = weight * scale.reshape([-1] + [1] * (weight.ndim - 1))
        bias = arr[bias_name] if bias_name else np.zeros(channels)
    elif prod.op_type == "ConvTranspose":
        group = node_attr(prod, "group", 1)
        cin, cout_g = weight.shape[:2]
        if cout_g * group != channels:
            return False
        # weight[i, j] feeds output channel (i // (cin/group)) * cout_g + j
        per_in = np.repeat(scale.reshape(group, 1, cout_g), cin // group, axis=1).reshape(cin, cout_g)
        weight = weight * per_in.reshape(cin, cout_g, *([1] * (weight.ndim - 2)))
        bias = arr[bias_name] if bias_name else np.zeros(channels)
    else:  # Gemm: BN over axis 1 of a 2-D output = the Gemm's N
        if weight.ndim != 2:
            return False
        trans_b = node_attr(prod, "transB", 0)
        if weight.shape[0 if trans_b else 1] != channels:
            return False
        weight = weight * (scale[:, None] if trans_b else scale[None, :])
        bias = arr[bias_name] * node_attr(prod, "beta", 1.0) if bias_name else np.zeros(channels)
        if bias.size not in (1, channels):
            return False
        bias = np.broadcast_to(bias.reshape(-1), (channels,))
        for a in prod.attribute:
            if a.name == "beta":
                a.f = 1.0
    new_bias = (bias - mean) * scale + beta
    inits[weight_name].CopyFrom(numpy_helper.from_array(weight.astype(dtype), weight_name))
    if bias_name:
        inits[bias_name].CopyFrom(numpy_helper.from_array(new_bias.astype(dtype), bias_name))
    else:
        bias_name = _unique_name(graph, f"{weight_name}_bn_bias")
        tensor = numpy_helper.from_array(new_bias.astype(dtype), bias_name)
        graph.initializer.append(tensor)
        inits[bias_name] = tensor
        while len(prod.input) < 3:
            prod.input.append("")
        prod.input[2] = bias_name
    return True


def _unique_name(graph: onnx.GraphProto, base: str) -> str:
    taken = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output}
    name, i = base, 0
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    return name
