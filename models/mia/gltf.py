"""Rigged GLB output without Blender: trimesh writes the textured mesh, we add the skin.

trimesh exports geometry, UVs, materials and textures faithfully but cannot write skins, so the
GLB it produces is parsed (JSON chunk + BIN chunk) and extended with what glTF 2.0 skinning needs:
JOINTS_0 (ushort VEC4) and WEIGHTS_0 (float VEC4) on the primitive, one node per joint named
`mixamorig:*` with local translation/rotation from the joint world matrices, a skin whose
inverse bind matrices (column-major MAT4) invert those world matrices, and `skin` on the mesh
node, which stays at the scene root without a transform (the validator's rule). Vertex order is
never changed (trimesh runs with process=False), so weights line up with vertices.

FBX is written only when Blender's Python module `bpy` is importable; it re-imports this GLB.
"""

from __future__ import annotations

import importlib.util
import json
import struct

import numpy as np

from .lazy_trimesh import trimesh
from .mesh import MeshError
from .rig import MAX_INFLUENCES, RigResult

GLB_MAGIC = 0x46546C67
CHUNK_JSON = 0x4E4F534A
CHUNK_BIN = 0x004E4942
FLOAT, USHORT = 5126, 5123
ARRAY_BUFFER = 34962


def read_glb(data: bytes) -> tuple[dict, bytes]:
    """(JSON document, BIN chunk) of a GLB file."""
    magic, version, length = struct.unpack_from("<III", data, 0)
    if magic != GLB_MAGIC or version != 2:
        raise ValueError("not a glTF 2.0 binary (GLB) file")
    offset, doc, binary = 12, None, b""
    while offset < min(length, len(data)):
        chunk_len, chunk_type = struct.unpack_from("<II", data, offset)
        body = data[offset + 8: offset + 8 + chunk_len]
        if chunk_type == CHUNK_JSON:
            doc = json.loads(body.decode("utf-8"))
        elif chunk_type == CHUNK_BIN:
            binary = bytes(body)
        offset += 8 + chunk_len
    if doc is None:
        raise ValueError("GLB has no JSON chunk")
    return doc, binary


def encode_glb(doc: dict, binary: bytes) -> bytes:
    doc["buffers"] = [{"byteLength": len(binary)}] if binary else []
    js = json.dumps(doc, separators=(",", ":")).encode("utf-8")
    js += b" " * (-len(js) % 4)
    binary += b"\0" * (-len(binary) % 4)
    total = 12 + 8 + len(js) + (8 + len(binary) if binary else 0)
    out = struct.pack("<III", GLB_MAGIC, 2, total) + struct.pack("<II", len(js), CHUNK_JSON) + js
    if binary:
        out += struct.pack("<II", len(binary), CHUNK_BIN) + binary
    return out


def accessor_array(doc: dict, binary: bytes, index: int) -> np.ndarray:
    """Read an accessor back as a numpy array (tightly packed views only; enough for our files)."""
    acc = doc["accessors"][index]
    view = doc["bufferViews"][acc["bufferView"]]
    dtype = {5126: np.float32, 5123: np.uint16, 5125: np.uint32, 5121: np.uint8}[acc["componentType"]]
    width = {"SCALAR": 1, "VEC2": 2, "VEC3": 3, "VEC4": 4, "MAT4": 16}[acc["type"]]
    start = view.get("byteOffset", 0) + acc.get("byteOffset", 0)
    arr = np.frombuffer(binary, dtype=dtype, count=acc["count"] * width, offset=start)
    return arr.reshape(acc["count"], width) if width > 1 else arr


class _BinWriter:
    def __init__(self, doc: dict, binary: bytes):
        self.doc = doc
        self.binary = bytearray(binary)
        doc.setdefault("bufferViews", [])
        doc.setdefault("accessors", [])

    def add(self, array: np.ndarray, component: int, kind: str, target: int | None = None,
            minmax: bool = False) -> int:
        self.binary += b"\0" * (-len(self.binary) % 4)
        data = np.ascontiguousarray(array).tobytes()
        view = {"buffer": 0, "byteOffset": len(self.binary), "byteLength": len(data)}
        if target is not None:
            view["target"] = target
        self.binary += data
        self.doc["bufferViews"].append(view)
        acc = {"bufferView": len(self.doc["bufferViews"]) - 1, "componentType": component,
               "count": int(array.shape[0]), "type": kind}
        if minmax:
            acc["min"] = array.min(axis=0).tolist()
            acc["max"] = array.max(axis=0).tolist()
        self.doc["accessors"].append(acc)
        return len(self.doc["accessors"]) - 1


