"""DRAM cache keys for CLIPs: the weights fingerprint, the keyed loaders outside ComfyUI, the report split."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from slipstream.host.graph_values import CLIP
from slipstream.host.standalone import NeedsComfyUIError
from slipstream.kernels import dram, dram_report
from slipstream.kernels.dram import DramCache, GiB
from slipstream.kernels.dram_fingerprint import (
    SAMPLES_PER_TENSOR,
    sample_positions,
    weights_fingerprint,
    weights_key,
)
from slipstream.kernels.sysmem import RamInfo
from slipstream.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, memory_loaders
from slipstream.nodes.memory import OffloadClipToDram
from slipstream.nodes.memory_loaders import SlipstreamCLIPLoaderKeyed, SlipstreamDualCLIPLoaderKeyed

sys.path.insert(0, str(Path(__file__).parent))  # pytest runs with --import-mode=importlib: helpers beside us
from test_memory_nodes import TinyTextEncoder  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def tiny_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"embed.weight": torch.randn(64, 16, generator=gen), "proj.weight": torch.randn(16, 16, generator=gen),
            "proj.bias": torch.randn(16, generator=gen), "scale": torch.tensor(0.5)}


# ---------------------------------------------------------------- the fingerprint


def test_same_weights_give_the_same_key_in_any_order_and_copy():
    a = tiny_weights()
    b = {k: v.clone() for k, v in reversed(list(a.items()))}
    assert weights_key("clip", "Enc", a.items()) == weights_key("clip", "Enc", b.items())
    assert weights_key("clip", "Enc", a.items()).startswith("clip:weights:Enc@")
    assert weights_key("clip", "Other", a.items()) != weights_key("clip", "Enc", a.items())


def test_every_part_of_the_layout_and_every_tensor_counts():
    base = weights_fingerprint(tiny_weights().items())
    assert weights_fingerprint(tiny_weights(seed=1).items()) != base                   # another training
    renamed = tiny_weights()
    renamed["proj.b"] = renamed.pop("proj.bias")
    assert weights_fingerprint(renamed.items()) != base
    assert weights_fingerprint({**tiny_weights(), "embed.weight": tiny_weights()["embed.weight"].half()}.items()) != base
    assert weights_fingerprint({**tiny_weights(), "proj.bias": tiny_weights()["proj.bias"][:15]}.items()) != base
    fewer = tiny_weights()
    del fewer["scale"]
    assert weights_fingerprint(fewer.items()) != base
    for name, tensor in tiny_weights().items():          # one sampled value changed, in any tensor
        edited = tiny_weights()
        pos = sample_positions(name, tensor.numel())[-1]
        edited[name].view(-1)[pos] += 1.0
        assert weights_fingerprint(edited.items()) != base, name


def test_sampling_reads_a_few_values_per_tensor_not_the_whole_tensor():
    """The documented trade-off: an edit at a position no sample reads keeps the key (cheap, not a full hash)."""
    name, numel = "embed.weight", 64 * 16
    positions = sample_positions(name, numel)
    assert len(positions) == SAMPLES_PER_TENSOR and positions == sample_positions(name, numel)
    assert positions != sample_positions("proj.weight", numel)          # offset by the name: not all at index 0
    assert max(positions) - min(positions) >= numel // 2                 # spread over the tensor
    assert sample_positions("x", 5) == [0, 1, 2, 3, 4]
    unsampled = next(i for i in range(numel) if i not in positions)
    edited = tiny_weights()
    edited[name].view(-1)[unsampled] += 1.0
    assert weights_fingerprint(edited.items()) == weights_fingerprint(tiny_weights().items())


def test_values_are_read_by_logical_position_and_bits():
    w = torch.randn(8, 12)
    assert weights_fingerprint([("w", w.t())]) == weights_fingerprint([("w", w.t().contiguous())])
    assert weights_fingerprint([("z", torch.tensor([0.0]))]) != weights_fingerprint([("z", torch.tensor([-0.0]))])
    bf16 = torch.randn(4, 4).to(torch.bfloat16)
    assert weights_fingerprint([("b", bf16)]) == weights_fingerprint([("b", bf16.clone())])
    flags = torch.tensor([True, False, True])
    assert weights_fingerprint([("f", flags)]) != weights_fingerprint([("f", ~flags)])


def test_meta_and_empty_tensors_fingerprint_by_layout_and_no_weights_is_an_error():
    meta = torch.empty(3, 4, device="meta")
    assert weights_fingerprint([("m", meta)]) == weights_fingerprint([("m", torch.empty(3, 4, device="meta"))])
    assert weights_fingerprint([("m", meta)]) != weights_fingerprint([("m", torch.empty(4, 3, device="meta"))])
    assert weights_fingerprint([("e", torch.empty(0, 4))])
    with pytest.raises(ValueError, match="no weights"):
        weights_fingerprint([])
    with pytest.raises(ValueError, match="kind"):
        weights_key("a:b", "Enc", tiny_weights().items())


def test_fingerprint_is_the_same_in_another_process(tmp_path):
    """Stable across runs: sha256 of bytes, never Python's per-process hash()."""
    path = tmp_path / "w.safetensors"
    save_file(tiny_weights(), str(path))
    here = weights_fingerprint(load_file(str(path)).items())
    code = ("import sys; from safetensors.torch import load_file; sys.path.insert(0, sys.argv[2]);"
            "import importlib.util as u; s = u.spec_from_file_location('fp', sys.argv[3]); m = u.module_from_spec(s);"
            "s.loader.exec_module(m); print(m.weights_fingerprint(load_file(sys.argv[1]).items()))")
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    out = subprocess.run([sys.executable, "-c", code, str(path), str(REPO), str(REPO / "kernels" / "dram_fingerprint.py")],
                         capture_output=True, text=True, env=env, timeout=120, check=True)
    assert out.stdout.strip() == here


