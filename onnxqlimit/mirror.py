"""The mirror: an ONNX graph rebuilt as a torch.nn.Module, one torch function per node.

Weights are parameters (float) or buffers (integer) registered under their initializer
name (mappings of the data file for a model kept on disk, see weights.py), read lazily:
a weight is quantized when its first reader runs and dropped after its last, so a
forward pass never holds every quantized weight at once. Every tensor the graph
computes can be captured or rewritten by name through `set_hook`, which is where
quantizers attach later (a Q/DQ pair in the exported file stands exactly where a hook
stands here).
"""
from __future__ import annotations

import difflib
import re
from collections import Counter
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import onnx
import torch
from torch import nn

from . import weights
from .data import declared_shapes, model_feeds
from .errors import QLimitError, UnsupportedModelError
from .graph import all_nodes, outer_names, subgraphs
from .ops import Node, get_converter
from .ops.registry import as_tensor


def model_opsets(model: onnx.ModelProto) -> dict[str, int]:
    return {("" if o.domain in ("", "ai.onnx") else o.domain): o.version for o in model.opset_import}


def unsupported_op_counts(model: onnx.ModelProto) -> Counter:
    """Op types that have no converter, with their node counts (subgraphs included)."""
    counts: Counter = Counter()
    for proto in all_nodes(model.graph):
        if get_converter(proto.op_type, proto.domain) is None:
            counts[f"{proto.domain}.{proto.op_type}" if proto.domain not in ("", "ai.onnx") else proto.op_type] += 1
    return counts


def _safe_key(name: str, taken: set[str]) -> str:
    key = "t_" + re.sub(r"\W", "_", name)
    while key in taken:
        key += "_"
    taken.add(key)
    return key


