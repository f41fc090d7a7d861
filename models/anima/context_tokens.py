"""Per-block reference tokens appended to Anima's cross-attention context, and how they are injected.

Tokens live in the 1024-d context space, one set per DiT block: [num_blocks, num_tokens, context_dim].
Block b's cross-attention sees [text context ; tokens_b]: the tokens go through that block's own
frozen k_proj / k_norm / v_proj, so they stay what the model expects text to look like, and every
zero-padded text row (the attention sinks Anima is trained with) is kept.

One mechanism everywhere: each block's `cross_attn.attn_op` (the callable that receives q/k/v
already projected and normalised, [B, S, H, D]) is replaced by a `ReferenceAttnOp`. Our DiT and
ComfyUI's Cosmos/Anima DiT (every version since the Cosmos code landed) both expose that attribute,
so the trainer installs the op for its own forward passes and the patch node installs the very
same op through `ModelPatcher.add_object_patch` — reversible, per clone, no forward overrides.

Strength: because of k_norm, multiplying a token by s leaves its *key* unchanged and only scales
its value, so "scale the tokens" barely changes how much attention they get. Here the scale is a
logit bias of log(s) on the injected columns: their un-normalised attention weight is multiplied
by s (1 = as trained, 2 = twice the pull, 0 = off and bit-identical to the unpatched model).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .errors import IncompatibleModelArchitecture


@dataclass(frozen=True)
class ReferenceContext:
    """What the trainer hands to the patch node (socket type ANIMA_REFERENCE_CONTEXT). In memory only."""

    tokens: torch.Tensor                 # [num_blocks, num_tokens, context_dim], fp32, CPU, detached
    steps: int
    learning_rate: float
    final_loss: float
    reference_count: int
    training_prompt: str = ""
    image_sizes: tuple[tuple[int, int], ...] = ()
    loss_history: tuple[float, ...] = field(default=(), repr=False)

    @property
    def num_blocks(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def context_dim(self) -> int:
        return int(self.tokens.shape[2])

    def __repr__(self) -> str:
        return (f"ReferenceContext({self.num_blocks} blocks × {self.num_tokens} tokens × {self.context_dim}, "
                f"{self.reference_count} reference(s), {self.steps} steps, lr {self.learning_rate:g}, "
                f"final loss {self.final_loss:.4f})")


@dataclass(frozen=True)
class InjectionGate:
    """When an injection applies: a sigma window (inclusive) and, optionally, the positive (cond) chunk only."""

    sigma_start: float = math.inf        # the largest sigma at which it applies (start of sampling)
    sigma_end: float = 0.0               # the smallest
    positive_only: bool = False

    def active(self, transformer_options: Mapping[str, Any], batch: int, device) -> torch.Tensor:
        """[batch] bool: which samples of this call get the tokens."""
        on = torch.ones(batch, dtype=torch.bool, device=device)
        sigmas = transformer_options.get("sigmas")
        if sigmas is not None and (self.sigma_start != math.inf or self.sigma_end > 0.0):
            s = torch.as_tensor(sigmas, device=device, dtype=torch.float32).flatten()
            s = s if s.numel() == batch else s[:1].expand(batch)
            on &= (s <= self.sigma_start + 1e-6) & (s >= self.sigma_end - 1e-6)
        chunks = transformer_options.get("cond_or_uncond")
        if self.positive_only and chunks and batch % len(chunks) == 0:
            per = batch // len(chunks)
            is_cond = torch.tensor([c == 0 for c in chunks for _ in range(per)], device=device)
            on &= is_cond
        return on


@dataclass(frozen=True)
class Injection:
    tokens: torch.Tensor                 # [num_tokens, context_dim] of one block
    scale: float = 1.0
    gate: InjectionGate = InjectionGate()


def _is_container(x: Any) -> bool:
    """ComfyUI's newest Cosmos attention passes single-owner AttentionTensorContainer(s) with .take()."""
    return not isinstance(x, torch.Tensor) and hasattr(x, "take")