# ---------------------------------------------------------------- the keyed loaders, outside ComfyUI


@pytest.fixture
def cache():
    info = RamInfo(64 * GiB, 32 * GiB, 64 * GiB, 32 * GiB, None)
    fresh = DramCache(budget_bytes=1 << 30, headroom_bytes=0, ram_probe=lambda: info)
    previous = dram.set_default_cache(fresh)
    yield fresh
    dram.set_default_cache(previous)


@pytest.fixture
def text_encoders(tmp_path, monkeypatch):
    """Two tiny encoder files under text_encoders/, and a stand-in for ComfyUI's loader that counts disk reads."""
    folder = tmp_path / "text_encoders"
    folder.mkdir()
    for i, name in enumerate(("te_a.safetensors", "te_b.safetensors")):
        torch.manual_seed(i)
        save_file({k: v.contiguous() for k, v in TinyTextEncoder().state_dict().items()}, str(folder / name))
    reads: list[tuple[tuple[str, ...], str, str]] = []

    def load_from_disk(paths, clip_type, device):
        reads.append((tuple(os.path.basename(p) for p in paths), clip_type, device))
        enc = TinyTextEncoder()
        for p in paths:
            enc.load_state_dict(load_file(p))
        return CLIP(enc, lambda text: torch.tensor([[ord(c) % 64 for c in text]]), enc, "cpu", "cpu")

    monkeypatch.setattr(memory_loaders, "model_path", lambda key, name: str(tmp_path / key / name))
    monkeypatch.setattr(memory_loaders, "list_models", lambda key: sorted(os.listdir(tmp_path / key)))
    monkeypatch.setattr(memory_loaders, "load_clip_files", load_from_disk)
    return folder, reads


def test_registration_inputs_and_tooltips():
    for node_id, cls, name in (("SlipstreamCLIPLoaderKeyed", SlipstreamCLIPLoaderKeyed, "Load CLIP (keyed)"),
                               ("SlipstreamDualCLIPLoaderKeyed", SlipstreamDualCLIPLoaderKeyed, "Load Dual CLIP (keyed)")):
        assert NODE_CLASS_MAPPINGS[node_id] is cls and NODE_DISPLAY_NAME_MAPPINGS[node_id] == name
        assert cls.CATEGORY == "Slipstream/Memory" and cls.RETURN_TYPES == ("CLIP",) and cls.DESCRIPTION
        spec = cls.INPUT_TYPES()
        for section in spec.values():
            for input_name, (_, options) in section.items():
                assert options.get("tooltip"), f"{node_id}.{input_name} has no tooltip"
        assert spec["optional"]["device"][0] == ["default", "cpu"] and spec["optional"]["device"][1]["advanced"]
    assert list(SlipstreamCLIPLoaderKeyed.INPUT_TYPES()["required"]) == ["clip_name", "type"]
    assert list(SlipstreamDualCLIPLoaderKeyed.INPUT_TYPES()["required"]) == ["clip_name1", "clip_name2", "type"]
    assert SlipstreamCLIPLoaderKeyed.INPUT_TYPES()["required"]["type"][0][0] == "stable_diffusion"
    assert SlipstreamDualCLIPLoaderKeyed.INPUT_TYPES()["required"]["type"][0][0] == "sdxl"


