"""The per-quantizer BitPlan (the supported widths are in widths.py).

A BitPlan maps each quantized tensor (a weight initializer or an activation) to its bit
width. The placement policy and the defaults produce one, the mixed-precision search
returns one, a user edits one as JSON (`--save-plan` / `--bits-plan`), and the opset of
the exported file follows from the widths it may hold.

The JSON form is keyed by node (what a user sees in Netron): `{node: {"wbits": W,
"abits": A}}`, where abits is the width of the node's quantized activation input(s).
A tensor name is accepted too (`{tensor: {"bits": B}}`), for an activation read by
several nodes. An activation shared by nodes given different widths takes the widest.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

from ..errors import QLimitError
from .policy import QuantPoint
from .widths import check_bits, required_opset


NOTES_KEY = "__search__"  # a saved plan's record of how the search scored it (not a node)


@dataclass(frozen=True)
class BitPlan:
    """tensor name -> bit width, for every quantizer of a model."""

    bits: Mapping[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, points: Iterable[QuantPoint]) -> BitPlan:
        return cls({p.tensor: p.spec.bits for p in points})

    def widths(self) -> set[int]:
        return set(self.bits.values())

    def opset(self) -> int:
        return required_opset(self.widths())

    def with_bits(self, changes: Mapping[str, int]) -> BitPlan:
        return BitPlan({**self.bits, **changes})

    # ------------------------------------------------------------ the node view (JSON)

    def to_nodes(self, points: Iterable[QuantPoint]) -> dict[str, dict[str, int]]:
        nodes: dict[str, dict[str, int]] = {}
        for point in points:
            key = "wbits" if point.kind == "weight" else "abits"
            for node in point.consumers:
                entry = nodes.setdefault(node, {})
                entry[key] = max(entry.get(key, 0), self.bits[point.tensor])
        return nodes

    @classmethod
    def from_nodes(cls, entries: Mapping[str, Mapping[str, int]], points: list[QuantPoint],
                   base: BitPlan | None = None) -> BitPlan:
        """The plan `entries` describes (node or tensor names); quantizers not named keep `base`'s widths."""
        by_node: dict[str, list[QuantPoint]] = {}
        for point in points:
            for node in point.consumers:
                by_node.setdefault(node, []).append(point)
        by_tensor = {p.tensor: p for p in points}
        unknown = [name for name in entries if name not in by_node and name not in by_tensor]
        if unknown:
            shown = ", ".join(repr(n) for n in unknown[:3]) + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else "")
            raise QLimitError(f"bit plan names {shown}: no quantized node or tensor of that name in this model")
        chosen: dict[str, int] = {}
        for name, entry in entries.items():
            if not isinstance(entry, Mapping) or not set(entry) <= {"wbits", "abits", "bits"} or not entry:
                raise QLimitError(f"bit plan entry {name!r}: expected {{\"wbits\": W, \"abits\": A}} or {{\"bits\": B}}")
            targets = [by_tensor[name]] if name in by_tensor else by_node[name]
            for point in targets:
                key = "bits" if name in by_tensor else ("wbits" if point.kind == "weight" else "abits")
                if key in entry:
                    bits = check_bits(point.kind, entry[key], f"bit plan {name!r} {key}")
                    chosen[point.tensor] = max(chosen.get(point.tensor, 0), bits)
        start = dict(base.bits) if base is not None else {p.tensor: p.spec.bits for p in points}
        return cls({**start, **chosen})

    def save(self, path: str | Path, points: list[QuantPoint], notes: Mapping | None = None) -> None:
        """The node view as JSON; `notes` (how a search scored the plan) under NOTES_KEY, which reading skips."""
        data = {NOTES_KEY: dict(notes), **self.to_nodes(points)} if notes else self.to_nodes(points)
        Path(path).write_text(json.dumps(data, indent=1) + "\n")


def read_plan_file(path: str | Path) -> dict[str, dict[str, int]]:
    """The raw node -> widths mapping of a `--bits-plan` file, checked for form only."""
    try:
        entries = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise QLimitError(f"{path}: no such bit plan file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise QLimitError(f"{path}: not a JSON bit plan ({err})") from None
    if isinstance(entries, dict):
        entries.pop(NOTES_KEY, None)
    if not isinstance(entries, dict) or not all(isinstance(v, dict) for v in entries.values()):
        raise QLimitError(f"{path}: a bit plan is a JSON object {{node: {{\"wbits\": W, \"abits\": A}}}}")
    return entries


def plan_widths(entries: Mapping[str, Mapping[str, int]]) -> set[int]:
    return {b for entry in entries.values() for b in entry.values() if isinstance(b, int)}
