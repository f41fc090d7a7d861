"""Calibrating the step caches on a model's own uncached run, the way their papers calibrate.

The published tables (models/wan/cache_tables.py) were measured on the released Wan 2.1 weights; a
fine-tune, a distilled model or a random test model changes how fast its outputs move, and a cache
driven by another model's table skips at the wrong steps. `CacheRecorder` watches one uncached
sampling run (hooks on the DiT, nothing in the sampler changes) and gives what each cache needs:

- TeaCache: a polynomial (highest power first) from the relative L1 change of the time
  modulation e0 between consecutive steps to the relative L1 change of the model output, fitted
  by least squares over every step and CFG branch (TeaCache's own calibration procedure).
- MagCache: the mean over tokens of ‖r_t‖ / ‖r_{t−1}‖, the per-token norm ratio of the residual
  r = tokens after − before the blocks, per step, cond and uncond interleaved and led by a 1.0
  pair: the layout of `MAG_RATIOS` (MagCache's calibration run).

EasyCache needs nothing: it measures its transformation rate on the run itself.

`CacheArgs(..., coefficients=fit_teacache(...), mag_ratios=mag_ratio_curve(...))` then drives the
caches with the calibrated values.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

TEACACHE_DEGREE = 4


@dataclass
class BranchTrace:
    """What one CFG branch showed at each forward: e0, the per-token norm of the block residual
    ([tokens, 1]: all MagCache's ratio needs, a fraction of the residual's memory), the model output."""

    e0: list[torch.Tensor] = field(default_factory=list)
    residual: list[torch.Tensor] = field(default_factory=list)
    output: list[torch.Tensor] = field(default_factory=list)


class CacheRecorder:
    """Hooks on a DiT that record every forward of an uncached run, one trace per batch row
    (with batched CFG: row 0 the positive branch, row 1 the negative one). Use as a context
    manager around the run; the hooks are removed on exit."""

    def __init__(self, dit: nn.Module):
        self.dit = dit
        self.traces: dict[int, BranchTrace] = {}
        self._handles: list = []
        self._start: torch.Tensor | None = None

    def __enter__(self) -> CacheRecorder:
        blocks = self.dit.blocks
        self._handles = [blocks[0].register_forward_pre_hook(self._first_block),
                         blocks[-1].register_forward_hook(self._last_block),
                         self.dit.register_forward_hook(self._model_output)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _trace(self, row: int) -> BranchTrace:
        return self.traces.setdefault(row, BranchTrace())

    def _first_block(self, module, args):
        tokens, inputs = args[0], args[1]
        self._start = tokens.detach().float()
        for row in range(tokens.shape[0]):
            self._trace(row).e0.append(inputs.e0[row].detach().float().cpu())

    def _last_block(self, module, args, output):
        residual = output.detach().float() - self._start
        for row in range(residual.shape[0]):
            self._trace(row).residual.append(residual[row].norm(dim=-1, keepdim=True).cpu())

    def _model_output(self, module, args, output):
        for row in range(output.shape[0]):
            self._trace(row).output.append(output[row].detach().float().cpu())


def _rel_l1(now: torch.Tensor, before: torch.Tensor) -> float:
    return float((now - before).abs().mean() / before.abs().mean().clamp_min(1e-12))


def teacache_pairs(traces: dict[int, BranchTrace]) -> tuple[list[float], list[float]]:
    """(relative L1 change of e0, relative L1 change of the output) for each consecutive pair of steps."""
    xs, ys = [], []
    for trace in traces.values():
        for i in range(1, len(trace.e0)):
            xs.append(_rel_l1(trace.e0[i], trace.e0[i - 1]))
            ys.append(_rel_l1(trace.output[i], trace.output[i - 1]))
    return xs, ys


def fit_teacache(traces: dict[int, BranchTrace], degree: int = TEACACHE_DEGREE) -> tuple[float, ...]:
    """The least-squares polynomial (highest power first) mapping e0 change to output change."""
    xs, ys = teacache_pairs(traces)
    if len(xs) <= degree:
        raise ValueError(f"TeaCache calibration needs more than {degree} step pairs, the run gave {len(xs)}: "
                         "calibrate on a run with more steps.")
    x = torch.tensor(xs, dtype=torch.float64)
    y = torch.tensor(ys, dtype=torch.float64)
    scale = float(x.abs().max()) or 1.0     # fit on x/scale: the Vandermonde matrix stays well conditioned
    powers = torch.stack([(x / scale) ** p for p in range(degree, -1, -1)], dim=1)
    solution = torch.linalg.lstsq(powers, y[:, None]).solution[:, 0]
    return tuple(float(c) / scale ** p for c, p in zip(solution, range(degree, -1, -1), strict=True))


def mag_ratio_curve(traces: dict[int, BranchTrace]) -> tuple[float, ...]:
    """Per-step mean per-token norm ratio of consecutive residuals, cond/uncond interleaved, led by
    a 1.0 pair (two branches; a run without CFG repeats its one branch)."""
    rows = [traces[row] for row in sorted(traces)][:2]
    if len(rows) == 1:
        rows = rows * 2
    steps = min(len(trace.residual) for trace in rows)
    curve = [1.0, 1.0]
    for i in range(1, steps):
        for trace in rows:
            now, before = trace.residual[i], trace.residual[i - 1]
            ratio = now.norm(dim=-1) / before.norm(dim=-1).clamp_min(1e-12)
            curve.append(float(ratio.mean()))
    return tuple(curve)
