"""Model files from the Hugging Face hub, cached in a model folder we are given, converted once.

Downloads go through huggingface_hub into a hidden staging folder inside the model folder, so an
interrupted transfer resumes where it stopped (huggingface_hub keeps `.incomplete` files there and
continues them with HTTP ranges) and nothing half-written ever sits under a final name. A finished
file is verified (size from the hub's metadata, and its sha256 when the hub gives one as the ETag
of an LFS file), then handed to a `convert` callback that writes the final cached file; after that
the download is deleted. Every failure becomes one error that says what went wrong, which URL, and
where to put the files by hand. The hub endpoint and offline switch are read from the environment
at call time (HF_ENDPOINT, HF_HUB_OFFLINE), so a process can change them between calls.

This module does not import the host: the caller passes the directory and the progress/interrupt
callbacks.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass

log = logging.getLogger("slipstream.hub")

DEFAULT_ENDPOINT = "https://huggingface.co"
STAGING_DIR = ".download"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class HubFile:
    """One file of a hub repository and the cached file it becomes."""

    repo_path: str     # path inside the repository, e.g. "output/best/new/bw.pth"
    cached_name: str   # file name in the model folder after conversion, e.g. "bw.safetensors"
    manual_name: str   # file name a user may drop into the folder by hand, e.g. "bw.pth"


@dataclass(frozen=True)
class HubSource:
    """A repository, its revision and what to call it in messages."""

    repo_id: str
    revision: str | None
    label: str         # e.g. "MIA models" -> "Failed to download MIA models"


class HubDownloadError(RuntimeError):
    """A model file could not be fetched or verified; the message tells the user what to do."""


Convert = Callable[[str, str, HubFile], None]          # (downloaded or manual file, cached path, file)
Progress = Callable[[int, int], None]                  # (bytes done, bytes total)


def hub_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def file_url(source: HubSource, item: HubFile) -> str:
    return f"{hub_endpoint()}/{source.repo_id}/resolve/{source.revision or 'main'}/{item.repo_path}"


def missing_files(directory: str, files: Sequence[HubFile]) -> list[HubFile]:
    return [f for f in files if not os.path.isfile(os.path.join(directory, f.cached_name))]


def ensure_files(directory: str, source: HubSource, files: Sequence[HubFile], convert: Convert,
                 progress: Progress | None = None, check_interrupt: Callable[[], None] | None = None) -> dict[str, str]:
    """Make every file's cached form exist in `directory`; return {cached_name: path}.

    Order of preference per file: the cached file, a file the user placed by hand
    (`manual_name`, converted and kept), a download. Raises HubDownloadError otherwise.
    """
    os.makedirs(directory, exist_ok=True)
    todo = missing_files(directory, files)
    if not todo:
        log.info("Using cached models (%s in %s)", source.label, directory)
    for item in todo:
        if check_interrupt is not None:
            check_interrupt()
        cached = os.path.join(directory, item.cached_name)
        manual = os.path.join(directory, item.manual_name)
        if os.path.isfile(manual):
            log.info("Converting %s to %s (once)", manual, item.cached_name)
            convert(manual, cached, item)
            continue
        downloaded = _download(directory, source, item, files, progress, check_interrupt)
        try:
            convert(downloaded, cached, item)
        except Exception as exc:
            os.unlink(downloaded)  # a bad download must not be converted again; the next try re-fetches it
            raise _failure(source, item, files, directory, f"the downloaded file is not valid: {exc}") from exc
        os.unlink(downloaded)
    _clean_staging(directory)
    return {f.cached_name: os.path.join(directory, f.cached_name) for f in files}


def _download(directory: str, source: HubSource, item: HubFile, files: Sequence[HubFile],
              progress: Progress | None, check_interrupt: Callable[[], None] | None) -> str:
    if hub_offline():
        raise _failure(source, item, files, directory,
                       "offline mode is on (HF_HUB_OFFLINE=1) and the files are not in the cache")
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url

    # The interrupt is checked on every chunk, so stopping a multi-GB download takes effect at once;
    # the partial file stays in the staging folder and the next load continues it.
    interrupted: list[BaseException] = []

    def on_bytes(done: int, total: int) -> None:
        if progress is not None:
            progress(done, total)
        if check_interrupt is not None:
            try:
                check_interrupt()
            except BaseException as exc:
                interrupted.append(exc)
                raise

    staging = os.path.join(directory, STAGING_DIR)
    endpoint = hub_endpoint()
    log.info("Downloading %s from %s", item.repo_path, file_url(source, item))
    watch = progress is not None or check_interrupt is not None
    try:
        meta = get_hf_file_metadata(hf_hub_url(source.repo_id, item.repo_path, revision=source.revision,
                                               endpoint=endpoint), endpoint=endpoint)
        path = hf_hub_download(source.repo_id, item.repo_path, revision=source.revision, local_dir=staging,
                               endpoint=endpoint, tqdm_class=_progress_tqdm(on_bytes) if watch else None)
    except Exception as exc:
        if interrupted:
            raise interrupted[0] from None  # the user stopped it: not a failed download
        raise _failure(source, item, files, directory, _describe(exc)) from exc
    problem = _verify(path, meta.size, meta.etag)
    if problem is not None:
        os.unlink(path)
        raise _failure(source, item, files, directory, problem)
    return path


def _verify(path: str, size: int | None, etag: str | None) -> str | None:
    """Why the downloaded file is wrong, or None when its size (and sha256, when known) match."""
    actual = os.path.getsize(path)
    if size is not None and actual != size:
        return f"the file is truncated: {actual} of {size} bytes arrived"
    digest = (etag or "").strip('"').lower().removeprefix("w/").strip('"')
    if _SHA256.match(digest):
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        if h.hexdigest() != digest:
            return "the file's sha256 does not match the hub's (corrupted transfer)"
    return None


def _describe(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if status is not None:
        return f"HTTP {status} from the hub ({type(exc).__name__}: {text})"
    return f"{type(exc).__name__}: {text}"


def _failure(source: HubSource, item: HubFile, files: Sequence[HubFile], directory: str, cause: str) -> HubDownloadError:
    urls = "\n".join(f"  {file_url(source, f)}  ->  {os.path.join(directory, f.manual_name)}" for f in files)
    return HubDownloadError(
        f"Failed to download {source.label}: {cause}.\n"
        f"URL: {file_url(source, item)}\n"
        f"To install them by hand, download these files and put them in {directory}:\n{urls}\n"
        "They are converted to safetensors on the next load. Set HF_ENDPOINT to use a mirror.")


def _clean_staging(directory: str) -> None:
    staging = os.path.join(directory, STAGING_DIR)
    if os.path.isdir(staging):
        shutil.rmtree(staging, ignore_errors=True)


def _progress_tqdm(progress: Progress):
    """A tqdm class that forwards byte counts to `progress` (huggingface_hub instantiates it)."""
    from tqdm.auto import tqdm

    class _Forwarding(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

        def update(self, n=1):
            self.n += n or 0
            progress(int(self.n), int(self.total or 0))

    return _Forwarding
