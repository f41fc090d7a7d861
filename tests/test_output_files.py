"""Output files as a user's system sees them: permissions, long names, full or read-only folders,
leftovers of killed runs, and folders that are symbolic links."""

from __future__ import annotations

import errno
import os
import stat
import time

import pytest
from slipstream import host
from slipstream.host import paths
from slipstream.host.paths import BadPrefixError, OutputFolderError


def write_output(root, prefix="video/clip", ext="mp4", body=b"data") -> str:
    target = paths.save_target(str(root), prefix, "output")
    with paths.staged_file(target, ext) as tmp:
        with open(tmp, "wb") as f:
            f.write(body)
        return paths.publish(tmp, target, ext)


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_published_files_get_the_mode_a_plain_open_gives(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        final = write_output(tmp_path)
        with open(tmp_path / "plain", "wb"):
            pass
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(final).st_mode) == mode == stat.S_IMODE(os.stat(tmp_path / "plain").st_mode)


def test_a_stem_that_fits_the_final_name_fits_the_staging_name(tmp_path):
    stem = "é" * 115                                    # 230 bytes: the final name is 249 bytes
    final = write_output(tmp_path, prefix=f"video/{stem}", ext="safetensors")
    assert os.path.basename(final) == f"{stem}_00001_.safetensors"
    with pytest.raises(BadPrefixError, match="filename_prefix's file name part is 242 bytes"):
        write_output(tmp_path, prefix="v/" + "a" * 242)
    assert [f for f in os.listdir(tmp_path / "video")] == [os.path.basename(final)]


@pytest.mark.parametrize(("prefix", "words"), [("bad\x00name", "NUL"), ("x" * 300, "Shorten"),
                                               ("../outside", "outside"), (".", "no file name")])
def test_prefix_problems_are_found_at_validation(workdirs, prefix, words):
    answer = host.prefix_problem(prefix)
    assert answer is not True and "filename_prefix" in answer and words in answer
    assert host.prefix_problem("video/%date:yyyy-MM-dd%/clip") is True
    assert host.prefix_problem(None) is True          # a linked prefix is checked when the node runs


@pytest.mark.parametrize(("code", "words"), [(errno.ENOSPC, "the disk is full"),
                                             (errno.EROFS, "read-only file system"),
                                             (errno.EACCES, "may not write there")])
def test_full_or_locked_output_folder_names_the_folder_and_the_fix(tmp_path, code, words):
    target = paths.save_target(str(tmp_path), "video/clip", "output")
    with pytest.raises(OutputFolderError) as err:
        with paths.staged_file(target, "png"):
            raise OSError(code, os.strerror(code))     # what PIL or the encoder meets on a full disk
    message = str(err.value)
    assert target.directory in message and words in message and "Nothing was saved" in message
    assert err.value.errno == code and os.listdir(target.directory) == []


def test_read_only_folder_fails_when_the_staging_file_is_made(tmp_path, monkeypatch):
    target = paths.save_target(str(tmp_path), "clip", "output")
    real_open = os.open

    def read_only(path, flags, mode=0o777):
        if ".partial." in str(path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
        return real_open(path, flags, mode)

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(OutputFolderError, match="read-only file system"):
        with paths.staged_file(target, "mp4"):
            pass


def test_stale_partials_are_swept_once_and_fresh_ones_kept(tmp_path):
    folder = tmp_path / "video"
    folder.mkdir()
    stale, fresh = folder / ".clip.ab12cd34.partial.mp4", folder / ".clip.ef56ab78.partial.mp4"
    user = folder / ".notes.partial.txt.bak"             # hidden and old, but not a staging name: kept
    for f in (stale, fresh, user):
        f.write_bytes(b"x")
    day_ago = time.time() - 25 * 3600
    for f in (stale, user):
        os.utime(f, (day_ago, day_ago))
    keep = folder / "clip_00001_.mp4"
    keep.write_bytes(b"x")
    os.utime(keep, (day_ago, day_ago))
    final = write_output(tmp_path)
    left = sorted(os.listdir(folder))
    assert stale.name not in left and fresh.name in left and keep.name in left and user.name in left
    assert os.path.basename(final) in left
    stale.write_bytes(b"x")
    os.utime(stale, (day_ago, day_ago))
    write_output(tmp_path)                                # swept once per folder and process
    assert stale.exists()


def test_a_linked_subfolder_is_followed_and_the_real_place_is_told(tmp_path, monkeypatch, workdirs):
    elsewhere = tmp_path / "big-disk"
    elsewhere.mkdir()
    os.symlink(elsewhere, workdirs["output"] / "video")
    seen = []
    remove = host.add_notice_hook(lambda node, message: seen.append(message))
    try:
        target = host.save_target("video/clip", node="Video Combine")
    finally:
        remove()
    assert target.real_directory == str(elsewhere.resolve())
    assert seen == [f"'video' is a symbolic link leading out of the output folder; the file was written to "
                    f"{elsewhere.resolve()}"]
    assert paths.link_note(host.save_target("clip")) is None


def test_every_node_that_saves_under_a_prefix_checks_it_at_validation(workdirs):
    """A bad filename_prefix fails when the prompt is queued, not after a long generation or training."""
    from slipstream import NODE_CLASS_MAPPINGS

    savers = {node_id: cls for node_id, cls in NODE_CLASS_MAPPINGS.items()
              if "filename_prefix" in cls.INPUT_TYPES().get("required", {})}
    assert {"SlipstreamVideoCombine", "SlipstreamSaveInt8Model", "SlipstreamAnimaSaveReferenceContext"} <= set(savers)
    for node_id, cls in savers.items():
        assert hasattr(cls, "VALIDATE_INPUTS"), f"{node_id} checks its filename_prefix only when it runs"
        assert "NUL" in str(cls.VALIDATE_INPUTS(filename_prefix="bad\x00name")), node_id
        assert cls.VALIDATE_INPUTS(filename_prefix="fine/name") is True, node_id


def test_load_mesh_follows_a_link_out_of_input_once_and_says_where(tmp_path, workdirs):
    """Load Mesh reads the file a link in input/ leads to (as ComfyUI does) and tells the user its real place."""
    import trimesh
    from slipstream import NODE_CLASS_MAPPINGS

    elsewhere = tmp_path / "shared-assets"
    elsewhere.mkdir()
    trimesh.creation.box().export(elsewhere / "box.glb")
    (workdirs["input"] / "3d").mkdir()
    os.symlink(elsewhere / "box.glb", workdirs["input"] / "3d" / "box.glb")
    seen = []
    remove = host.add_notice_hook(lambda node, message: seen.append((node, message)))
    try:
        (mesh,) = NODE_CLASS_MAPPINGS["SlipstreamLoadMesh"]().load("3d/box.glb")
        (workdirs["input"] / "plain.glb").write_bytes((elsewhere / "box.glb").read_bytes())
        NODE_CLASS_MAPPINGS["SlipstreamLoadMesh"]().load("plain.glb")
    finally:
        remove()
    assert len(mesh.vertices) == 8
    assert seen == [("Load Mesh", f"'3d/box.glb' is a symbolic link leading out of the input folder; the mesh was "
                                  f"read from {(elsewhere / 'box.glb').resolve()}")]
