"""The five Make-It-Animatable networks: one point-cloud autoencoder (PCAE) with task heads.

Every module and attribute name here mirrors the published checkpoints
(`output/best/new/{joints_coarse,bw,bw_normal,joints,pose}.pth`), so their state dicts load with
`strict=True`; the key list of the released checkpoints (tests/data/mia_state_dict_shapes.txt) is the contract and the tests compare against it.

The base is 3DShape2VecSet's perceiver-style autoencoder: 512 farthest-point-sampled latents
cross-attend to the full 32,768-point cloud, 24 latent self-attention layers refine them, then
queries (mesh vertices for blend weights, learnable tokens for joints/pose) cross-attend back.
The joints and pose heads are a tree-masked transformer run level by level down the skeleton.

Attention goes through kernels/attention.py. Only the latent self-attention (8 heads x 64) and
the normal InputAttention can use flash-attn; the one-head 512-dim cross-attentions exceed its head
size and the tree heads need an arbitrary mask, so those always ask for sdpa. The Fourier point
embedding runs in fp32 whatever the weights' dtype: it multiplies coordinates by up to 2^7*pi, and
in bf16 the highest frequencies would be noise.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...kernels.attention import attention
from . import skeleton

NETWORK_NAMES = ("joints_coarse", "bw", "bw_normal", "joints", "pose")


@dataclass(frozen=True)
class PCAEConfig:
    """Sizes of the architecture. The defaults are the published networks (`ae_d512_m512`).

    Smaller values build the same architecture in miniature for CPU tests and demos; the
    converted checkpoint records its config so it always reloads into the right shapes.
    """

    dim: int = 512
    depth: int = 24
    heads: int = 8
    dim_head: int = 64
    num_latents: int = 512
    num_points: int = 32768
    fourier_dim: int = 48
    head_depth: int = 8
    head_heads: int = 8
    head_ff: int = 2048

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> PCAEConfig:
        known = {k: int(v) for k, v in values.items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass(frozen=True)
class TaskSpec:
    """What one network predicts (upstream app.py init_models arguments)."""

    input_normal: bool = False
    input_attention: bool = False
    hierarchical_ratio: float = 0.5
    predict_bw: bool = False
    predict_joints: bool = False
    joints_causal: bool = False
    predict_pose: bool = False


TASKS: dict[str, TaskSpec] = {
    "joints_coarse": TaskSpec(hierarchical_ratio=0.0, predict_joints=True),
    "bw": TaskSpec(predict_bw=True),
    "bw_normal": TaskSpec(input_normal=True, input_attention=True, predict_bw=True),
    "joints": TaskSpec(predict_joints=True, joints_causal=True),
    "pose": TaskSpec(predict_pose=True),
}

# Keys older checkpoints carry that the current architecture computes instead (upstream adapt_ckpt).
DEPRECATED_KEYS = (
    "normal_embed.embed.basis", "joints_embedder.embed.basis", "joints_head.encoder.embed.basis",
    "joints_head.0.mask", "pose_head.0.mask",
    *(f"{head}.{key}" for head in ("joints_head", "pose_head")
      for key in ("mask_attn", "mask_parent", "tree_levels_mask", "embed.basis")),
)


# ---------------------------------------------------------------- building blocks


def fourier_basis(fourier_dim: int) -> torch.Tensor:
    """[3, fourier_dim/2] block-diagonal 2^k*pi frequencies, one block per axis."""
    per_axis = fourier_dim // 6
    freqs = torch.pow(2.0, torch.arange(per_axis, dtype=torch.float32)) * math.pi
    basis = torch.zeros(3, 3 * per_axis)
    for axis in range(3):
        basis[axis, axis * per_axis:(axis + 1) * per_axis] = freqs
    return basis


def fourier_features(xyz: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """[sin, cos, xyz] of the coordinates, computed in fp32."""
    xyz32 = xyz.float()
    proj = xyz32 @ basis.float()
    return torch.cat([proj.sin(), proj.cos(), xyz32], dim=-1)


class PointEmbed(nn.Module):
    """Fourier features + Linear; its basis is a persistent buffer in the checkpoints."""

    def __init__(self, fourier_dim: int, dim: int):
        super().__init__()
        self.register_buffer("basis", fourier_basis(fourier_dim))
        self.mlp = nn.Linear(fourier_dim + 3, dim)

    def forward(self, xyz: torch.Tensor) -> torch.Tensor:
        feats = fourier_features(xyz, self.basis)
        return self.mlp(feats.to(self.mlp.weight.dtype))


class JointsEmbedder(nn.Module):
    """Fourier features of 1 or 2 points per token (head, tail), concatenated, then Linear."""

    def __init__(self, fourier_dim: int, out_dim: int, points: int = 1):
        super().__init__()
        self.fourier_dim = fourier_dim
        self.points = points
        self.reset_buffers(None)
        self.mlp = nn.Linear(points * (fourier_dim + 3), out_dim)

    def reset_buffers(self, device: torch.device | None) -> None:
        self.register_buffer("basis", fourier_basis(self.fourier_dim).to(device), persistent=False)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        b, n, d = values.shape
        feats = fourier_features(values.reshape(b, n * self.points, 3), self.basis)
        return self.mlp(feats.reshape(b, n, -1).to(self.mlp.weight.dtype))


class Attention(nn.Module):
    """Multi-head attention with a fused K/V projection (K first, then V)."""

    def __init__(self, query_dim: int, context_dim: int | None = None, heads: int = 8, dim_head: int = 64,
                 flash_ok: bool = False):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.flash_ok = flash_ok
        self.backend = "sdpa"
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_kv = nn.Linear(context_dim or query_dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, query_dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q = self.to_q(x)
        k, v = self.to_kv(context).chunk(2, dim=-1)
        b, sq, _ = q.shape
        q = q.view(b, sq, self.heads, -1)
        k = k.view(b, k.shape[1], self.heads, -1)
        v = v.view(b, v.shape[1], self.heads, -1)
        out = attention(q, k, v, backend=self.backend if self.flash_ok else "sdpa", layout="bshd")
        return self.to_out(out.reshape(b, sq, -1))


class PreNorm(nn.Module):
    def __init__(self, dim: int, fn: nn.Module, context_dim: int | None = None):
        super().__init__()
        self.fn = fn
        self.norm = nn.LayerNorm(dim)
        self.norm_context = nn.LayerNorm(context_dim) if context_dim else None

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if self.norm_context is not None:
            return self.fn(self.norm(x), context=self.norm_context(context))
        return self.fn(self.norm(x))


class GEGLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = x.chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim * mult * 2), GEGLU(), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class AutoEncoder(nn.Module):
    """The `base` sub-module: 3DShape2VecSet's AE (its occupancy head `to_outputs` is kept for the keys)."""

    def __init__(self, cfg: PCAEConfig):
        super().__init__()
        d = cfg.dim
        self.num_latents = cfg.num_latents
        self.num_inputs = cfg.num_points
        self.point_embed = PointEmbed(cfg.fourier_dim, d)
        self.cross_attend_blocks = nn.ModuleList([
            PreNorm(d, Attention(d, d, heads=1, dim_head=d), context_dim=d),
            PreNorm(d, FeedForward(d)),
        ])
        self.layers = nn.ModuleList([
            nn.ModuleList([
                PreNorm(d, Attention(d, heads=cfg.heads, dim_head=cfg.dim_head, flash_ok=True)),
                PreNorm(d, FeedForward(d)),
            ])
            for _ in range(cfg.depth)
        ])
        self.decoder_cross_attn = PreNorm(d, Attention(d, d, heads=1, dim_head=d), context_dim=d)
        self.to_outputs = nn.Linear(d, 1)