class Mirror(nn.Module):
    """Runs an ONNX graph with torch; see the module docstring."""

    def __init__(self, model: onnx.ModelProto, root: Mirror | None = None):
        super().__init__()
        # A subgraph's mirror shares its root's quantizer hooks (tensor names are unique across
        # scopes) and device; a plain attribute, so the root is no child module of its own child.
        self.__dict__["_root"] = root
        graph = model.graph
        self.opsets = model_opsets(model)
        self._keys: dict[str, str] = {}  # ONNX tensor name -> attribute name on this module
        taken: set[str] = set()
        self.initializer_names: list[str] = []
        for init in graph.initializer:
            try:
                array = weights.array(init)
                # a mapped file is used as it is (copy-on-write); anything else is copied
                value = torch.from_numpy(array) if isinstance(array, np.memmap) else as_tensor(array)
            except QLimitError as err:
                raise UnsupportedModelError(f"initializer '{init.name}': {err}") from None
            key = _safe_key(init.name, taken)
            self._keys[init.name] = key
            self.initializer_names.append(init.name)
            if value.is_floating_point():
                self.register_parameter(key, nn.Parameter(value, requires_grad=False))
            else:
                self.register_buffer(key, value)
        initialized = set(self._keys)
        self.input_names = [i.name for i in graph.input if i.name not in initialized]
        self._declared = {n: s for n, s in declared_shapes(model).items() if n not in initialized}
        self.output_names = [o.name for o in graph.output]

        self.nodes: list[Node] = []
        self._fns = []
        # Control flow: each subgraph is a mirror of its own, handed to the node's converter in
        # place of its graph attribute; what it reads from this scope is passed in at run time.
        self.subgraphs = nn.ModuleDict()
        self.subgraph_names: dict[str, str] = {}  # subgraphs key -> "node 'name' then_branch"
        self.runs = 0  # times run as a subgraph (untaken_subgraphs)
        self._outer: dict[int, list[str]] = {}
        problems: list[str] = []
        missing = unsupported_op_counts(model)
        for index, proto in enumerate(graph.node):
            node = Node.from_proto(proto, self.opsets, index)
            converter = get_converter(node.op_type, node.domain)
            if converter is None or (missing and subgraphs(proto)):
                continue  # (an unsupported op inside a subgraph is named by `missing`)
            for attr in proto.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    sub = Mirror(onnx.helper.make_model(attr.g, opset_imports=model.opset_import), root or self)
                    key = _safe_key(f"{node.name}.{attr.name}", set(self.subgraphs.keys()))
                    self.subgraphs[key], self.subgraph_names[key] = sub, f"{node.op_type} '{node.name}' {attr.name}"
                    node.attrs[attr.name] = sub
            if outer := outer_names(proto):
                self._outer[len(self.nodes)] = outer
            try:
                self._fns.append(converter(node))
            except QLimitError as err:
                problems.append(str(err))
            self.nodes.append(node)
        if missing or problems:
            raise UnsupportedModelError(_refusal_message(missing, problems))

        # What each node reads (its subgraphs' reads of this scope too), and where each tensor
        # is last read, so intermediate results are freed as soon as possible.
        self._reads = [[*node.inputs, *self._outer.get(index, ())] for index, node in enumerate(self.nodes)]
        self._last_use: dict[str, int] = {}
        for index, reads in enumerate(self._reads):
            for name in reads:
                self._last_use[name] = index
        self._hook_keys: dict[str, str] = {}
        self.hooks = nn.ModuleDict()

    # ---------------------------------------------------------------- tensors by name

    def initializer(self, name: str) -> torch.Tensor:
        return getattr(self, self._keys[name])

    def set_hook(self, name: str, module: nn.Module | None) -> None:
        """Route the tensor `name` through `module` wherever it is read (None removes), in
        whichever scope computes it."""
        table = self._root or self
        key = table._hook_keys.get(name) or _safe_key(name, set(table.hooks.keys()))
        if module is None:
            if key in table.hooks:
                del table.hooks[key]
            table._hook_keys.pop(name, None)
            return
        table._hook_keys[name] = key
        table.hooks[key] = module

    def get_hook(self, name: str) -> nn.Module | None:
        table = self._root or self
        key = table._hook_keys.get(name)
        return table.hooks[key] if key is not None else None

    # ---------------------------------------------------------------- execution

    @property
    def device(self) -> torch.device:
        if self._root is not None:
            return self._root.device
        for t in self.parameters():
            return t.device
        for t in self.buffers():
            return t.device
        return torch.device("cpu")

    def _put(self, env: dict, name: str, value: torch.Tensor) -> None:
        hook = self.get_hook(name)
        env[name] = hook(value) if hook is not None else value

    def initializer_env(self, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """Initializers (all, or the named ones), their hooks (weight quantizers) applied."""
        env: dict[str, torch.Tensor] = {}
        for name in self.initializer_names if names is None else names:
            self._put(env, name, self.initializer(name))
        return env

    def initializers_read(self, node_range: Iterable[int]) -> list[str]:
        """The initializers that the given nodes (their subgraphs too) read."""
        return list(dict.fromkeys(n for i in node_range for n in self.reads(i) if n in self._keys))

    def value(self, env: dict[str, torch.Tensor], name: str) -> torch.Tensor:
        """env[name], an initializer (hook applied) being fetched into env on first use."""
        found = env.get(name)
        if found is None and name in self._keys:
            self._put(env, name, self.initializer(name))
            found = env[name]
        elif found is None:
            raise KeyError(name)
        return found

    def as_declared(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        """A batch held samples-first, as the model's inputs declare it (data.model_feeds)."""
        return model_feeds(feeds, self._declared)

    def initial_env(self, feeds: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Graph inputs, hooks applied: the state before the first node (initializers are
        fetched as nodes read them, see value())."""
        env: dict[str, torch.Tensor] = {}
        device = self.device
        feeds = self.as_declared(feeds)
        for name in self.input_names:
            if name not in feeds:
                raise QLimitError(f"missing model input '{name}' (expected: {', '.join(self.input_names)})")
            value = feeds[name]
            if not isinstance(value, torch.Tensor):
                value = as_tensor(np.asarray(value))
            self._put(env, name, value.to(device))
        return env

    def reads(self, index: int) -> list[str]:
        """Node `index`'s inputs and the tensors its subgraphs read from this scope."""
        return self._reads[index]

    def inside(self, index: int) -> set[str]:
        """Every tensor that node `index`'s subgraphs (nested ones too) read or compute."""
        found: set[str] = set()
        for value in self.nodes[index].attrs.values():
            if isinstance(value, Mirror):
                for j, node in enumerate(value.nodes):
                    found.update(node.inputs, node.outputs, value.inside(j))
        return found

    def run_subgraph(self, scope: Mapping[str, torch.Tensor],
                     inputs: Sequence[torch.Tensor] = ()) -> list[torch.Tensor]:
        """This mirror as a subgraph: its outputs, given the tensors it reads from outside and
        its own inputs in order (a Loop body's iteration number, condition, carried values),
        hooks applied to those as to a model's inputs."""
        self.runs += 1
        env = dict(scope)
        for name, value in zip(self.input_names, inputs):
            self._put(env, name, value)
        env = self.execute(env)
        return [self.value(env, name) for name in self.output_names]

    def nested(self) -> list[Mirror]:
        """The mirrors of every subgraph inside this one, depth first."""
        return [m for sub in self.subgraphs.values() for m in (sub, *sub.nested())]

    def untaken_nodes(self) -> set[str]:
        """The names of the nodes inside subgraphs that no run since they were built has entered."""
        found: set[str] = set()
        for sub in self.subgraphs.values():
            found |= {m_node.name for m in (sub, *sub.nested()) for m_node in m.nodes} if sub.runs == 0 \
                else sub.untaken_nodes()
        return found

    def untaken_subgraphs(self) -> list[str]:
        """The subgraphs (nested ones too) that no run since they were built has entered."""
        found = []
        for key, sub in self.subgraphs.items():
            found += [self.subgraph_names[key]] if sub.runs == 0 else \
                [f"{self.subgraph_names[key]} > {name}" for name in sub.untaken_subgraphs()]
        return found

    def call(self, index: int, args: list, env: dict[str, torch.Tensor]) -> Any:
        """Node `index`'s torch function on `args` (one per node input; None for an empty one);
        a control-flow node also gets the tensors its subgraphs read, from `env`."""
        outer = self._outer.get(index)
        if outer:
            return self._fns[index](*args, scope={name: self.value(env, name) for name in outer})
        return self._fns[index](*args)

    def execute(self, env: dict[str, torch.Tensor], node_range: Iterable[int] | None = None,
                keep: Iterable[str] = ()) -> dict[str, torch.Tensor]:
        """Run nodes (all, or the given indices in order) over `env`, in place.

        Tensors not needed by later nodes are dropped unless named in `keep`.
        """
        keep = set(keep) | set(self.output_names)
        indices = range(len(self.nodes)) if node_range is None else node_range
        for index in indices:
            node = self.nodes[index]
            args = [self.value(env, name) if name else None for name in node.inputs]
            try:
                result = self.call(index, args, env)
            except (RuntimeError, ValueError, IndexError, KeyError) as err:
                raise RuntimeError(f"{node.op_type} node '{node.name}' failed: {err}") from err
            results = result if isinstance(result, (tuple, list)) else (result,)
            if not node.inputs:  # Constant & co. have no input to take a device from
                results = [r.to(self.device) if isinstance(r, torch.Tensor) else r for r in results]
            for name, value in zip(node.outputs, results):
                if name:
                    self._put(env, name, value)
            for name in self.reads(index):
                if self._last_use.get(name) == index and name not in keep:
                    env.pop(name, None)
        return env

    def run(self, feeds: Mapping[str, Any], outputs: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Compute the graph outputs (or the named tensors) for one batch of inputs."""
        wanted = list(outputs) if outputs is not None else self.output_names
        known = set(self.input_names) | set(self._keys) | {name for node in self.nodes for name in node.outputs}
        missing = [name for name in wanted if name not in known]
        if missing:  # before running: a typo should not cost a forward pass or end in a KeyError
            near = difflib.get_close_matches(missing[0], sorted(known), n=3)
            raise QLimitError(f"no tensor named {missing[0]!r} in the model"
                              + (f" (near: {', '.join(near)})" if near else ""))
        env = self.execute(self.initial_env(feeds), keep=wanted)
        return {name: self.value(env, name) for name in wanted}

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        result = self.run(dict(zip(self.input_names, inputs)))
        return tuple(result[name] for name in self.output_names)


def _refusal_message(missing: Counter, problems: list[str]) -> str:
    parts = []
    if missing:
        ops = ", ".join(f"{op} ({count} node{'s' if count > 1 else ''})" for op, count in sorted(missing.items()))
        parts.append(f"unsupported ops: {ops}")
    if problems:
        parts.append("unsupported features: " + "; ".join(problems))
    return "model cannot be mirrored - " + " | ".join(parts)
