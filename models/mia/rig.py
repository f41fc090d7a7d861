"""The MIA rigging pipeline: a humanoid mesh in, skeleton + skin weights (+ rest pose) out.

Stages follow upstream Make-It-Animatable (app.py), whose frames the networks were trained on:
sample 32,768 surface points -> normalise to [-1, 1] -> coarse joints -> canonical frame (Hips at
the origin, +Y up, +Z forward, +X the character's left) -> re-sample half the points in boxes around
the hands -> scale so max |coord| = 1 -> blend weights per vertex, joints, pose -> weight clean-up
-> pose-to-rest by linear blend skinning.

Unlike upstream, the result is mapped back to the input's own position, orientation and scale:
the three normalising steps form one similarity transform, and its inverse is applied to the
vertices and joints at the end (bone frames get only its rotation, so joints carry no scale).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from . import skeleton
from .lazy_trimesh import trimesh
from .mesh import check_rig_input, vertex_normals
from .networks import PCAE, ortho6d_to_matrix

HAND_RESAMPLE_RATIO = 0.5
HAND_BOX_RELATIVE_SIZE = 0.15
BW_CHUNK = 16384
MIN_WEIGHT = 1e-3   # upstream's Blender export drops weights at or below this
MAX_INFLUENCES = 4


class LazyNetwork:
    """A network built and loaded on first use, then kept.

    Only rigs with use_normal need bw_normal (~430 MB in fp32), so the loader defers it. The frozen
    handle holds this object for its whole life, so the network loads at most once per handle (and
    ComfyUI keeps the handle cached under the loader's inputs).
    """

    def __init__(self, load: Callable[[], PCAE]):
        self._load = load
        self._model: PCAE | None = None
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def get(self) -> PCAE:
        with self._lock:
            if self._model is None:
                # Built outside inference mode: the rig runs under it, but the weights outlive this rig.
                with torch.inference_mode(False):
                    self._model = self._load()
            return self._model


@dataclass(frozen=True)
class MIANetworks:
    """The five networks and how they run; bw_normal may still be waiting in a LazyNetwork."""

    coarse: PCAE
    bw: PCAE
    bw_normal: PCAE | LazyNetwork
    joints: PCAE
    pose: PCAE
    dtype: torch.dtype
    device: torch.device
    attn_backend: str
    # Each loaded network's handle in the host's model manager (name -> handle); bw_normal joins when it loads.
    managed: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def num_points(self) -> int:
        return self.coarse.cfg.num_points

    def normal_network(self) -> PCAE:
        """bw_normal, loaded now if the loader deferred it."""
        net = self.bw_normal
        return net.get() if isinstance(net, LazyNetwork) else net


@dataclass
class RigResult:
    """A rig in the input mesh's own frame."""

    vertices: np.ndarray            # [V, 3] float32: the input's, or the rest pose with reset_to_rest
    joint_indices: tuple[int, ...]  # skeleton indices of the exported joints (52, or 22 without fingers)
    heads: np.ndarray               # [J, 3] bone heads
    tails: np.ndarray               # [J, 3] bone tails
    bind_matrices: np.ndarray       # [J, 4, 4] joint world matrices (rigid: +Y along the bone, template roll)
    weights: np.ndarray             # [V, J] float32, <= 4 non-zeros per row, rows sum to 1
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [skeleton.NAMES[i] for i in self.joint_indices]

    @property
    def parents(self) -> list[int]:
        """Parent of each exported joint as an index into joint_indices (-1 for Hips)."""
        pos = {j: k for k, j in enumerate(self.joint_indices)}
        return [pos.get(skeleton.PARENTS[j], -1) for j in self.joint_indices]


# ---------------------------------------------------------------- geometry helpers


def similarity(scale: float, rotation: np.ndarray, translation: np.ndarray) -> np.ndarray:
    """4x4 matrix of x -> scale * R x + t."""
    m = np.eye(4)
    m[:3, :3] = scale * rotation
    m[:3, 3] = translation
    return m


def apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:3, :3].T + matrix[:3, 3]


def normalize_transform(points: np.ndarray, recenter: bool) -> np.ndarray:
    """Upstream get_normalize_transform(keep_ratio=True): bbox centre -> 0 and extent -> 2, or max |x| -> 1."""
    lo, hi = points.min(axis=0), points.max(axis=0)
    if recenter:
        center = (lo + hi) / 2
        scale = 2.0 / max(float((hi - lo).max()), 1e-12)
        return similarity(scale, np.eye(3), -scale * center)
    scale = 1.0 / max(float(np.abs(points).max()), 1e-12)
    return similarity(scale, np.eye(3), np.zeros(3))


