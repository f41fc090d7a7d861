"""In-process scenarios for the INT8 family, run inside ComfyUI by inprocess_boot.py.

Not a test module: it runs under COMFYUI_PYTHON with ComfyUI imported and returns plain data that
tests/integration/test_int8_comfyui.py checks. The model is a tiny Wan 2.1 DiT (official key
names, which ComfyUI's own model detection recognises); conditioning is a hand-made tensor, since
a real umT5-XXL text encoder would not fit a CPU test.
"""

from __future__ import annotations


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _layer_kinds(module) -> dict:
    from collections import Counter

    return dict(Counter(m.layer_kind for m in module.modules() if hasattr(m, "layer_kind")))


def _use_scenario_folders(ctx) -> None:
    """Point ComfyUI's model and output folders at the scenario's base directory (the in-process
    boot imports folder_paths before it can honour --base-directory)."""
    import folder_paths

    for key in ("diffusion_models", "loras", "text_encoders"):
        (ctx.models / key).mkdir(parents=True, exist_ok=True)
        folder_paths.add_model_folder_path(key, str(ctx.models / key), is_default=True)
    ctx.output.mkdir(parents=True, exist_ok=True)
    folder_paths.set_output_directory(str(ctx.output))


def wan_int8(ctx) -> dict:
    import comfy.model_management as mm
    import comfy.sd
    import comfy.utils
    import torch

    import nodes

    _use_scenario_folders(ctx)
    p = ctx.params
    loader = ctx.pack.NODE_CLASS_MAPPINGS["OTUNetLoaderW8A8"]()
    saver = ctx.pack.NODE_CLASS_MAPPINGS["SlipstreamSaveInt8Model"]()
    out: dict = {"host": ctx.pack_module("host").NAME}

    # 1. A float checkpoint quantized on the fly by our node; the same file through core UNETLoader.
    (q_model,) = loader.load_unet(p["float_file"], "default", "auto", True)
    (f_model,) = nodes.UNETLoader().load_unet(p["float_file"], "default")
    dq, df = q_model.model.diffusion_model, f_model.model.diffusion_model
    out["model_class"] = type(q_model.model).__name__
    out["kinds"] = _layer_kinds(dq)
    out["q_layer_class"] = type(dq.blocks[0].self_attn.q).__qualname__
    out["head_kind"] = dq.head.head.layer_kind
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 1, 8, 8, generator=gen)
    t = torch.tensor([0.5])
    context = torch.randn(1, 8, 4096, generator=gen)
    with torch.no_grad():
        yq, yf = dq(x, t, context), df(x, t, context)
    out["out_dtype"] = str(yq.dtype)
    out["rel_vs_float"] = _rel(yq, yf)

    # 2. One sampling step through core KSampler code, counting which int8 kernel ran.
    kernels = ctx.pack_module("kernels.int8")
    out["int8_backend"] = ctx.pack_module("kernels.int8_onednn").describe()
    out["packed_layers"] = sum(type(m.weight).__name__ == "PackedInt8Weight" for m in dq.modules()
                               if getattr(m, "layer_kind", None) == "int8")
    cond = [[context, {}]]
    latent = {"samples": torch.zeros(1, 16, 1, 8, 8)}
    before = kernels.backend_calls()
    (sampled,) = nodes.common_ksampler(q_model, 7, 1, 1.0, "euler", "simple", cond, cond, latent)
    after = kernels.backend_calls()
    out["ksampler_kernel_calls"] = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
    (sampled_f,) = nodes.common_ksampler(f_model, 7, 1, 1.0, "euler", "simple", cond, cond, latent)
    out["sample_finite"] = bool(torch.isfinite(sampled["samples"]).all())
    out["sample_rel_vs_float"] = _rel(sampled["samples"], sampled_f["samples"])

    # 3. A LoRA through core LoraLoaderModelOnly: dequantize, patch, re-quantize; unpatch restores.
    layer = dq.blocks[0].self_attn.q
    orig_w, orig_s = layer.weight.detach().clone(), layer.weight_scale.detach().clone()
    (lora_model,) = nodes.LoraLoaderModelOnly().load_lora_model_only(q_model, p["lora_file"], 1.0)
    mm.load_models_gpu([lora_model], force_patch_weights=True)
    patched = layer.convert_weight(layer.weight.float())
    lora = comfy.utils.load_torch_file(str(ctx.models / "loras" / p["lora_file"]))
    delta = lora[f"{p['lora_key']}.lora_up.weight"].float() @ lora[f"{p['lora_key']}.lora_down.weight"].float()
    int8 = ctx.pack_module("kernels.int8")
    before = int8.dequantize_weight(orig_w, orig_s, torch.float32, layer.rotation_group)
    w_float = df.blocks[0].self_attn.q.weight.float()
    out["lora_patched_rel"] = _rel(patched, w_float + delta)
    out["lora_moved_by_delta_rel"] = _rel(patched - before, delta)
    out["scale_changed"] = not torch.equal(layer.weight_scale, orig_s)
    with torch.no_grad():
        y_lora = dq(x, t, context)
    (sampled_l,) = nodes.common_ksampler(lora_model, 7, 1, 1.0, "euler", "simple", cond, cond, latent)
    out["lora_changes_sample"] = _rel(sampled_l["samples"], sampled["samples"]) > 1e-3
    lora_model.unpatch_model()
    out["unpatch_exact"] = bool(torch.equal(layer.weight, orig_w) and torch.equal(layer.weight_scale, orig_s))
    with torch.no_grad():
        out["unpatched_output_exact"] = bool(torch.equal(dq(x, t, context), yq))
        out["lora_output_differs"] = _rel(y_lora, yq) > 1e-3

    # 4. LoRA applied on the fly (what ComfyUI does for offloaded weights): weight_function path.
    layer.weight_function = [lambda w: w + delta.to(w.dtype)]
    with torch.no_grad():
        y_fn = dq(x, t, context)
    layer.weight_function = []
    out["weight_function_matches_bake"] = _rel(y_fn, y_lora)

    # 4b. Weights ComfyUI streams from the offload device (lowvram): comfy_cast_weights path.
    for module in dq.modules():
        if getattr(module, "layer_kind", None) == "int8":
            module.comfy_cast_weights = True
    with torch.no_grad():
        out["cast_weights_rel"] = _rel(dq(x, t, context), yq)
    for module in dq.modules():
        if getattr(module, "layer_kind", None) == "int8":
            module.comfy_cast_weights = False

    # 5. Save in the official layout, reload through our node without quantizing: bit for bit.
    ui = saver.save(q_model, "int8/tiny_wan")
    saved = sorted((ctx.output / "int8").glob("tiny_wan_*.safetensors"))[-1]
    out["saved_text"] = ui["ui"]["text"][0]
    target = ctx.models / "diffusion_models" / "tiny_wan_int8.safetensors"
    target.write_bytes(saved.read_bytes())
    onednn = ctx.pack_module("kernels.int8_onednn")
    given: list[str] = []                   # the kind of each int8 weight ComfyUI's loader is handed
    core_loader = comfy.sd.load_diffusion_model_state_dict

    def recording_loader(sd, *args, **kwargs):
        given.extend("packed" if isinstance(v, onednn.PackedInt8Weight) else "plain"
                     for v in sd.values() if v.dtype == torch.int8 and v.dim() == 2)
        return core_loader(sd, *args, **kwargs)

    comfy.sd.load_diffusion_model_state_dict = recording_loader
    try:
        (reloaded,) = loader.load_unet(target.name, "default", "auto", False)
    finally:
        comfy.sd.load_diffusion_model_state_dict = core_loader
    out["reload_given_int8"] = {kind: given.count(kind) for kind in ("packed", "plain")}
    dr = reloaded.model.diffusion_model
    same = all(ka == kb and a.dtype == b.dtype and torch.equal(a, b)
               for (ka, a), (kb, b) in zip(dq.state_dict().items(), dr.state_dict().items(), strict=True))
    out["reload_state_equal"] = same
    with torch.no_grad():
        yr = dr(x, t, context)
    # ComfyUI treats a file with comfy_quant tags as a quantized model and runs its float layers
    # through manual-cast ops, so the output matches to float rounding, not bit for bit.
    out["reload_output_rel"] = _rel(yr, yq)
    out["reload_manual_cast"] = str(getattr(reloaded.model, "manual_cast_dtype", None))
    out["reload_kinds"] = _layer_kinds(dr)

    # 6. ComfyUI's own UNETLoader on the file we wrote (works on ComfyUI versions with int8 support).
    try:
        (core,) = nodes.UNETLoader().load_unet(target.name, "default")
        with torch.no_grad():
            out["core_loader"] = {"ok": True, "rel_vs_ours": _rel(core.model.diffusion_model(x, t, context), yq)}
    except Exception as exc:  # reported, not hidden: v0.8.0 has no int8_tensorwise
        out["core_loader"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}

    # 6b. The saved tensors read by comfy-kitchen's TensorWiseINT8Layout, the way ComfyUI versions with
    # int8 build their weights from a file: same dequantized weight, same layer output.
    out["kitchen"] = _kitchen_parity(saved, dq, ["blocks.0.self_attn.q", "blocks.1.ffn.2"],
                                     ctx.pack_module("kernels.int8_kitchen"))

    # 7. Two loads in one process do not share configuration (fresh ops class per load).
    (plain,) = loader.load_unet(p["float_file"], "default", "auto", False)
    out["second_load_kinds"] = _layer_kinds(plain.model.diffusion_model)
    out["ops_classes_distinct"] = type(plain.model.diffusion_model.blocks[0].self_attn.q) is not type(layer)
    return out


