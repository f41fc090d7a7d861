"""host/comfy_memory.py against fake `comfy.model_management` modules of several ComfyUI eras.

Shapes:
  upstream  unload_model_and_clones + free_memory(..., keep_loaded, for_dynamic, pins_required, ram_required)
  legacy    free_memory(memory_required, device, keep_loaded=[])  (ComfyUI v0.8.0)
  minimal   free_memory(memory_required, device) without keep_loaded: only model_unload + pop is left
The fakes implement the real semantics that matter: LoadedModel holds a weak reference to its
patcher and compares by patcher identity; clones share the nn.Module and its loaded counter.
"""

from __future__ import annotations

import enum
import importlib
import sys
import types
import weakref

import pytest
import torch
from slipstream.host import comfy_memory
from slipstream.kernels.dram_report import LoadedModelInfo

MB = 1 << 20


class Weights(torch.nn.Module):
    """The shared nn.Module; ComfyUI keeps the loaded-bytes counter on it, so clones agree."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)
        self.model_loaded_weight_memory = 0


class FakePatcher:
    def __init__(self, model, load_device="cuda:0", offload_device="cpu", size=100 * MB, dynamic=None,
                 parent=None, calls=None):
        self.model = model
        self.load_device = torch.device(load_device)
        self.offload_device = torch.device(offload_device)
        self.size = size
        self.parent = parent
        self.calls = calls if calls is not None else []
        if dynamic is not None:
            self.is_dynamic = lambda: dynamic

    def clone(self):
        twin = FakePatcher(self.model, self.load_device, self.offload_device, self.size, None, self, self.calls)
        if hasattr(self, "is_dynamic"):
            twin.is_dynamic = self.is_dynamic
        return twin

    def is_clone(self, other):
        return getattr(other, "model", None) is self.model

    def model_size(self):
        return self.size

    def loaded_size(self):
        return self.model.model_loaded_weight_memory

    def load(self):
        self.model.model_loaded_weight_memory = self.size

    def detach(self, unpatch_all=True):
        self.calls.append(("detach", id(self)))
        self.model.model_loaded_weight_memory = 0

    def partially_unload(self, device_to, memory_to_free=0, force_patch_weights=False):
        self.calls.append(("partially_unload", id(self)))
        freed = min(memory_to_free, self.loaded_size())
        self.model.model_loaded_weight_memory -= freed
        return freed

    def pin_weight_to_device(self, key):
        self.calls.append(("pin_weight_to_device", key))
        if getattr(self, "is_dynamic", lambda: False)():
            raise RuntimeError("pin_weight_to_device invalid for dymamic weight loading")


class FakeLoadedModel:
    def __init__(self, patcher):
        self._model = weakref.ref(patcher)
        self.device = patcher.load_device
        self.currently_used = True

    @property
    def model(self):
        return self._model()

    def model_memory(self):
        return self.model.model_size()

    def model_loaded_memory(self):
        return self.model.loaded_size()

    def model_unload(self, memory_to_free=None, unpatch_weights=True):
        self.model.calls.append(("model_unload", id(self.model)))
        if memory_to_free is not None and memory_to_free < self.model.loaded_size():
            if self.model.partially_unload(self.model.offload_device, memory_to_free) >= memory_to_free:
                return False
        self.model.detach(unpatch_weights)
        return True

    def __eq__(self, other):
        return self.model is other.model

    __hash__ = None


class VRAMState(enum.Enum):
    NORMAL_VRAM = 3
    HIGH_VRAM = 4


def make_mm(shape: str) -> types.ModuleType:
    mm = types.ModuleType("comfy.model_management")
    mm.current_loaded_models = []
    mm.calls = []
    mm.LoadedModel = FakeLoadedModel
    mm.vram_state = VRAMState.NORMAL_VRAM
    mm.MAX_PINNED_MEMORY = 8 << 30
    mm.TOTAL_PINNED_MEMORY = 0
    mm.DISABLE_SMART_MEMORY = False

    def soft_empty_cache(force=False):
        mm.calls.append(("soft_empty_cache",))

    def unload_all_models():
        mm.calls.append(("unload_all_models",))
        raise AssertionError("unload_all_models must never be called by the offload node")

    def load(patcher):
        patcher.load()
        mm.current_loaded_models.insert(0, FakeLoadedModel(patcher))

    def _free(memory_required, device, keep_loaded):
        unloaded = []
        for i in range(len(mm.current_loaded_models) - 1, -1, -1):
            lm = mm.current_loaded_models[i]
            if lm.device == device and lm not in keep_loaded:
                if lm.model_unload(memory_required):
                    unloaded.append(i)
        for i in sorted(unloaded, reverse=True):
            mm.current_loaded_models.pop(i)
        if unloaded:
            soft_empty_cache()

    if shape == "upstream":
        def free_memory(memory_required, device, keep_loaded=[], for_dynamic=False, pins_required=0,  # noqa: B006
                        ram_required=0):
            mm.calls.append(("free_memory", device, list(keep_loaded)))
            _free(memory_required, device, keep_loaded)

        def unload_model_and_clones(model, unload_additional_models=True, all_devices=False):
            mm.calls.append(("unload_model_and_clones", model, unload_additional_models))
            keep = [lm for lm in mm.current_loaded_models if not model.is_clone(lm.model)]
            free_memory(1e30, model.load_device, keep)

        mm.unload_model_and_clones = unload_model_and_clones
    elif shape == "legacy":
        def free_memory(memory_required, device, keep_loaded=[]):  # noqa: B006 (ComfyUI's signature)
            mm.calls.append(("free_memory", device, list(keep_loaded)))
            _free(memory_required, device, keep_loaded)
    elif shape == "minimal":
        def free_memory(memory_required, device):
            mm.calls.append(("free_memory", device, []))
            _free(memory_required, device, [])
    else:
        raise ValueError(shape)

    mm.free_memory = free_memory
    mm.soft_empty_cache = soft_empty_cache
    mm.unload_all_models = unload_all_models
    mm.load = load
    return mm


def names(mm):
    return [c[0] for c in mm.calls]


SHAPES = ["upstream", "legacy", "minimal"]


@pytest.fixture
def clip_world():
    """A CLIP-like value whose LoRA clone ComfyUI loaded, plus an unrelated loaded UNet."""
    def build(shape, **kw):
        mm = make_mm(shape)
        base = FakePatcher(Weights(), **kw)
        clone = base.clone()                       # what CLIPTextEncode really loaded (LoRA clone)
        unet = FakePatcher(Weights(), size=300 * MB, calls=base.calls)
        mm.load(unet)
        mm.load(clone)
        clip = types.SimpleNamespace(patcher=base, cond_stage_model=base.model)
        return mm, clip, base, clone, unet
    return build


@pytest.mark.parametrize("shape", SHAPES)
def test_offload_unloads_the_managed_clone_only(shape, clip_world):
    mm, clip, base, clone, unet = clip_world(shape)
    res = comfy_memory.residency(mm, clip)
    assert (res.total_bytes, res.device_bytes, res.managed, res.new_ram_bytes) == (100 * MB, 100 * MB, True, 100 * MB)
    report = comfy_memory.offload(mm, clip)
    assert report.moved and report.freed_bytes == 100 * MB
    assert "freed 100.0 MiB on cuda:0; weights now on cpu" in report.message
    assert [lm.model for lm in mm.current_loaded_models] == [unet]     # the UNet stays loaded
    assert unet.loaded_size() == 300 * MB
    assert ("detach", id(clone)) in base.calls                         # the clone ComfyUI loaded was detached
    assert ("detach", id(unet)) not in base.calls
    assert "unload_all_models" not in names(mm)
    assert not any(c[0] == "pin_weight_to_device" for c in base.calls)


def test_upstream_uses_unload_model_and_clones(clip_world):
    mm, clip, base, *_ = clip_world("upstream")
    report = comfy_memory.offload(mm, clip)
    assert report.method == "unload_model_and_clones"
    first = mm.calls[0]
    assert first[0] == "unload_model_and_clones" and first[1] is base and first[2] is False


def test_legacy_uses_free_memory_with_loaded_model_keep_list(clip_world):
    mm, clip, base, clone, unet = clip_world("legacy")
    report = comfy_memory.offload(mm, clip)
    assert report.method == "free_memory(keep_loaded=others)"
    (_, device, keep), = [c for c in mm.calls if c[0] == "free_memory"]
    assert device == torch.device("cuda:0")
    assert keep and all(isinstance(lm, FakeLoadedModel) for lm in keep)   # LoadedModel objects, not patchers
    assert [lm.model for lm in keep] == [unet]


def test_minimal_falls_back_to_model_unload_pop_and_soft_empty(clip_world):
    mm, clip, base, clone, unet = clip_world("minimal")
    report = comfy_memory.offload(mm, clip)
    assert report.method == "LoadedModel.model_unload"
    assert names(mm) == ["soft_empty_cache"]             # free_memory (which would unload the UNet) unused
    assert ("model_unload", id(clone)) in base.calls


@pytest.mark.parametrize("shape", SHAPES)
def test_gpu_only_reports_nothing_freed(shape, clip_world):
    mm, clip, base, clone, unet = clip_world(shape, load_device="cuda:0", offload_device="cuda:0")
    report = comfy_memory.offload(mm, clip)
    assert not report.moved and report.freed_bytes == 0 and report.method == "none"
    assert "load and offload device are both cuda:0" in report.message and "--gpu-only" in report.message
    assert mm.calls == [] and len(mm.current_loaded_models) == 2
    assert comfy_memory.residency(mm, clip).new_ram_bytes == 0


@pytest.mark.parametrize("shape", SHAPES)
def test_already_offloaded_and_not_loaded(shape):
    mm = make_mm(shape)
    patcher = FakePatcher(Weights())
    report = comfy_memory.offload(mm, patcher)             # never loaded
    assert not report.moved and "not loaded on cuda:0" in report.message and mm.calls == []
    mm.load(patcher)
    comfy_memory.offload(mm, patcher)
    mm.load(patcher)
    patcher.model.model_loaded_weight_memory = 0           # managed, but fully offloaded
    report = comfy_memory.offload(mm, patcher)
    assert not report.moved and "already offloaded to cpu" in report.message


def test_unmanaged_weights_on_device_are_left_alone():
    mm = make_mm("upstream")
    patcher = FakePatcher(Weights())
    patcher.load()                                          # on the GPU, but not in current_loaded_models
    report = comfy_memory.offload(mm, patcher)
    assert not report.moved and "does not track this model" in report.message
    assert patcher.loaded_size() == 100 * MB and mm.calls == []


@pytest.mark.parametrize("shape", SHAPES)
def test_dynamic_patcher_never_pinned_and_needs_no_new_ram(shape, clip_world):
    mm, clip, base, clone, unet = clip_world(shape, dynamic=True)
    res = comfy_memory.residency(mm, clip)
    assert res.dynamic and res.new_ram_bytes == 0
    report = comfy_memory.offload(mm, clip)
    assert report.moved and "Dynamic VRAM" in report.message
    assert not any(c[0] == "pin_weight_to_device" for c in base.calls)


def test_clone_handle_resolves_to_base_entry():
    mm = make_mm("legacy")
    base = FakePatcher(Weights())
    mm.load(base)                         # ComfyUI loaded the base; the node got a clone
    clone = base.clone()
    report = comfy_memory.offload(mm, types.SimpleNamespace(patcher=clone))
    assert report.moved and mm.current_loaded_models == []


def test_loaded_models_summary_and_flags(clip_world):
    mm, clip, base, clone, unet = clip_world("upstream", dynamic=False)
    rows = comfy_memory.loaded_models_summary(mm)
    assert rows == [LoadedModelInfo("Weights", "cuda:0", 100 * MB, 100 * MB, False),
                    LoadedModelInfo("Weights", "cuda:0", 300 * MB, 300 * MB, False)]
    flags = comfy_memory.memory_flags(mm)
    assert flags == {"vram_state": "NORMAL_VRAM", "pinned_memory": "on (limit 8.0 GiB)", "pinned_now": "0.00 GiB",
                     "smart_memory": "on"}


def test_rejects_values_without_a_patcher():
    with pytest.raises(TypeError, match="expected a MODEL, CLIP or VAE"):
        comfy_memory.offload(make_mm("upstream"), object())


def test_comfyui_host_delegates_to_adapter(monkeypatch, clip_world):
    """host/comfyui.py, imported against fake ComfyUI modules, routes the memory functions here."""
    mm, clip, base, clone, unet = clip_world("upstream")
    comfy = types.ModuleType("comfy")
    comfy.model_management = mm
    comfy.utils = types.ModuleType("comfy.utils")
    comfy.__path__ = []
    folder_paths = types.ModuleType("folder_paths")
    for name, module in (("comfy", comfy), ("comfy.model_management", mm), ("comfy.utils", comfy.utils),
                         ("folder_paths", folder_paths)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.delitem(sys.modules, "slipstream.host.comfyui", raising=False)
    try:
        comfy_host = importlib.import_module("slipstream.host.comfyui")
        assert comfy_host.model_residency(clip).device_bytes == 100 * MB
        assert [r.loaded_bytes for r in comfy_host.loaded_models_summary()] == [100 * MB, 300 * MB]
        report = comfy_host.offload_model_weights(clip)
        assert report.moved and report.method == "unload_model_and_clones"
        assert comfy_host.memory_flags()["vram_state"] == "NORMAL_VRAM"
    finally:
        sys.modules.pop("slipstream.host.comfyui", None)
