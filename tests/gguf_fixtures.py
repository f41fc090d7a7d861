"""Writing real GGUF files for the tests: tiny Wan DiTs and umT5 encoders in the quant mixes people use.

Files go through the `gguf` package's GGUFWriter; Q8_0 (and the other 32-weight types) use its
reference quantizer. The package has no encoder for the K types, so Q4_K and Q6_K are encoded
here with a plain min/max rule (not llama.cpp's search for the best scales: a file a little less
accurate than a real one, but every bit in the layout real files use). `dequantized()` reads the
values back with the package's reference *dequantizer*, which is the ground truth the loaders are
compared with.
"""

from __future__ import annotations

from collections.abc import Mapping

import gguf
import numpy as np
import torch

Q = gguf.GGMLQuantizationType


def _round(x: np.ndarray) -> np.ndarray:
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b == 0, 0.0, a / np.where(b == 0, 1.0, b))


def encode_q4_k(x: np.ndarray) -> np.ndarray:
    """float [rows, cols] (cols % 256 == 0) -> Q4_K bytes [rows, cols/256·144]."""
    rows, cols = x.shape
    groups = x.astype(np.float32).reshape(-1, 8, 32)
    low = np.minimum(groups.min(-1), 0.0)
    scale = (groups.max(-1) - low) / 15.0
    d = (scale.max(-1) / 63.0).astype(np.float16)
    dmin = ((-low).max(-1) / 63.0).astype(np.float16)
    sc = np.clip(_round(_safe_div(scale, d.astype(np.float32)[:, None])), 0, 63).astype(np.uint8)
    mn = np.clip(_round(_safe_div(-low, dmin.astype(np.float32)[:, None])), 0, 63).astype(np.uint8)
    step = d.astype(np.float32)[:, None] * sc
    offset = dmin.astype(np.float32)[:, None] * mn
    q = np.clip(_round(_safe_div(groups + offset[..., None], step[..., None])), 0, 15).astype(np.uint8)
    scales = np.concatenate([(sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6),
                             (mn[:, :4] & 63) | ((mn[:, 4:] >> 4) << 6),
                             (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)], axis=1)
    qs = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(-1, 128)
    blocks = np.concatenate([d.reshape(-1, 1).view(np.uint8), dmin.reshape(-1, 1).view(np.uint8), scales, qs], axis=1)
    return blocks.reshape(rows, -1)


def encode_q6_k(x: np.ndarray) -> np.ndarray:
    """float [rows, cols] (cols % 256 == 0) -> Q6_K bytes [rows, cols/256·210]."""
    rows, cols = x.shape
    groups = x.astype(np.float32).reshape(-1, 16, 16)
    scale = np.abs(groups).max(-1) / 31.0
    d = (scale.max(-1) / 127.0).astype(np.float16)
    sc = np.clip(_round(_safe_div(scale, d.astype(np.float32)[:, None])), -128, 127).astype(np.int8)
    step = d.astype(np.float32)[:, None] * sc
    u = (np.clip(_round(_safe_div(groups, step[..., None])), -32, 31) + 32).astype(np.uint8).reshape(-1, 2, 2, 64)
    ql = ((u[:, :, 0] & 15) | ((u[:, :, 1] & 15) << 4)).reshape(-1, 128)
    hi = (u >> 4).reshape(-1, 2, 4, 32)
    qh = (hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)).reshape(-1, 64)
    blocks = np.concatenate([ql, qh, sc.view(np.uint8), d.reshape(-1, 1).view(np.uint8)], axis=1)
    return blocks.reshape(rows, -1)


def quantize(x: np.ndarray, qtype: Q) -> np.ndarray:
    if qtype == Q.Q4_K:
        return encode_q4_k(x)
    if qtype == Q.Q6_K:
        return encode_q6_k(x)
    return gguf.quants.quantize(x.astype(np.float32), qtype)


# ComfyUI-GGUF's Q4_K_M for Wan: attention values and the FFN's down projection get Q6_K.
def q4_k_m(name: str) -> Q:
    return Q.Q6_K if name.endswith((".v.weight", "ffn.2.weight")) else Q.Q4_K


def wan_mix(mix: str):
    """name -> type for the block Linear weights of a file-level mix."""
    if mix == "Q4_K_M":
        return q4_k_m
    return lambda name: Q[mix]


