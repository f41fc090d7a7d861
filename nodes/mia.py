"""MIA (Make-It-Animatable) nodes: load the five networks, auto-rig a humanoid, load a mesh file.

The loader downloads the published checkpoints once into the `mia` model folder (ComfyUI
models/mia, or MIA_MODELS_PATH), converts them to safetensors, and returns an MIA_MODEL handle.
The rig node runs the pipeline in models/mia/rig.py and writes a skinned GLB to output/3d/ that
core's 3D preview shows; FBX is added only when Blender's `bpy` module is importable.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import time

import numpy as np
import torch

from ..host import (
    ProgressBar,
    check_interrupt,
    compute_device,
    counter_of,
    input_dir,
    load_managed,
    manage_module,
    managed_home,
    model_folders,
    notice,
    output_dir,
    publish,
    register_model_folder,
    save_target,
    staged_file,
    ui_file,
)
from ..kernels.attention import is_installed, require_backend
from ..kernels.precision import PRECISIONS, dtype_name, resolve_dtype
from ..models.mia import gltf
from ..models.mia.mesh import (
    MESH_EXTENSIONS,
    MeshError,
    as_triangle_mesh,
    check_rig_input,
    list_mesh_files,
    load_mesh,
)
from ..models.mia.networks import NETWORK_NAMES
from ..models.mia.plausibility import humanoid_doubt
from ..models.mia.rig import STAGES, LazyNetwork, MIANetworks, rig_mesh
from ..models.mia.weights import check_network_file, ensure_networks, load_network

log = logging.getLogger("slipstream.mia")

CATEGORY = "Slipstream/MIA"
MODELS_ENV = "MIA_MODELS_PATH"
register_model_folder("mia", "mia", {".safetensors", ".pth"})


def models_directory() -> str:
    """Where the MIA networks live: $MIA_MODELS_PATH, else the first `mia` folder holding them all."""
    override = os.environ.get(MODELS_ENV)
    if override:
        return os.path.abspath(override)
    folders = model_folders("mia")
    if not folders:
        raise RuntimeError("No 'mia' model folder is registered; set MIA_MODELS_PATH to a directory.")
    for folder in folders:
        if all(os.path.isfile(os.path.join(folder, f"{n}.safetensors")) for n in NETWORK_NAMES):
            return folder
    return folders[0]


def resolve_attention(choice: str, device: torch.device, dtype: torch.dtype) -> str:
    """auto -> flash_attn when installed and usable (CUDA, fp16/bf16), else sdpa; explicit choices are checked."""
    if choice == "auto":
        usable = device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
        return "flash_attn" if usable and is_installed("flash_attn") else "sdpa"
    require_backend(choice)
    return choice


class MIALoadModel:
    """Load (and on first use download) the five Make-It-Animatable networks."""

    DESCRIPTION = ("Load the Make-It-Animatable networks for fast humanoid rigging (Mixamo skeleton). The first "
                   "run downloads ~2.3 GB from Hugging Face into models/mia and converts it to safetensors; later "
                   "loads read the safetensors cache. Humanoid characters only.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("MIA_MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The MIA networks with their precision, attention backend and device (bw_normal loads "
                       "on the first rig that uses normals).",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {}, "optional": {
            "precision": (list(PRECISIONS), {"default": "auto", "tooltip": (
                "Network precision. auto: bf16 on Ampere and newer GPUs, fp16 on Volta/Turing, fp32 on older GPUs "
                "and CPU. The point embedding always runs in fp32; choose fp32 if rigs look noisy.")}),
            "attn_backend": (["auto", "flash_attn", "sdpa"], {"default": "auto", "tooltip": (
                "Attention backend. auto: flash_attn when installed (CUDA, fp16/bf16), else sdpa. Only the latent "
                "self-attention layers can use flash_attn; the others always use sdpa.")}),
        }}

    def load(self, precision: str = "auto", attn_backend: str = "auto") -> tuple:
        device = compute_device()
        dtype = resolve_dtype(precision, device)
        backend = resolve_attention(attn_backend, device, dtype)   # AttentionBackendUnavailable names the fix
        directory = models_directory()
        eager = tuple(n for n in NETWORK_NAMES if n != "bw_normal")
        bar = ProgressBar(100 + len(eager))

        def on_bytes(done: int, total: int) -> None:
            if total:
                bar.update_absolute(min(99, done * 100 // total))

        paths = ensure_networks(directory, NETWORK_NAMES, progress=on_bytes, check_interrupt=check_interrupt)
        bar.update_absolute(100)
        start = time.perf_counter()
        # Built where the host's model manager wants them (inside ComfyUI: its offload device); each network
        # is then one managed model that ComfyUI moves to the GPU for a rig and can free for other models.
        home = managed_home()
        nets = {}
        for name in eager:
            nets[name] = load_network(paths[name], name, dtype=dtype, device=home, attn_backend=backend)
            bar.update(1)
        managed = {name: manage_module(net) for name, net in nets.items()}
        # Only use_normal rigs need bw_normal: vet its file now, load it on first use.
        check_network_file(paths["bw_normal"], "bw_normal")
        bw_normal = LazyNetwork(functools.partial(_load_managed_network, paths["bw_normal"], "bw_normal", managed,
                                                  dtype=dtype, device=home, attn_backend=backend))
        log.info("MIA networks loaded in %.2fs (%s, %s, %s; bw_normal on first use)", time.perf_counter() - start,
                 dtype_name(dtype), backend, device)
        handle = MIANetworks(nets["joints_coarse"], nets["bw"], bw_normal, nets["joints"], nets["pose"],
                             dtype, device, backend, managed=managed)
        return (handle,)


def _load_managed_network(path: str, name: str, managed: dict, **kwargs):
    """Load a deferred network and hand it to the host's model manager beside the others."""
    net = load_network(path, name, **kwargs)
    managed[name] = manage_module(net)
    load_managed([managed[name]])
    return net


