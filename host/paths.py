"""File-system rules shared by both hosts: model lookup errors, output naming, safe publishing.

Pure Python on purpose: ComfyUI and the standalone runner must name and publish files the same
way, and these rules (never overwrite, never leave a half-written file under a final name) are
tested without either host.
"""

from __future__ import annotations

import difflib
import errno
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
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
    real_directory: str = ""   # where `directory` really is when a symbolic link leads out of the root


class BadPrefixError(ValueError):
    """A filename_prefix no file can be saved under (NUL byte, too long, escaping the folder, no name)."""


class OutputFolderError(OSError):
    """A file cannot be written into the output folder (disk full, read-only, no permission)."""


# Longest file name most file systems take (ext4, xfs, btrfs, NTFS, APFS count 255 bytes or units).
NAME_MAX_BYTES = 255
# What numbered_name() adds to the stem: '_00001_.' plus the longest extension we write ('safetensors').
_NUMBER_AND_EXT_BYTES = len("_00001_.safetensors")
# Staging names start with a short, byte-safe cut of the stem, so they never outgrow the final name.
_STAGING_STEM_BYTES = 48


def check_prefix(prefix: object, input_name: str = "filename_prefix") -> str:
    """The prefix as a string, or BadPrefixError naming the input when no file could ever be saved under it.

    Cheap and independent of the folders, so nodes call it from VALIDATE_INPUTS: a bad prefix then fails
    when the graph is queued, not after a long generation.
    """
    if not isinstance(prefix, str):
        raise BadPrefixError(f"{input_name} must be text, got {type(prefix).__name__}.")
    if "\x00" in prefix:
        raise BadPrefixError(f"{input_name} contains a NUL character (\\x00), which no file name can hold; "
                         "remove it (it usually comes from pasting binary text).")
    stem = os.path.basename(os.path.normpath(prefix.strip().replace("\\", "/") or "Slipstream"))
    if "%" not in stem:  # patterns such as %date:…% change length when expanded; checked when saving
        _check_stem_length(stem, input_name)
    return prefix


def _check_stem_length(stem: str, input_name: str) -> None:
    room = NAME_MAX_BYTES - _NUMBER_AND_EXT_BYTES
    size = len(stem.encode("utf-8", "surrogateescape"))
    if size > room:
        raise BadPrefixError(f"{input_name}'s file name part is {size} bytes long; with the counter and extension "
                         f"it would not fit a file name ({NAME_MAX_BYTES} bytes). Shorten it to {room} bytes "
                         "or less (sub-folders before a '/' do not count).")


def save_target(root: str, prefix: str, folder_type: str, width: int = 0, height: int = 0) -> SaveTarget:
    """Resolve a filename_prefix (with subfolders and patterns) under root, refusing escapes."""
    check_prefix(prefix)
    prefix = expand_prefix(prefix.strip() or "Slipstream", width, height)
    norm = os.path.normpath(prefix.replace("\\", "/"))
    root = os.path.abspath(root)
    directory = os.path.abspath(os.path.join(root, os.path.dirname(norm)))
    if os.path.isabs(norm) or os.path.commonpath((root, directory)) != root:
        raise BadPrefixError(f"filename_prefix '{prefix}' points outside the {folder_type} folder ({root}); "
                         "use a relative prefix such as 'video/Slipstream'.")
    stem = os.path.basename(norm)
    if stem in ("", ".", ".."):
        raise BadPrefixError(f"filename_prefix '{prefix}' has no file name part; end it with a name, e.g. 'video/clip'.")
    _check_stem_length(stem, "filename_prefix")
    subfolder = os.path.relpath(directory, root).replace(os.sep, "/")
    return SaveTarget(directory, stem, "" if subfolder == "." else subfolder, folder_type,
                      _linked_elsewhere(root, directory))


def _linked_elsewhere(root: str, directory: str) -> str:
    """The real directory when a symbolic link under root leads out of it, else ''.

    ComfyUI follows such links too (users link output/ sub-folders to bigger disks on purpose), so we
    follow them as well; resolving here lets the node say where the file really went.
    """
    real_root, real_dir = os.path.realpath(root), os.path.realpath(directory)
    inside = os.path.commonpath((real_root, real_dir)) == real_root
    return "" if inside else real_dir


def link_note(target: SaveTarget) -> str | None:
    """A line for the user when the target's folder is a link leading out of the output folder."""
    if not target.real_directory:
        return None
    shown = target.subfolder or "the output folder"
    return (f"'{shown}' is a symbolic link leading out of the {target.folder_type} folder; "
            f"the file was written to {target.real_directory}")


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
    _make_directory(target.directory)
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
            try:
                os.replace(tmp_path, final)
            except OSError as exc:
                _raise_folder_problem(exc, target.directory)
            return final
        os.unlink(tmp_path)
        return final
    raise RuntimeError(f"no free file name for '{target.stem}' in {target.directory}")


def _folder_problem(exc: OSError, directory: str) -> OSError:
    """Our clear error for the OS errors a full or locked output folder gives; other errors unchanged."""
    what = {
        errno.ENOSPC: ("the disk is full", "free some space there or point the output folder at a bigger disk"),
        errno.EDQUOT: ("the disk quota is used up", "free some space there or ask for a bigger quota"),
        errno.EROFS: ("the folder is on a read-only file system", "make it writable or save somewhere else"),
        errno.EACCES: ("this process may not write there", "fix the folder's permissions or save somewhere else"),
        errno.EPERM: ("this process may not write there", "fix the folder's permissions or save somewhere else"),
    }.get(exc.errno)
    if what is None or isinstance(exc, OutputFolderError):
        return exc
    problem, fix = what
    return OutputFolderError(exc.errno, f"Cannot write the output file into {directory}: {problem} "
                                        f"({exc.strerror}). Nothing was saved; {fix}.")


