"""Rewriting ComfyUI-INT8-Fast workflows so they open and run on this pack, with no missing nodes.

Its loader id, `OTUNetLoaderW8A8`, is ours too (same widgets, in the same order). Its LoRA loaders
are not registered here — their ids belong to that pack, and a second pack registering them would
replace its nodes for everyone who has both installed. They map onto ComfyUI's own
"LoraLoaderModelOnly", which patches our int8 layers (dequantize, add, re-quantize):

    INT8LoraLoader / INT8DynamicLoraLoader  (model, [mode,] lora_name, strength)
        -> LoraLoaderModelOnly               (model, lora_name, strength_model)

The LoRA stack and pre-LoRA nodes have no one-node equivalent; they are reported by id, left as they
are, for the user to replace with a chain of LoraLoaderModelOnly.

Both workflow formats are handled: the UI format (a `nodes` list with `widgets_values`) and the API
format (node id -> `class_type`, `inputs`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

SINGLE_LORA_TYPES = ("INT8LoraLoader", "INT8DynamicLoraLoader")
UNMAPPED_TYPES = ("INT8LoraLoaderStack", "INT8DynamicLoraStack", "INT8GroupedLora", "INT8PreLoraLoader")
CORE_LORA = "LoraLoaderModelOnly"
LORA_MODES = ("Standard", "Stochastic", "Dynamic", "None")


@dataclass
class MigrationReport:
    """What a migration changed and what it left for the user."""

    replaced: list[str] = field(default_factory=list)     # node ids turned into LoraLoaderModelOnly
    left: list[str] = field(default_factory=list)         # "id (type)" of nodes with no equivalent

    def summary(self) -> str:
        parts = [f"{len(self.replaced)} INT8 LoRA loader(s) replaced by {CORE_LORA}"]
        if self.left:
            parts.append("left as they are (replace each with a chain of LoraLoaderModelOnly): "
                         + ", ".join(self.left))
        return "; ".join(parts)


def _lora_args(values: list[Any]) -> tuple[Any, Any]:
    """(lora_name, strength) from the widget values of either version (with or without `mode` first)."""
    rest = values[1:] if values and values[0] in LORA_MODES else values
    if len(rest) < 2:
        raise ValueError(f"an INT8 LoRA loader with widget values {values!r}: expected a LoRA name and a strength")
    return rest[0], rest[1]


def _migrate_ui(workflow: dict, report: MigrationReport) -> None:
    for node in workflow.get("nodes", []):
        kind = node.get("type")
        if kind in SINGLE_LORA_TYPES:
            name, strength = _lora_args(list(node.get("widgets_values") or []))
            node["type"] = CORE_LORA
            node["widgets_values"] = [name, strength]
            node.setdefault("properties", {})["Node name for S&R"] = CORE_LORA
            node["inputs"] = [slot for slot in node.get("inputs", []) if slot.get("name") == "model"]
            report.replaced.append(str(node.get("id")))
        elif kind in UNMAPPED_TYPES:
            report.left.append(f"{node.get('id')} ({kind})")


def _migrate_api(workflow: dict, report: MigrationReport) -> None:
    for node_id, node in workflow.items():
        kind = node.get("class_type") if isinstance(node, dict) else None
        if kind in SINGLE_LORA_TYPES:
            inputs = node.get("inputs", {})
            node["class_type"] = CORE_LORA
            node["inputs"] = {"model": inputs.get("model"), "lora_name": inputs.get("lora_name"),
                              "strength_model": inputs.get("strength", 1.0)}
            report.replaced.append(str(node_id))
        elif kind in UNMAPPED_TYPES:
            report.left.append(f"{node_id} ({kind})")


def migrate_workflow(workflow: dict) -> MigrationReport:
    """Rewrite an INT8-Fast workflow (UI or API format) in place; the report says what changed."""
    report = MigrationReport()
    if isinstance(workflow.get("nodes"), list):
        _migrate_ui(workflow, report)
    else:
        _migrate_api(workflow, report)
    return report


def migrate_file(source: str, target: str) -> MigrationReport:
    """Read a workflow JSON, migrate it and write the result to `target` (never over `source`)."""
    if target == source:
        raise ValueError("write the migrated workflow to a new file; the original stays as it is")
    with open(source, encoding="utf-8") as f:
        workflow = json.load(f)
    if not isinstance(workflow, dict):
        raise ValueError(f"{source}: not a ComfyUI workflow (expected a JSON object)")
    report = migrate_workflow(workflow)
    with open(target, "w", encoding="utf-8") as f:
        json.dump(workflow, f, indent=2)
    return report
