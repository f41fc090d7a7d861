"""Assembling a loaded Wan DiT from a file and the loader's settings, for any host.

The order is the point: the weights load where they will wait (RAM when block swap or a LoRA merge
follows), a speech model is attached before anything else touches the weights, then LoRAs merge,
then int8 or the fp8 matmul choice applies, then block swap splits the model and the rest moves to
its device, then compile. Each later step covers what the earlier ones added (a speech model's
block Linears get int8, LoRA and swapping too). The Wan Model Loader node only resolves names to
paths, reads devices and passes the host's progress and notice functions in (nodes/wan.py); the
host-free callers (benchmarks, tests) call `load_model` the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ...kernels.blockswap import plan_block_swap, unit_bytes
from ...kernels.precision import UnsupportedDtypeError, fp8_dtype, fp8_matmul_missing
from ...kernels.quant_layer import convert_linears
from ..checkpoint import load_state_dict
from ..gguf_file import is_gguf
from .core_source import int8_plan
from .dit import WanDiT
from .lora import merge_lora
from .pipeline import (
    CompileSettings,
    SwapSettings,
    WanModelHandle,
    apply_compile,
    build_host_blocks,
    swap_units,
)

log = logging.getLogger("slipstream.wan")

QUANTIZATIONS = ("disabled", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2", "int8_w8a8")


@dataclass(frozen=True)
class LoraFile:
    """One LoRA to merge at load: its file, strength, blocks (() = all) and how the log names it."""

    path: str
    strength: float
    blocks: tuple[int, ...] = ()
    label: str = ""


@dataclass(frozen=True)
class LoadSettings:
    """What one load is asked for, devices already chosen by the host."""

    dtype: torch.dtype                       # compute precision
    quantization: str                        # one of QUANTIZATIONS
    device: torch.device                     # compute device
    resident: torch.device                   # where the weights wait between runs
    offload: torch.device                    # RAM, for staging before a merge or a swap split
    attention_mode: str = "auto"
    compile: CompileSettings | None = None
    swap: SwapSettings | None = None
    loras: tuple[LoraFile, ...] = ()
    speech_model: object | None = None       # models/wan/speech_models.SpeechModelChoice

    @property
    def swapping(self) -> bool:
        swap = self.swap
        return swap is not None and (swap.blocks_to_swap > 0 or swap.offload_txt_emb or swap.offload_img_emb)


def weight_dtype_for(quantization: str, dtype: torch.dtype) -> torch.dtype | None:
    """Storage of the block weights: None keeps the file's (fp8 files stay fp8), int8 loads float first."""
    if quantization == "disabled":
        return None
    if quantization == "int8_w8a8":
        return dtype  # load float (fp8 files are dequantized), then quantize the block Linears to int8
    return fp8_dtype(quantization)


def load_model(path: str, settings: LoadSettings, *, name: str | None = None,
               on_layer: Callable[[int, int], None] | None = None,
               notice: Callable[[str], None] | None = None, free_vram: int | None = None) -> WanModelHandle:
    """The loaded model for the sampler. `on_layer(done, total)` reports int8 conversion, `notice`
    tells the user something once (the fp8 matmul fallback), `free_vram` (bytes) lets the block swap
    log say what the planner would pick now."""
    staging = settings.offload if (settings.swapping or settings.loras) else settings.resident
    if is_gguf(path):
        dit = _load_gguf_dit(path, settings.quantization, settings.dtype, staging, settings.attention_mode)
    else:
        dit = WanDiT.from_file(path, dtype=settings.dtype, device=staging,
                               weight_dtype=weight_dtype_for(settings.quantization, settings.dtype),
                               attention_backend=settings.attention_mode)
    speech = settings.speech_model
    if speech is not None:   # before LoRA, int8 and block swap: they all cover the added weights
        from .speech_models import attach_speech_model
        attach_speech_model(dit, speech.path)
        log.info("Wan: %s (%s) attached", speech.name, speech.label)
    for lora in settings.loras:
        report = merge_lora(dit, load_state_dict(lora.path), lora.strength, lora.blocks)
        log_lora_report(lora.label + " merged", report)
    quantization = settings.quantization
    if quantization == "int8_w8a8":
        quantize_int8(dit, settings.device, on_layer)
    elif quantization.endswith("_fast"):
        missing = fp8_matmul_missing(settings.device)
        if missing is None:
            log.info("Wan: fp8 matmul on for %d block Linears (%s)", dit.use_fp8_matmul(), quantization)
        elif notice is not None:   # the same rule as the INT8 loader: keep the fp8 storage, say so once, loudly
            notice(f"{quantization}: {missing}.")
    host_blocks = None
    if settings.swapping:
        log_swap_plan(dit, settings.swap, free_vram)
        host_blocks = build_host_blocks(dit, settings.swap)
        host_blocks.move_rest(dit, settings.resident)
    else:
        dit.to(settings.resident)
    if settings.compile is not None:
        apply_compile(dit, settings.compile)
    name = name or path.replace("\\", "/").rsplit("/", 1)[-1]
    return WanModelHandle(dit, name, settings.resident, settings.swap if settings.swapping else None, host_blocks,
                          quantization, tuple(lora.label for lora in settings.loras))


