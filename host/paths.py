"""File-system rules shared by both hosts: model lookup errors, output naming, safe publishing.

Pure Python on purpose: ComfyUI and the standalone runner must name and publish files the same
way, and these rules (never overwrite, never leave a half-written file under a final name) are
tested without either host.
"""

from __future__ import annotations

import difflib
import os
import re
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

# The extensions ComfyUI accepts for model files (folder_paths.supported_pt_extensions).
MODEL_EXTENSIONS = frozenset({".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"})


class ModelNotFoundError(FileNotFoundError):
    """A model file named by a node is not in any of its folder's directories."""


def missing_model_error(folder: str, name: str, available: Iterable[str], searched: Iterable[str]) -> ModelNotFoundError:
    """Build the error a user sees for a missing model: where we looked and what is close."""
    available = list(available)
    searched = list(searched)
    close = difflib.get_close_matches(name, available, n=5, cutoff=0.5)
    lines = [f"Model file '{name}' not found in folder '{folder}'."]
    lines.append("Searched: " + (", ".join(searched) if searched else "(no directories registered)"))
    if close:
        lines.append("Close matches: " + ", ".join(close))
    elif available:
        lines.append(f"{len(available)} file(s) are available there; pick one from the list.")
    else:
        lines.append(f"The folder is empty: put the file into one of the searched directories ('{folder}').")
    return ModelNotFoundError("\n".join(lines))


def list_model_files(directories: Iterable[str], extensions: Iterable[str] | None) -> list[str]:
    """Relative paths (forward slashes) of model files under the directories, sorted, first wins."""
    exts = None if extensions is None else {e.lower() for e in extensions}
    found: dict[str, None] = {}
    for root in directories:
        if not os.path.isdir(root):
            continue
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for fname in filenames:
                if fname.startswith("."):
                    continue
                if exts is not None and os.path.splitext(fname)[1].lower() not in exts:
                    continue
                rel = os.path.relpath(os.path.join(dirpath, fname), root).replace(os.sep, "/")
                found.setdefault(rel, None)
    return sorted(found)


def find_model_file(directories: Iterable[str], name: str) -> str | None:
    """Absolute path of `name` (relative, forward or back slashes) in the first directory holding it."""
    rel = os.path.normpath(name.replace("\\", "/"))
    if os.path.isabs(rel) or rel.startswith(".."):
        return None
    for root in directories:
        candidate = os.path.join(root, rel)
        if os.path.isfile(candidate):
            return os.path.abspath(candidate)
    return None


# ComfyUI's frontend expands %date:FORMAT% before queueing; the headless runner and API users
# send it raw, so we expand it here too (same tokens as the frontend: yyyy MM dd hh mm ss).
_DATE_TOKEN = re.compile(r"%date:([^%]+)%")
_DATE_FIELD = re.compile(r"yyyy|yy|MM|dd|hh|HH|mm|ss|M|d")


def _frontend_date(fmt: str, now: time.struct_time) -> str:
    fields = {
        "yyyy": f"{now.tm_year:04d}", "yy": f"{now.tm_year % 100:02d}", "MM": f"{now.tm_mon:02d}",
        "dd": f"{now.tm_mday:02d}", "hh": f"{now.tm_hour:02d}", "HH": f"{now.tm_hour:02d}",
        "mm": f"{now.tm_min:02d}", "ss": f"{now.tm_sec:02d}", "M": str(now.tm_mon), "d": str(now.tm_mday),
    }
    return _DATE_FIELD.sub(lambda m: fields[m.group(0)], fmt)


def expand_prefix(prefix: str, width: int = 0, height: int = 0, now: time.struct_time | None = None) -> str:
    """Expand ComfyUI's filename_prefix patterns: %date:…%, %year% … %second%, %width%, %height%."""
    if "%" not in prefix:
        return prefix
    now = now or time.localtime()
    prefix = _DATE_TOKEN.sub(lambda m: _frontend_date(m.group(1), now), prefix)
    values = {
        "%width%": str(width), "%height%": str(height), "%year%": str(now.tm_year),
        "%month%": f"{now.tm_mon:02d}", "%day%": f"{now.tm_mday:02d}", "%hour%": f"{now.tm_hour:02d}",
        "%minute%": f"{now.tm_min:02d}", "%second%": f"{now.tm_sec:02d}",
    }
    for token, value in values.items():
        prefix = prefix.replace(token, value)
    return prefix


