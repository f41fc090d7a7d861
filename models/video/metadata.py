"""The workflow and prompt inside the files, so a user can drag an output back onto the canvas.

Video containers get them as tags from an FFMETADATA file (a command-line `-metadata` argument
would hit the 128 KiB per-argument limit with large workflows): one tag per key, as core Save Video
writes them, plus a `comment` tag holding all of them as one JSON object, which is where the widely
used Video Combine node writes (and its loaders read) the workflow. The first-frame PNG (and the
first frame of a png sequence) gets them as text chunks, exactly as ComfyUI's SaveImage writes them
(key `prompt`, then each extra_pnginfo key).
"""

from __future__ import annotations

import json
import os
import struct
import zlib
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


def container_tags(tags: Mapping[str, str]) -> dict[str, str]:
    """The tags for a video container: each key, plus 'comment' = {key: JSON text, ...} as one JSON object."""
    return {**tags, "comment": json.dumps(dict(tags))} if tags else {}


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _text_chunk(key: str, value: str) -> bytes:
    """tEXt when the text is Latin-1 (JSON from json.dumps always is), else uncompressed iTXt (UTF-8)."""
    try:
        return _png_chunk(b"tEXt", key.encode("latin-1") + b"\0" + value.encode("latin-1"))
    except UnicodeEncodeError:
        return _png_chunk(b"iTXt", key.encode("latin-1", "replace") + b"\0\0\0\0\0" + value.encode("utf-8"))


def add_png_text(path: str, tags: Mapping[str, str]) -> None:
    """Insert text chunks right after the IHDR of an existing PNG (any bit depth), rewriting it in place.

    ffmpeg's PNG encoder writes no text, and Pillow cannot write 16-bit RGB; adding chunks to the
    bytes ffmpeg wrote keeps the pixels exactly as encoded. The file is rewritten through a temporary
    name and os.replace, so it is never half-written.
    """
    with open(path, "rb") as f:
        data = f.read()
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        raise ValueError(f"{path} is not a PNG file")
    ihdr_end = 8 + 8 + struct.unpack(">I", data[8:12])[0] + 4
    chunks = b"".join(_text_chunk(str(k), str(v)) for k, v in tags.items())
    tmp = path + ".text"
    with open(tmp, "wb") as f:
        f.write(data[:ihdr_end] + chunks + data[ihdr_end:])
    os.replace(tmp, path)


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
