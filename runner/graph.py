"""Execute an API-format workflow of Slipstream nodes in a plain process.

This is not a second ComfyUI: no caching, no lazy inputs, no list mapping. It validates inputs
the way ComfyUI does (required inputs, combo choices, min/max), runs the nodes that feed output
nodes in dependency order, and collects each output node's UI dict. A node type that is not
ours (a core ComfyUI node) is refused by name before anything runs.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("slipstream.runner")


class WorkflowError(ValueError):
    """The workflow cannot run here: unknown node, bad link, invalid input."""


@dataclass
class NodeRun:
    node_id: str
    class_type: str
    seconds: float
    ui: dict[str, Any] | None = None


@dataclass
class WorkflowResult:
    runs: list[NodeRun] = field(default_factory=list)
    outputs: dict[str, tuple] = field(default_factory=dict)

    def ui_outputs(self) -> dict[str, dict[str, Any]]:
        return {r.node_id: r.ui for r in self.runs if r.ui}


def load_workflow(path: str | Path) -> dict[str, dict]:
    """Read an API-format workflow; a UI-format file gets an error that says how to get the API one."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise WorkflowError(f"{path}: no such file. Example workflows are in the pack's workflows/ folder "
                            "(the '_api.json' files run headless).") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise WorkflowError(f"{path}: cannot read it ({exc}).") from None
    except json.JSONDecodeError as exc:
        raise WorkflowError(f"{path} is not valid JSON ({exc}); save the workflow again from ComfyUI with "
                            "Workflow → Export (API).") from None
    if isinstance(data, dict) and "nodes" in data and "links" in data:
        raise WorkflowError(
            f"{path} is a UI-format workflow (what the ComfyUI canvas saves). The headless runner needs the "
            "API format: use the '_api.json' twin next to it, or in ComfyUI choose Workflow → Export (API).")
    if not isinstance(data, dict) or not all(isinstance(v, dict) and "class_type" in v for v in data.values()):
        raise WorkflowError(f"{path} is not an API-format workflow ({{id: {{class_type, inputs}}}}).")
    return data


def _is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def _check_known(prompt: Mapping[str, dict], mappings: Mapping[str, type]) -> None:
    unknown = sorted({f"{n['class_type']} (node {i})" for i, n in prompt.items() if n["class_type"] not in mappings})
    if unknown:
        raise WorkflowError(
            "This workflow uses node types the headless runner does not have: " + ", ".join(unknown) + ". "
            "Only Slipstream nodes (and core Load Audio, for WAV files) run here; other core ComfyUI nodes (and "
            "other packs) need ComfyUI itself — "
            "queue the workflow in ComfyUI instead.")


def _needed_nodes(prompt: Mapping[str, dict], mappings: Mapping[str, type]) -> list[str]:
    """Ids of output nodes' ancestors, in an order where every input is produced before use."""
    outputs = [i for i, n in prompt.items() if getattr(mappings[n["class_type"]], "OUTPUT_NODE", False)]
    if not outputs:
        raise WorkflowError("The workflow has no output node (a node that saves or shows a result); nothing to run.")
    order: list[str] = []
    state: dict[str, str] = {}

    def visit(node_id: str, path: tuple[str, ...]) -> None:
        if state.get(node_id) == "done":
            return
        if state.get(node_id) == "visiting":
            raise WorkflowError("The workflow has a cycle: " + " -> ".join((*path, node_id)))
        if node_id not in prompt:
            raise WorkflowError(f"Node {path[-1]} takes an input from node {node_id}, which is not in the workflow.")
        state[node_id] = "visiting"
        for value in prompt[node_id].get("inputs", {}).values():
            if _is_link(value):
                visit(value[0], (*path, node_id))
        state[node_id] = "done"
        order.append(node_id)

    for node_id in sorted(outputs, key=_id_sort_key):
        visit(node_id, ())
    return order


def _id_sort_key(node_id: str) -> tuple[int, str]:
    return (int(node_id), "") if node_id.isdigit() else (1 << 30, node_id)


def _missing_file_hint(value: Any) -> str:
    """What to do when a combo names a file the folders do not hold (the usual cause: no models here)."""
    if not (isinstance(value, str) and "." in value.rsplit("/", 1)[-1]):
        return ""
    return (" If it names a file, put the file in the matching folder under SLIPSTREAM_MODELS (models) or "
            "SLIPSTREAM_INPUT (images, meshes), or run `python -m slipstream demo --workdir DIR`, which builds the "
            "example workflows' tiny models in DIR/models.")


