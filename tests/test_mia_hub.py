"""MIA downloads against a hub stand-in on 127.0.0.1: success, cache hit, offline, 404, 500, truncation, resume."""

from __future__ import annotations

import io
import logging
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # pytest runs with --import-mode=importlib: helpers beside us
from mia_fixtures import TINY  # noqa: E402
from mia_hub_standin import HubStandIn  # noqa: E402
from slipstream.models.hub import HubDownloadError  # noqa: E402
from slipstream.models.mia import weights  # noqa: E402
from slipstream.models.mia.networks import build_network  # noqa: E402

NAMES = ("bw", "joints")


def _pth_bytes(name: str) -> bytes:
    torch.manual_seed(len(name))
    buf = io.BytesIO()
    torch.save({"model": build_network(name, TINY).state_dict()}, buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def published():
    return {f"output/best/new/{n}.pth": _pth_bytes(n) for n in NAMES}


@pytest.fixture
def hub(published, monkeypatch):
    with HubStandIn(weights.REPO_ID) as server:
        server.files.update(published)
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        yield server


def _ensure(directory: Path, **kw):
    return weights.ensure_networks(str(directory), NAMES, config=TINY, **kw)


def test_download_converts_and_cache_hits(hub, tmp_path, caplog):
    seen = []
    paths = _ensure(tmp_path, progress=lambda done, total: seen.append((done, total)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bw.safetensors", "joints.safetensors"]
    assert seen and seen[-1][0] == seen[-1][1] > 0
    model = weights.load_network(paths["bw"], "bw")
    torch.manual_seed(len("bw"))
    expected = build_network("bw", TINY).state_dict()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())
    hub.requests.clear()
    with caplog.at_level(logging.INFO, logger="slipstream.hub"):
        assert _ensure(tmp_path) == paths
    assert "Using cached models" in caplog.text
    assert hub.requests == []


def test_offline_uses_cache_or_fails_clearly(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubDownloadError, match="Failed to download MIA models: offline mode") as err:
        _ensure(tmp_path)
    assert "output/best/new/bw.pth" in str(err.value) and str(tmp_path) in str(err.value)
    assert hub.requests == []
    monkeypatch.delenv("HF_HUB_OFFLINE")
    _ensure(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _ensure(tmp_path)


@pytest.mark.parametrize("fault, cause", [("404", "HTTP 404"), ("500", "HTTP 500"),
                                          ("short", "truncated|size")])
def test_failures_name_cause_url_and_folder(hub, tmp_path, fault, cause):
    hub.faults["output/best/new/joints.pth"] = fault
    with pytest.raises(HubDownloadError) as err:
        _ensure(tmp_path)
    text = str(err.value)
    assert text.startswith("Failed to download MIA models")
    assert pytest.importorskip("re").search(cause, text), text
    assert f"{hub.endpoint}/jasongzy/Make-It-Animatable/resolve/main/output/best/new/joints.pth" in text
    assert str(tmp_path) in text and "by hand" in text
    assert not (tmp_path / "joints.safetensors").exists()
    assert (tmp_path / "bw.safetensors").exists()  # the good file is kept; the next try fetches only the rest


def test_dropped_connection_is_continued(hub, tmp_path):
    hub.faults["output/best/new/bw.pth"] = "drop_once"
    paths = _ensure(tmp_path)
    assert (tmp_path / "bw.safetensors").exists() and paths["bw"].endswith("bw.safetensors")
    assert sum(m == "GET" and p.endswith("bw.pth") for m, p, _ in hub.requests) >= 2
    assert not (tmp_path / ".download").exists()


def test_corrupt_download_is_not_kept(hub, tmp_path):
    hub.files["output/best/new/bw.pth"] = b"not a checkpoint" * 100
    with pytest.raises(HubDownloadError, match="file is not valid: .* could not be read as a weights-only PyTorch checkpoint"):
        _ensure(tmp_path)
    assert not list(tmp_path.glob("bw*"))


def test_files_placed_by_hand_are_converted_and_kept(tmp_path, published, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for n in NAMES:
        (tmp_path / f"{n}.pth").write_bytes(published[f"output/best/new/{n}.pth"])
    paths = _ensure(tmp_path)
    assert (tmp_path / "bw.pth").exists() and Path(paths["joints"]).exists()


def test_interrupt_stops_the_download_and_the_next_load_finishes_it(hub, tmp_path):
    class Stopped(Exception):
        pass

    calls = []

    def stop_once_bytes_flow():
        calls.append(1)
        if len(calls) == 2:  # call 1: before the first file; call 2: its first downloaded chunk
            raise Stopped

    with pytest.raises(Stopped):
        _ensure(tmp_path, check_interrupt=stop_once_bytes_flow)
    assert not list(tmp_path.glob("*.safetensors"))
    paths = _ensure(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bw.safetensors", "joints.safetensors"]
    assert weights.load_network(paths["bw"], "bw") is not None
