"""The format -> inputs table Video Combine's frontend reads: one table, the same one the encoder obeys.

The frontend extension (web/js/video_combine_formats.js) hides the inputs a format lacks and limits
crf and pix_fmt to what the table says; these tests hold the encoder to the same table: an input the
table leaves out is never refused (whatever value a hidden widget kept), and every value the table
offers is accepted.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from slipstream.models.video.ffmpeg import find_ffmpeg
from slipstream.models.video.formats import (
    FORMAT_WIDGETS,
    FORMATS,
    PIX_FMT_CHOICES,
    check_choice,
    format_widgets,
    get_format,
    ignored_options,
    widget_table,
)
from slipstream.nodes.video import FORMAT_WIDGETS_KEY, SlipstreamVideoCombine

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "web" / "js" / "video_combine_formats.js"


@pytest.fixture(scope="module")
def build():
    return find_ffmpeg()


def _writable(build):
    return [f for f in FORMATS if f.encoder_for(build) is not None]


def test_table_lists_every_format_and_only_format_inputs(build):
    table = widget_table(build)
    assert table["widgets"] == list(FORMAT_WIDGETS)
    assert list(table["formats"]) == [f.name for f in FORMATS]
    for name, has in table["formats"].items():
        assert set(has) <= set(FORMAT_WIDGETS), name
    json.dumps(table)                                       # it travels in /object_info


@pytest.mark.parametrize(("name", "inputs"), [
    ("image/gif", {"loop_count"}),
    ("image/webp", {"loop_count", "lossless", "quality"}),
    ("video/h264-mp4", {"loop_count", "crf", "pix_fmt", "trim_to_audio"}),
    ("video/webm", {"loop_count", "crf", "pix_fmt", "trim_to_audio"}),
    ("video/ProRes", {"loop_count", "pix_fmt", "trim_to_audio"}),
    ("video/ffv1-mkv", {"loop_count", "pix_fmt", "trim_to_audio"}),
    ("image/png", set()),
    ("video/16bit-png", set()),
])
def test_each_format_has_the_inputs_it_uses(name, inputs):
    assert set(format_widgets(get_format(name))) == inputs


def test_crf_range_follows_the_encoder_the_build_uses():
    av1 = get_format("video/av1-webm")
    svt, aom = av1.encoders
    assert format_widgets(av1, svt)["crf"] == {"min": 1, "max": 63, "default": -1, "format_default": 23}
    assert format_widgets(av1, aom)["crf"]["min"] == 0
    assert format_widgets(get_format("video/h264-mp4"))["crf"]["max"] == 51
    assert format_widgets(get_format("video/h265-mp4"))["pix_fmt"]["values"][:2] == ["auto", "yuv420p10le"]


def test_inputs_a_format_lacks_are_never_refused(build):
    """A hidden widget keeps whatever value it had: no such value may make the run fail."""
    for fmt in _writable(build):
        has = format_widgets(fmt, fmt.encoder_for(build))
        if "pix_fmt" not in has:
            for choice in PIX_FMT_CHOICES:
                assert check_choice(fmt.name, choice, -1, build) is None, (fmt.name, choice)
                assert ignored_options(fmt.name, choice, -1, build) == ([] if choice == "auto" else
                                                                        [f"pix_fmt {choice}"])
        if "crf" not in has:
            for crf in (-1, 0, 30, 63):
                assert check_choice(fmt.name, "auto", crf, build) is None, (fmt.name, crf)
                assert ignored_options(fmt.name, "auto", crf, build) == ([] if crf == -1 else [f"crf {crf}"])


def test_every_value_the_table_offers_is_accepted_and_others_refused(build):
    for fmt in _writable(build):
        has = format_widgets(fmt, fmt.encoder_for(build))
        for choice in has.get("pix_fmt", {}).get("values", []):
            assert check_choice(fmt.name, choice, -1, build) is None, (fmt.name, choice)
            assert ignored_options(fmt.name, choice, -1, build) == []
        for choice in set(PIX_FMT_CHOICES) - set(has.get("pix_fmt", {}).get("values", PIX_FMT_CHOICES)):
            assert "supports pix_fmt" in check_choice(fmt.name, choice, -1, build), (fmt.name, choice)
        if "crf" in has:
            lo, hi = has["crf"]["min"], has["crf"]["max"]
            for crf in (-1, lo, hi):
                assert check_choice(fmt.name, "auto", crf, build) is None, (fmt.name, crf)
            if hi < 63:
                assert "outside" in check_choice(fmt.name, "auto", hi + 1, build)


def test_node_sends_the_table_with_its_format_input(build):
    types = SlipstreamVideoCombine.INPUT_TYPES()
    names, options = types["required"]["format"]
    assert options[FORMAT_WIDGETS_KEY] == widget_table(build)
    assert set(names) <= set(options[FORMAT_WIDGETS_KEY]["formats"])
    inputs = {**types["required"], **types["optional"]}
    for name in FORMAT_WIDGETS:                             # each one a real widget input, with a tooltip
        assert name in inputs and inputs[name][1]["tooltip"], name
    # What only some formats have is optional, so an API prompt for another format may leave it out.
    for name in set(FORMAT_WIDGETS) - {"loop_count"}:
        assert name in types["optional"], name


def test_frontend_extension_reads_this_node_and_this_key():
    text = SCRIPT.read_text(encoding="utf-8")
    assert re.search(r'NODE_TYPE = "SlipstreamVideoCombine"', text)
    assert re.search(rf'TABLE_KEY = "{FORMAT_WIDGETS_KEY}"', text)
    assert 'from "../../../scripts/app.js"' in text           # web/js/ is served at /extensions/<pack>/js/
    # The extension learns format names and inputs only from the table: no format is spelled out in it.
    for fmt in FORMATS:
        assert f'"{fmt.name}"' not in text, fmt.name


def test_help_page_table_matches_the_format_table():
    text = (REPO / "web" / "docs" / "SlipstreamVideoCombine.md").read_text(encoding="utf-8")
    section = text.split("## Inputs per format", 1)[1].split("\n## ", 1)[0]
    documented: dict[str, set[str]] = {}
    for row in re.findall(r"^\| (.+?) \| (.+?) \|$", section, re.M):
        names, inputs = row
        if names in ("Format", "---"):
            continue
        shown = set(re.findall(r"`(\w+)`", inputs))
        for fmt in FORMATS:
            if f"`{fmt.name}`" in names or ("nvenc" in fmt.name and re.search(r"\bnvenc\b", names)):
                documented[fmt.name] = shown
    assert documented == {f.name: set(format_widgets(f)) for f in FORMATS}
