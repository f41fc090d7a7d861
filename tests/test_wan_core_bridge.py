"""Wan Model to core MODEL without ComfyUI: what the loader records, the storage plan, LoRA block
selection, the errors users see, and the per-block swap patches on a tiny module (the ComfyUI side is
tests/integration/test_comfyui_wan_core.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file
from slipstream import NODE_CLASS_MAPPINGS as N
from slipstream.host import standalone
from slipstream.kernels.blockswap_replace import BlockPatch, ModuleBlockSwap
from slipstream.kernels.quant_layer import QuantPlan, prepare_linear
from slipstream.models.wan import config as wan_config
from slipstream.models.wan.core_source import (
    WAN_FLOAT_LAYERS,
    CoreBridgeError,
    WanSource,
    check_core_compatible,
    keep_patch,
    quant_plan,
)
from slipstream.models.wan.dit import random_state_dict
from slipstream.models.wan.lora import block_of
from slipstream.nodes.wan_core import lora_records

DIT = "wan_core_tiny_t2v.safetensors"
LORA = "wan_core_tiny_lora.safetensors"


@pytest.fixture(scope="module")
def tiny_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan_core")
    (root / "models" / "diffusion_models").mkdir(parents=True)
    (root / "models" / "loras").mkdir()
    (root / "input").mkdir()
    cfg = wan_config.tiny("t2v", text_dim=32)
    save_file(random_state_dict(cfg, seed=2), str(root / "models" / "diffusion_models" / DIT))
    g = torch.Generator().manual_seed(0)
    lora = {}
    for block in range(cfg.num_layers):
        stem = f"diffusion_model.blocks.{block}.self_attn.q"
        lora[stem + ".lora_A.weight"] = torch.randn(4, cfg.dim, generator=g) * 0.1
        lora[stem + ".lora_B.weight"] = torch.randn(cfg.dim, 4, generator=g) * 0.1
    save_file(lora, str(root / "models" / "loras" / LORA))
    return root


@pytest.fixture
def dirs(tiny_tree, host_folders):
    host_folders(tiny_tree / "models", tiny_tree / "input")
    return tiny_tree


def _node(node_id):
    cls = N[node_id]
    return getattr(cls(), cls.FUNCTION)


def _load(**kwargs):
    (handle,) = _node("SlipstreamWanModelLoader")(DIT, "fp32", kwargs.pop("quantization", "disabled"),
                                                  "offload_device", **kwargs)
    return handle


# ------------------------------------------------------------------------------------ what the loader records


def test_loader_records_file_precision_quantization_and_loras(dirs):
    (chain,) = _node("SlipstreamWanLoraSelect")(LORA, 0.5, None, "1")
    (swap,) = _node("SlipstreamWanBlockSwap")(1, False, False, True, 1)
    handle = _load(quantization="int8_w8a8", lora=chain, block_swap_args=swap)
    src = handle.source
    assert src.path == str(dirs / "models" / "diffusion_models" / DIT) and src.name == DIT
    assert (src.precision, src.quantization, src.speech_model, src.compiled) == ("fp32", "int8_w8a8", None, False)
    assert [(r.name, r.strength, r.blocks) for r in src.loras] == [(LORA, 0.5, (1,))]
    assert src.loras[0].path == str(dirs / "models" / "loras" / LORA)
    assert handle.swap.blocks_to_swap == 1          # the bridge reads the loader's block swap from the handle


def test_runtime_loras_follow_the_merged_ones(dirs):
    handle = _load()
    assert handle.source.loras == ()
    (chain,) = _node("SlipstreamWanLoraSelect")(LORA, 0.8)
    (applied,) = _node("SlipstreamWanApplyLora")(handle, chain, False)
    assert applied.source is handle.source
    assert [(r.name, r.strength, r.blocks) for r in lora_records(applied)] == [(LORA, 0.8, ())]


def test_compile_settings_are_recorded(dirs):
    (compile_args,) = _node("SlipstreamWanCompileSettings")("inductor", False, "default", False, 64, 128, True)
    assert _load(compile_args=compile_args).source.compiled


# ------------------------------------------------------------------------------------ storage plan


def test_quant_plan_follows_the_loader():
    int8 = quant_plan(WanSource("m.safetensors", quantization="int8_w8a8"), torch.bfloat16, None)
    assert int8.on_the_fly and int8.exclude == WAN_FLOAT_LAYERS and int8.float_storage is None
    fp8 = quant_plan(WanSource("m.safetensors", quantization="fp8_e4m3fn_fast"), torch.bfloat16, None)
    assert not fp8.on_the_fly and fp8.float_storage == torch.float8_e4m3fn and fp8.fp8_fast
    assert fp8.fp8_exclude == WAN_FLOAT_LAYERS
    kept = quant_plan(WanSource("m.safetensors"), torch.float8_e5m2, None)
    assert kept.float_storage == torch.float8_e5m2 and not kept.fp8_fast     # an fp8 file stays fp8
    assert quant_plan(WanSource("m.safetensors"), torch.bfloat16, None) == QuantPlan()
    with pytest.raises(CoreBridgeError, match="unknown quantization 'nf4'"):
        quant_plan(WanSource("m.safetensors", quantization="nf4"), torch.bfloat16, None)


def test_fp8_plan_keeps_embeddings_and_head_in_float():
    plan = quant_plan(WanSource("m.safetensors", quantization="fp8_e4m3fn"), torch.float32, None)
    w = torch.randn(8, 16)
    block = prepare_linear("blocks.3.ffn.0", w, None, plan, torch.bfloat16)
    head = prepare_linear("head.head", w, None, plan, torch.bfloat16)
    text = prepare_linear("text_embedding.0", w, None, plan, torch.bfloat16)
    assert block.kind == "fp8" and block.weight.dtype == torch.float8_e4m3fn
    assert (head.kind, head.weight.dtype) == ("float", torch.bfloat16)
    assert (text.kind, text.weight.dtype) == ("float", torch.bfloat16)


def test_int8_plan_quantizes_only_block_linears():
    plan = quant_plan(WanSource("m.safetensors", quantization="int8_w8a8"), torch.float32, None)
    w = torch.randn(16, 32)
    assert prepare_linear("blocks.0.self_attn.q", w, None, plan, torch.float32).kind == "int8"
    assert prepare_linear("time_projection.1", w, None, plan, torch.float32).kind == "float"


# ------------------------------------------------------------------------------------ LoRA block selection


def test_block_of_reads_every_spelling():
    assert block_of("diffusion_model.blocks.12.self_attn.q.weight") == 12
    assert block_of("lora_unet_blocks_3_cross_attn_k.lora_up.weight") == 3
    assert block_of("blocks.0.ffn.0.weight") == 0
    assert block_of("diffusion_model.head.head.weight") is None
    assert block_of("diffusion_model.vace_blocks.1.after_proj.weight") is None


def test_keep_patch_honours_the_block_selection():
    assert keep_patch("diffusion_model.blocks.5.ffn.0.weight", ())
    assert keep_patch("diffusion_model.blocks.5.ffn.0.weight", (4, 5))
    assert not keep_patch("diffusion_model.blocks.6.ffn.0.weight", (4, 5))
    assert keep_patch("diffusion_model.text_embedding.0.weight", (4, 5))   # outside the blocks: always


# ------------------------------------------------------------------------------------ errors


def test_gguf_and_speech_models_are_refused_with_the_way_out():
    with pytest.raises(CoreBridgeError, match="GGUF file.*Use a safetensors Wan file"):
        check_core_compatible(WanSource("/m/wan-t2v-Q4_K_M.gguf"))
    with pytest.raises(CoreBridgeError, match="speech adapter 'mt.safetensors.*Sample it with the Wan Sampler"):
        check_core_compatible(WanSource("/m/wan.safetensors", speech_model="mt.safetensors (MultiTalk)"))
    check_core_compatible(WanSource("/m/wan.safetensors"))


def test_node_outside_comfyui_says_where_it_runs(dirs):
    with pytest.raises(standalone.NeedsComfyUIError, match="runs only inside ComfyUI.*Wan Sampler"):
        _node("SlipstreamWanToCoreModel")(_load())


def test_node_refuses_a_handle_without_a_record(dirs):
    from dataclasses import replace

    with pytest.raises(CoreBridgeError, match="Connect the Wan Model Loader"):
        _node("SlipstreamWanToCoreModel")(replace(_load(), source=None))


# ------------------------------------------------------------------------------------ block swap patches


class _Blocks(torch.nn.Module):
    """A model loop shaped like ComfyUI's Wan forward: replace patches by ("double_block", i)."""

    def __init__(self, n=6):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(n))

    def forward(self, x, replace=None):
        replace = replace or {}
        for i, block in enumerate(self.blocks):
            if ("double_block", i) in replace:
                def wrap(args, block=block):
                    return {"img": block(args["img"])}
                x = replace[("double_block", i)]({"img": x}, {"original_block": wrap})["img"]
            else:
                x = block(x)
        return x


