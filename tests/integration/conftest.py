"""Fixtures for tests against a real ComfyUI (skipped unless COMFYUI_DIR is set). See README.md here.

  comfyui            session: a running ComfyServer (post_prompt, wait_history, run, object_info, ...)
  comfy_inprocess    session: run(scenario_file, function, params=None) -> dict, ComfyUI imported in-process
  slip_nodes         the pack's node table as this test process sees it (the contract to compare with)
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def _load_harness():
    name = "slipstream_comfy_harness"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, HERE / "comfy_harness.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


harness = _load_harness()
SKIP_REASON = ("COMFYUI_DIR is not set: the real-ComfyUI integration tests are skipped. Run them with "
               "COMFYUI_DIR=/path/to/ComfyUI COMFYUI_PYTHON=/path/to/its/python python -m pytest tests/integration")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.integration)


def _comfy_dir() -> Path:
    comfy_dir = harness.comfyui_dir()
    if comfy_dir is None:
        pytest.skip(SKIP_REASON)
    if not (comfy_dir / "main.py").is_file():
        pytest.fail(f"COMFYUI_DIR={comfy_dir} is not a ComfyUI checkout (no main.py)")
    return comfy_dir


@pytest.fixture(scope="session")
def harness_module():
    return harness


@pytest.fixture(scope="session")
def comfyui(tmp_path_factory):
    """One ComfyUI server for the whole session, with the pack linked under an unusual folder name."""
    comfy_dir = _comfy_dir()
    server = harness.ComfyServer(comfy_dir, tmp_path_factory.mktemp("comfy_server_base"))
    server.start()
    try:
        import slipstream

        info = server.object_info()
        missing = sorted(set(slipstream.NODE_CLASS_MAPPINGS) - set(info))
        if missing:
            pytest.fail(f"ComfyUI started but lacks our nodes {missing}: did the pack import?\n"
                        f"{server.log_tail(80)}")
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def comfy_inprocess(tmp_path_factory):
    """run(scenario_file, function, params=None, timeout=600) in a fresh in-process ComfyUI."""
    comfy_dir = _comfy_dir()
    base = harness.make_base_dir(tmp_path_factory.mktemp("comfy_inprocess_base"))

    class Runner:
        base_dir = base
        models_dir = base / "models"

        @staticmethod
        def run(scenario: Path, function: str, params: dict | None = None, timeout: float = 600) -> dict:
            return harness.run_inprocess(comfy_dir, base, Path(scenario), function, params=params, timeout=timeout)

    return Runner


@pytest.fixture
def slip_nodes():
    import slipstream
    from slipstream.nodes import NODES

    return slipstream, NODES