def make_networks_resident(model: MIANetworks, use_normal: bool) -> None:
    """Ask the host to put the networks this rig uses on the compute device (ComfyUI frees room first)."""
    if use_normal:
        model.normal_network()
    load_managed([h for name, h in model.managed.items() if use_normal or name != "bw_normal"])


_NAME_OK = re.compile(r"[^A-Za-z0-9._-]+")


class MIAAutoRig:
    """Rig a humanoid mesh with the Mixamo skeleton and write a skinned GLB."""

    DESCRIPTION = ("Auto-rig a humanoid mesh with the 52-joint (or 22 without fingers) Mixamo skeleton: predicts "
                   "joints, skin weights and the pose-to-rest transform, then saves a rigged GLB to output/3d "
                   "(FBX too when Blender's bpy module is installed). The rig keeps the input's position and scale.")
    CATEGORY = CATEGORY
    FUNCTION = "rig"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("glb_path", "fbx_path")
    OUTPUT_TOOLTIPS = (
        "The rigged GLB, relative to the output folder (e.g. 3d/rigged_mia_00001_.glb) - plug into Preview 3D.",
        "The FBX relative to the output folder when bpy is installed, else an empty string.",
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "trimesh": ("TRIMESH,MESH", {"tooltip": (
                "The humanoid mesh: from Load Mesh (Slipstream) or any node giving a TRIMESH, or core ComfyUI's "
                "MESH. Best results with a single character standing upright.")}),
            "model": ("MIA_MODEL", {"tooltip": "The networks from MIA: Load Model."}),
        }, "optional": {
            "fbx_name": ("STRING", {"default": "", "tooltip": (
                "Output file name (no extension). Empty: 'rigged_mia'. A number is appended; existing files are "
                "never overwritten.")}),
            "no_fingers": ("BOOLEAN", {"default": True, "tooltip": (
                "Rig without finger bones (22 joints): finger weights are merged into the hands. Turn off for "
                "characters with separate, spread fingers (52 joints).")}),
            "use_normal": ("BOOLEAN", {"default": False, "tooltip": (
                "Also use surface normals for the skin weights; helps when limbs touch the body. The first rig "
                "with this on loads one more network (~430 MB in fp32), kept for later rigs.")}),
            "reset_to_rest": ("BOOLEAN", {"default": True, "tooltip": (
                "Move the mesh and skeleton into the T-pose rest pose the prediction implies, so Mixamo animations "
                "apply directly. Off: keep the input pose as the bind pose.")}),
        }}

    def rig(self, trimesh, model: MIANetworks, fbx_name: str = "", no_fingers: bool = True,
            use_normal: bool = False, reset_to_rest: bool = True) -> dict:
        mesh = as_triangle_mesh(trimesh)
        check_rig_input(np.asarray(mesh.vertices), np.asarray(mesh.faces), "The trimesh input")
        doubt = humanoid_doubt(mesh, "The trimesh input")
        if doubt:
            log.warning(doubt)
        make_networks_resident(model, use_normal)
        bar = ProgressBar(len(STAGES) + 1)
        start = time.perf_counter()
        result = rig_mesh(model, mesh, no_fingers=no_fingers, use_normal=use_normal, reset_to_rest=reset_to_rest,
                          on_stage=lambda _stage: bar.update(1), check_interrupt=check_interrupt)
        stem = _NAME_OK.sub("_", fbx_name.strip()).strip("._") or "rigged_mia"
        target = save_target(f"3d/{stem}")
        with staged_file(target, "glb") as tmp:
            with open(tmp, "wb") as f:
                f.write(gltf.rigged_glb_bytes(mesh, result))
            glb = publish(tmp, target, "glb")
        fbx_rel = ""
        if gltf.fbx_available():
            with staged_file(target, "fbx") as tmp:
                gltf.write_fbx_with_blender(glb, tmp)
                fbx_rel = _relative_output(publish(tmp, target, "fbx", counter=counter_of(glb, target)))
        bar.update(1)
        log.info("MIA rig: %d joints, %d vertices in %.2fs (%s)", len(result.joint_indices), len(result.vertices),
                 time.perf_counter() - start, ", ".join(f"{k} {v:.2f}s" for k, v in result.timings.items()))
        return {"ui": {"3d": [ui_file(glb, target)]}, "result": (_relative_output(glb), fbx_rel)}