def test_outside_comfyui_the_loader_says_it_needs_comfyuis_loader(tmp_path, monkeypatch, cache):
    (tmp_path / "text_encoders").mkdir()
    save_file({"w": torch.zeros(2)}, str(tmp_path / "text_encoders" / "clip_l.safetensors"))
    monkeypatch.setattr(memory_loaders, "model_path", lambda key, name: str(tmp_path / key / name))
    with pytest.raises(NeedsComfyUIError, match=r"clip_l.safetensors as a 'stable_diffusion' CLIP needs ComfyUI"):
        SlipstreamCLIPLoaderKeyed().load_clip("clip_l.safetensors", "stable_diffusion")
    assert len(cache) == 0
    with pytest.raises(ValueError, match="device must be one of default, cpu"):
        SlipstreamCLIPLoaderKeyed().load_clip("clip_l.safetensors", "stable_diffusion", "cuda")


def test_offload_keeps_the_loaders_clip_and_the_next_load_reads_no_file(text_encoders, cache):
    folder, reads = text_encoders
    (clip,) = SlipstreamCLIPLoaderKeyed().load_clip("te_a.safetensors", "stable_diffusion")
    assert reads == [(("te_a.safetensors",), "stable_diffusion", "default")]
    stats, dram_id, _, _ = OffloadClipToDram().offload(clip.clone(), trigger="cond")   # a LoRA-style clone
    key = dram.dram_key("clip", [folder / "te_a.safetensors"], type="stable_diffusion", device="default")
    assert dram_id == key and dram_id.startswith("clip:te_a.safetensors@") and "weights" not in dram_id
    assert not cache.entries()[0].weak                               # the loader's CLIP is held strongly
    probe = weakref.ref(clip)
    del clip                                                         # ComfyUI dropped the loader's output
    gc.collect()
    assert probe() is not None
    (again,) = SlipstreamCLIPLoaderKeyed().load_clip("te_a.safetensors", "stable_diffusion")
    assert len(reads) == 1 and again is probe()                       # served from RAM: no second read
    assert cache.entries()[0].hits == 1
    assert again.encode_from_tokens(again.tokenize("abc")).shape == (1, 3, 16)
    # Other options or another file are other CLIPs: read from disk, under their own keys.
    SlipstreamCLIPLoaderKeyed().load_clip("te_a.safetensors", "sd3")
    SlipstreamCLIPLoaderKeyed().load_clip("te_b.safetensors", "stable_diffusion")
    assert len(reads) == 3