def save_keeps_float_dtype(ctx) -> dict:
    """A bf16 checkpoint quantized on the fly and saved by our nodes inside ComfyUI on CPU: every
    tensor that is not an int8 layer's weight or scale must come out as it went in (dtype and value)."""
    import torch
    from safetensors import safe_open

    _use_scenario_folders(ctx)
    p = ctx.params
    loader = ctx.pack.NODE_CLASS_MAPPINGS["OTUNetLoaderW8A8"]()
    saver = ctx.pack.NODE_CLASS_MAPPINGS["SlipstreamSaveInt8Model"]()
    (model,) = loader.load_unet(p["float_file"], "default", "auto", True)
    saver.save(model, "int8/bf16_kept")
    saved = sorted((ctx.output / "int8").glob("bf16_kept_*.safetensors"))[-1]
    source = ctx.models / "diffusion_models" / p["float_file"]
    changed, int8_layers, kept = [], 0, 0
    with safe_open(str(source), "pt") as src, safe_open(str(saved), "pt") as dst:
        dst_keys = set(dst.keys())
        for key in src.keys():
            a = src.get_tensor(key)
            b = dst.get_tensor(key) if key in dst_keys else None
            if b is not None and b.dtype == torch.int8:
                int8_layers += 1
                continue
            if b is None or b.dtype != a.dtype or not torch.equal(a, b):
                changed.append(f"{key}: {a.dtype} -> {None if b is None else b.dtype}")
            else:
                kept += 1
        f32 = [k for k in dst_keys if dst.get_tensor(k).dtype == torch.float32 and not k.endswith(".weight_scale")]
    return {"changed": changed[:10], "n_changed": len(changed), "kept": kept, "int8_layers": int8_layers,
            "f32_tensors": sorted(f32)[:10], "saved_bytes": saved.stat().st_size, "source_bytes": source.stat().st_size}


