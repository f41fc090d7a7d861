"""The UI-format example workflows load in ComfyUI's real frontend (headless Chromium).

Loads each workflows/*.json (not the *_api twins) through `app.loadGraphData`, the path the
frontend takes when a user opens or drops a file, then checks what the user would see: no toast or
alert (a schema error arrives as a toast), no dialog but the Missing Models prompt, which lists every
offered model with its download link, every node type known, no two nodes overlapping as drawn, every
node inside the free part of the canvas under the saved view, and each of our nodes holding the widget
values stored in the file. Needs the `selenium` package (in the `test` extra) plus Chromium and
chromedriver (Debian: `apt-get install chromium chromium-driver`); skipped with the reason otherwise.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the layout rules shared with the static test
from workflow_layout import (  # noqa: E402
    VIEWPORT,
    bounding_rect,
    outside_safe_area,
    overlapping_pairs,
)

WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"
UI_FILES = sorted(p for p in WORKFLOWS.glob("*.json") if not p.name.endswith("_api.json"))

LOAD_SCRIPT = """
const [wf, done] = arguments;
const visible = sel => Array.from(document.querySelectorAll(sel)).filter(d => d.getClientRects().length > 0);
const closeAll = () => visible('.p-toast-close-button, .p-dialog-close-button').forEach(b => b.click());
const sleep = ms => new Promise(r => setTimeout(r, ms));
(async () => {
  try {
    closeAll();
    await sleep(400);
    const alerts = [];
    const nativeAlert = window.alert;
    window.alert = msg => alerts.push(String(msg));
    await window.app.loadGraphData(wf, true, true, 'slipstream-check');
    await sleep(1200);  // toasts and the Missing Models dialog arrive after the graph is configured
    window.alert = nativeAlert;
    const canvas = window.app.canvas;
    const nodes = window.app.graph._nodes.map(n => ({
      id: n.id, type: n.type, registered: !!LiteGraph.registered_node_types[n.type],
      bounding: Array.from(n.getBounding()),
      widgets: (n.widgets || []).map(w => [w.name, w.value])}));
    const toasts = visible('.p-toast-message').map(t => t.innerText.slice(0, 400));
    const dialogs = visible('.p-dialog, .comfy-modal').map(d => d.innerText.slice(0, 1200));
    const links = visible('.p-dialog a[href], .p-dialog [title]').map(a => a.getAttribute('href') || a.title);
    const rect = canvas.canvas.getBoundingClientRect();
    closeAll();
    done({nodes, toasts, alerts, dialogs, links, offset: Array.from(canvas.ds.offset), scale: canvas.ds.scale,
          canvas: [rect.width, rect.height]});
  } catch (e) { done({error: String(e) + '\\n' + (e.stack || '')}); }
})();
"""


def _browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver_bin = shutil.which("chromedriver")
    if not chromium or not driver_bin:
        pytest.skip("Chromium and chromedriver are needed (apt-get install chromium chromium-driver)")
    opts = Options()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1400,900"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_bin), options=opts)
    driver.set_script_timeout(90)
    return driver


@pytest.fixture(scope="module")
def frontend(comfyui):
    driver = _browser()
    # A new user gets the Templates dialog over the canvas; mark the tutorial done, as a returning user.
    comfyui.post("/settings", {"Comfy.TutorialCompleted": True})
    try:
        driver.get(comfyui.url + "/")
        deadline = time.time() + 90
        ready = "return !!(window.app && window.app.graph && Object.keys(LiteGraph.registered_node_types).length > 100)"
        while not driver.execute_script(ready):
            if time.time() > deadline:
                pytest.fail("ComfyUI's frontend did not become ready within 90 s")
            time.sleep(0.5)
        yield driver
    finally:
        driver.quit()


def _offered_models(workflow: dict) -> list[dict]:
    """The properties.models entries the frontend offers: those whose name a widget of the node holds."""
    offered = []
    for node in workflow["nodes"]:
        values = {v for v in node.get("widgets_values", []) if isinstance(v, str)}
        offered += [m for m in node.get("properties", {}).get("models", []) or [] if m.get("name") in values]
    return offered


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.name)
def test_ui_workflow_loads_in_frontend(path, frontend, comfyui):
    import slipstream

    workflow = json.loads(path.read_text(encoding="utf-8"))
    result = frontend.execute_async_script(LOAD_SCRIPT, workflow)
    frontend.save_screenshot(str(comfyui.base / f"{path.stem}.png"))
    assert "error" not in result, result.get("error")
    # A schema error, a failed load or any warning reaches the user as a toast or an alert.
    assert not result["toasts"], f"{path.name} raised toasts: {result['toasts']}"
    assert not result["alerts"], f"{path.name} raised alerts: {result['alerts']}"
    loaded = {n["id"]: n for n in result["nodes"]}
    assert sorted(loaded) == sorted(n["id"] for n in workflow["nodes"])
    unknown = [f"{n['id']}:{n['type']}" for n in result["nodes"] if not n["registered"]]
    assert not unknown, f"node types unknown to the frontend: {unknown}"
    # "Missing Models" is the download prompt that properties.models is meant to raise on a fresh install;
    # any other dialog means the workflow is broken.
    others = [d for d in result["dialogs"] if not d.startswith("Missing Models")]
    assert not others, others
    offered = _offered_models(workflow)
    if offered:
        prompt = "\n".join(d for d in result["dialogs"] if d.startswith("Missing Models"))
        for model in offered:
            assert f"{model['directory']} / {model['name']}" in prompt, f"{path.name}: {model['name']} not offered"
            assert model["url"] in result["links"], f"{path.name}: no download link {model['url']}"
    rects = {n["id"]: bounding_rect(n["bounding"]) for n in result["nodes"]}
    assert not overlapping_pairs(rects), f"{path.name}: nodes overlap as drawn: {overlapping_pairs(rects)}"
    if tuple(round(v) for v in result["canvas"]) == VIEWPORT:
        hidden = outside_safe_area(rects, result["offset"], result["scale"])
        assert not hidden, f"{path.name}: nodes {hidden} open outside the visible canvas"
    for node in workflow["nodes"]:
        if node["type"] not in slipstream.NODE_CLASS_MAPPINGS:
            continue
        shown = [value for name, value in loaded[node["id"]]["widgets"] if name != "control_after_generate"]
        stored = [v for v in node.get("widgets_values", []) if v not in ("fixed", "randomize", "increment", "decrement")]
        assert shown[: len(stored)] == stored, f"{path.name} node {node['id']} ({node['type']}): {shown} != {stored}"


# ---------------------------------------------------------------- Video Combine: inputs per format

COMBINE = "SlipstreamVideoCombine"
# A small graph as a user saves it: core EmptyImage into Video Combine. widgets_values in input order:
# frame_rate, loop_count, filename_prefix, format, pingpong, save_output, crf, pix_fmt, lossless, quality,
# save_metadata, trim_to_audio, decode_chunk.
COMBINE_VALUES = [8.0, 0, "slip_front/combine", "video/h264-mp4", False, True, -1, "auto", True, 90, True, False, 16]


def _combine_workflow(values: list) -> dict:
    return {
        "last_node_id": 2, "last_link_id": 1, "version": 0.4, "groups": [], "config": {},
        "extra": {"ds": {"scale": 1.0, "offset": [0, 0]}},
        "nodes": [
            {"id": 1, "type": "EmptyImage", "pos": [20, 40], "size": [300, 160], "flags": {}, "order": 0, "mode": 0,
             "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [1], "slot_index": 0}], "properties": {},
             "widgets_values": [64, 48, 6, 3355596]},
            {"id": 2, "type": COMBINE, "pos": [380, 40], "size": [340, 420], "flags": {}, "order": 1, "mode": 0,
             "inputs": [{"name": "images", "type": "IMAGE", "link": 1}, {"name": "audio", "type": "AUDIO",
                                                                           "link": None}],
             "outputs": [{"name": "filenames", "type": "SLIP_FILENAMES", "links": None},
                         {"name": "video", "type": "VIDEO", "links": None}],
             "properties": {"Node name for S&R": COMBINE}, "widgets_values": list(values)},
        ],
        "links": [[1, 1, 0, 2, 0, "IMAGE"]],
    }


# The page-side helpers the scripts below share: the Video Combine node and what a user sees of it.
COMBINE_HELPERS = """
const combine = () => window.app.graph._nodes.find(n => n.type === 'SlipstreamVideoCombine');
const shown = n => n.widgets.filter(w => n.isWidgetVisible ? n.isWidgetVisible(w) : !w.hidden).map(w => w.name);
// [name, value] pairs in widget order (an object's keys would not keep that order on the way back).
const values = n => n.widgets.filter(w => w.name !== 'control_after_generate').map(w => [w.name, w.value]);
const look = n => ({shown: shown(n), values: values(n), height: n.size[1], computed: n.computeSize()[1],
                    pixFmts: [...(n.widgets.find(w => w.name === 'pix_fmt').options.values || [])]});