def test_a_rewritten_file_is_a_new_key_and_is_read_again(text_encoders, cache):
    folder, reads = text_encoders
    (clip,) = SlipstreamCLIPLoaderKeyed().load_clip("te_a.safetensors", "stable_diffusion")
    _, old_key, _, _ = OffloadClipToDram().offload(clip, trigger=1)
    changed_before = SlipstreamCLIPLoaderKeyed.IS_CHANGED("te_a.safetensors", "stable_diffusion")
    assert changed_before == old_key == SlipstreamCLIPLoaderKeyed.IS_CHANGED("te_a.safetensors", "stable_diffusion")
    st = os.stat(folder / "te_a.safetensors")
    os.utime(folder / "te_a.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert SlipstreamCLIPLoaderKeyed.IS_CHANGED("te_a.safetensors", "stable_diffusion") != old_key
    (fresh,) = SlipstreamCLIPLoaderKeyed().load_clip("te_a.safetensors", "stable_diffusion")
    assert fresh is not clip and len(reads) == 2
    assert SlipstreamCLIPLoaderKeyed.IS_CHANGED("missing.safetensors", "stable_diffusion") == ""


def test_without_offload_nothing_is_held_but_a_live_clip_is_handed_back(text_encoders, cache):
    _, reads = text_encoders
    (clip,) = SlipstreamCLIPLoaderKeyed().load_clip("te_a.safetensors", "stable_diffusion")
    (same,) = SlipstreamCLIPLoaderKeyed().load_clip("te_a.safetensors", "stable_diffusion")
    assert same is clip and len(reads) == 1 and len(cache) == 0
    probe = weakref.ref(clip)
    del clip, same
    gc.collect()
    assert probe() is None                                           # the registration is weak: no leak
    SlipstreamCLIPLoaderKeyed().load_clip("te_a.safetensors", "stable_diffusion")
    assert len(reads) == 2


def test_dual_loader_keys_both_files_in_order(text_encoders, cache):
    folder, reads = text_encoders
    (clip,) = SlipstreamDualCLIPLoaderKeyed().load_clip("te_a.safetensors", "te_b.safetensors", "flux")
    assert reads == [(("te_a.safetensors", "te_b.safetensors"), "flux", "default")]
    _, dram_id, _, _ = OffloadClipToDram().offload(clip, trigger=1)
    assert dram_id == dram.dram_key("clip", [folder / "te_a.safetensors", folder / "te_b.safetensors"],
                                    type="flux", device="default")
    assert dram_id.startswith("clip:te_a.safetensors+te_b.safetensors@")
    del clip
    (again,) = SlipstreamDualCLIPLoaderKeyed().load_clip("te_a.safetensors", "te_b.safetensors", "flux")
    assert len(reads) == 1 and cache.lookup(dram_id) is again
    SlipstreamDualCLIPLoaderKeyed().load_clip("te_b.safetensors", "te_a.safetensors", "flux")
    assert len(reads) == 2
    assert SlipstreamDualCLIPLoaderKeyed.IS_CHANGED("te_a.safetensors", "te_b.safetensors", "flux") == dram_id


def test_a_core_clip_gets_the_same_weights_key_in_every_run(cache, tmp_path):
    """Two loads of one file (what core Load CLIP does on each run) give one dram_id, held weakly."""
    torch.manual_seed(3)
    path = tmp_path / "te.safetensors"
    save_file({k: v.contiguous() for k, v in TinyTextEncoder().state_dict().items()}, str(path))

    def core_load() -> CLIP:
        enc = TinyTextEncoder()
        enc.load_state_dict(load_file(str(path)))
        return CLIP(enc, lambda text: torch.tensor([[1, 2]]), enc, "cpu", "cpu")

    first, second = core_load(), core_load()
    _, key1, _, _ = OffloadClipToDram().offload(first, trigger=1)
    _, key2, _, _ = OffloadClipToDram().offload(second.clone(), trigger=1)
    assert key1 == key2 and key1.startswith("clip:weights:TinyTextEncoder@") and cache.keys() == [key1]
    assert cache.entries()[0].weak and cache.held_bytes() == 0
    other = core_load()
    with torch.no_grad():
        other.cond_stage_model.proj.weight.mul_(2)
    _, key3, _, _ = OffloadClipToDram().offload(other, trigger=1)
    assert key3 != key1


# ---------------------------------------------------------------- the report lives apart from the cache


def test_report_is_its_own_module():
    assert not hasattr(dram, "memory_stats") and not hasattr(dram, "LoadedModelInfo")
    text = dram_report.memory_stats(None, vram=None, loaded_models=[dram_report.LoadedModelInfo("M", "cpu", 0, 0)])
    assert "MEMORY STATUS" in text and "[0] M on cpu" in text


# ---------------------------------------------------------------- files a host loader recorded


def _recorded_clip(init) -> CLIP:
    enc = TinyTextEncoder()
    clip = CLIP(enc, lambda text: torch.tensor([[1]]), enc, "cpu", "cpu")
    clip.patcher.cached_patcher_init = init
    return clip


def load_recorded(paths, embedding_directory, clip_type, model_options):
    """Stands for a newer ComfyUI's recorded core CLIP loader (it is only named, never called)."""


def test_loader_source_reads_recorded_files_and_plain_options(tmp_path):
    from enum import Enum

    from slipstream.host import loader_source

    class Kind(Enum):
        SD = 1

    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    a.write_bytes(b"1")
    b.write_bytes(b"2")
    clip = _recorded_clip((load_recorded, ([str(a), str(b)], None, Kind.SD, {"dtype": torch.float16, "ops": object()})))
    source = loader_source(clip)
    assert source.paths == (str(a), str(b)) and source.factory.endswith("load_recorded")
    assert source.options == ("None", "Kind.SD", "{'dtype': torch.float16, 'ops': <object>}")
    assert loader_source(_recorded_clip((load_recorded, (str(a), "fp16")))).paths == (str(a),)
    assert loader_source(_recorded_clip(None)) is None                                    # ComfyUI v0.8.0
    assert loader_source(_recorded_clip((load_recorded, ("not/a/file", 1)))) is None
    assert loader_source(_recorded_clip("garbage")) is None


def test_offload_keys_a_recorded_core_clip_by_its_files(tmp_path, cache):
    path = tmp_path / "clip_l.safetensors"
    path.write_bytes(b"weights")
    first = _recorded_clip((load_recorded, ([str(path)], None, "stable_diffusion", {})))
    second = _recorded_clip((load_recorded, ([str(path)], None, "stable_diffusion", {})))
    stats, key1, _, _ = OffloadClipToDram().offload(first, trigger=1)
    _, key2, _, _ = OffloadClipToDram().offload(second, trigger=1)    # other random weights, same file
    assert key1 == key2 and key1.startswith("clip:core:clip_l.safetensors@")
    assert "the files ComfyUI's loader recorded" in stats and cache.entries()[0].weak
    other_type = _recorded_clip((load_recorded, ([str(path)], None, "sd3", {})))
    assert OffloadClipToDram().offload(other_type, trigger=1)[1] != key1
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert OffloadClipToDram().offload(_recorded_clip((load_recorded, ([str(path)], None, "stable_diffusion", {}))),
                                       trigger=1)[1] != key1
