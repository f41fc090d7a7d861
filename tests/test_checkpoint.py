"""Checkpoint reading: every way a file can be wrong gets a message that says so."""

from __future__ import annotations

import gc
import json
import os
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file
from slipstream.kernels import int8_onednn
from slipstream.models import checkpoint as ck
from slipstream.models.finite import NonFiniteError
from slipstream.models.quant_loading import read_int8_file


@pytest.fixture
def good_file(tmp_path):
    path = tmp_path / "good.safetensors"
    save_file({"a.weight": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)}, str(path),
              metadata={"format": "pt", "heads": "12"})
    return path


def test_reads_tensors_and_metadata(good_file):
    sd = ck.load_state_dict(str(good_file))
    assert set(sd) == {"a.weight", "b"} and sd["b"].dtype == torch.bfloat16
    assert ck.read_metadata(str(good_file))["heads"] == "12"
    assert ck.tensor_shapes(str(good_file))["a.weight"] == ((2, 3), "F32")
    assert set(ck.load_state_dict(str(good_file), keys=["b"])) == {"b"}
    with pytest.raises(ck.CheckpointError, match="missing tensor"):
        ck.load_state_dict(str(good_file), keys=["nope"])


def test_truncated_file_says_how_much_is_missing(good_file, tmp_path):
    data = good_file.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:-10])
    with pytest.raises(ck.CheckpointError, match="truncated.*10 bytes missing"):
        ck.load_state_dict(str(cut))


def test_file_cut_inside_its_header_is_called_truncated(good_file, tmp_path):
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good_file.read_bytes()[:20])
    with pytest.raises(ck.CheckpointError, match="truncated — its header needs"):
        ck.load_state_dict(str(cut))


@pytest.mark.parametrize("payload,fragment", [
    (b"", "too short"),
    (b"PK\x03\x04" + b"\0" * 100, "not a safetensors file"),
    (struct.pack("<Q", 5) + b"{bad}", "not valid JSON"),
])
def test_not_safetensors(tmp_path, payload, fragment):
    path = tmp_path / "x.safetensors"
    path.write_bytes(payload)
    with pytest.raises(ck.CheckpointError, match=fragment):
        ck.load_state_dict(str(path))


def test_missing_file(tmp_path):
    with pytest.raises(ck.CheckpointError, match="no such file"):
        ck.load_state_dict(str(tmp_path / "absent.safetensors"))


def test_pickle_weights_only(tmp_path):
    path = tmp_path / "net.pth"
    torch.save({"model": {"w": torch.ones(2)}, "epoch": 3}, path)
    assert torch.equal(ck.load_state_dict(str(path))["w"], torch.ones(2))


def test_strip_prefix_and_check():
    sd = {"model.diffusion_model.x": torch.zeros(2), "model.diffusion_model.y": torch.zeros(3), "spiece_model": torch.zeros(1)}
    out, prefix = ck.strip_prefix(sd, ["diffusion_model.", "model.diffusion_model."])
    assert prefix == "model.diffusion_model." and set(out) == {"x", "y", "spiece_model"}
    ck.check_state_dict({"x": (2,), "y": (3,)}, out, "test model", allow_extra=True)
    with pytest.raises(ck.CheckpointError, match=r"Missing tensor\(s\): z"):
        ck.check_state_dict({"x": (2,), "z": (1,)}, out, "test model", allow_extra=True)
    with pytest.raises(ck.CheckpointError, match=r"Wrong shape: y \(3,\) \(expected \(4,\)\)"):
        ck.check_state_dict({"x": (2,), "y": (4,)}, out, "test model", allow_extra=True)
    with pytest.raises(ck.CheckpointError, match="Unexpected tensor"):
        ck.check_state_dict({"x": (2,), "y": (3,)}, out, "test model")


def test_header_json_shape(good_file):
    header, meta = ck.read_safetensors_header(str(good_file))
    assert json.dumps(meta) and "__metadata__" not in header


def _is_mapped(path) -> bool:
    with open("/proc/self/maps") as f:
        return any(line.rstrip().endswith(str(path)) for line in f)


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads the process's mappings (Linux)")
def test_plain_reads_give_the_mapped_tensors_without_mapping_the_file(good_file, monkeypatch):
    mapped = ck.load_state_dict(str(good_file))
    assert _is_mapped(good_file)          # safe_open's tensors view the file's map
    del mapped
    gc.collect()
    monkeypatch.setattr(int8_onednn, "backend", lambda: int8_onednn.BACKEND_PREPACKED)
    plain = read_int8_file(str(good_file), torch.device("cpu"))     # the reader that reads plainly
    assert not _is_mapped(good_file)
    reference = load_file(str(good_file))
    assert set(plain) == set(reference)
    for key, value in reference.items():
        assert plain[key].dtype == value.dtype and torch.equal(plain[key], value)
    assert set(ck.load_state_dict(str(good_file), keys=["b"])) == {"b"}
    with pytest.raises(ck.CheckpointError, match="missing tensor"):
        ck.load_state_dict(str(good_file), keys=["nope"])


def test_plain_reads_refuse_non_finite_weights(tmp_path, monkeypatch):
    path = tmp_path / "nan.safetensors"
    save_file({"w": torch.tensor([1.0, float("nan")])}, str(path))
    monkeypatch.setattr(int8_onednn, "backend", lambda: int8_onednn.BACKEND_PREPACKED)
    with pytest.raises(NonFiniteError, match="'w' holds NaN"):
        read_int8_file(str(path), torch.device("cpu"))


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads the process's mappings (Linux)")
@pytest.mark.parametrize("backend, device, mapped", [
    (int8_onednn.BACKEND_PREPACKED, "cpu", False),     # each int8 weight is packed and its plain copy dropped
    (int8_onednn.BACKEND_INT_MM, "cpu", True),         # the layers keep the file's int8 tensors
    (int8_onednn.BACKEND_PREPACKED, "cuda", True),     # the weights go on to the GPU
])
def test_the_int8_loader_maps_the_file_only_where_layers_keep_its_tensors(good_file, monkeypatch, backend,
                                                                         device, mapped):
    gc.collect()
    assert not _is_mapped(good_file)
    monkeypatch.setattr(int8_onednn, "backend", lambda: backend)
    sd = read_int8_file(str(good_file), torch.device(device))
    assert _is_mapped(good_file) is mapped
    assert torch.equal(sd["a.weight"], torch.arange(6.0).reshape(2, 3))
