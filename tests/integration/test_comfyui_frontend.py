"""The UI-format example workflows load in ComfyUI's real frontend (headless Chromium).

Loads each workflows/*.json (not the *_api twins) through `app.loadGraphData`, the path the
frontend takes when a user opens or drops a file, then checks that every node type is known,
that each of our nodes received the widget values stored in the file, and that no "missing
nodes" dialog appeared. Needs the `selenium` package plus Chromium and chromedriver (Debian:
`apt-get install chromium chromium-driver`); skipped with the reason otherwise.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"
UI_FILES = sorted(p for p in WORKFLOWS.glob("*.json") if not p.name.endswith("_api.json"))

LOAD_SCRIPT = """
const [wf, done] = arguments;
(async () => {
  try {
    await window.app.loadGraphData(wf, true, true, 'slipstream-check');
    const nodes = window.app.graph._nodes.map(n => ({
      id: n.id, type: n.type, registered: !!LiteGraph.registered_node_types[n.type],
      widgets: (n.widgets || []).map(w => [w.name, w.value])}));
    const dialogs = Array.from(document.querySelectorAll('.p-dialog, .comfy-modal'))
      .filter(d => d.offsetParent !== null).map(d => d.innerText.slice(0, 400));
    done({nodes, dialogs});
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


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.name)
def test_ui_workflow_loads_in_frontend(path, frontend, comfyui):
    import slipstream

    workflow = json.loads(path.read_text(encoding="utf-8"))
    result = frontend.execute_async_script(LOAD_SCRIPT, workflow)
    assert "error" not in result, result.get("error")
    loaded = {n["id"]: n for n in result["nodes"]}
    assert sorted(loaded) == sorted(n["id"] for n in workflow["nodes"])
    unknown = [f"{n['id']}:{n['type']}" for n in result["nodes"] if not n["registered"]]
    assert not unknown, f"node types unknown to the frontend: {unknown}"
    assert not any("missing" in d.lower() for d in result["dialogs"]), result["dialogs"]
    for node in workflow["nodes"]:
        if node["type"] not in slipstream.NODE_CLASS_MAPPINGS:
            continue
        shown = [value for name, value in loaded[node["id"]]["widgets"] if name != "control_after_generate"]
        stored = [v for v in node.get("widgets_values", []) if v not in ("fixed", "randomize", "increment", "decrement")]
        assert shown[: len(stored)] == stored, f"{path.name} node {node['id']} ({node['type']}): {shown} != {stored}"
    frontend.save_screenshot(str(comfyui.base / f"{path.stem}.png"))