def write_gguf(path, tensors: Mapping[str, tuple[np.ndarray, Q]], arch: str | None = "wan") -> dict[str, torch.Tensor]:
    """Write `name -> (float array, type)` and return what the file holds, read back with the
    reference dequantizer (float32 tensors in the arrays' shapes)."""
    writer = gguf.GGUFWriter(str(path), arch or "wan")
    if arch is None:    # a converter that records no architecture
        writer.kv_data[0].pop("general.architecture", None)
    held = {}
    for name, (array, qtype) in tensors.items():
        array = np.asarray(array, dtype=np.float32)
        stored = array if array.ndim <= 4 else array.reshape(array.shape[0], -1)
        if array.ndim > 4:
            writer.add_array(f"comfy.gguf.orig_shape.{name}", list(array.shape))
        if qtype == Q.F32:
            writer.add_tensor(name, stored)
            back = stored
        elif qtype == Q.F16:
            writer.add_tensor(name, stored.astype(np.float16))
            back = stored.astype(np.float16).astype(np.float32)
        elif stored.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:   # rows that fill no block: kept F16
            writer.add_tensor(name, stored.astype(np.float16))
            back = stored.astype(np.float16).astype(np.float32)
        else:
            packed = quantize(stored, qtype)
            writer.add_tensor(name, packed, raw_dtype=qtype)
            back = gguf.quants.dequantize(packed, qtype)
        held[name] = torch.from_numpy(np.ascontiguousarray(back).reshape(array.shape).copy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return held


def write_wan_dit(path, sd: Mapping[str, torch.Tensor], mix: str, prefix: str = "") -> dict[str, torch.Tensor]:
    """A Wan DiT state dict as a GGUF of `mix` (Q8_0, Q4_K_M, Q6_K, ...): block Linear weights
    quantized, other matrices F16, vectors and the conv F32 (the converters' rules)."""
    choose = wan_mix(mix)
    plan = {}
    for name, value in sd.items():
        array = value.float().numpy()
        if name.startswith("blocks.") and name.endswith(".weight") and array.ndim == 2:
            plan[prefix + name] = (array, choose(name))
        elif array.ndim == 2:
            plan[prefix + name] = (array, Q.F16)
        else:
            plan[prefix + name] = (array, Q.F32)
    held = write_gguf(path, plan)
    return {k[len(prefix):]: v for k, v in held.items()}


# Official umT5 names -> llama.cpp's (what its converter writes for T5 encoders).
_UMT5_LLAMA_CPP = {"attn.q.weight": "attn_q.weight", "attn.k.weight": "attn_k.weight", "attn.v.weight": "attn_v.weight",
                   "attn.o.weight": "attn_o.weight", "pos_embedding.embedding.weight": "attn_rel_b.weight",
                   "norm1.weight": "attn_norm.weight", "norm2.weight": "ffn_norm.weight",
                   "ffn.gate.0.weight": "ffn_gate.weight", "ffn.fc1.weight": "ffn_up.weight",
                   "ffn.fc2.weight": "ffn_down.weight"}


def llama_cpp_umt5_name(name: str) -> str:
    if name == "token_embedding.weight":
        return "token_embd.weight"
    if name == "norm.weight":
        return "enc.output_norm.weight"
    _, index, rest = name.split(".", 2)
    return f"enc.blk.{index}.{_UMT5_LLAMA_CPP[rest]}"


def write_umt5(path, sd: Mapping[str, torch.Tensor], mix: str, arch: str = "t5encoder") -> dict[str, torch.Tensor]:
    """An official-name umT5 state dict as a llama.cpp-named GGUF; returns the held values under
    official names. Block Linears and the embedding get the mix's types, norms and biases F32."""
    choose = wan_mix(mix)
    plan = {}
    for name, value in sd.items():
        array = value.float().numpy()
        linear = name.startswith("blocks.") and (".attn." in name or ".ffn." in name)
        qtype = choose(name) if linear or name == "token_embedding.weight" else Q.F32
        plan[llama_cpp_umt5_name(name)] = (array, qtype)
    held = write_gguf(path, plan, arch=arch)
    back = {llama_cpp_umt5_name(name): name for name in sd}
    return {back[k]: v for k, v in held.items()}