const pick = (n, name, value) => n.widgets.find(w => w.name === name).setValue(value,
    {e: undefined, node: n, canvas: window.app.canvas});
const sleep = ms => new Promise(r => setTimeout(r, ms));
"""

LOAD_COMBINE = COMBINE_HELPERS + """
const [wf, done] = arguments;
(async () => {
  try {
    await window.app.loadGraphData(wf, true, true, 'slipstream-combine');
    await sleep(300);
    done(look(combine()));
  } catch (e) { done({error: String(e) + '\\n' + (e.stack || '')}); }
})();
"""

# Every format in turn, the way a menu pick sets it (setValue runs the widget's callback).
EVERY_FORMAT = COMBINE_HELPERS + """
const [formats, done] = arguments;
const n = combine();
const seen = {};
for (const f of formats) { pick(n, 'format', f); seen[f] = look(n); }
done(seen);
"""

# Values survive being hidden; a value the next format refuses is set aside and comes back.
ROUND_TRIPS = COMBINE_HELPERS + """
const done = arguments[0];
const n = combine();
const steps = [];
const step = (what, fn) => { fn(); steps.push([what, values(n)]); };
step('h264, crf 30', () => { pick(n, 'format', 'video/h264-mp4'); pick(n, 'crf', 30); });
step('to gif', () => pick(n, 'format', 'image/gif'));
step('back to h264', () => pick(n, 'format', 'video/h264-mp4'));
step('h265, yuv444p10le', () => { pick(n, 'format', 'video/h265-mp4'); pick(n, 'pix_fmt', 'yuv444p10le'); });
step('to webm', () => pick(n, 'format', 'video/webm'));
step('back to h265', () => pick(n, 'format', 'video/h265-mp4'));
step('to webp, lossy 70', () => { pick(n, 'format', 'image/webp'); pick(n, 'lossless', false);
                                   pick(n, 'quality', 70); });
