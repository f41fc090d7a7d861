"""`python -m slipstream {run,nodes,demo}` — run Slipstream workflows without ComfyUI.

  run FILE.json     execute an API-format workflow of our nodes and print where outputs went
  nodes             list every node with its inputs and outputs
  demo              run the CPU-runnable example workflows on tiny models built on the spot
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = PACKAGE_ROOT / "workflows"


def _package():
    """The package this runner belongs to, however it was imported (installed or by path)."""
    import importlib

    return importlib.import_module(__package__.rsplit(".", 1)[0])


def _describe_input(name: str, spec: tuple) -> str:
    kind = spec[0]
    opts = spec[1] if len(spec) > 1 else {}
    if isinstance(kind, list):
        shown = ", ".join(map(str, kind[:6])) + (", …" if len(kind) > 6 else "")
        kind_text = f"[{shown}]"
    else:
        kind_text = str(kind)
    default = f" = {opts['default']!r}" if "default" in opts else ""
    return f"{name}: {kind_text}{default}"


def nodes_markdown() -> str:
    """The README's node table, generated from the registry."""
    pkg = _package()
    lines = ["| Node (id) | Display name | Category |", "|---|---|---|"]
    for node_id, cls in pkg.NODE_CLASS_MAPPINGS.items():
        lines.append(f"| `{node_id}` | {pkg.NODE_DISPLAY_NAME_MAPPINGS[node_id]} | {cls.CATEGORY} |")
    return "\n".join(lines)


def list_nodes(as_json: bool = False) -> str:
    pkg = _package()
    rows = []
    for node_id, cls in pkg.NODE_CLASS_MAPPINGS.items():
        spec = cls.INPUT_TYPES()
        rows.append({
            "id": node_id,
            "display_name": pkg.NODE_DISPLAY_NAME_MAPPINGS.get(node_id, node_id),
            "category": cls.CATEGORY,
            "required": [_describe_input(n, s) for n, s in spec.get("required", {}).items()],
            "optional": [_describe_input(n, s) for n, s in spec.get("optional", {}).items()],
            "outputs": [f"{n}: {t}" for n, t in zip(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES), cls.RETURN_TYPES, strict=True)],
        })
    if as_json:
        return json.dumps(rows, indent=2)
    lines = []
    for row in rows:
        lines.append(f"{row['id']}  \"{row['display_name']}\"  [{row['category']}]")
        lines += [f"    in   {x}" for x in row["required"]]
        lines += [f"    opt  {x}" for x in row["optional"]]
        lines += [f"    out  {x}" for x in row["outputs"]] or ["    out  (output node)"]
    return "\n".join(lines)


def _ui_files(ui: dict[str, Any]) -> list[str]:
    """Absolute paths of the files a node's UI dict points at ({filename, subfolder, type} entries)."""
    from ..host import input_dir, output_dir, temp_dir

    roots = {"output": output_dir, "temp": temp_dir, "input": input_dir}
    found = []
    for values in ui.values():
        for item in values if isinstance(values, (list, tuple)) else [values]:
            if isinstance(item, dict) and "filename" in item:
                root = roots.get(item.get("type", "output"), output_dir)()
                found.append(os.path.join(root, item.get("subfolder", ""), item["filename"]))
    return found


def _listed_files(cls: type, outputs: tuple) -> list[str]:
    """Paths a node returns as SLIP_FILENAMES (e.g. Video Combine's workflow PNG beside the video it previews)."""
    return [str(p) for kind, value in zip(cls.RETURN_TYPES, outputs, strict=True) if kind == "SLIP_FILENAMES" for p in value]


def run_file(path: str | Path, out=sys.stdout) -> list[str]:
    from .core_nodes import CORE_STAND_INS
    from .graph import load_workflow, run_workflow

    mappings = {**CORE_STAND_INS, **_package().NODE_CLASS_MAPPINGS}   # core Load Audio feeds the speech demos
    prompt = load_workflow(path)
    started = time.perf_counter()
    result = run_workflow(prompt, mappings, extra_pnginfo={"workflow": {"api_file": str(path)}})
    files: list[str] = []
    for run in result.runs:
        cls = mappings[run.class_type]
        shown = _ui_files(run.ui) if run.ui else []
        for f in shown + [f for f in _listed_files(cls, result.outputs[run.node_id]) if f not in shown]:
            files.append(f)
            print(f"  node {run.node_id}: {f}", file=out)
    print(f"ran {len(result.runs)} node(s) in {time.perf_counter() - started:.1f} s; {len(files)} file(s) written",
          file=out)
    return files


