"""In-process scenario for MIA rigging, run inside ComfyUI by inprocess_boot.py.

Not a test module: it runs under COMFYUI_PYTHON with ComfyUI imported and returns plain data that
tests/integration/test_comfyui_mia.py checks.
"""

from __future__ import annotations


def networks_are_managed(ctx) -> dict:
    """MIA: Load Model + Auto Rig: every network a ModelPatcher that ComfyUI loaded, counted and can free."""
    import comfy.model_management as mm
    import folder_paths
    import torch

    folder_paths.add_model_folder_path("mia", str(ctx.models / "mia"), is_default=True)
    folder_paths.set_input_directory(str(ctx.input))
    nodes = ctx.pack.NODE_CLASS_MAPPINGS
    out: dict = {"host": ctx.pack_module("host").NAME}
    with torch.inference_mode():
        (handle,) = nodes["MIALoadModel"]().load("fp32", "sdpa")
        out["before_rig"] = sorted(name for name, p in handle.managed.items()
                                   if any(lm.model is p for lm in mm.current_loaded_models))
        (mesh,) = nodes["SlipstreamLoadMesh"]().load(ctx.params["mesh"])
        nodes["MIAAutoRig"]().rig(mesh, handle, use_normal=True)
    out["patchers"] = sorted({type(p).__module__ + "." + type(p).__name__ for p in handle.managed.values()})
    out["managed"] = sorted(name for name, p in handle.managed.items()
                            if any(lm.model is p for lm in mm.current_loaded_models))
    out["counted_bytes"] = sum(lm.model_memory() for lm in mm.current_loaded_models
                               if any(lm.model is p for p in handle.managed.values()))
    out["weight_bytes"] = sum(t.numel() * t.element_size() for p in handle.managed.values()
                              for t in p.model.state_dict().values())
    mm.unload_all_models()
    out["after_unload"] = sorted(name for name, p in handle.managed.items()
                                 if any(lm.model is p for lm in mm.current_loaded_models))
    return out