def _validate_value(node_id: str, class_type: str, name: str, spec: tuple, value: Any) -> Any:
    kind = spec[0]
    opts = spec[1] if len(spec) > 1 else {}
    where = f"{class_type} (node {node_id}) input '{name}'"
    if isinstance(kind, list):
        if value not in kind:
            raise WorkflowError(f"{where}: '{value}' is not one of the choices {kind[:12]}"
                                f"{' …' if len(kind) > 12 else ''}.{_missing_file_hint(value)}")
    elif kind in ("INT", "FLOAT"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise WorkflowError(f"{where}: expected a number, got {value!r}")
        value = int(value) if kind == "INT" else float(value)
        if "min" in opts and value < opts["min"]:
            raise WorkflowError(f"{where}: {value} is below the minimum {opts['min']}")
        if "max" in opts and value > opts["max"]:
            raise WorkflowError(f"{where}: {value} is above the maximum {opts['max']}")
    elif kind == "BOOLEAN" and not isinstance(value, bool):
        raise WorkflowError(f"{where}: expected true/false, got {value!r}")
    elif kind == "STRING" and not isinstance(value, str):
        raise WorkflowError(f"{where}: expected text, got {value!r}")
    return value


def _gather_inputs(node_id: str, node: dict, cls: type, produced: Mapping[str, tuple],
                   prompt: Mapping[str, dict], extra_pnginfo: dict | None) -> dict[str, Any]:
    spec = cls.INPUT_TYPES()
    given = node.get("inputs", {})
    class_type = node["class_type"]
    kwargs: dict[str, Any] = {}
    for section in ("required", "optional"):
        for name, entry in spec.get(section, {}).items():
            if name not in given:
                if section == "required":
                    raise WorkflowError(f"{class_type} (node {node_id}) is missing required input '{name}'.")
                continue
            value = given[name]
            if _is_link(value):
                src, slot = value
                outputs = produced[src]
                if slot >= len(outputs):
                    raise WorkflowError(f"{class_type} (node {node_id}) input '{name}' links to output {slot} "
                                        f"of node {src}, which has only {len(outputs)} outputs.")
                kwargs[name] = outputs[slot]
            else:
                kwargs[name] = _validate_value(node_id, class_type, name, entry, value)
    hidden = {"PROMPT": dict(prompt), "EXTRA_PNGINFO": extra_pnginfo, "UNIQUE_ID": node_id}
    for name, kind in spec.get("hidden", {}).items():
        kwargs[name] = hidden.get(kind if isinstance(kind, str) else kind[0])
    return kwargs


def _split_result(node_id: str, class_type: str, cls: type, result: Any) -> tuple[tuple, dict | None]:
    ui = None
    if isinstance(result, dict):
        ui = result.get("ui")
        result = result.get("result", ())
    if result is None:
        result = ()
    if not isinstance(result, tuple):
        raise WorkflowError(f"{class_type} (node {node_id}) returned {type(result).__name__}, not a tuple")
    if len(result) != len(cls.RETURN_TYPES):
        raise WorkflowError(f"{class_type} (node {node_id}) returned {len(result)} values for "
                            f"{len(cls.RETURN_TYPES)} outputs")
    return result, ui


@dataclass(frozen=True)
class FailedNode:
    """Which node raised, attached to the exception as `failed_node` so the CLI can name it."""

    node_id: str
    class_type: str


def failed_node(exc: BaseException) -> FailedNode | None:
    """The node an exception from run_workflow() came from, if it came from a node."""
    return getattr(exc, "failed_node", None)


def _validate_node(node_id: str, class_type: str, cls: type, kwargs: Mapping[str, Any]) -> None:
    validate = getattr(cls, "VALIDATE_INPUTS", None)
    if validate is None:
        return
    import inspect

    names = inspect.signature(validate).parameters
    verdict = validate(**{k: v for k, v in kwargs.items() if k in names})
    if verdict is not True:
        raise WorkflowError(f"{class_type} (node {node_id}): {verdict}")


def _validate_literals(prompt: Mapping[str, dict], order: list[str], mappings: Mapping[str, type]) -> None:
    """VALIDATE_INPUTS on the widget values of every node before anything runs, as ComfyUI does when a
    prompt is queued: a bad filename prefix fails now, not after a long generation (linked inputs are
    left out and checked when their node runs)."""
    import inspect

    for node_id in order:
        node = prompt[node_id]
        cls = mappings[node["class_type"]]
        validate = getattr(cls, "VALIDATE_INPUTS", None)
        if validate is None:
            continue
        literals = {k: v for k, v in node.get("inputs", {}).items() if not _is_link(v)}
        needed = [n for n, p in inspect.signature(validate).parameters.items()
                  if p.default is inspect.Parameter.empty and p.kind is p.POSITIONAL_OR_KEYWORD]
        if all(n in literals for n in needed):   # else: checked when the node runs, with every value
            _validate_node(node_id, node["class_type"], cls, literals)


def run_workflow(prompt: Mapping[str, dict], mappings: Mapping[str, type],
                 extra_pnginfo: dict | None = None) -> WorkflowResult:
    """Run the nodes that feed output nodes; returns each node's outputs and the output nodes' UI dicts.

    An exception a node raises propagates unchanged, with `failed_node` (see failed_node()) attached.
    """
    from ..host import clear_stale_interrupt

    clear_stale_interrupt()
    _check_known(prompt, mappings)
    order = _needed_nodes(prompt, mappings)
    for flag in ("INPUT_IS_LIST", "OUTPUT_IS_LIST"):
        listy = [prompt[i]["class_type"] for i in order if any(getattr(mappings[prompt[i]["class_type"]], flag, ()))]
        if listy:
            raise WorkflowError(f"The headless runner does not map list inputs/outputs ({flag}): {', '.join(listy)}")
    _validate_literals(prompt, order, mappings)
    result = WorkflowResult()
    extra_pnginfo = extra_pnginfo if extra_pnginfo is not None else {}
    for node_id in order:
        node = prompt[node_id]
        cls = mappings[node["class_type"]]
        kwargs = _gather_inputs(node_id, node, cls, result.outputs, prompt, extra_pnginfo)
        _validate_node(node_id, node["class_type"], cls, kwargs)
        started = time.perf_counter()
        log.info("running node %s (%s)", node_id, node["class_type"])
        try:
            returned = getattr(cls(), cls.FUNCTION)(**kwargs)
        except Exception as exc:
            exc.failed_node = FailedNode(node_id, node["class_type"])
            raise
        outputs, ui = _split_result(node_id, node["class_type"], cls, returned)
        result.outputs[node_id] = outputs
        result.runs.append(NodeRun(node_id, node["class_type"], time.perf_counter() - started, ui))
    return result