step('to png', () => pick(n, 'format', 'image/png'));
step('back to webp', () => pick(n, 'format', 'image/webp'));
done(steps);
"""

TO_PROMPT = COMBINE_HELPERS + """
const done = arguments[0];
window.app.graphToPrompt().then(p => done({output: p.output, workflow: p.workflow}),
                                e => done({error: String(e)}));
"""

# Where the format widget is on screen, for a real click.
FORMAT_WIDGET_AT = COMBINE_HELPERS + """
const n = combine();
const w = n.widgets.find(w => w.name === 'format');
const c = window.app.canvas;
const [x, y] = c.ds.convertOffsetToCanvas([n.pos[0] + n.size[0] / 2, n.pos[1] + w.last_y + 10]);
const rect = c.canvas.getBoundingClientRect();
return [x * rect.width / c.canvas.width, y * rect.height / c.canvas.height, rect.width, rect.height];
"""


def _format_table(comfyui) -> dict:
    spec = comfyui.object_info(COMBINE)["input"]["required"]["format"]
    return spec[1]["slipstream_format_widgets"], spec[0]


def _expected_shown(all_widgets: list[str], table: dict, fmt: str) -> list[str]:
    has = table["formats"][fmt]
    return [w for w in all_widgets if w not in table["widgets"] or w in has]


def _looked(result: dict) -> dict:
    """The page's look(): `names` in widget order, `values` as a dict."""
    assert "error" not in result, result.get("error")
    return {**result, "names": [n for n, _ in result["values"]], "values": dict(result["values"])}


