"""A procedural T-pose humanoid (capsules and spheres) for demos, tests and benchmarks.

Real scans cannot ship with the pack; this figure has the parts MIA looks for (head, torso, arms
out along +-X, legs, hands, feet), Y up and facing +Z like a Mixamo character, plus UVs and a small
texture so the rigged GLB's material carry-over is exercised too.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from .lazy_trimesh import trimesh
from .networks import NETWORK_NAMES, PCAEConfig, build_network
from .weights import save_network_file

# The real architecture at a tiny size: the demo exercises the whole pipeline on a CPU in seconds.
DEMO_CONFIG = PCAEConfig(dim=64, depth=2, heads=2, dim_head=32, num_latents=64, num_points=2048, head_depth=2,
                         head_heads=2, head_ff=128)


def _capsule(a: tuple[float, float, float], b: tuple[float, float, float], radius: float) -> trimesh.Trimesh:
    a_, b_ = np.asarray(a, float), np.asarray(b, float)
    axis = b_ - a_
    cap = trimesh.creation.capsule(height=float(np.linalg.norm(axis)), radius=radius, count=[12, 12])
    cap.apply_transform(trimesh.geometry.align_vectors([0, 0, 1], axis / np.linalg.norm(axis)))
    cap.apply_translation((a_ + b_) / 2)
    return cap


def _sphere(center: tuple[float, float, float], radius: float) -> trimesh.Trimesh:
    s = trimesh.creation.icosphere(subdivisions=2, radius=radius)
    s.apply_translation(center)
    return s


def make_humanoid(scale: float = 1.0, offset: tuple[float, float, float] = (0.0, 0.0, 0.0),
                  textured: bool = True) -> trimesh.Trimesh:
    """About 1.8 * scale tall, feet at y = offset[1], facing +Z, arms along +-X."""
    parts = [
        _capsule((0, 0.95, 0), (0, 1.45, 0), 0.16),            # torso
        _sphere((0, 1.68, 0), 0.12),                           # head
        _capsule((0, 1.48, 0), (0, 1.56, 0), 0.05),            # neck
        _capsule((0.18, 1.42, 0), (0.75, 1.42, 0), 0.05),      # left arm (+X = character's left)
        _capsule((-0.18, 1.42, 0), (-0.75, 1.42, 0), 0.05),    # right arm
        _sphere((0.82, 1.42, 0), 0.06),                        # left hand
        _sphere((-0.82, 1.42, 0), 0.06),                       # right hand
        _capsule((0.09, 0.92, 0), (0.09, 0.08, 0), 0.07),      # left leg
        _capsule((-0.09, 0.92, 0), (-0.09, 0.08, 0), 0.07),    # right leg
        _capsule((0.09, 0.04, -0.02), (0.09, 0.04, 0.16), 0.04),   # left foot
        _capsule((-0.09, 0.04, -0.02), (-0.09, 0.04, 0.16), 0.04),  # right foot
    ]
    body = trimesh.util.concatenate(parts)
    body.apply_scale(scale)
    body.apply_translation(offset)
    mesh = trimesh.Trimesh(body.vertices, body.faces, process=False)
    if textured:
        from PIL import Image

        v = mesh.vertices
        uv = np.stack([(np.arctan2(v[:, 0], v[:, 2]) / (2 * np.pi)) % 1.0,
                       (v[:, 1] - v[:, 1].min()) / np.ptp(v[:, 1])], axis=1)
        pixels = np.zeros((16, 16, 3), dtype=np.uint8)
        pixels[..., 0] = np.linspace(40, 220, 16, dtype=np.uint8)[None, :]
        pixels[..., 1] = np.linspace(200, 60, 16, dtype=np.uint8)[:, None]
        pixels[..., 2] = 128
        mesh.visual = trimesh.visual.TextureVisuals(uv=uv, image=Image.fromarray(pixels))
    return mesh


def write_demo_assets(models_dir: str, mesh_path: str, seed: int = 0) -> None:
    """Miniature random-weight networks in the cache layout, and the humanoid as a GLB.

    The networks have the real architecture at a tiny size (their config rides in the safetensors
    metadata), so the demo workflow exercises download-free loading and the whole pipeline on a CPU
    in seconds. The rig they produce is random: this demonstrates plumbing, not quality.
    """
    os.makedirs(models_dir, exist_ok=True)
    os.makedirs(os.path.dirname(mesh_path), exist_ok=True)
    torch.manual_seed(seed)
    for name in NETWORK_NAMES:
        net = build_network(name, DEMO_CONFIG)
        save_network_file(net.state_dict(), name, DEMO_CONFIG, os.path.join(models_dir, f"{name}.safetensors"))
    make_humanoid().export(mesh_path)
