"""ComfyUI-INT8-Fast workflows rewritten to open on this pack: its LoRA loaders become core
LoraLoaderModelOnly nodes, its loader stays (the id is ours), nodes with no equivalent are named."""

from __future__ import annotations

import json

import pytest
from slipstream import NODE_CLASS_MAPPINGS
from slipstream.runner import cli
from slipstream.runner.migrate import migrate_workflow


def ui_workflow():
    return {"nodes": [
        {"id": 3, "type": "OTUNetLoaderW8A8", "inputs": [],
         "widgets_values": ["wan_int8.safetensors", "bf16", "wan", False, True, "None"]},
        {"id": 10, "type": "INT8LoraLoader", "inputs": [{"name": "model", "type": "MODEL", "link": 1}],
         "widgets_values": ["Stochastic", "style.safetensors", 0.8]},
        {"id": 11, "type": "INT8LoraLoader", "inputs": [{"name": "model", "type": "MODEL", "link": 2}],
         "widgets_values": ["old.safetensors", 0.5]},
        {"id": 12, "type": "INT8LoraLoaderStack", "inputs": [], "widgets_values": []},
    ], "links": [[1, 3, 0, 10, 0, "MODEL"], [2, 10, 0, 11, 0, "MODEL"]]}


def test_ui_lora_loaders_become_core_lora_loaders():
    workflow = ui_workflow()
    report = migrate_workflow(workflow)
    nodes = {n["id"]: n for n in workflow["nodes"]}
    assert nodes[10]["type"] == nodes[11]["type"] == "LoraLoaderModelOnly"
    assert nodes[10]["widgets_values"] == ["style.safetensors", 0.8]
    assert nodes[11]["widgets_values"] == ["old.safetensors", 0.5]
    assert nodes[10]["inputs"] == [{"name": "model", "type": "MODEL", "link": 1}]
    assert nodes[3]["type"] in NODE_CLASS_MAPPINGS      # the loader needs no change
    assert report.replaced == ["10", "11"] and report.left == ["12 (INT8LoraLoaderStack)"]
    assert "12 (INT8LoraLoaderStack)" in report.summary()


def test_api_lora_loader_inputs_are_renamed():
    workflow = {"3": {"class_type": "OTUNetLoaderW8A8", "inputs": {"unet_name": "x.safetensors"}},
                "10": {"class_type": "INT8DynamicLoraLoader",
                       "inputs": {"model": ["3", 0], "lora_name": "a.safetensors", "strength": 0.7}}}
    report = migrate_workflow(workflow)
    assert workflow["10"] == {"class_type": "LoraLoaderModelOnly",
                              "inputs": {"model": ["3", 0], "lora_name": "a.safetensors", "strength_model": 0.7}}
    assert report.replaced == ["10"] and not report.left


def test_cli_writes_a_new_file_and_never_over_the_original(tmp_path, capsys):
    source, target = tmp_path / "int8fast.json", tmp_path / "migrated.json"
    source.write_text(json.dumps(ui_workflow()))
    assert cli.main(["migrate-int8", str(source), str(target)]) == 0
    assert "2 INT8 LoRA loader(s) replaced" in capsys.readouterr().out
    assert {n["type"] for n in json.loads(target.read_text())["nodes"]} == {
        "OTUNetLoaderW8A8", "LoraLoaderModelOnly", "INT8LoraLoaderStack"}
    assert json.loads(source.read_text()) == ui_workflow()
    with pytest.raises(ValueError, match="new file"):
        cli.main(["migrate-int8", str(source), str(source)])


def test_lora_loader_without_values_is_refused_clearly():
    with pytest.raises(ValueError, match="expected a LoRA name and a strength"):
        migrate_workflow({"nodes": [{"id": 1, "type": "INT8LoraLoader", "widgets_values": ["Dynamic"]}]})
