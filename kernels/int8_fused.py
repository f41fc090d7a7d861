"""Fused CPU kernels for the int8 layer (activation quantizer, rescale epilogue), compiled once.

Eager PyTorch quantizes in five memory passes (abs, amax, divide, round, convert), each a separate
kernel; on the 2-core test machine that was 15-25 % of a layer's time, and bf16 inputs paid an
extra hidden upcast per pass. Inductor turns the same math into one vectorised loop per row
block: 2-4× faster, bit-identical (the tests check that). The rescale epilogue (int32 → scaled
fp32 + bias) likewise becomes one pass instead of two. It needs a working C++ compiler and
costs ~15 s the first time on a machine (a few more seconds per new dtype); inductor keeps the
compiled code in its on-disk cache (TORCHINDUCTOR_CACHE_DIR, on by default), so later processes
take a few seconds. The first compile of a process is announced once in the log, with its time,
so the first int8 run is not a silent wait; torch's own import-time chatter during it ("No CUDA
runtime is found" from cpp_extension on CPU-only machines with CUDA wheels) is kept out of the
log. It is used only for activations big enough to gain from it, and any compile failure
switches it off for the rest of the process with one log line. SLIPSTREAM_INT8_COMPILE=0 turns it
off (environments where torch.compile misbehaves).

The compiled functions are a process-wide cache, not configuration: they hold no settings.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator

import torch

from . import hadamard

log = logging.getLogger("slipstream.int8")

MIN_ELEMENTS = 1 << 18           # below ~256 K elements the call overhead eats the gain
_state: dict[str, object] = {}   # function name -> compiled function | "off": why nothing is compiled
_lock = threading.Lock()


def rotation_matrix(group: int, device: torch.device) -> torch.Tensor:
    """What `_rotate` multiplies by: H16 for groups of 256 (applied on both sides), else H itself."""
    return hadamard.regular_hadamard(16 if group == 256 else group, device)


def _rotate(x2d: torch.Tensor, group: int, h: torch.Tensor) -> torch.Tensor:
    """ConvRot of activations. H256 = H16 ⊗ H16, so a group of 256 is rotated as H16·X·H16 on its
    16×16 view: 32 instead of 256 multiply-adds per value (2-3× faster compiled on CPU). Equal to
    the full rotation up to float rounding; weights keep the exact full-matrix rotation.
    `h` comes from rotation_matrix() (passed in: the compiled graph must not call a cached function)."""
    if group == 256:
        t = x2d.float().reshape(-1, 16, 16)
        return torch.matmul(torch.matmul(h, t), h).reshape(x2d.shape)
    return torch.mm(x2d.float().reshape(-1, group), h).reshape(x2d.shape)


def _rounded_rows(x2d: torch.Tensor, rotation_group: int,
                  h: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """round(x / scale) in fp32 and the fp32 [M, 1] scales, rotation first when asked: the values
    both stored forms hold."""
    if rotation_group:
        x = _rotate(x2d, rotation_group, rotation_matrix(rotation_group, x2d.device) if h is None else h)
    else:
        x = x2d
    scale = x.abs().amax(dim=1, keepdim=True).float().div(127.0).clamp_min(1e-30)
    return torch.round(x.float() / scale), scale


def quantize_rows_reference(x2d: torch.Tensor, rotation_group: int,
                            h: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The math being compiled: (int8 rows, fp32 [M, 1] scales); rotation first when asked."""
    rounded, scale = _rounded_rows(x2d, rotation_group, h)
    return rounded.to(torch.int8), scale