def hips_transform(hips: np.ndarray, right_up_leg: np.ndarray, left_up_leg: np.ndarray) -> np.ndarray:
    """Rigid transform putting Hips at the origin, the hip-plane normal on +Z and right->left leg on +X.

    Same result as upstream get_hips_transform (Rodrigues to +Z, then a turn about Z), written as
    an orthonormal frame so it cannot divide by zero when the normal already points along -Z.
    """
    normal = np.cross(right_up_leg - hips, left_up_leg - hips)
    z = normal / max(np.linalg.norm(normal), 1e-12)
    if np.linalg.norm(normal) < 1e-12:
        z = np.array([0.0, 0.0, 1.0])
    tangent = left_up_leg - right_up_leg
    x = tangent - z * np.dot(tangent, z)
    if np.linalg.norm(x) < 1e-12:
        x = np.cross([0.0, 1.0, 0.0], z) if abs(z[1]) < 0.9 else np.cross([1.0, 0.0, 0.0], z)
    x = x / np.linalg.norm(x)
    y = np.cross(z, x)
    rotation = np.stack([x, y, z])  # rows: world axes expressed in the new frame
    return similarity(1.0, rotation, -rotation @ hips)


def sample_surface(mesh: trimesh.Trimesh, count: int, rng: np.random.Generator) -> np.ndarray:
    """[count, 6] area-uniform surface samples with their face normals."""
    if count <= 0:
        return np.zeros((0, 6), dtype=np.float32)
    points, faces = trimesh.sample.sample_surface(mesh, count, seed=rng)
    return np.concatenate([points, mesh.face_normals[faces]], axis=1).astype(np.float32)


def sample_near(mesh: trimesh.Trimesh, center: np.ndarray, side: float, count: int,
                rng: np.random.Generator) -> np.ndarray:
    """Area-uniform samples of the surface inside an axis-aligned box of the given side.

    Same distribution as sampling the mesh clipped to the box (upstream slices it with six planes),
    done by rejection over the faces whose bounds touch the box, which needs no polygon library.
    """
    lo, hi = center - side / 2, center + side / 2
    tri = mesh.triangles
    touching = np.nonzero(((tri.min(axis=1) <= hi) & (tri.max(axis=1) >= lo)).all(axis=1))[0]
    if count <= 0 or len(touching) == 0:
        return np.zeros((0, 6), dtype=np.float32)
    sub = trimesh.Trimesh(mesh.vertices, mesh.faces[touching], process=False)
    if sub.area <= 0:
        return np.zeros((0, 6), dtype=np.float32)
    kept: list[np.ndarray] = []
    have = 0
    for _ in range(20):
        cand = sample_surface(sub, max(2 * (count - have), 256), rng)
        inside = cand[((cand[:, :3] >= lo) & (cand[:, :3] <= hi)).all(axis=1)]
        kept.append(inside[: count - have])
        have += len(kept[-1])
        if have >= count:
            break
    return np.concatenate(kept, axis=0)


