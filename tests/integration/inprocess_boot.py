"""Boot ComfyUI inside this process, load the pack like ComfyUI does, run one scenario function.

Usage (run by comfy_harness.run_inprocess under COMFYUI_PYTHON, cwd = COMFYUI_DIR):
  python inprocess_boot.py COMFYUI_DIR BASE_DIR PACK_DIR SCENARIO_FILE FUNCTION PARAMS_JSON

The scenario function gets a Context and returns a JSON-serialisable dict, printed on the last
line after a marker. Order matters: CPU mode and the base directory are set
before anything imports comfy.model_management or folder_paths, and `utils.extra_config` is
imported before `nodes`, which puts ComfyUI/comfy first on sys.path.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

MARKER = "@@SLIPSTREAM-INPROCESS-RESULT@@"


@dataclass
class Context:
    comfy_dir: Path
    base: Path
    models: Path
    input: Path
    output: Path
    pack: ModuleType          # the pack as ComfyUI loaded it (NODE_CLASS_MAPPINGS, host, ...)
    params: dict

    def pack_module(self, name: str) -> ModuleType:
        """A submodule of the loaded pack, e.g. ctx.pack_module('host')."""
        return sys.modules[f"{self.pack.__name__}.{name}"]


def boot(comfy_dir: Path, base: Path, pack_dir: Path) -> ModuleType:
    sys.argv = [str(comfy_dir / "main.py")]
    sys.path.insert(0, str(comfy_dir))
    import utils.extra_config  # noqa: F401  (before `nodes`: keeps the top-level utils package importable)
    from comfy.cli_args import args

    args.cpu = True
    args.base_directory = str(base)
    args.disable_auto_launch = True
    import comfy.model_management  # noqa: F401
    import folder_paths  # noqa: F401

    import nodes

    if not asyncio.run(nodes.load_custom_node(str(pack_dir))):
        raise RuntimeError(f"ComfyUI could not load the pack from {pack_dir} (see the log above)")
    return sys.modules[str(pack_dir).replace(".", "_x_")]


def main() -> None:
    comfy_dir, base, pack_dir, scenario, function, params = sys.argv[1:7]
    comfy_dir, base = Path(comfy_dir), Path(base)
    pack = boot(comfy_dir, base, Path(pack_dir))
    spec = importlib.util.spec_from_file_location("slipstream_inprocess_scenario", scenario)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ctx = Context(comfy_dir, base, base / "models", base / "input", base / "output", pack, json.loads(params))
    result = getattr(module, function)(ctx)
    print(MARKER + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
