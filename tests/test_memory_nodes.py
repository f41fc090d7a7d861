"""The memory nodes in the standalone host with a small real nn.Module text encoder."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from safetensors.torch import save_file
from slipstream.host import standalone
from slipstream.host.graph_values import CLIP
from slipstream.kernels import dram
from slipstream.kernels.dram import CacheKeyNotFoundError, DramCache, GiB
from slipstream.kernels.sysmem import RamInfo
from slipstream.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from slipstream.nodes.memory import MemoryCleanup, OffloadClipToDram


class TinyTextEncoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(64, 16)
        self.proj = torch.nn.Linear(16, 16)

    def forward(self, tokens):
        h = self.proj(self.embed(tokens))
        return h, h.mean(1)


def make_clip(device="cpu") -> CLIP:
    enc = TinyTextEncoder()
    return CLIP(enc, lambda text: torch.tensor([[ord(c) % 64 for c in text]]), enc, device, "cpu")


@pytest.fixture
def cache():
    total = 64 * GiB
    info = RamInfo(total, 32 * GiB, total, 32 * GiB, None)
    fresh = DramCache(budget_bytes=1 << 30, headroom_bytes=0, ram_probe=lambda: info)
    previous = dram.set_default_cache(fresh)
    yield fresh
    dram.set_default_cache(previous)


def test_registration_and_no_is_changed():
    assert NODE_CLASS_MAPPINGS["ArchAi3D_Offload_CLIP"] is OffloadClipToDram
    assert NODE_DISPLAY_NAME_MAPPINGS["ArchAi3D_Offload_CLIP"] == "🧠Offload CLIP to DRAM"
    assert NODE_CLASS_MAPPINGS["SlipstreamMemoryCleanup"] is MemoryCleanup
    for cls in (OffloadClipToDram, MemoryCleanup):
        assert not hasattr(cls, "IS_CHANGED")     # a volatile one would re-run everything downstream
        assert cls.CATEGORY == "Slipstream/Memory"
    spec = OffloadClipToDram.INPUT_TYPES()
    assert list(spec["required"]) == ["clip"] and spec["required"]["clip"][0] == "CLIP"
    assert list(spec["optional"]) == ["trigger"] and spec["optional"]["trigger"][0] == "*"
    assert OffloadClipToDram.RETURN_TYPES == ("STRING", "STRING", "*", "CLIP")
    assert OffloadClipToDram.RETURN_NAMES == ("memory_stats", "dram_id", "passthrough", "clip")


def test_offload_cpu_clip_says_nothing_freed_and_passes_trigger(cache):
    clip = make_clip()
    cond = [[torch.zeros(1, 3, 16), {}]]
    stats, key, passthrough, _ = OffloadClipToDram().offload(clip, trigger=cond)
    assert passthrough is cond
    assert key.startswith("clip:anon:TinyTextEncoder:")
    assert "Offload: nothing freed: load and offload device are both cpu [method: none]" in stats
    assert "session key" in stats and "MEMORY STATUS" in stats
    assert key in stats and "Loaded models: not tracked by this host" in stats
    # Encoding still works: the weights were not touched.
    cond2 = clip.encode_from_tokens(clip.tokenize("abc"))
    assert cond2.shape == (1, 3, 16)


def test_unconnected_trigger_passes_nothing_usable_and_the_clip_output_still_encodes(cache):
    clip = make_clip()
    stats, _, passthrough, clip_out = OffloadClipToDram().offload(clip)
    assert "'trigger' is not connected" in stats
    # A stray True used to reach a MODEL/CLIP input and fail deep inside core ('bool' has no 'tokenize').
    assert passthrough is not True
    with pytest.raises(AttributeError, match="'trigger' input is not connected"):
        passthrough.tokenize("a cat")
    _, passed = MemoryCleanup().cleanup("all", "", False, trigger=passthrough)   # ordering still works
    assert passed is passthrough
    assert clip_out is clip and clip_out.encode_from_tokens(clip_out.tokenize("abc")).shape == (1, 3, 16)


def test_clones_share_the_key_and_anonymous_entries_do_not_leak(cache):
    clip = make_clip()
    _, key, _, _ = OffloadClipToDram().offload(clip, trigger=1)
    lora_clone = clip.clone()
    _, key2, _, _ = OffloadClipToDram().offload(lora_clone, trigger=1)
    assert key2 == key and cache.keys() == [key]
    assert cache.entries()[0].weak and cache.held_bytes() == 0
    probe = weakref.ref(clip.cond_stage_model)
    del clip, lora_clone, _                      # the last output returned is the CLIP itself
    gc.collect()
    assert probe() is None                      # the cache kept nothing alive
    assert key not in cache


def test_loader_registered_clip_uses_stable_key_and_is_held(cache, tmp_path):
    clip = make_clip()
    path = tmp_path / "tiny_te.safetensors"
    save_file({k: v.contiguous() for k, v in clip.cond_stage_model.state_dict().items()}, str(path))
    key = dram.dram_key("clip", [path], type="tiny", dtype="fp32")
    cache.register_loaded(key, clip, clip.cond_stage_model)      # what a Slipstream loader does

    stats, dram_id, _, _ = OffloadClipToDram().offload(clip.clone(), trigger="x")
    assert dram_id == key and key in stats and "session key" not in stats
    entry = cache.entries()[0]
    assert not entry.weak and entry.nbytes == standalone.model_residency(clip).total_bytes > 0
    assert cache.lookup(key) is clip                              # the base object, not the clone
    probe = weakref.ref(clip)
    del clip
    gc.collect()
    assert probe() is not None                                    # held across "workflow switches"
    # The same file and options give the same key in a new run; a rewritten file does not.
    assert dram.dram_key("clip", [path], dtype="fp32", type="tiny") == key
    path.write_bytes(path.read_bytes() + b" ")
    assert dram.dram_key("clip", [path], type="tiny", dtype="fp32") != key


class MovablePatcher:
    """A patcher on a pretend GPU: the standalone host must call its unload(), never .to()."""

    def __init__(self):
        self.model = TinyTextEncoder()
        self.load_device, self.offload_device = torch.device("cuda", 0), torch.device("cpu")
        self.on_device = True
        self.unloads = 0

    def model_size(self):
        return 4096

    def loaded_size(self):
        return 4096 if self.on_device else 0

    def unload(self):
        self.unloads += 1
        self.on_device = False
        return 4096


def test_insufficient_dram_still_frees_vram_and_reports_the_refusal(tmp_path):
    """The node's job is freeing VRAM; the RAM cache is the bonus a small budget may refuse."""
    patcher = MovablePatcher()
    clip = FakeClip(patcher)
    info = RamInfo(8 * GiB, 4 * GiB, 8 * GiB, 4 * GiB, None)
    tight = DramCache(budget_bytes=1024, headroom_bytes=0, ram_probe=lambda: info)   # budget < model size
    path = tmp_path / "te.safetensors"
    path.write_bytes(b"0" * 64)
    tight.register_loaded(dram.dram_key("clip", [path]), clip, patcher.model)
    previous = dram.set_default_cache(tight)
    try:
        stats, key, passed, _ = OffloadClipToDram().offload(clip, trigger=1)
        assert patcher.unloads == 1 and len(tight) == 0 and passed == 1
        assert f"Not kept in the DRAM cache ({key} is not an entry): Insufficient DRAM available: need" in stats
        patcher.on_device = True
        tight.budget_bytes = 1 << 20
        stats, _, _, _ = OffloadClipToDram().offload(clip, trigger=1)
        assert patcher.unloads == 2
        assert "Offload: moved 0.0 MiB of weights from cuda:0 to cpu [method: patcher.unload]" in stats
        assert tight.lookup(tight.keys()[0]) is clip
    finally:
        dram.set_default_cache(previous)