def _swap(model, swapped, prefetch=0):
    moves = []
    swap = ModuleBlockSwap(model.blocks, swapped, "cuda", "cpu", prefetch=prefetch,
                           move=lambda m, d, nb: moves.append((list(model.blocks).index(m), d.type)))
    return swap, moves


def test_swapped_blocks_are_resident_only_while_they_run():
    model = _Blocks()
    swap, moves = _swap(model, (1, 4))
    replace = {("double_block", i): swap.patch(i) for i in swap.swapped}
    x = torch.randn(2, 8)
    assert torch.equal(model(x, replace), model(x))
    model(x, replace)                                           # a second step: the same schedule
    assert moves == [(1, "cuda"), (1, "cpu"), (4, "cuda"), (4, "cpu")] * 2
    assert swap.log.runs == [(1, (1,)), (4, (4,))] * 2 and swap.resident == set()
    assert (swap.log.moves_in, swap.log.moves_out) == (4, 4)


def test_prefetch_brings_the_next_swapped_block_ahead():
    model = _Blocks()
    swap, moves = _swap(model, (0, 2, 4), prefetch=1)
    model(torch.randn(1, 8), {("double_block", i): swap.patch(i) for i in swap.swapped})
    assert swap.log.runs == [(0, (0, 2)), (2, (2, 4)), (4, (4,))]
    assert moves == [(0, "cuda"), (2, "cuda"), (0, "cpu"), (4, "cuda"), (2, "cpu"), (4, "cpu")]


