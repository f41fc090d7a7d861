"""The headless runner: API-format execution order, validation like ComfyUI's, refusal of core nodes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from slipstream import host
from slipstream.runner import cli
from slipstream.runner.graph import WorkflowError, load_workflow, run_workflow

CALLS: list[str] = []


class MakeImage:
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"width": ("INT", {"default": 8, "min": 1, "max": 64}),
                             "mode": (["zeros", "ones"], {"default": "zeros"})}}

    def make(self, width, mode):
        CALLS.append("make")
        return ((torch.ones if mode == "ones" else torch.zeros)(1, 4, width, 3),)


class Double:
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",)}, "optional": {"gain": ("FLOAT", {"default": 2.0})}}

    def run(self, image, gain=2.0):
        CALLS.append("double")
        return (image * gain,)


class SaveText:
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "save"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",), "prefix": ("STRING", {"default": "t"})},
                "hidden": {"prompt": "PROMPT", "unique_id": "UNIQUE_ID"}}

    def save(self, image, prefix, prompt=None, unique_id=None):
        CALLS.append("save")
        target = host.save_target(prefix)
        with host.staged_file(target, "txt") as tmp:
            open(tmp, "w").write(f"{float(image.sum())} {unique_id} {sorted(prompt)}")
            path = host.publish(tmp, target, "txt")
        return {"ui": {"text": [host.ui_file(path, target)]}, "result": ()}


MAPPINGS = {"MakeImage": MakeImage, "Double": Double, "SaveText": SaveText}


def _prompt(**overrides):
    prompt = {
        "1": {"class_type": "MakeImage", "inputs": {"width": 4, "mode": "ones"}},
        "7": {"class_type": "Double", "inputs": {"image": ["1", 0], "gain": 3.0}},
        "3": {"class_type": "SaveText", "inputs": {"image": ["7", 0], "prefix": "out/t"}},
        "9": {"class_type": "Double", "inputs": {"image": ["1", 0]}},  # not needed by any output node
    }
    prompt.update(overrides)
    return prompt


def test_runs_needed_nodes_in_dependency_order(workdirs):
    CALLS.clear()
    result = run_workflow(_prompt(), MAPPINGS)
    assert CALLS == ["make", "double", "save"]
    ui = result.ui_outputs()["3"]["text"][0]
    text = (workdirs["output"] / "out" / ui["filename"]).read_text()
    assert text.startswith("144.0 3 ['1', '3', '7', '9']")  # 1*4*4*3 ones * 3.0, hidden inputs arrive


def test_core_nodes_refused_by_name():
    with pytest.raises(WorkflowError, match=r"KSampler \(node 5\).*need ComfyUI itself"):
        run_workflow(_prompt(**{"5": {"class_type": "KSampler", "inputs": {}}}), MAPPINGS)


@pytest.mark.parametrize("node,fragment", [
    ({"class_type": "MakeImage", "inputs": {"width": 0, "mode": "ones"}}, "below the minimum 1"),
    ({"class_type": "MakeImage", "inputs": {"width": 4, "mode": "twos"}}, "not one of the choices"),
    ({"class_type": "MakeImage", "inputs": {"mode": "ones"}}, "missing required input 'width'"),
    ({"class_type": "MakeImage", "inputs": {"width": "4", "mode": "ones"}}, "expected a number"),
])
def test_inputs_validated_like_comfyui(node, fragment):
    with pytest.raises(WorkflowError, match=fragment):
        run_workflow(_prompt(**{"1": node}), MAPPINGS)


def test_bad_links_and_cycles():
    with pytest.raises(WorkflowError, match="node 42, which is not in the workflow"):
        run_workflow(_prompt(**{"7": {"class_type": "Double", "inputs": {"image": ["42", 0]}}}), MAPPINGS)
    cyc = _prompt(**{"1": {"class_type": "Double", "inputs": {"image": ["7", 0]}}})
    with pytest.raises(WorkflowError, match="cycle"):
        run_workflow(cyc, MAPPINGS)
    with pytest.raises(WorkflowError, match="no output node"):
        run_workflow({"1": {"class_type": "MakeImage", "inputs": {"width": 4, "mode": "ones"}}}, MAPPINGS)


def test_ui_format_file_gets_pointed_to_api_twin(tmp_path):
    ui = tmp_path / "wf.json"
    ui.write_text(json.dumps({"nodes": [], "links": [], "version": 0.4}))
    with pytest.raises(WorkflowError, match="_api.json"):
        load_workflow(ui)


def test_unreadable_files_are_workflow_errors(tmp_path):
    with pytest.raises(WorkflowError, match="no such file"):
        load_workflow(tmp_path / "missing_api.json")
    broken = tmp_path / "broken_api.json"
    broken.write_text('{"1": {"class_type": ')
    with pytest.raises(WorkflowError, match="not valid JSON"):
        load_workflow(broken)


def test_errors_name_the_node_type_of_the_workflow_and_say_where_files_go():
    """The workflow names node types by id (what the user sees), not by our Python class name."""
    aliased = {**MAPPINGS, "SlipstreamMakeImage": MakeImage}
    bad = {"class_type": "SlipstreamMakeImage", "inputs": {"width": 4, "mode": "tiny.safetensors"}}
    with pytest.raises(WorkflowError, match=r"SlipstreamMakeImage \(node 1\).*SLIPSTREAM_MODELS.*demo --workdir"):
        run_workflow(_prompt(**{"1": bad}), aliased)


def test_run_command_reports_a_missing_file_without_a_traceback(tmp_path):
    out = subprocess.run([sys.executable, "-m", "slipstream", "run", str(tmp_path / "nope_api.json")],
                         capture_output=True, text=True, cwd=str(tmp_path), env=_env_with_package())
    assert out.returncode == 2 and "no such file" in out.stderr and "Traceback" not in out.stderr


def test_nodes_command_lists_registered_nodes():
    out = subprocess.run([sys.executable, "-m", "slipstream", "nodes", "--json"], capture_output=True, text=True,
                         cwd=str(cli.PACKAGE_ROOT.parent), env=_env_with_package())
    assert out.returncode == 0, out.stderr
    ids = [row["id"] for row in json.loads(out.stdout)]
    from slipstream import NODE_CLASS_MAPPINGS

    assert ids == list(NODE_CLASS_MAPPINGS)


def _env_with_package():
    """Run `python -m slipstream` against this checkout, whatever its folder is called."""
    import os
    import tempfile

    shim = tempfile.mkdtemp(prefix="slip-shim-")
    os.symlink(cli.PACKAGE_ROOT, os.path.join(shim, "slipstream"))
    env = dict(os.environ)
    env["PYTHONPATH"] = shim + os.pathsep + env.get("PYTHONPATH", "")
    return env
