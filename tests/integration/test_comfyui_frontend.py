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