def top_influences(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """([V,4] joint indices, [V,4] weights) of the largest weights per vertex (unused slots weigh 0)."""
    order = np.argsort(-weights, axis=1, kind="stable")[:, :MAX_INFLUENCES]
    picked = np.take_along_axis(weights, order, axis=1).astype(np.float32)
    order = np.where(picked > 0, order, 0)
    return order.astype(np.uint16), picked


def matrix_to_quaternion(m: np.ndarray) -> list[float]:
    """[x, y, z, w] unit quaternion of a rotation matrix (glTF order)."""
    t = np.trace(m)
    if t > 0:
        s = np.sqrt(t + 1.0) * 2
        q = [(m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s, 0.25 * s]
    elif m[0, 0] > m[1, 1] and m[0, 0] > m[2, 2]:
        s = np.sqrt(1.0 + m[0, 0] - m[1, 1] - m[2, 2]) * 2
        q = [0.25 * s, (m[0, 1] + m[1, 0]) / s, (m[0, 2] + m[2, 0]) / s, (m[2, 1] - m[1, 2]) / s]
    elif m[1, 1] > m[2, 2]:
        s = np.sqrt(1.0 + m[1, 1] - m[0, 0] - m[2, 2]) * 2
        q = [(m[0, 1] + m[1, 0]) / s, 0.25 * s, (m[1, 2] + m[2, 1]) / s, (m[0, 2] - m[2, 0]) / s]
    else:
        s = np.sqrt(1.0 + m[2, 2] - m[0, 0] - m[1, 1]) * 2
        q = [(m[0, 2] + m[2, 0]) / s, (m[1, 2] + m[2, 1]) / s, 0.25 * s, (m[1, 0] - m[0, 1]) / s]
    q = np.asarray(q, dtype=np.float64)
    return (q / np.linalg.norm(q)).tolist()


def rigged_glb_bytes(mesh: trimesh.Trimesh, rig: RigResult) -> bytes:
    """The GLB of `mesh`'s faces and visuals with the rig's vertices, joints and weights."""
    out_mesh = trimesh.Trimesh(rig.vertices, np.asarray(mesh.faces), visual=mesh.visual.copy(), process=False)
    doc, binary = read_glb(out_mesh.export(file_type="glb"))
    writer = _BinWriter(doc, binary)
    joints_idx, joint_weights = top_influences(rig.weights)
    joints_acc = writer.add(joints_idx, USHORT, "VEC4", ARRAY_BUFFER)
    weights_acc = writer.add(joint_weights, FLOAT, "VEC4", ARRAY_BUFFER)
    ibm = np.linalg.inv(rig.bind_matrices).astype(np.float32)
    ibm_acc = writer.add(ibm.transpose(0, 2, 1).reshape(len(ibm), 16), FLOAT, "MAT4")

    nodes = doc.setdefault("nodes", [])
    mesh_nodes = [i for i, n in enumerate(nodes) if "mesh" in n]
    first_joint = len(nodes)
    parents = rig.parents
    for k, name in enumerate(rig.names):
        world = rig.bind_matrices[k]
        local = world if parents[k] < 0 else np.linalg.inv(rig.bind_matrices[parents[k]]) @ world
        node = {"name": name, "translation": local[:3, 3].tolist(), "rotation": matrix_to_quaternion(local[:3, :3])}
        children = [first_joint + c for c, p in enumerate(parents) if p == k]
        if children:
            node["children"] = children
        nodes.append(node)
    root = first_joint + parents.index(-1)
    doc["skins"] = [{"name": "mixamorig", "joints": list(range(first_joint, len(nodes))),
                     "inverseBindMatrices": ibm_acc, "skeleton": root}]
    for i in mesh_nodes:
        for key in ("matrix", "translation", "rotation", "scale"):
            nodes[i].pop(key, None)
        nodes[i]["skin"] = 0
        for prim in doc["meshes"][nodes[i]["mesh"]]["primitives"]:
            prim["attributes"]["JOINTS_0"] = joints_acc
            prim["attributes"]["WEIGHTS_0"] = weights_acc
    scene = doc["scenes"][doc.get("scene", 0)]
    scene["nodes"] = [*scene.get("nodes", []), root]
    doc["asset"]["generator"] = "Slipstream MIA auto-rig (trimesh + skin)"
    binary = bytes(writer.binary)
    check_finite_floats(doc, binary)
    return encode_glb(doc, binary)


def check_finite_floats(doc: dict, binary: bytes) -> None:
    """Refuse a GLB that would hold a NaN or inf anywhere (accessor data or node transforms):
    viewers and game engines show such a file as nothing, or crash on it."""
    bad = [f"accessor {i} ({acc['type']})" for i, acc in enumerate(doc.get("accessors", []))
           if acc["componentType"] == FLOAT and not np.isfinite(accessor_array(doc, binary, i)).all()]
    bad += [f"node '{node.get('name', i)}'" for i, node in enumerate(doc.get("nodes", []))
            if not np.isfinite(np.asarray([*node.get("translation", []), *node.get("rotation", []),
                                           *node.get("scale", []), *node.get("matrix", [])], dtype=np.float64)).all()]
    if bad:
        raise MeshError(f"The rig came out with non-finite numbers (NaN or inf) in {', '.join(bad[:4])}, so no GLB "
                        "was written. Check that the mesh is a humanoid of sensible size (re-export it in metres) "
                        "and that the MIA model files are intact.")


def fbx_available() -> bool:
    return importlib.util.find_spec("bpy") is not None


def write_fbx_with_blender(glb_path: str, fbx_path: str) -> None:
    """Convert the rigged GLB to FBX with Blender's Python module (only called when bpy exists)."""
    import bpy

    bpy.ops.wm.read_factory_settings(use_empty=True)
    bpy.ops.import_scene.gltf(filepath=glb_path)
    bpy.ops.export_scene.fbx(filepath=fbx_path, use_selection=False, object_types={"ARMATURE", "MESH"},
                             add_leaf_bones=False, bake_anim=False, path_mode="COPY", embed_textures=True)