class FakeClip:
    def __init__(self, patcher):
        self.patcher = patcher
        self.cond_stage_model = patcher.model

    def tokenize(self, text):
        return text


def test_standalone_host_offload_moves_through_patcher():
    patcher = MovablePatcher()
    assert standalone.model_residency(patcher).new_ram_bytes == 4096
    report = standalone.offload_model_weights(patcher)
    assert report.moved and report.freed_bytes == 4096 and report.method == "patcher.unload"
    assert patcher.unloads == 1
    again = standalone.offload_model_weights(patcher)
    assert not again.moved and "already on cpu" in again.message and patcher.unloads == 1


def test_cleanup_modes(cache):
    cache.put("clip:a@1", object.__new__(type("A", (), {})), "clip", 1000)
    cache.put("model:b@2", object.__new__(type("B", (), {})), "model", 2000)
    cache.put("clip:c@3", object.__new__(type("C", (), {})), "clip", 3000)
    node = MemoryCleanup()
    stats, passthrough = node.cleanup("key", " model:b@2 ", False, trigger="latent")
    assert passthrough == "latent" and "dropped 1 entry" in stats and "model:b@2" in stats
    assert cache.keys() == ["clip:a@1", "clip:c@3"]
    with pytest.raises(CacheKeyNotFoundError, match=r"Cache key not found: 'model:b@2'.*clip:a@1, clip:c@3"):
        node.cleanup("key", "model:b@2", False)
    stats, passthrough = node.cleanup("kind", "vae", True)
    assert passthrough is True and "held nothing to drop of kind 'vae'" in stats
    stats, _ = node.cleanup("kind", "clip", True)
    assert "dropped 2 entries" in stats and len(cache) == 0
    with pytest.raises(ValueError, match="needs a 'target'"):
        node.cleanup("key", "", True)
    cache.put("x", object.__new__(type("X", (), {})), "vae", 10)
    stats, _ = node.cleanup("all", "", True)
    assert "dropped 1 entry" in stats and "DRAM cache: empty" in stats
