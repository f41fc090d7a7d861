"""Check every registered node the way ComfyUI's server and executor will read it."""

from __future__ import annotations

import inspect

import pytest
import slipstream
from slipstream.nodes import NODES

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}
SEED_IDS = {"MIALoadModel", "MIAAutoRig", "OTUNetLoaderW8A8", "AnimaFastTrainReferenceContext", "ArchAi3D_Offload_CLIP",
            # shipped alongside its seed node (the original pack's ids)
            "AnimaFastTrainMaskedReferenceContext", "AnimaFastTrainPatchModel"}
NODE_IDS = [node_id for node_id, _, _ in NODES]


def _inputs(cls) -> dict[str, dict]:
    spec = cls.INPUT_TYPES()
    assert isinstance(spec, dict) and set(spec) <= {"required", "optional", "hidden"}, spec.keys()
    return spec


def test_package_exports_mappings():
    assert slipstream.NODE_CLASS_MAPPINGS is slipstream.nodes.NODE_CLASS_MAPPINGS
    assert set(slipstream.NODE_DISPLAY_NAME_MAPPINGS) == set(slipstream.NODE_CLASS_MAPPINGS)
    assert slipstream.WEB_DIRECTORY == "./web"


def test_node_ids_are_prefixed_or_seed():
    for node_id in NODE_IDS:
        assert node_id in SEED_IDS or node_id.startswith("Slipstream"), node_id


@pytest.mark.parametrize("node_id", NODE_IDS)
def test_node_contract(node_id):
    cls = slipstream.NODE_CLASS_MAPPINGS[node_id]
    spec = _inputs(cls)
    assert isinstance(cls.CATEGORY, str) and cls.CATEGORY.startswith("Slipstream/"), cls.CATEGORY
    assert isinstance(cls.DESCRIPTION, str) and len(cls.DESCRIPTION) > 20
    assert isinstance(cls.RETURN_TYPES, tuple)
    names = getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)
    assert len(names) == len(cls.RETURN_TYPES)
    tips = getattr(cls, "OUTPUT_TOOLTIPS", None)
    if cls.RETURN_TYPES:
        assert tips is not None and len(tips) == len(cls.RETURN_TYPES), f"{node_id}: OUTPUT_TOOLTIPS"
        assert all(isinstance(t, str) and t for t in tips)
    for flag in ("OUTPUT_IS_LIST",):
        if hasattr(cls, flag):
            assert len(getattr(cls, flag)) == len(cls.RETURN_TYPES)
    if not cls.RETURN_TYPES:
        assert getattr(cls, "OUTPUT_NODE", False), f"{node_id} returns nothing and is not an output node"
    assert not hasattr(cls, "IS_CHANGED") or inspect.ismethod(cls.IS_CHANGED)

    declared: list[str] = []
    for section in ("required", "optional"):
        for name, entry in spec.get(section, {}).items():
            declared.append(name)
            assert isinstance(entry, tuple) and 1 <= len(entry) <= 2, f"{node_id}.{name}: {entry!r}"
            kind = entry[0]
            opts = entry[1] if len(entry) == 2 else {}
            assert isinstance(opts, dict)
            assert opts.get("tooltip"), f"{node_id}.{name} has no tooltip"
            if isinstance(kind, list):
                assert kind, f"{node_id}.{name}: empty combo"
                assert all(isinstance(v, (str, int, float)) for v in kind)
                if "default" in opts:
                    assert opts["default"] in kind, f"{node_id}.{name}: default not in combo"
            elif kind in ("INT", "FLOAT"):
                default = opts.get("default")
                assert default is not None, f"{node_id}.{name}: number without default"
                if "min" in opts:
                    assert default >= opts["min"], f"{node_id}.{name}: default below min"
                if "max" in opts:
                    assert default <= opts["max"], f"{node_id}.{name}: default above max"
                if kind == "INT":
                    assert isinstance(default, int) and not isinstance(default, bool)
            elif kind == "BOOLEAN":
                assert isinstance(opts.get("default"), bool), f"{node_id}.{name}: boolean default"
            elif kind == "STRING":
                assert isinstance(opts.get("default", ""), str)
            else:
                assert isinstance(kind, str) and kind, f"{node_id}.{name}: type"
                # "A,B" is ComfyUI's union socket type (comfy_execution/validation.py validate_node_input).
                assert kind == "*" or all(part.replace("_", "").isalnum() and part.isupper()
                                          for part in kind.split(",")), f"{node_id}.{name}: {kind}"

    func = getattr(cls, cls.FUNCTION)
    params = inspect.signature(func).parameters
    accepts_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
    for name in declared:
        assert accepts_kwargs or name in params, f"{node_id}.{cls.FUNCTION} does not accept '{name}'"
    hidden = spec.get("hidden", {})
    for name in hidden:
        assert accepts_kwargs or name in params, f"{node_id}.{cls.FUNCTION} does not accept hidden '{name}'"
    required = set(spec.get("required", {})) | set(hidden)
    for pname, p in params.items():
        if pname == "self" or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        if p.default is p.empty:
            assert pname in required, f"{node_id}.{cls.FUNCTION} needs '{pname}' which is not a required input"
    validate = getattr(cls, "VALIDATE_INPUTS", None)
    if validate is not None:
        vparams = inspect.signature(validate).parameters
        assert not any(p.kind is p.VAR_KEYWORD for p in vparams.values()), (
            f"{node_id}.VALIDATE_INPUTS takes **kwargs, which disables ComfyUI's own min/max/combo checks")
