"""Every CPU-runnable example workflow runs headless on the tiny models its DemoCase builds."""

from __future__ import annotations

import io
import os

import pytest
from slipstream.runner import cli
from slipstream.runner.demos import demo_cases

CASES = demo_cases()


def test_demo_workflows_exist():
    for case in CASES:
        assert (cli.WORKFLOWS / case.workflow).exists(), case.workflow


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_demo_runs_end_to_end(case, workdirs):
    case.prepare(workdirs["models"], workdirs["input"])
    out = io.StringIO()
    files = cli.run_file(cli.WORKFLOWS / case.workflow, out=out)
    assert files, f"{case.name} produced no output file:\n{out.getvalue()}"
    for path in files:
        assert os.path.getsize(path) > 0, path
    written = {str(p) for p in workdirs["output"].rglob("*") if p.is_file()}
    assert written == set(files), f"{case.name}: the runner must print every file written:\n{out.getvalue()}"
    if _feeds_audio_to_video(case.workflow):       # e.g. the speech demos: the voice reaches the video file
        import imageio_ffmpeg

        for path in (p for p in files if p.endswith((".mp4", ".webm"))):
            reader = imageio_ffmpeg.read_frames(path)
            assert next(reader).get("audio_codec"), f"{case.name}: {path} has no audio stream"
            reader.close()


def _feeds_audio_to_video(workflow: str) -> bool:
    import json

    nodes = json.loads((cli.WORKFLOWS / workflow).read_text(encoding="utf-8")).values()
    return any(n["class_type"] == "SlipstreamVideoCombine" and isinstance(n["inputs"].get("audio"), list)
               for n in nodes)


def test_demo_command_says_it_uses_tiny_models_and_reports_each_case(tmp_path, monkeypatch):
    for var in ("SLIPSTREAM_MODELS", "SLIPSTREAM_INPUT", "SLIPSTREAM_OUTPUT", "SLIPSTREAM_TEMP"):
        monkeypatch.setenv(var, os.environ.get(var, ""))     # run_demos points them at its workdir; undo after
    name = CASES[-1].name
    out = io.StringIO()
    assert cli.run_demos(str(tmp_path), [name], out=out) == 0
    text = out.getvalue()
    assert "No real weights are used" in text and f"== {name}:" in text and "1/1 demo workflow(s) ran" in text
    assert list((tmp_path / "output").rglob("*_00001_*")), text
    assert cli.run_demos(str(tmp_path), ["no-such-demo"], out=io.StringIO()) == 1