def quantize_rows_u8_reference(x2d: torch.Tensor, rotation_group: int,
                               h: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The same quantization stored as uint8 with an offset of 128 (q + 128, bit for bit `q ^ 0x80`),
    what oneDNN's prepacked kernel takes (its fast u8·s8 path, the zero point folded into the
    packed weight); one pass, so the offset costs nothing."""
    rounded, scale = _rounded_rows(x2d, rotation_group, h)
    return (rounded + 128.0).to(torch.uint8), scale


def rescale_reference(acc: torch.Tensor, w_row: torch.Tensor, act_scale: torch.Tensor,
                      bias: torch.Tensor | None) -> torch.Tensor:
    """The epilogue being compiled: fp32 acc · weight scale · activation scale (+ bias), row-major.

    `acc` may be a transposed view (see gemm_rescale); inductor would then write the result in the
    same transposed layout, and every op after the layer would run on a column-major tensor
    (attention fell back to its slow path), hence the explicit contiguous output.
    """
    y = acc.float() * w_row * act_scale
    if bias is not None:
        y = y + bias.float()
    return y.contiguous()


_REFERENCES = {"quantize": quantize_rows_reference, "quantize_u8": quantize_rows_u8_reference,
               "rescale": rescale_reference}
_NOISY_LOGGERS = {"torch.utils.cpp_extension": ("No CUDA runtime is found",)}
_announced: set[str] = set()     # kernels whose first (compiling) call has run in this process


class _DropMessages(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(f in message for f in self.fragments)


@contextlib.contextmanager
def _quiet_third_party() -> Iterator[None]:
    """Drop torch's known irrelevant warnings while inductor imports its toolchain."""
    installed = []
    for name, fragments in _NOISY_LOGGERS.items():
        flt = _DropMessages(fragments)
        logging.getLogger(name).addFilter(flt)
        installed.append((name, flt))
    try:
        yield
    finally:
        for name, flt in installed:
            logging.getLogger(name).removeFilter(flt)


def _first_call(name: str, fn, args):
    """A kernel's first call compiles it: say so once per process, say how long it took."""
    if not _announced:
        log.info("int8: compiling the fused CPU int8 kernels for this process (the first int8 run on a machine "
                 "usually takes 10-20 s; torch caches the result on disk, later runs take a few seconds)...")
    _announced.add(name)
    start = time.perf_counter()
    with _quiet_third_party():
        result = fn(*args)
    log.info("int8: fused CPU kernel '%s' ready in %.1f s.", name, time.perf_counter() - start)
    return result


def _compiled(name: str):
    fn = _state.get(name)
    if fn is not None or "off" in _state:
        return fn
    with _lock:
        if name not in _state and "off" not in _state:
            if os.environ.get("SLIPSTREAM_INT8_COMPILE", "1").strip() in ("0", "false", "no"):
                _state["off"] = "SLIPSTREAM_INT8_COMPILE=0"
            elif not hasattr(torch, "compile"):
                _state["off"] = "this torch has no torch.compile"
            else:
                _state[name] = torch.compile(_REFERENCES[name], dynamic=True)
    return _state.get(name)


def _usable(t: torch.Tensor) -> bool:
    compiling = getattr(getattr(torch, "compiler", None), "is_compiling", lambda: False)()
    return t.device.type == "cpu" and t.numel() >= MIN_ELEMENTS and not compiling


def _call(name: str, *args):
    fn = _compiled(name)
    if fn is None:
        return None
    try:
        return fn(*args) if name in _announced else _first_call(name, fn, args)
    except Exception as exc:  # no compiler, unsupported platform: eager is always correct
        for key in _REFERENCES:
            _state.pop(key, None)
        _state["off"] = f"{type(exc).__name__}: {exc}"
        log.warning("int8: torch.compile of the fused CPU kernels failed (%s); using the eager path, "
                    "which is slower on CPU.", str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)
        return None


def _fused_rows(name: str, x2d: torch.Tensor, rotation_group: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    if not _usable(x2d):
        return None
    h = rotation_matrix(rotation_group, x2d.device) if rotation_group else None
    return _call(name, x2d, rotation_group, h)


def quantize_rows(x2d: torch.Tensor, rotation_group: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The fused quantizer's result, or None when it does not apply (caller runs the eager path)."""
    return _fused_rows("quantize", x2d, rotation_group)


def quantize_rows_u8(x2d: torch.Tensor, rotation_group: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """quantize_rows with the uint8 (+128) output of quantize_rows_u8_reference, or None."""
    return _fused_rows("quantize_u8", x2d, rotation_group)


def rescale(acc: torch.Tensor, w_row: torch.Tensor, act_scale: torch.Tensor,
            bias: torch.Tensor | None) -> torch.Tensor | None:
    """The fused epilogue's fp32 output (a new tensor), or None when it does not apply.

    Always fp32: inductor's bf16 stores were 3-5× slower than ATen's vectorised conversion, so a
    narrow output dtype is produced by the caller's copy into the output tensor.
    """
    return _call("rescale", acc, w_row, act_scale, bias) if _usable(acc) else None


def status() -> str:
    """"compiled", "not compiled yet" or why the fused quantizer is off (for logs and tests)."""
    if "off" in _state:
        return f"off: {_state['off']}"
    return "compiled" if any(k in _state for k in _REFERENCES) else "not compiled yet"