def write_tiny_sd15(ctx) -> dict:
    """A random SD1.5-layout UNet (model_channels 320, context 768, one level) built by ComfyUI's own
    UNetModel, plus a LoRA on its cross-attention query, written to models/ for the HTTP test."""
    import comfy.ops
    import torch
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from safetensors.torch import save_file

    torch.manual_seed(5)
    unet = UNetModel(image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[1],
                     channel_mult=[1], num_head_channels=64, transformer_depth=[1], transformer_depth_output=[1, 1],
                     transformer_depth_middle=1, context_dim=768, use_linear_in_transformer=False,
                     use_spatial_transformer=True, operations=comfy.ops.manual_cast)
    for param in unet.parameters():
        torch.nn.init.normal_(param, std=0.02)
    sd = {k: v.detach().half().contiguous() for k, v in unet.state_dict().items()}
    (ctx.models / "diffusion_models").mkdir(parents=True, exist_ok=True)
    save_file(sd, str(ctx.models / "diffusion_models" / ctx.params["unet_file"]))
    key = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"
    lora = {f"{key}.lora_up.weight": torch.randn(320, 4) * 0.5, f"{key}.lora_down.weight": torch.randn(4, 320) * 0.5,
            f"{key}.alpha": torch.tensor(4.0)}
    (ctx.models / "loras").mkdir(parents=True, exist_ok=True)
    save_file(lora, str(ctx.models / "loras" / ctx.params["lora_file"]))
    return {"tensors": len(sd)}


def _kitchen_parity(path, model, layers, wrapper=None) -> dict:
    import json

    import torch
    import torch.nn.functional as F
    from safetensors.torch import load_file

    try:
        from comfy_kitchen.tensor import QuantizedTensor, TensorWiseINT8Layout
    except ImportError as exc:
        return {"available": False, "error": str(exc)}
    sd = load_file(str(path))
    result = {"available": True}
    gen = torch.Generator().manual_seed(9)
    for name in layers:
        weight, scale = sd[f"{name}.weight"], sd[f"{name}.weight_scale"]
        conf = json.loads(bytes(sd[f"{name}.comfy_quant"].tolist()).decode())
        params = TensorWiseINT8Layout.Params(scale=scale, orig_dtype=torch.float32, orig_shape=tuple(weight.shape),
                                             convrot=bool(conf.get("convrot", False)),
                                             convrot_groupsize=int(conf.get("convrot_groupsize", 256)))
        qt = QuantizedTensor(weight, "TensorWiseINT8Layout", params)
        layer = model.get_submodule(name)
        ours = layer.convert_weight(layer.weight.float())
        x = torch.randn(32, weight.shape[1], generator=gen)
        bias = sd.get(f"{name}.bias")
        with torch.no_grad():
            y_kitchen, y_ours = F.linear(x, qt, bias), layer(x)
        wrapped = None
        if wrapper is not None:      # our CUDA dispatch to kitchen, forced onto kitchen's CPU backend
            import comfy_kitchen

            wrapper._state.clear()
            wrapper._state["fn"] = comfy_kitchen.int8_linear
            y_wrapped = wrapper.linear(x, weight, scale, bias, int(conf.get("convrot_groupsize", 0))
                                       if conf.get("convrot") else 0, allow_cpu=True)
            wrapper._state.clear()
            wrapped = _rel(y_wrapped, y_ours)
        result[name] = {"conf": conf, "scale_shape": list(scale.shape), "wrapper_rel": wrapped,
                        "dequant_max_abs": float((qt.dequantize().float() - ours).abs().max()),
                        "weight_abs_max": float(ours.abs().max()),
                        "output_rel": _rel(y_kitchen, y_ours)}
    return result
