"""Meshes in and out of the rigger: files via trimesh, and ComfyUI's core MESH values.

Files are loaded with process=False and maintain_order=True so vertices are never merged or
reordered (weights are per vertex, and UV seams rely on duplicated vertices). A scene is flattened
into one mesh with each node's transform applied. Core ComfyUI passes meshes as a `MESH` object
whose `vertices` [B, N, 3] and `faces` [B, M, 3] are tensors (newer builds add per-item counts for
padded batches, UVs and a texture); the rigger takes the first item.
"""

from __future__ import annotations

import os

import numpy as np

from .lazy_trimesh import trimesh

MESH_EXTENSIONS = (".glb", ".gltf", ".obj", ".ply", ".stl")


class MeshError(ValueError):
    """A mesh file or value the rigger cannot use; the message says why."""


def load_mesh(path: str) -> trimesh.Trimesh:
    """A single triangle mesh from a glb/gltf/obj/ply/stl file, textures kept where trimesh reads them."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in MESH_EXTENSIONS:
        raise MeshError(f"'{os.path.basename(path)}' is not a supported mesh file ({', '.join(MESH_EXTENSIONS)}).")
    if not os.path.isfile(path):
        raise MeshError(f"Mesh file not found: {path}. Put the mesh in ComfyUI's input/3d folder and pick it again.")
    try:
        loaded = trimesh.load(path, process=False, maintain_order=True)
    except Exception as exc:  # trimesh raises many types for damaged files
        raise MeshError(f"Cannot read '{os.path.basename(path)}' as a {ext[1:]} mesh: {exc}. The file may be damaged; "
                        "re-export it (glb is the safest choice).") from exc
    return as_triangle_mesh(loaded, os.path.basename(path))


def as_triangle_mesh(value: object, what: str = "input") -> trimesh.Trimesh:
    """Accept a trimesh.Trimesh, a trimesh.Scene, a core ComfyUI MESH or a file path."""
    if isinstance(value, str):
        return load_mesh(value)
    if isinstance(value, trimesh.Scene):
        geometries = [g for g in value.dump() if isinstance(g, trimesh.Trimesh) and len(g.faces)]
        if not geometries:
            raise MeshError(f"{what} contains no triangle mesh (only points or lines); export the character as a mesh.")
        value = geometries[0] if len(geometries) == 1 else trimesh.util.concatenate(geometries)
    if isinstance(value, trimesh.Trimesh):
        if len(value.faces) == 0:
            raise MeshError(f"{what} has no faces; MIA needs a surface, not a point cloud.")
        return value
    if hasattr(value, "vertices") and hasattr(value, "faces"):
        return from_comfy_mesh(value)
    raise MeshError(f"Expected a mesh (trimesh or ComfyUI MESH), got {type(value).__name__}.")


def _item(array, index: int, count) -> np.ndarray:
    data = array[index]
    data = data.detach().cpu().numpy() if hasattr(data, "detach") else np.asarray(data)
    if count is not None:
        data = data[: int(count[index])]
    return data


def from_comfy_mesh(mesh: object) -> trimesh.Trimesh:
    """Convert core ComfyUI's MESH (batched tensors) to a trimesh, first batch item only."""
    vertices, faces = mesh.vertices, mesh.faces
    if getattr(vertices, "ndim", 0) == 2:
        vertices, faces = vertices[None], faces[None]
    if getattr(vertices, "ndim", 0) != 3 or vertices.shape[0] == 0:
        raise MeshError(f"MESH vertices must be [B, N, 3], got {tuple(getattr(vertices, 'shape', ()))}.")
    verts = _item(vertices, 0, getattr(mesh, "vertex_counts", None)).astype(np.float64)
    tris = _item(faces, 0, getattr(mesh, "face_counts", None)).astype(np.int64)
    if len(tris) == 0:
        raise MeshError("MESH has no faces.")
    visual = None
    uvs, texture = getattr(mesh, "uvs", None), getattr(mesh, "texture", None)
    if uvs is not None and texture is not None:
        from PIL import Image

        uv = _item(uvs, 0, getattr(mesh, "vertex_counts", None))
        pixels = (np.clip(_item(texture, 0, None), 0, 1) * 255).astype(np.uint8)
        visual = trimesh.visual.TextureVisuals(uv=uv, image=Image.fromarray(pixels))
    return trimesh.Trimesh(verts, tris, visual=visual, process=False)


def list_mesh_files(root: str) -> list[str]:
    """Mesh files under root/3d (then root itself), relative to root with forward slashes."""
    found: list[str] = []
    for sub in ("3d", ""):
        base = os.path.join(root, sub)
        if not os.path.isdir(base):
            continue
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and not (sub == "" and d == "3d"))
            if sub == "" and dirpath != base:
                continue
            for fname in sorted(filenames):
                if os.path.splitext(fname)[1].lower() in MESH_EXTENSIONS and not fname.startswith("."):
                    found.append(os.path.relpath(os.path.join(dirpath, fname), root).replace(os.sep, "/"))
    return found