def _load_combine(frontend, values: list | dict) -> dict:
    workflow = values if isinstance(values, dict) else _combine_workflow(values)
    return _looked(frontend.execute_async_script(LOAD_COMBINE, workflow))


def test_video_combine_format_table_is_the_python_one(comfyui):
    from slipstream.models.video.formats import FORMAT_WIDGETS, FORMATS, format_widgets

    table, listed = _format_table(comfyui)
    assert table["widgets"] == list(FORMAT_WIDGETS)
    assert set(table["formats"]) == {f.name for f in FORMATS} and set(listed) <= set(table["formats"])
    for fmt in FORMATS:        # the server's ffmpeg may pick another encoder (crf range), never other inputs
        assert set(table["formats"][fmt.name]) == set(format_widgets(fmt)), fmt.name


def test_video_combine_shows_only_the_inputs_of_its_format(frontend, comfyui):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    table, listed = _format_table(comfyui)
    state = _load_combine(frontend, COMBINE_VALUES)
    every = state["names"]
    assert state["shown"] == _expected_shown(every, table, "video/h264-mp4")
    assert "lossless" not in state["shown"] and "crf" in state["shown"]

    # A real click on the format combo, then on "image/gif" in the menu it opens.
    x, y, width, height = frontend.execute_script(FORMAT_WIDGET_AT)
    canvas = frontend.find_element(By.CSS_SELECTOR, "#graph-canvas")
    ActionChains(frontend).move_to_element_with_offset(canvas, int(x - width / 2), int(y - height / 2)).click().perform()
    time.sleep(0.5)
    entries = [e for e in frontend.find_elements(By.CSS_SELECTOR, ".litecontextmenu .litemenu-entry")
               if e.text.strip() == "image/gif"]
    assert entries, "the format menu did not open (or lacks image/gif)"
    entries[0].click()
    time.sleep(0.3)
    after = _looked(frontend.execute_async_script(COMBINE_HELPERS + "arguments[0](look(combine()));"))
    frontend.save_screenshot(str(comfyui.base / "video_combine_gif.png"))
    assert after["values"]["format"] == "image/gif"
    assert after["shown"] == _expected_shown(every, table, "image/gif")
    assert not {"crf", "pix_fmt", "lossless", "quality", "trim_to_audio"} & set(after["shown"])
    assert after["height"] < state["height"]                    # the node shrank by the hidden rows

    seen = {f: _looked(v) for f, v in frontend.execute_async_script(EVERY_FORMAT, listed).items()}
    for fmt in listed:
        assert seen[fmt]["shown"] == _expected_shown(every, table, fmt), fmt
        assert seen[fmt]["height"] >= seen[fmt]["computed"], f"{fmt}: shown inputs do not fit the node"
        if "pix_fmt" in table["formats"][fmt]:
            assert seen[fmt]["pixFmts"] == table["formats"][fmt]["pix_fmt"]["values"], fmt


FRESH_NODE = COMBINE_HELPERS + """
const done = arguments[0];
const n = LiteGraph.createNode('SlipstreamVideoCombine');
window.app.graph.add(n);
const seen = look(n);
window.app.graph.remove(n);
done(seen);
"""


def test_a_new_video_combine_shows_its_default_format_inputs(frontend, comfyui):
    table, _ = _format_table(comfyui)
    _load_combine(frontend, COMBINE_VALUES)
    fresh = _looked(frontend.execute_async_script(FRESH_NODE))
    assert fresh["values"]["format"] == "video/h264-mp4"
    assert fresh["shown"] == _expected_shown(fresh["names"], table, "video/h264-mp4")
    assert 0 <= fresh["height"] - fresh["computed"] < 20, fresh      # no empty rows where hidden inputs were


