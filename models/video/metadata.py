"""The workflow and prompt inside the files, so a user can drag an output back onto the canvas.

Video containers get them as tags from an FFMETADATA file (a command-line `-metadata` argument
would hit the 128 KiB per-argument limit with large workflows); the first-frame PNG gets them as
text chunks, exactly as ComfyUI's SaveImage writes them (key `prompt`, then each extra_pnginfo key).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .frames import FrameConverter


def comfy_metadata(prompt: Any, extra_pnginfo: Mapping[str, Any] | None) -> dict[str, str]:
    """ComfyUI's metadata convention as key -> JSON text: 'prompt' and each extra_pnginfo key ('workflow')."""
    tags: dict[str, str] = {}
    if prompt is not None:
        tags["prompt"] = json.dumps(prompt)
    for key, value in (extra_pnginfo or {}).items():
        tags[str(key)] = json.dumps(value)
    return tags


def _escape_ffmetadata(text: str) -> str:
    # FFMETADATA reserves '=', ';', '#', '\' and newlines; each is escaped with a backslash.
    out = []
    for ch in text:
        if ch in "=;#\\\n":
            out.append("\\")
        out.append(ch)
    return "".join(out)


def write_ffmetadata(path: str, tags: Mapping[str, str]) -> None:
    """An FFMETADATA1 file holding global tags, for `ffmpeg -i <file> -map_metadata <n>`."""
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(";FFMETADATA1\n")
        for key, value in tags.items():
            f.write(f"{_escape_ffmetadata(key)}={_escape_ffmetadata(value)}\n")


def save_png(pixels: np.ndarray, path: str, tags: Mapping[str, str], compress_level: int = 4) -> None:
    """A PNG of one uint8 frame [H,W,3|4] with each tag as a text chunk (ComfyUI's SaveImage layout)."""
    info = PngInfo()
    for key, value in tags.items():
        info.add_text(key, value)
    Image.fromarray(np.ascontiguousarray(pixels)).save(path, format="PNG", pnginfo=info, compress_level=compress_level)


def save_first_frame_png(images: torch.Tensor, path: str, tags: Mapping[str, str]) -> None:
    """Frame 0 of an IMAGE batch as a PNG (alpha kept) carrying the workflow, for dragging back into ComfyUI."""
    _, height, width, channels = images.shape
    converter = FrameConverter(int(height), int(width), int(channels), keep_alpha=True, pad_to_even=False)
    save_png(converter.convert(images[0]), path, tags)