def sample_with_hands(mesh: trimesh.Trimesh, count: int, hand_centers: list[np.ndarray],
                      rng: np.random.Generator) -> np.ndarray:
    """[main | left hand | right hand] samples; empty hand boxes are topped up with uniform samples."""
    n_hands = int(count * HAND_RESAMPLE_RATIO)
    per_hand = [n_hands // len(hand_centers)] * (len(hand_centers) - 1)
    per_hand.append(n_hands - sum(per_hand))
    side = HAND_BOX_RELATIVE_SIZE * float(mesh.vertices.max() - mesh.vertices.min())
    parts = [sample_surface(mesh, count - n_hands, rng)]
    parts += [sample_near(mesh, c, side, n, rng) for c, n in zip(hand_centers, per_hand, strict=True)]
    pts = np.concatenate(parts, axis=0)
    if len(pts) < count:
        pts = np.concatenate([pts, sample_surface(mesh, count - len(pts), rng)], axis=0)
    return pts


# ---------------------------------------------------------------- weights


def _indices(pred: Callable[[str], bool]) -> torch.Tensor:
    return torch.tensor([i for i, n in enumerate(skeleton.NAMES) if pred(n)], dtype=torch.long)


def _zero_conflicts(bw: torch.Tensor, dominant: torch.Tensor, rows: Callable[[str], bool],
                    cols: Callable[[str], bool], value: float = 0.0) -> None:
    """bw[v, k] = value where vertex v's dominant bone satisfies `rows` and bone k satisfies `cols`."""
    row_idx, col_idx = _indices(rows), _indices(cols)
    if len(row_idx) == 0 or len(col_idx) == 0:
        return
    vertices = torch.isin(dominant, row_idx).nonzero().squeeze(1)
    if len(vertices):
        bw[vertices[:, None], col_idx[None, :]] = value


_FINGERS = skeleton.FINGERS
_HANDS = ("Left", "Right")
# Groups of bones whose weights must not bleed into each other (upstream bw_post_process); names
# are matched as substrings, and bones our skeleton lacks (ears, tail) simply match nothing.
_LEFT_ARM = ("LeftArm", "LeftForeArm", "LeftHand", *(f"LeftHand{f}{i}" for f in _FINGERS for i in (1, 2, 3)))
_RIGHT_ARM = ("RightArm", "RightForeArm", "RightHand", *(f"RightHand{f}{i}" for f in _FINGERS for i in (1, 2, 3)))
CONFLICT_SETS: tuple[tuple[tuple[str, ...], ...], ...] = (
    (("Neck", "Head", "RabbitEar"), ("LeftLeg", "LeftFoot", "LeftToeBase"),
     ("RightLeg", "RightFoot", "RightToeBase"), _LEFT_ARM, _RIGHT_ARM),
    (("Hips", "Spine", "Spine1", "Spine2", "Neck", "Head", "LeftShoulder", "RightShoulder", "RightUpLeg",
      "RightLeg", "RightFoot", "RightToeBase", "LeftUpLeg", "LeftLeg", "LeftFoot", "LeftToeBase", "RabbitEar",
      "FoxTail"),
     (*_RIGHT_ARM[1:], *_LEFT_ARM[1:])),
    (("LRabbitEar",), ("RRabbitEar",)),
    (("FoxTail",), ("Neck", "Head", "RabbitEar"), ("RightFoot", "RightToeBase", "LeftFoot", "LeftToeBase")),
)


def clean_weights(bw: torch.Tensor, above_head: torch.Tensor, no_fingers: bool) -> torch.Tensor:
    """Upstream bw_post_process on [V, 52] weights: head cap, fingers, left/right and limb bleeding, top 4.

    Masks are [vertex x bone]: rows = vertices whose dominant bone is in one group, columns = the
    bones of the conflicting groups.
    """
    bw = bw.clone().float()
    head = skeleton.index_of("Head")
    bw[above_head, head] = 1e5
    if no_fingers:
        dominant = bw.argmax(dim=-1)
        for hand in _HANDS:
            _zero_conflicts(bw, dominant, lambda k, h=hand: h in k and any(f in k for f in _FINGERS),
                            lambda k, h=hand: k.endswith(f"{h}Hand"), value=1e5)
        bw[:, _indices(lambda k: any(f in k for f in _FINGERS))] = 0
    dominant = bw.argmax(dim=-1)
    if not no_fingers:
        for hand in _HANDS:
            other = "Right" if hand == "Left" else "Left"
            _zero_conflicts(bw, dominant, lambda k, h=hand: h in k, lambda k, o=other: o in k)
            for finger in _FINGERS:
                others = [f for f in _FINGERS if f != finger]
                _zero_conflicts(bw, dominant, lambda k, h=hand, f=finger: h in k and f in k,
                                lambda k, h=hand, o=others: h in k and any(x in k for x in o))
    for parts in CONFLICT_SETS:
        for part in parts:
            others = [p for p in parts if p is not part]
            _zero_conflicts(bw, dominant, lambda k, p=part: any(x in k for x in p),
                            lambda k, o=others: any(any(x in k for x in p) for p in o))
    bw = bw / (bw.sum(dim=-1, keepdim=True) + 1e-10)
    kth = torch.topk(bw, k=MAX_INFLUENCES, dim=-1).values[..., -1:]
    bw[bw < kth] = 0
    return bw


def final_weights(bw: np.ndarray, joint_indices: tuple[int, ...]) -> np.ndarray:
    """Weights of the exported joints: fingers folded into their hand, <= 4 per vertex, rows summing to 1."""
    bw = bw.astype(np.float64).copy()
    if len(joint_indices) < skeleton.JOINT_COUNT:
        for j in skeleton.JOINTS:
            if j.is_finger:
                hand = skeleton.index_of(("Left" if "Left" in j.short_name else "Right") + "Hand")
                bw[:, hand] += bw[:, j.index]
    bw = bw[:, list(joint_indices)]
    bw[bw <= MIN_WEIGHT] = 0
    order = np.argsort(-bw, axis=1, kind="stable")
    bw[np.arange(len(bw))[:, None], order[:, MAX_INFLUENCES:]] = 0  # ties can leave more than 4
    total = bw.sum(axis=1, keepdims=True)
    empty = total[:, 0] <= 0
    bw[empty, 0] = 1.0  # a vertex left with nothing follows the root rather than staying unskinned
    total[empty] = 1.0
    return (bw / total).astype(np.float32)


# ---------------------------------------------------------------- pose


def pose_to_global(rotations: np.ndarray, heads: np.ndarray) -> np.ndarray:
    """[52, 4, 4] transforms: each bone rotates about its head and follows its posed parent; root = identity."""
    mats = np.zeros((skeleton.JOINT_COUNT, 4, 4))
    for i, parent in enumerate(skeleton.PARENTS):
        m = np.eye(4)
        m[:3, :3] = rotations[i]
        m[:3, 3] = heads[i] - rotations[i] @ heads[i]
        if parent >= 0:
            m[:3, 3] += apply(mats[parent], heads[i]) - heads[i]
        mats[i] = m
    mats[0] = np.eye(4)
    return mats


def bone_frames(heads: np.ndarray, tails: np.ndarray, joint_indices: tuple[int, ...]) -> np.ndarray:
    """[J, 3, 3] bone axes as columns: +Y head->tail, +Z the template roll axis made orthogonal, X = Y x Z."""
    frames = np.zeros((len(joint_indices), 3, 3))
    for k, j in enumerate(joint_indices):
        joint = skeleton.JOINTS[j]
        y = tails[k] - heads[k]
        y = y / np.linalg.norm(y) if np.linalg.norm(y) > 1e-9 else np.asarray(joint.template_y_axis, float)
        y = y / np.linalg.norm(y)
        z = np.asarray(joint.template_z_axis, float)
        z = z - y * np.dot(z, y)
        if np.linalg.norm(z) < 1e-6:
            z = np.cross(y, [1.0, 0.0, 0.0]) if abs(y[0]) < 0.9 else np.cross(y, [0.0, 0.0, 1.0])
        z = z / np.linalg.norm(z)
        frames[k] = np.stack([np.cross(y, z), y, z], axis=1)
    return frames


# ---------------------------------------------------------------- the pipeline


class _Timer:
    def __init__(self, progress: Callable[[str], None] | None):
        self.timings: dict[str, float] = {}
        self._progress = progress
        self._t = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.timings[stage] = now - self._t
        self._t = now
        if self._progress is not None:
            self._progress(stage)


STAGES = ("sample", "coarse_joints", "canonicalize", "blend_weights", "joints", "pose", "weights_cleanup",
          "pose_to_rest")


@torch.inference_mode()
def rig_mesh(nets: MIANetworks, mesh: trimesh.Trimesh, no_fingers: bool = True, use_normal: bool = False,
             reset_to_rest: bool = True, seed: int = 0,
             on_stage: Callable[[str], None] | None = None,
             check_interrupt: Callable[[], None] | None = None) -> RigResult:
    """Rig a humanoid mesh; `on_stage(name)` is called after each of STAGES (for progress bars)."""
    check_rig_input(np.asarray(mesh.vertices), np.asarray(mesh.faces))
    timer = _Timer(on_stage)
    interrupt = check_interrupt or (lambda: None)
    rng = np.random.default_rng(seed)
    n = nets.num_points
    input_verts = np.asarray(mesh.vertices, dtype=np.float64)
    plain = trimesh.Trimesh(input_verts, np.asarray(mesh.faces), process=False)
    pts = sample_surface(plain, n, rng).astype(np.float64)
    timer.lap("sample")

    norm1 = normalize_transform(pts[:, :3], recenter=True)
    coarse = _run_joints(nets, nets.coarse, apply(norm1, pts[:, :3]))
    timer.lap("coarse_joints")
    interrupt()

    rotate = hips_transform(coarse[0, :3], coarse[skeleton.index_of("RightUpLeg"), :3],
                            coarse[skeleton.index_of("LeftUpLeg"), :3])
    to_canon = rotate @ norm1
    canon_mesh = trimesh.Trimesh(apply(to_canon, input_verts), plain.faces, process=False)
    hand_tails = [apply(rotate, coarse[skeleton.index_of(h + "Hand"), 3:]) for h in _HANDS]
    pts = sample_with_hands(canon_mesh, n, hand_tails, rng).astype(np.float64)
    norm2 = normalize_transform(pts[:, :3], recenter=False)
    to_canon = norm2 @ to_canon
    pts[:, :3] = apply(norm2, pts[:, :3])
    verts = apply(to_canon, input_verts)
    timer.lap("canonicalize")
    interrupt()

    bw = _run_blend_weights(nets, pts, verts, vertex_normals(canon_mesh.vertices, plain.faces) if use_normal else None,
                            interrupt)
    timer.lap("blend_weights")
    joints = _run_joints(nets, nets.joints, pts[:, :3])
    timer.lap("joints")
    interrupt()
    pose6d = _run_pose(nets, pts[:, :3], joints)
    timer.lap("pose")

    head_tail_y = joints[skeleton.index_of("Head"), 4]
    bw = clean_weights(torch.from_numpy(bw), torch.from_numpy(verts[:, 1] >= head_tail_y), no_fingers).numpy()
    joint_indices = skeleton.subset(no_fingers)
    weights = final_weights(bw, joint_indices)
    timer.lap("weights_cleanup")

    heads, tails = joints[:, :3].astype(np.float64), joints[:, 3:].astype(np.float64)
    sel = list(joint_indices)
    back = np.linalg.inv(to_canon)
    out_verts = input_verts.astype(np.float32)
    if reset_to_rest:
        rotations = ortho6d_to_matrix(torch.from_numpy(pose6d).double()).numpy()
        mats = pose_to_global(rotations, heads)
        blended = np.einsum("vj,jab->vab", weights.astype(np.float64), mats[sel])
        rest = np.einsum("vab,vb->va", blended[:, :3, :3], verts) + blended[:, :3, 3]
        out_verts = apply(back, rest).astype(np.float32)
        heads = np.stack([apply(m, p) for m, p in zip(mats, heads, strict=True)])
        tails = np.stack([apply(m, p) for m, p in zip(mats, tails, strict=True)])
    frames = bone_frames(heads[sel], tails[sel], joint_indices)
    back_rotation = to_canon[:3, :3] / np.cbrt(np.linalg.det(to_canon[:3, :3]))
    out_heads = apply(back, heads[sel])
    bind = np.tile(np.eye(4), (len(sel), 1, 1))
    bind[:, :3, :3] = np.einsum("ab,jbc->jac", back_rotation.T, frames)
    bind[:, :3, 3] = out_heads
    timer.lap("pose_to_rest")
    return RigResult(out_verts, joint_indices, out_heads.astype(np.float32),
                     apply(back, tails[sel]).astype(np.float32), bind, weights, timer.timings)


def _tensor(nets: MIANetworks, values: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))[None].to(nets.device)