def _load_gguf_dit(path: str, quantization: str, dtype: torch.dtype, device, attention_mode: str) -> WanDiT:
    """A GGUF DiT: its block weights stay quantized as the file has them (per-layer dequant)."""
    if quantization != "disabled":
        raise UnsupportedDtypeError(f"{path.rsplit('/', 1)[-1]} is a GGUF file, already quantized; set "
                                    f"quantization to 'disabled' (it was '{quantization}').")
    from ..gguf_wan import load_wan_dit_gguf
    return load_wan_dit_gguf(path, dtype=dtype, device=device, attention_backend=attention_mode)


def quantize_int8(dit: WanDiT, device: torch.device, on_layer: Callable[[int, int], None] | None = None) -> None:
    """W8A8 for the block Linears through kernels/int8.py, with the INT8 model loader's Wan rules (the
    embeddings, the head and the CLIP projection stay float)."""
    report = convert_linears(dit, int8_plan(device if device.type == "cuda" else None), on_layer=on_layer)
    log.info("Wan: %s", report.summary())


def log_lora_report(what: str, report) -> None:
    """Info when a LoRA fully applies; a warning naming the fix when part of it matched nothing."""
    if report.skipped or report.unknown:
        log.warning("Wan: %s (%s). Keys that match nothing are ignored: check the LoRA was made for this model "
                    "(size, t2v/i2v) and the block selection.", report.summary(), what)
    else:
        log.info("Wan: %s (%s)", report.summary(), what)


def log_swap_plan(dit: WanDiT, swap: SwapSettings, free_vram: int | None) -> None:
    """Tell the user what the plan costs and what the planner would pick with the VRAM free now."""
    sizes = [unit_bytes(block) for block in dit.blocks]
    plan = plan_block_swap(sizes, blocks_to_swap=swap.blocks_to_swap, prefetch=swap.prefetch_blocks)
    log.info("Wan: %s", plan.describe())
    vace: Sequence = list(getattr(dit, "vace_blocks", ()))
    if vace:   # swapped in the same share as the main blocks (models/wan/pipeline.swap_units)
        units, swapped = swap_units(dit, swap)
        count = sum(any(units[i] is block for block in vace) for i in swapped)
        log.info("Wan: %d of %d VACE blocks swapped too (%.0f MiB in RAM)", count, len(vace),
                 count * unit_bytes(vace[-1]) / 2 ** 20)
    if free_vram is not None:
        rest = sum(p.numel() * p.element_size() for p in dit.parameters()) - sum(sizes)
        try:
            auto = plan_block_swap(sizes, prefetch=swap.prefetch_blocks, free_vram=free_vram, reserve_bytes=rest)
            log.info("Wan: with %.1f GiB free now, swapping %d blocks would be enough for the weights "
                     "(leave more for activations at high resolution)", free_vram / 1024 ** 3, auto.count)
        except ValueError as exc:
            log.warning("Wan: %s", exc)