@dataclass(frozen=True)
class SaveTarget:
    """Where an output goes: the directory, the file name stem, and how ComfyUI's UI addresses it."""

    directory: str       # absolute directory the file lands in
    stem: str            # file name without counter or extension
    subfolder: str       # relative to the output/temp root, forward slashes ('' for the root)
    folder_type: str     # "output" | "temp" | "input" — the /view?type= value


def save_target(root: str, prefix: str, folder_type: str, width: int = 0, height: int = 0) -> SaveTarget:
    """Resolve a filename_prefix (with subfolders and patterns) under root, refusing escapes."""
    prefix = expand_prefix(prefix.strip() or "Slipstream", width, height)
    norm = os.path.normpath(prefix.replace("\\", "/"))
    root = os.path.abspath(root)
    directory = os.path.abspath(os.path.join(root, os.path.dirname(norm)))
    if os.path.isabs(norm) or os.path.commonpath((root, directory)) != root:
        raise ValueError(f"filename_prefix '{prefix}' points outside the {folder_type} folder ({root}); "
                         "use a relative prefix such as 'video/Slipstream'.")
    stem = os.path.basename(norm)
    if stem in ("", ".", ".."):
        raise ValueError(f"filename_prefix '{prefix}' has no file name part; end it with a name, e.g. 'video/clip'.")
    subfolder = os.path.relpath(directory, root).replace(os.sep, "/")
    return SaveTarget(directory, stem, "" if subfolder == "." else subfolder, folder_type)


def numbered_name(stem: str, counter: int, ext: str) -> str:
    """ComfyUI's numbering: '<stem>_00001_.ext'."""
    return f"{stem}_{counter:05d}_.{ext.lstrip('.')}"


def counter_of(path: str, target: SaveTarget) -> int | None:
    """The NNNNN of a name numbered_name() gave for this target ('<stem>_NNNNN_.ext'), so a companion
    file (the workflow PNG of a video, the FBX of a GLB) can be published under the same number."""
    found = re.fullmatch(re.escape(target.stem) + r"_(\d+)_\..+", os.path.basename(path))
    return int(found.group(1)) if found else None


def next_counter(target: SaveTarget) -> int:
    """The first counter above every existing '<stem>_NNNNN_*' file (any extension), as ComfyUI counts."""
    pattern = re.compile(re.escape(target.stem) + r"_(\d+)_", re.IGNORECASE)
    highest = 0
    if os.path.isdir(target.directory):
        for fname in os.listdir(target.directory):
            m = pattern.match(fname)
            if m:
                highest = max(highest, int(m.group(1)))
    return highest + 1


def publish(tmp_path: str, target: SaveTarget, ext: str, counter: int | None = None) -> str:
    """Move a finished temporary file to the first free numbered name, never replacing a file.

    A hard link fails atomically when the name exists, so two writers cannot take the same name
    and an existing file is never overwritten; file systems without hard links fall back to an
    existence check plus rename.
    """
    os.makedirs(target.directory, exist_ok=True)
    counter = next_counter(target) if counter is None else counter
    for _ in range(100000):
        final = os.path.join(target.directory, numbered_name(target.stem, counter, ext))
        try:
            os.link(tmp_path, final)
        except FileExistsError:
            counter += 1
            continue
        except OSError:
            if os.path.exists(final):
                counter += 1
                continue
            os.replace(tmp_path, final)
            return final
        os.unlink(tmp_path)
        return final
    raise RuntimeError(f"no free file name for '{target.stem}' in {target.directory}")


@contextmanager
def staged_file(target: SaveTarget, ext: str) -> Iterator[str]:
    """Yield a temporary path beside the destination; it is removed if the block fails.

    The caller writes the file, then calls publish(); nothing half-written ever carries a final name.
    """
    os.makedirs(target.directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=f".partial.{ext.lstrip('.')}", dir=target.directory)
    os.close(fd)
    try:
        yield tmp
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