def _raise_folder_problem(exc: OSError, directory: str) -> None:
    problem = _folder_problem(exc, directory)
    if problem is exc:
        raise exc
    raise problem from exc


def _make_directory(directory: str) -> None:
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as exc:
        _raise_folder_problem(exc, directory)


def _create_empty_file(path: str) -> None:
    """An empty staging file, made with mode 0666 so the process umask decides the final permissions,
    exactly as a plain open() would (tempfile.mkstemp would make every output private, 0600)."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))


def _claim_staging_name(target: SaveTarget, ext: str, create: Callable[[str], None]) -> str:
    """The first free '.<stem>.<random>.partial.<ext>' beside the destination, made by `create`
    (which must fail with FileExistsError when the name is taken: O_EXCL open, mkdir). The stem is
    cut short in this name so a stem that fits the final name always fits the staging name too."""
    short = target.stem.encode("utf-8", "surrogateescape")[:_STAGING_STEM_BYTES].decode("utf-8", "ignore")
    for _ in range(100):
        path = os.path.join(target.directory, f".{short}.{secrets.token_hex(4)}{PARTIAL_MARK}{ext.lstrip('.')}")
        try:
            create(path)
        except FileExistsError:
            continue
        except OSError as exc:
            _raise_folder_problem(exc, target.directory)
        return path
    raise OutputFolderError(errno.EEXIST, f"no free staging name in {target.directory}")


PARTIAL_MARK = ".partial."
# '.<stem>.<8 random characters>.partial.<ext>': ours (and what tempfile.mkstemp made in earlier versions).
_STAGING_NAME = re.compile(r"\..+\.[A-Za-z0-9_]{8}\.partial\.[A-Za-z0-9]+")
STALE_AFTER_S = 24 * 3600
_swept: set[str] = set()


def sweep_stale_partials(directory: str, older_than_s: float = STALE_AFTER_S) -> list[str]:
    """Remove '.<stem>.<random>.partial.<ext>' files older than a day from one folder; return them.

    Staging files are removed when a save fails, but a killed process (SIGKILL, power loss) cannot
    clean up. A day is far longer than any encode, so a file that old belongs to no running writer.
    """
    removed = []
    cutoff = time.time() - older_than_s
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        if not _STAGING_NAME.fullmatch(name):
            continue
        path = os.path.join(directory, name)
        try:
            if os.path.islink(path) or os.path.getmtime(path) >= cutoff:
                continue
            if os.path.isfile(path):
                os.unlink(path)
                removed.append(path)
            elif os.path.isdir(path):          # a staged png sequence (staged_folder)
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
        except OSError:
            continue
    return removed


def sweep_once(directory: str) -> list[str]:
    """sweep_stale_partials() the first time this process saves into a folder; later calls do nothing."""
    key = os.path.abspath(directory)
    if key in _swept:
        return []
    _swept.add(key)
    return sweep_stale_partials(key)


@contextmanager
def staged_file(target: SaveTarget, ext: str) -> Iterator[str]:
    """Yield a temporary path beside the destination; it is removed if the block fails.

    The caller writes the file, then calls publish(); nothing half-written ever carries a final name.
    A full, read-only or locked folder raises OutputFolderError naming the folder and what to do.
    """
    with _staging(target, ext, _create_empty_file, os.unlink) as tmp:
        yield tmp


@contextmanager
def staged_folder(target: SaveTarget, ext: str = "frames") -> Iterator[str]:
    """Yield an empty hidden folder beside the destination, for a result made of many files (a png
    sequence); it is removed with its contents if the block fails. publish_folder() gives it its name."""
    with _staging(target, ext, os.mkdir, lambda path: shutil.rmtree(path, ignore_errors=True)) as path:
        yield path


@contextmanager
def _staging(target: SaveTarget, ext: str, create: Callable[[str], None], remove: Callable[[str], None],
             ) -> Iterator[str]:
    """The staging life cycle both kinds share: folder made and swept, a hidden name claimed by
    `create`, folder problems explained, and the staged path removed by `remove` unless published."""
    _make_directory(target.directory)
    sweep_once(target.directory)
    path = _claim_staging_name(target, ext, create)
    try:
        yield path
    except OSError as exc:
        _raise_folder_problem(exc, target.directory)
    finally:
        if os.path.lexists(path):
            remove(path)


def publish_folder(tmp_dir: str, target: SaveTarget, counter: int | None = None) -> str:
    """Give a finished staged folder the first free '<stem>_NNNNN_' name, never replacing anything.

    The name is reserved with mkdir (atomic: fails when anything has it), then the staged folder is
    renamed onto that empty reservation, so a reader never sees a folder with only some of the files.
    """
    counter = next_counter(target) if counter is None else counter
    for _ in range(100000):
        final = os.path.join(target.directory, f"{target.stem}_{counter:05d}_")
        try:
            os.mkdir(final)
        except FileExistsError:
            counter += 1
            continue
        except OSError as exc:
            _raise_folder_problem(exc, target.directory)
        try:
            os.replace(tmp_dir, final)          # POSIX: replaces our own empty reservation atomically
        except OSError:
            os.rmdir(final)                     # Windows: a folder cannot be renamed onto another
            try:
                os.rename(tmp_dir, final)
            except OSError as exc:
                _raise_folder_problem(exc, target.directory)
        return final
    raise RuntimeError(f"no free folder name for '{target.stem}' in {target.directory}")