def test_video_combine_keeps_values_across_formats(frontend, comfyui):
    _load_combine(frontend, COMBINE_VALUES)
    steps = {what: dict(values) for what, values in frontend.execute_async_script(ROUND_TRIPS)}
    assert steps["to gif"]["crf"] == 30 and steps["back to h264"]["crf"] == 30       # hidden, kept
    assert steps["h265, yuv444p10le"]["pix_fmt"] == "yuv444p10le"
    assert steps["to webm"]["pix_fmt"] == "auto"          # webm has no yuv444p10le: set aside, not sent
    assert steps["back to h265"]["pix_fmt"] == "yuv444p10le"
    assert steps["to png"]["lossless"] is False and steps["to png"]["quality"] == 70
    assert steps["back to webp"]["lossless"] is False and steps["back to webp"]["quality"] == 70


def test_saved_video_combine_with_another_format_reloads(frontend, comfyui):
    table, _ = _format_table(comfyui)
    saved = list(COMBINE_VALUES)
    saved[3:4] = ["image/webp"]
    saved[6:10] = [30, "yuv444p", False, 70]         # crf and pix_fmt hidden for webp, still stored
    loaded = _load_combine(frontend, saved)
    assert list(loaded["values"].values()) == saved
    assert loaded["shown"] == _expected_shown(loaded["names"], table, "image/webp")
    # Saved again by the frontend and loaded back: the same values, the same inputs shown.
    workflow = frontend.execute_async_script(TO_PROMPT)["workflow"]
    again = _load_combine(frontend, workflow)
    assert list(again["values"].values()) == saved and again["shown"] == loaded["shown"]


def test_video_combine_queues_after_a_format_change(frontend, comfyui):
    _load_combine(frontend, COMBINE_VALUES)
    frontend.execute_async_script(COMBINE_HELPERS + """
        const n = combine(); pick(n, 'format', 'video/ProRes'); pick(n, 'format', 'image/gif');
        arguments[0](true);""")
    prompt = frontend.execute_async_script(TO_PROMPT)
    assert "error" not in prompt, prompt.get("error")
    api = prompt["output"]
    inputs = api["2"]["inputs"]
    assert inputs["format"] == "image/gif"
    assert {"crf", "pix_fmt", "lossless", "quality"} <= set(inputs)          # hidden inputs are still sent
    entry = comfyui.run(api)                                                  # validates and runs
    item = entry["outputs"]["2"]["images"][0]
    assert item["filename"].endswith("_.gif")
    # An API prompt that leaves out what gif does not have is valid too.
    for name in ("crf", "pix_fmt", "lossless", "quality", "trim_to_audio", "decode_chunk", "save_metadata"):
        inputs.pop(name, None)
    inputs["filename_prefix"] = "slip_front/bare"
    assert comfyui.run(api)["outputs"]["2"]["images"][0]["filename"].endswith("_.gif")


VUE_NODES = """
const [on, done] = arguments;
window.app.extensionManager.setting.set('Comfy.VueNodes.Enabled', on).then(() => done(true),
                                                                         e => done(String(e)));
"""
NODE_TEXT = "const e = document.querySelector('[data-node-id=\"2\"]'); return e ? e.innerText.split('\\n') : null;"


def test_video_combine_inputs_follow_the_format_in_vue_nodes(frontend, comfyui):
    """The same with the DOM node renderer ("Modern Node Design (Nodes 2.0)") turned on."""
    from slipstream.models.video.formats import FORMAT_WIDGETS

    table, _ = _format_table(comfyui)
    assert frontend.execute_async_script(VUE_NODES, True) is True
    try:
        time.sleep(0.5)
        _load_combine(frontend, COMBINE_VALUES)
        time.sleep(0.5)
        for fmt in ("video/h264-mp4", "image/gif", "image/webp", "video/ProRes", "image/png"):
            frontend.execute_async_script(COMBINE_HELPERS + "pick(combine(), 'format', arguments[0]); "
                                          "sleep(300).then(() => arguments[1](true));", fmt)
            lines = frontend.execute_script(NODE_TEXT)
            assert lines, "the Video Combine node is not drawn as a DOM node"
            assert fmt in lines
            assert set(lines) & set(FORMAT_WIDGETS) == set(table["formats"][fmt]), fmt
    finally:
        frontend.execute_async_script(VUE_NODES, False)
