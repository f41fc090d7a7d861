"""Bad inputs at the output and memory nodes: filename prefixes, full or read-only output folders,
Offload CLIP given something else, unusable DRAM cache settings.

Each row runs a node class as ComfyUI (or an API client) would call it and must end in the pack's own
error naming the input and the fix, with nothing left in the output folder.
"""

from __future__ import annotations

import errno
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import torch
from slipstream.host import OutputFolderError
from slipstream.host.graph_values import VAE
from slipstream.host.paths import BadPrefixError
from slipstream.kernels import dram
from slipstream.kernels.dram import DramSettingError
from slipstream.nodes.memory import NotAClipError, OffloadClipToDram
from slipstream.nodes.video import SlipstreamVideoCombine

sys.path.insert(0, str(Path(__file__).parent))  # pytest runs with --import-mode=importlib: helpers beside us
from bad_input_cases import BadInput, assert_bad_input, cases_param  # noqa: E402


@contextmanager
def _folders(tmp: Path, **env: str):
    """The standalone host's folders under tmp (plus any extra environment) for one case."""
    values = {"SLIPSTREAM_OUTPUT": str(tmp / "output"), "SLIPSTREAM_TEMP": str(tmp / "temp"),
              "SLIPSTREAM_INPUT": str(tmp / "input"), **env}
    with mock.patch.dict(os.environ, values):
        yield tmp / "output"


def _combine(tmp: Path, prefix: str = "video/clip", fmt: str = "image/gif", **env: str) -> None:
    with _folders(tmp, **env) as output:
        try:
            SlipstreamVideoCombine().combine(torch.rand(3, 16, 16, 3), 8.0, 0, prefix, fmt, False, True, -1,
                                             "auto", False, 90, prompt={"1": {}})
        finally:
            left = [f for _, _, fs in os.walk(output) for f in fs] if output.exists() else []
            assert left == [], f"files left behind: {left}"


def _failing_png(code: int):
    def run(tmp: Path) -> None:
        def fail(images, path, tags):
            with open(path, "wb") as f:
                f.write(b"\x89PNG")
            raise OSError(code, os.strerror(code))
        with mock.patch("slipstream.nodes.video.save_first_frame_png", fail):
            _combine(tmp)
    return run


def _offload(value) -> None:
    OffloadClipToDram().offload(value, trigger=1)


def _tiny_vae() -> VAE:
    net = torch.nn.Linear(2, 2)
    return VAE(net, lambda x: x, lambda x: x, torch.device("cpu"), torch.device("cpu"), 4, 8)


def _with_budget(raw: str, variable: str = dram.ENV_BUDGET_GB):
    def run(tmp: Path) -> None:
        previous = dram.set_default_cache(None)       # the next use reads the environment again
        try:
            with mock.patch.dict(os.environ, {variable: raw}):
                dram.default_cache()
        finally:
            dram.set_default_cache(previous)
    return run


CASES = [
    BadInput("prefix-nul", lambda t: _combine(t, "video/cl\x00ip"), BadPrefixError, ("filename_prefix", "NUL")),
    BadInput("prefix-too-long", lambda t: _combine(t, "video/" + "x" * 240), BadPrefixError,
             ("filename_prefix", "240 bytes", "shorten")),
    BadInput("prefix-too-long-after-patterns", lambda t: _combine(t, "%year%" + "x" * 234), BadPrefixError,
             ("filename_prefix", "shorten")),
    BadInput("prefix-escapes", lambda t: _combine(t, "../../elsewhere/clip"), BadPrefixError,
             ("filename_prefix", "outside the output folder")),
    BadInput("prefix-no-name", lambda t: _combine(t, "video/.."), BadPrefixError, ("filename_prefix", "file name")),
    BadInput("first-frame-png-disk-full", _failing_png(errno.ENOSPC), OutputFolderError,
             ("output", "disk is full", "free some space")),
    BadInput("output-read-only", _failing_png(errno.EROFS), OutputFolderError,
             ("output", "read-only", "save somewhere else")),
    BadInput("offload-clip-given-a-vae", lambda t: _offload(_tiny_vae()), NotAClipError, ("'clip'", "VAE")),
    BadInput("offload-clip-given-none", lambda t: _offload(None), NotAClipError, ("'clip'", "NoneType")),
    BadInput("offload-clip-given-text", lambda t: _offload("clip_l.safetensors"), NotAClipError, ("'clip'", "str")),
    BadInput("dram-budget-nan", _with_budget("nan"), DramSettingError, (dram.ENV_BUDGET_GB, "finite", "unset")),
    BadInput("dram-budget-inf", _with_budget("inf"), DramSettingError, (dram.ENV_BUDGET_GB, "finite")),
    BadInput("dram-budget-negative", _with_budget("-2"), DramSettingError, (dram.ENV_BUDGET_GB, "0 or more")),
    BadInput("dram-budget-words", _with_budget("lots"), DramSettingError, (dram.ENV_BUDGET_GB, "number of GiB")),
    BadInput("dram-headroom-nan", _with_budget("nan", dram.ENV_HEADROOM_GB), DramSettingError,
             (dram.ENV_HEADROOM_GB, "finite")),
]


@cases_param(CASES)
def test_bad_output_and_memory_inputs_get_our_clear_error(case, tmp_path):
    assert_bad_input(case, tmp_path)
