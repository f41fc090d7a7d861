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


# Working memory of a rig grows about 2.2 KiB per vertex (float64 weights of 52 joints, blend
# matrices, clean-up copies): 2.6 M vertices peaked at 5.7 GiB. One million stays near 2.2 GiB,
# and a character mesh rarely needs more vertices for skinning to look right.
MAX_RIG_VERTICES = 1_000_000


class MeshError(ValueError):
    """A mesh file or value the rigger cannot use; the message says why."""


def check_rig_input(vertices: np.ndarray, faces: np.ndarray, what: str = "the mesh") -> None:
    """Refuse a mesh the rigger cannot turn into a valid file: no faces, faces indexing past the
    vertices, coordinates that are not finite in float32 (what the GLB stores), or more vertices
    than MAX_RIG_VERTICES."""
    if len(faces) == 0:
        raise MeshError(f"{what} has no faces; MIA needs a surface to sample (point clouds are not supported).")
    if len(vertices) > MAX_RIG_VERTICES:
        raise MeshError(
            f"{what} has {len(vertices):,} vertices, more than the rigger's budget of {MAX_RIG_VERTICES:,} "
            "(about 2.2 GiB of working memory). Decimate it in a 3D editor (Blender: Decimate modifier) and try again.")
    low, high = int(faces.min()), int(faces.max())
    if low < 0 or high >= len(vertices):
        bad = low if low < 0 else high
        raise MeshError(f"{what} is damaged: a face uses vertex {bad}, but the mesh has {len(vertices)} vertices "
                        "(0 to {0}). Re-export the mesh from its editor.".format(len(vertices) - 1))
    with np.errstate(over="ignore", invalid="ignore"):
        stored = np.asarray(vertices, dtype=np.float64).astype(np.float32)
    if not np.isfinite(stored).all():
        raise MeshError(f"{what} has vertex coordinates that are NaN, inf or too large for a 3D file (beyond "
                        "±3.4e38): delete or fix those vertices in a 3D editor, or re-export the mesh in metres, "
                        "and try again.")


def vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """[V, 3] unit normals, each face's normal weighted by its corner angle at the vertex.

    The same weighting trimesh uses, summed with np.add.at instead of a scipy sparse matrix (the
    pack does not depend on scipy, and trimesh's fallback without it is a per-vertex Python loop).
    """
    tri = np.asarray(vertices, dtype=np.float64)[faces]
    normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    lengths = np.linalg.norm(normals, axis=1, keepdims=True)
    normals = np.divide(normals, lengths, out=np.zeros_like(normals), where=lengths > 0)
    angles = np.zeros((len(faces), 3))
    for corner in range(3):
        a = tri[:, (corner + 1) % 3] - tri[:, corner]
        b = tri[:, (corner + 2) % 3] - tri[:, corner]
        denom = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        cosine = np.divide((a * b).sum(axis=1), denom, out=np.ones(len(faces)), where=denom > 0)
        angles[:, corner] = np.arccos(np.clip(cosine, -1.0, 1.0))
    summed = np.zeros((len(vertices), 3))
    np.add.at(summed, faces.ravel(), (angles[:, :, None] * normals[:, None, :]).reshape(-1, 3))
    lengths = np.linalg.norm(summed, axis=1, keepdims=True)
    return np.divide(summed, lengths, out=np.zeros_like(summed), where=lengths > 0)


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