def run_demos(workdir: str | None, only: list[str], out=sys.stdout) -> int:
    from .demos import demo_cases

    cases = [c for c in demo_cases() if not only or c.name in only]
    if not cases:
        print("no demo workflows match" + (f" {only}" if only else ""), file=out)
        return 1
    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="slipstream-demo-"))
    models, inputs, output = root / "models", root / "input", root / "output"
    for d in (models, inputs, output, root / "temp"):
        d.mkdir(parents=True, exist_ok=True)
    os.environ.update(SLIPSTREAM_MODELS=str(models), SLIPSTREAM_INPUT=str(inputs),
                      SLIPSTREAM_OUTPUT=str(output), SLIPSTREAM_TEMP=str(root / "temp"))
    print(f"No real weights are used: each demo builds tiny random-weight models under {models}.\n"
          "Their outputs are noise — they show that every node of the pipeline runs end to end.", file=out)
    failures = 0
    for case in cases:
        print(f"\n== {case.name}: {case.description}", file=out)
        try:
            case.prepare(models, inputs)
            run_file(WORKFLOWS / case.workflow, out=out)
        except Exception as exc:  # report every demo, then fail at the end
            if isinstance(exc, _interrupts()):
                raise
            failures += 1
            print(f"  FAILED: {describe_failure(exc)}", file=out)
    print(f"\n{len(cases) - failures}/{len(cases)} demo workflow(s) ran; outputs under {output}", file=out)
    if not workdir:
        print(f"The demo folder {root} is kept so you can look at the outputs; delete it when done "
              "(or pass --workdir to choose the folder).", file=out)
    return 1 if failures else 0


def describe_failure(exc: BaseException) -> str:
    """'node 7 (SlipstreamVideoCombine): ValueError: …' — which node failed and why, without a traceback."""
    from .graph import failed_node

    node = failed_node(exc)
    where = f"node {node.node_id} ({node.class_type}): " if node is not None else ""
    return f"{where}{type(exc).__name__}: {exc}"


def _interrupts() -> tuple[type[BaseException], ...]:
    from ..host import interrupt_exception_types

    return interrupt_exception_types()


def _install_sigint() -> None:
    """First Ctrl-C asks the running node to stop at its next check; a second one kills the process."""
    from ..host import request_interrupt

    def handler(signum, frame):
        print("\ninterrupt requested (Ctrl-C again to abort)", file=sys.stderr)
        request_interrupt()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    signal.signal(signal.SIGINT, handler)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m slipstream", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log each node as it runs, and print the traceback when a node fails")
    sub = parser.add_subparsers(dest="command", required=True)
    # -v also after the command ('run FILE --verbose'); SUPPRESS keeps the top-level value otherwise.
    after = argparse.ArgumentParser(add_help=False)
    after.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                       help="as before the command")
    p_run = sub.add_parser("run", help="execute an API-format workflow", parents=[after])
    p_run.add_argument("workflow", help="path to an API-format workflow JSON")
    p_nodes = sub.add_parser("nodes", help="list nodes with their inputs")
    p_nodes.add_argument("--json", action="store_true", help="machine-readable output")
    p_nodes.add_argument("--markdown", action="store_true", help="the README's node table")
    p_demo = sub.add_parser("demo", help="run the CPU-runnable example workflows on tiny models",
                            parents=[after])
    p_demo.add_argument("names", nargs="*", help="demo names to run (default: all)")
    p_demo.add_argument("--workdir", help="where models/input/output go (default: a new temp folder)")
    p_migrate = sub.add_parser("migrate-int8", help="rewrite a ComfyUI-INT8-Fast workflow's LoRA loaders as "
                                                    "core LoraLoaderModelOnly nodes")
    p_migrate.add_argument("workflow", help="the workflow JSON (UI or API format)")
    p_migrate.add_argument("output", help="where the migrated workflow is written")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")

    if args.command == "nodes":
        print(nodes_markdown() if args.markdown else list_nodes(args.json))
        return 0
    if args.command == "migrate-int8":
        from .migrate import migrate_file

        print(migrate_file(args.workflow, args.output).summary())
        return 0
    _install_sigint()
    from .graph import WorkflowError

    try:
        if args.command == "run":
            run_file(args.workflow)
            return 0
        return run_demos(args.workdir, args.names)
    except WorkflowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except _interrupts():
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a node failed: say which and why; the traceback only when asked for
        if args.verbose:
            traceback.print_exc()
        print(f"error: {describe_failure(exc)}", file=sys.stderr)
        if not args.verbose:
            print("(run with --verbose for the traceback)", file=sys.stderr)
        return 1