class InputAttention(nn.Module):
    """Per point: the position feature attends over [itself, its normal feature] (bw_normal only)."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.norm_context = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads=heads, dim_head=dim_head, flash_ok=True)

    def forward(self, feat: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        shape = feat.shape
        token = feat.reshape(-1, 1, shape[-1])
        context = torch.cat([token, extra.reshape(-1, extra.shape[-2], shape[-1])], dim=1)
        out = self.attn(self.norm(token), context=self.norm_context(context)) + token
        return out.reshape(shape)


# ---------------------------------------------------------------- tree-causal joints / pose head


class InProjSelfAttention(nn.Module):
    """Self-attention with torch's MultiheadAttention parameter names (in_proj_*, out_proj)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(b, n, 3, self.heads, -1).unbind(2)
        out = attention(q, k, v, mask, backend="sdpa", layout="bshd")
        return self.out_proj(out.reshape(b, n, d))


class TreeEncoderLayer(nn.Module):
    """Pre-norm transformer layer (ReLU FF), named like nn.TransformerEncoderLayer."""

    def __init__(self, dim: int, heads: int, ff: int):
        super().__init__()
        self.self_attn = InProjSelfAttention(dim, heads)
        self.linear1 = nn.Linear(dim, ff)
        self.linear2 = nn.Linear(ff, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.norm1(x), mask)
        return x + self.linear2(F.relu(self.linear1(self.norm2(x))))