def _relative_output(path: str) -> str:
    return os.path.relpath(path, output_dir()).replace(os.sep, "/")


class SlipstreamLoadMesh:
    """Load a mesh file from input/3d for the rigger."""

    DESCRIPTION = ("Load a mesh (glb, gltf, obj, ply, stl) from ComfyUI's input/3d folder (or input/) as a TRIMESH, "
                   "keeping vertex order, UVs and textures.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("TRIMESH",)
    RETURN_NAMES = ("trimesh",)
    OUTPUT_TOOLTIPS = ("The mesh as a trimesh.Trimesh (scenes are flattened into one mesh).",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        files = list_mesh_files(input_dir()) or ["(put meshes in input/3d)"]
        return {"required": {"mesh_file": (files, {"tooltip": (
            f"A mesh file under input/3d or input ({', '.join(MESH_EXTENSIONS)}).")})}}

    @classmethod
    def IS_CHANGED(cls, mesh_file):
        path = os.path.join(input_dir(), mesh_file)
        if not os.path.isfile(path):
            return mesh_file
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()

    def load(self, mesh_file: str) -> tuple:
        root = os.path.abspath(input_dir())
        path = os.path.abspath(os.path.join(root, mesh_file))
        if os.path.commonpath((root, path)) != root:
            raise MeshError(f"'{mesh_file}' points outside the input folder; pick a file under input/3d or input/.")
        # A symbolic link inside input/ may lead anywhere; ComfyUI follows such links, and so do we, but
        # the path is resolved once (the file read is the one named here) and the user is told.
        real = os.path.realpath(path)
        real_root = os.path.realpath(root)
        if os.path.commonpath((real_root, real)) != real_root:
            notice("Load Mesh", f"'{mesh_file}' is a symbolic link leading out of the input folder; "
                                f"the mesh was read from {real}")
        return (load_mesh(real),)
