"""Make the repository importable as the package `slipstream`, whatever the clone's folder is called.

ComfyUI imports the repo root as a package from custom_nodes/<folder>/; the tests do the same
thing under a fixed name, so every relative import inside the pack is exercised as ComfyUI
exercises it. The standalone host is forced: a test never touches a real ComfyUI by accident.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("SLIPSTREAM_HOST", "standalone")
os.environ.setdefault("SLIPSTREAM_PROGRESS", "0")


def _load_repo_as_package(name: str = "slipstream") -> None:
    existing = sys.modules.get(name)
    if existing is not None and Path(existing.__file__).resolve().parent == REPO_ROOT:
        return
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "__init__.py",
                                                  submodule_search_locations=[str(REPO_ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    _alias_for_pytest_package_setup(module)


def _alias_for_pytest_package_setup(package) -> None:
    """Let pytest find the package already imported when it sets up the repo root.

    The repo root holds an __init__.py, so pytest makes it a Package node and imports that file on
    its own before the first test (to look for setup_module), by a name taken from the folder: the
    folder's own name when it is an identifier (a second copy of the whole pack), or "__init__" when
    it is not -- e.g. a clone called "ComfyUI-Slipstream", where the relative imports of a top-level
    "__init__" module fail and every test errors. pytest's importlib mode returns a module already in
    sys.modules under that name, so both names point at the package loaded above.
    """
    for alias in (REPO_ROOT.name, "__init__"):
        if alias.isidentifier() and not _installed_elsewhere(alias):
            sys.modules.setdefault(alias, package)


def _installed_elsewhere(name: str) -> bool:
    """True when `name` is an installed module other than this clone (a clone folder named like a
    dependency, e.g. "gguf", must not hide that dependency from the tests)."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return False
    origin = getattr(spec, "origin", None)
    return origin is not None and Path(origin).resolve() != (REPO_ROOT / "__init__.py").resolve()


_load_repo_as_package()


@pytest.fixture
def host_folders(tmp_path, monkeypatch):
    """A function pointing the standalone host's models and input folders at given trees (shared
    fixtures written once per module) and its output and temp folders at this test's own tmp_path."""
    def point(models, inputs) -> None:
        monkeypatch.setenv("SLIPSTREAM_MODELS", str(models))
        monkeypatch.setenv("SLIPSTREAM_INPUT", str(inputs))
        monkeypatch.setenv("SLIPSTREAM_OUTPUT", str(tmp_path / "output"))
        monkeypatch.setenv("SLIPSTREAM_TEMP", str(tmp_path / "temp"))
    return point


@pytest.fixture
def workdirs(tmp_path, host_folders):
    """Point the standalone host's models/output/temp/input folders at a fresh temporary tree."""
    dirs = {k: tmp_path / k for k in ("models", "output", "temp", "input")}
    for d in dirs.values():
        d.mkdir()
    host_folders(dirs["models"], dirs["input"])
    return dirs


@pytest.fixture(scope="module")
def single_thread():
    """Run a test module on one torch thread (opt in: `pytestmark = pytest.mark.usefixtures("single_thread")`).

    Tiny models spend their time synchronising threads: on this shared 2-core machine their matmuls and
    convolutions ran up to 60x slower with 2 threads than with 1. The previous count is restored after
    the module, so other modules keep torch's default.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def vae():
    """The tiny random-weight Wan 2.1 VAE on the CPU, as the sampler and encoder tests take it (one per
    module; a test file with a VAE of its own defines its own `vae`)."""
    import torch
    from slipstream.models.wan.demo_assets import tiny_vae_state_dict
    from slipstream.models.wan.encoders import WanVAEHandle
    from slipstream.models.wan.vae import WanVAE

    return WanVAEHandle(WanVAE.from_state_dict(tiny_vae_state_dict()), "tiny", torch.device("cpu"))


@pytest.fixture
def built_step_caches(monkeypatch) -> list:
    """Every StepCache a sampler run builds, kept for the test to read its recorded decisions."""
    from slipstream.models.wan import pipeline
    from slipstream.models.wan.step_cache import StepCache

    built: list[StepCache] = []

    class Recorded(StepCache):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(pipeline, "StepCache", Recorded)
    return built