class _LayerStack(nn.Module):
    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(layers)


class TreeTransformer(nn.Module):
    """`transformer.layers.layers.{j}`: the nesting upstream's nn.TransformerEncoder wrapper produces."""

    def __init__(self, dim: int, depth: int, heads: int, ff: int):
        super().__init__()
        self.layers = _LayerStack([TreeEncoderLayer(dim, heads, ff) for _ in range(depth)])

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        for layer in self.layers.layers:
            x = layer(x, mask)
        return x


class RotationDecoder(nn.Module):
    """Upstream TransformMLP with rotation only: key `decoder.rotation_mlp`, raw 6-D output."""

    def __init__(self, dim: int, rotation_dim: int = 6):
        super().__init__()
        self.rotation_mlp = nn.Linear(dim, rotation_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rotation_mlp(x)


def ortho6d_to_matrix(ortho6d: torch.Tensor) -> torch.Tensor:
    """Gram-Schmidt of the first two columns: x = a/|a|, z = (x cross b)/|.|, y = z cross x."""
    x = F.normalize(ortho6d[..., 0:3], dim=-1)
    z = F.normalize(torch.cross(x, ortho6d[..., 3:6], dim=-1), dim=-1)
    y = torch.cross(z, x, dim=-1)
    return torch.stack((x, y, z), dim=-1)


def matrix_to_ortho6d(matrix: torch.Tensor) -> torch.Tensor:
    return matrix[..., :2].transpose(-1, -2).reshape(*matrix.shape[:-2], 6)


class TreeCausalHead(nn.Module):
    """Decodes the 52 joints level by level; each joint sees its ancestors and its parent's output."""

    def __init__(self, cfg: PCAEConfig, out_type: str):
        super().__init__()
        d = cfg.dim
        self.out_type = out_type
        self.transformer = TreeTransformer(d, cfg.head_depth, cfg.head_heads, cfg.head_ff)
        if out_type == "joints":
            self.encoder = JointsEmbedder(cfg.fourier_dim, d, points=2)
            self.decoder = nn.Linear(d, 6)
        else:
            self.encoder = nn.Linear(6, d)
            self.decoder = RotationDecoder(d)
        self.reset_buffers(None)

    def reset_buffers(self, device: torch.device | None) -> None:
        self.register_buffer("mask_attn", torch.tensor(skeleton.attention_mask(), device=device), persistent=False)
        self.register_buffer("mask_parent", torch.tensor(skeleton.parent_mask(), device=device), persistent=False)
        self.register_buffer("tree_levels_mask", torch.tensor(skeleton.level_masks(), device=device),
                             persistent=False)

    def _step(self, feat: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.out_type == "pose":
            out = matrix_to_ortho6d(ortho6d_to_matrix(out.float()))
        encoded = self.encoder(out.to(feat.dtype) if self.out_type == "pose" else out)
        parent_feat = self.mask_parent.to(encoded.dtype) @ encoded  # each joint gets its parent's encoding
        hidden = self.transformer(feat + parent_feat, self.mask_attn)
        return self.decoder(hidden)

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        b, n, _ = feat.shape
        out = torch.zeros(b, n, 6, dtype=torch.float32, device=feat.device)
        for level in self.tree_levels_mask:
            step = self._step(feat, out).float()
            out[:, level] = step[:, level]
        return out


# ---------------------------------------------------------------- the network


class PCAE(nn.Module):
    """One MIA network: the shared autoencoder plus the heads its task needs."""

    def __init__(self, task: TaskSpec, cfg: PCAEConfig | None = None):
        super().__init__()
        cfg = cfg or PCAEConfig()
        self.cfg = cfg
        self.task = task
        d = cfg.dim
        self.base = AutoEncoder(cfg)
        self.input_dim = 6 if task.input_normal else 3
        if task.input_normal:
            self.normal_embed = JointsEmbedder(cfg.fourier_dim, d)
            if task.input_attention:
                self.input_attn = InputAttention(d, cfg.heads, cfg.dim_head)
        if task.predict_bw:
            self.bw_head = nn.Linear(d, skeleton.JOINT_COUNT)
        if task.predict_joints:
            self.joints_embed = nn.Parameter(torch.randn(1, skeleton.JOINT_COUNT, d))
            self.joints_head = TreeCausalHead(cfg, "joints") if task.joints_causal else nn.Linear(d, 6)
        if task.predict_pose:
            self.pose_embed = nn.Parameter(torch.randn(1, skeleton.JOINT_COUNT, d))
            self.pose_head = TreeCausalHead(cfg, "pose")
            self.joints_embedder = JointsEmbedder(cfg.fourier_dim, d, points=2)

    # -- encoding

    def sample_latent_points(self, pc: torch.Tensor) -> torch.Tensor:
        """Farthest point sampling per part ([uniform | hand regions]), in fp32, deterministic start."""
        b, n, _ = pc.shape
        m = self.cfg.num_latents
        n_hier = int(n * self.task.hierarchical_ratio)
        m_hier = int(m * self.task.hierarchical_ratio)
        parts = []
        for part, count in zip(pc.split([n - n_hier, n_hier], dim=1), (m - m_hier, m_hier), strict=True):
            if count == 0 or part.shape[1] == 0:
                continue
            idx = farthest_point_indices(part[..., :3].float(), count)
            parts.append(torch.gather(part, 1, idx[..., None].expand(-1, -1, part.shape[-1])))
        return torch.cat(parts, dim=1)

    def embed(self, pc: torch.Tensor) -> torch.Tensor:
        feat = self.base.point_embed(pc[..., :3])
        if self.task.input_normal:
            normal_feat = self.normal_embed(pc[..., 3:6])
            if self.task.input_attention:
                feat = self.input_attn(feat, normal_feat.unsqueeze(-2))
            else:
                feat = feat + normal_feat
        return feat

    def latents(self, pc: torch.Tensor) -> torch.Tensor:
        """Encode the point cloud and run the 24 latent layers: [B, num_latents, dim]."""
        if pc.shape[1] != self.cfg.num_points or pc.shape[-1] < self.input_dim:
            raise ValueError(f"expected a point cloud [B, {self.cfg.num_points}, {self.input_dim}], "
                             f"got {tuple(pc.shape)}")
        pc = pc[..., :self.input_dim]
        sampled = self.embed(self.sample_latent_points(pc))
        cross_attn, cross_ff = self.base.cross_attend_blocks
        x = cross_attn(sampled, context=self.embed(pc)) + sampled
        x = cross_ff(x) + x
        for self_attn, self_ff in self.base.layers:
            x = self_attn(x) + x
            x = self_ff(x) + x
        return x

    def decode(self, latents: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.base.decoder_cross_attn(tokens, context=latents)

    # -- heads

    def blend_weights(self, latents: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """Softmax weights over the 52 bones for each query point [B, Q, 52] (fp32)."""
        out = self.decode(latents, self.embed(queries[..., :self.input_dim]))
        return torch.softmax(self.bw_head(out).float(), dim=-1)

    def predict_joints(self, latents: torch.Tensor) -> torch.Tensor:
        """Bone heads and tails [B, 52, 6] in the input frame (fp32)."""
        tokens = self.joints_embed.expand(latents.shape[0], -1, -1).to(latents.dtype)
        return self.joints_head(self.decode(latents, tokens)).float()

    def predict_pose(self, latents: torch.Tensor, joints: torch.Tensor) -> torch.Tensor:
        """Global pose-to-rest rotations in ortho6d [B, 52, 6] (fp32), conditioned on the joints."""
        tokens = self.pose_embed.expand(latents.shape[0], -1, -1) + self.joints_embedder(joints)
        return self.pose_head(self.decode(latents, tokens.to(latents.dtype))).float()

    def forward(self, pc: torch.Tensor, queries: torch.Tensor | None = None,
                joints: torch.Tensor | None = None) -> torch.Tensor:
        """The network's single output (bw, joints or pose), as upstream's forward would give it."""
        latents = self.latents(pc)
        if self.task.predict_bw:
            return self.blend_weights(latents, queries)
        if self.task.predict_pose:
            return self.predict_pose(latents, joints)
        return self.predict_joints(latents)


def farthest_point_indices(points: torch.Tensor, count: int) -> torch.Tensor:
    """[B, count] indices of an iterative farthest-point sample, starting from point 0."""
    b, n, _ = points.shape
    count = min(count, n)
    idx = torch.zeros(b, count, dtype=torch.long, device=points.device)
    dist = torch.full((b, n), float("inf"), device=points.device)
    last = torch.zeros(b, dtype=torch.long, device=points.device)
    batch = torch.arange(b, device=points.device)
    for i in range(1, count):
        d = (points - points[batch, last][:, None, :]).square().sum(-1)
        dist = torch.minimum(dist, d)
        last = dist.argmax(dim=1)
        idx[:, i] = last
    return idx


# ---------------------------------------------------------------- public API


def build_network(name: str, config: PCAEConfig | None = None, device: torch.device | str | None = None) -> PCAE:
    """One of the five networks with random weights ('meta' builds shapes only)."""
    if name not in TASKS:
        raise ValueError(f"Unknown MIA network '{name}'. Valid names: {', '.join(NETWORK_NAMES)}.")
    with torch.device(device or "cpu"):
        model = PCAE(TASKS[name], config)
    return model.eval()


def reset_buffers(model: nn.Module, device: torch.device | str) -> None:
    """Recreate the computed (non-checkpoint) buffers on a device, e.g. after loading onto meta."""
    for module in model.modules():
        if hasattr(module, "reset_buffers"):
            module.reset_buffers(torch.device(device))


def set_attention_backend(model: nn.Module, backend: str) -> None:
    """Choose the backend for the layers that may use flash-attn (the others always use sdpa)."""
    for module in model.modules():
        if isinstance(module, Attention):
            module.backend = backend


def adapt_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop keys older checkpoints carry for buffers the current architecture computes."""
    return {k: v for k, v in state_dict.items() if k not in DEPRECATED_KEYS}


def expected_shapes(name: str, config: PCAEConfig | None = None) -> dict[str, tuple[int, ...]]:
    """Every state-dict key of a network and its shape, without allocating weights."""
    model = build_network(name, config, device="meta")
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}