def test_park_sends_every_swapped_block_to_the_offload_device():
    model = _Blocks()
    swap, moves = _swap(model, (3, 5))
    swap.park()
    assert moves == [(3, "cpu"), (5, "cpu")] and swap.resident == set()


def test_same_device_counts_moves_without_making_them():
    model = _Blocks(3)
    calls = []
    swap = ModuleBlockSwap(model.blocks, (1,), "cpu", "cpu", move=lambda *a: calls.append(a))
    model(torch.randn(1, 8), {("double_block", 1): swap.patch(1)})
    assert not swap.moves_real and calls == [] and swap.log.moves_in == 1 and swap.log.runs == [(1, (1,))]


def test_patches_survive_a_model_options_deepcopy():
    model = _Blocks()
    swap, _ = _swap(model, (2,))
    options = {"transformer_options": {"patches_replace": {"dit": {("double_block", 2): swap.patch(2)}}}}
    copied = copy.deepcopy(options)
    patch = copied["transformer_options"]["patches_replace"]["dit"][("double_block", 2)]
    assert isinstance(patch, BlockPatch) and patch.swap is swap


def test_block_swap_refuses_blocks_the_model_lacks():
    with pytest.raises(ValueError, match=r"blocks \[6\] do not exist \(the model has 6, 0-5\)"):
        ModuleBlockSwap(_Blocks().blocks, (2, 6), "cuda", "cpu")
    with pytest.raises(ValueError, match="prefetch must be >= 0"):
        ModuleBlockSwap(_Blocks().blocks, (2,), "cuda", "cpu", prefetch=-1)