def _run_joints(nets: MIANetworks, model: PCAE, pts: np.ndarray) -> np.ndarray:
    latents = model.latents(_tensor(nets, pts).to(nets.dtype))
    return model.predict_joints(latents)[0].double().cpu().numpy()


def _run_pose(nets: MIANetworks, pts: np.ndarray, joints: np.ndarray) -> np.ndarray:
    latents = nets.pose.latents(_tensor(nets, pts).to(nets.dtype))
    return nets.pose.predict_pose(latents, _tensor(nets, joints))[0].double().cpu().numpy()


def _run_blend_weights(nets: MIANetworks, pts: np.ndarray, verts: np.ndarray, normals: np.ndarray | None,
                       interrupt: Callable[[], None]) -> np.ndarray:
    """[V, 52] softmax weights, decoded in vertex chunks against latents computed once."""
    latents = nets.bw.latents(_tensor(nets, pts[:, :3]).to(nets.dtype))
    latents_n = None
    if normals is not None:
        bw_normal = nets.normal_network()
        latents_n = bw_normal.latents(_tensor(nets, pts).to(nets.dtype))
        keep = _indices(lambda k: any(x in k for x in ("Spine", "Shoulder", "Arm"))).to(nets.device)
    out = []
    for start in range(0, len(verts), BW_CHUNK):
        chunk = verts[start:start + BW_CHUNK]
        w = nets.bw.blend_weights(latents, _tensor(nets, chunk).to(nets.dtype))
        if latents_n is not None:
            q = np.concatenate([chunk, normals[start:start + BW_CHUNK]], axis=1)
            wn = bw_normal.blend_weights(latents_n, _tensor(nets, q).to(nets.dtype))
            wn[..., keep] = w[..., keep]  # upstream keeps the plain model's spine/shoulder/arm columns
            w = wn
        out.append(w[0].cpu().numpy())
        interrupt()
    return np.concatenate(out, axis=0).astype(np.float64)