class ReferenceAttnOp:
    """Replacement for one block's `cross_attn.attn_op` that appends that block's reference tokens.

    Called as attn_op(q, k, v, transformer_options=..., **extra) with [B, S, H, D] tensors (or
    ComfyUI's containers); returns [B, S_q, H*D] like the op it replaces. When no injection is
    active for the call, the original op runs on the untouched arguments, so the output is
    bit-identical to the unpatched model.
    """

    def __init__(self, cross_attn: torch.nn.Module, injections: Sequence[Injection], original: Callable,
                 differentiable: bool = False):
        self.cross_attn = cross_attn
        self.injections = tuple(injections)
        self.original = original
        self.differentiable = differentiable   # training: never hand off to a backend without autograd
        self._device_tokens: dict[tuple, torch.Tensor] = {}   # sampling: tokens already on q's device/dtype

    def __call__(self, q, k, v, transformer_options: Mapping[str, Any] | None = None, **extra):
        transformer_options = transformer_options if transformer_options is not None else {}
        batch = (q.shape[0] if isinstance(q, torch.Tensor) else _peek_batch(q))
        device = self.injections[0].tokens.device if self.injections else None
        scales = self._scales(transformer_options, batch, device)
        if scales is None:
            return self.original(q, k, v, transformer_options=transformer_options, **extra)
        if _is_container(q):
            q, k, v = q.take(), k.take(), v.take()
        tk, tv = self._project(q)
        tk = tk.unsqueeze(0).expand(batch, -1, -1, -1)
        tv = tv.unsqueeze(0).expand(batch, -1, -1, -1)
        k_all = torch.cat([k, tk], dim=1)
        v_all = torch.cat([v, tv], dim=1)
        scales = scales.to(q.device)
        if not self.differentiable and bool((scales == 1.0).all()):
            return self.original(q, k_all, v_all, transformer_options=transformer_options, **extra)
        bias = torch.zeros(batch, k_all.shape[1], dtype=q.dtype, device=q.device)
        bias[:, k.shape[1]:] = torch.log(scales).to(q.dtype)      # log(0) = -inf: that sample ignores them
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k_all.transpose(1, 2), v_all.transpose(1, 2),
                                             attn_mask=bias[:, None, None, :])
        return out.transpose(1, 2).reshape(batch, q.shape[1], -1)

    def _scales(self, transformer_options, batch: int, device) -> torch.Tensor | None:
        """[batch, total_tokens] per-column scale, or None when nothing applies to this call."""
        columns = []
        any_on = False
        for inj in self.injections:
            on = inj.gate.active(transformer_options, batch, device) if inj.scale > 0 else \
                torch.zeros(batch, dtype=torch.bool, device=device)
            any_on |= bool(on.any())
            per_sample = torch.where(on, torch.tensor(float(inj.scale), device=device), torch.tensor(0.0, device=device))
            columns.append(per_sample[:, None].expand(batch, inj.tokens.shape[0]))
        if not any_on:
            return None
        return torch.cat(columns, dim=1)

    def _project(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The tokens' keys and values through this block's frozen projections: [K, H, D] each."""
        attn = self.cross_attn
        key = (q.device, q.dtype)
        tokens = None if self.differentiable else self._device_tokens.get(key)
        if tokens is None:
            tokens = torch.cat([inj.tokens for inj in self.injections], dim=0).to(device=q.device, dtype=q.dtype)
            if not self.differentiable:       # trained tokens are fixed while sampling: copy them once
                self._device_tokens[key] = tokens
        heads, head_dim = q.shape[2], q.shape[3]
        tk = attn.k_norm(attn.k_proj(tokens).view(-1, heads, head_dim))
        tv = attn.v_proj(tokens).view(-1, heads, head_dim)
        return tk, tv


def _peek_batch(container: Any) -> int:
    """Batch size of a ComfyUI AttentionTensorContainer without consuming it."""
    return int(container.peek().shape[0])


# -- architecture -----------------------------------------------------------------------------------

def cross_attention_blocks(diffusion_model: Any, what: str = "the MODEL") -> list[torch.nn.Module]:
    """The blocks' cross-attention modules of an Anima-style DiT, or a clear error naming what was given."""
    blocks = getattr(diffusion_model, "blocks", None)
    name = type(diffusion_model).__name__
    if blocks is None or len(blocks) == 0:
        raise IncompatibleModelArchitecture(
            f"{what} is a {name}, not an Anima (Cosmos-Predict2) DiT: it has no transformer `blocks`. "
            "Load the Anima diffusion model (e.g. anima-preview.safetensors) and connect that MODEL.")
    out = []
    for i, block in enumerate(blocks):
        cross = getattr(block, "cross_attn", None)
        missing = [a for a in ("k_proj", "v_proj", "k_norm", "attn_op") if not hasattr(cross, a)]
        if cross is None or missing:
            raise IncompatibleModelArchitecture(
                f"{what} is a {name} whose block {i} has no Cosmos-style cross-attention "
                f"(missing {', '.join(missing) or 'cross_attn'}). These nodes work with Anima models only.")
        out.append(cross)
    return out


def context_dim_of(cross_attn: torch.nn.Module) -> int:
    weight = cross_attn.k_proj.weight
    return int(weight.shape[1])


def check_tokens_fit(tokens: torch.Tensor, crosses: Sequence[torch.nn.Module], what: str = "the MODEL") -> None:
    want = (len(crosses), context_dim_of(crosses[0]))
    if tokens.ndim != 3 or (tokens.shape[0], tokens.shape[2]) != want:
        raise IncompatibleModelArchitecture(
            f"the reference context holds tokens shaped {tuple(tokens.shape)} (blocks, tokens, width) but {what} "
            f"has {want[0]} blocks with {want[1]}-wide context. Train the context on this same model.")


# -- installing the op ------------------------------------------------------------------------------

def attn_op_name(block_index: int) -> str:
    """The ModelPatcher object-patch name of block i's cross-attention op."""
    return f"diffusion_model.blocks.{block_index}.cross_attn.attn_op"


def reference_object_patches(get_object: Callable[[str], Any], tokens: torch.Tensor, scale: float,
                             gate: InjectionGate) -> dict[str, ReferenceAttnOp]:
    """{object-patch name: op} that add `tokens` to every block, stacking on ops already patched in.

    `get_object` is ModelPatcher.get_model_object, so an earlier object patch (another reference
    context on the same MODEL) is found and merged rather than silently dropped.
    """
    crosses = cross_attention_blocks(get_object("diffusion_model"))
    check_tokens_fit(tokens, crosses)
    patches = {}
    for i, cross in enumerate(crosses):
        name = attn_op_name(i)
        current = get_object(name)
        new = Injection(tokens[i], float(scale), gate)
        if isinstance(current, ReferenceAttnOp):
            patches[name] = ReferenceAttnOp(current.cross_attn, (*current.injections, new), current.original)
        else:
            patches[name] = ReferenceAttnOp(cross, (new,), current)
    return patches


@contextlib.contextmanager
def installed_tokens(diffusion_model: torch.nn.Module, tokens: torch.Tensor) -> Iterator[None]:
    """Temporarily install trainable `tokens` (scale 1, always on) on a DiT for training; restores on exit."""
    crosses = cross_attention_blocks(diffusion_model)
    check_tokens_fit(tokens, crosses)
    saved = [cross.attn_op for cross in crosses]
    try:
        for i, cross in enumerate(crosses):
            cross.attn_op = ReferenceAttnOp(cross, (Injection(tokens[i]),), saved[i], differentiable=True)
        yield
    finally:
        for cross, op in zip(crosses, saved, strict=True):
            cross.attn_op = op


def token_norm_summary(tokens: torch.Tensor) -> str:
    """'mean 0.64, max 0.91' over the per-token L2 norms."""
    norms = tokens.detach().float().norm(dim=-1)
    return f"mean {norms.mean().item():.4f}, max {norms.max().item():.4f}"
