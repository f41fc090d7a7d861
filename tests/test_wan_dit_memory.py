"""Loading a DiT never holds a second copy of the weights: peak RSS during `from_file` stays within
1.25x the loaded weights, measured in a fresh subprocess on a mid-size config.

The peak is the process's VmHWM (Linux), the same high-water mark ru_maxrss reports except that
ru_maxrss survives execve (a child spawned from the big pytest process would report the parent's
size) and VmHWM can be reset to "now" just before the load.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from slipstream.models.wan.config import WanDiTConfig
from slipstream.models.wan.dit import WanDiT, random_state_dict

REPO = Path(__file__).resolve().parent.parent
# ~55 M parameters: 220 MB in fp32, large enough that interpreter noise is small beside it.
MID = WanDiTConfig("mid", "t2v", dim=512, ffn_dim=2048, num_heads=4, num_layers=12)

MEASURE = r"""
import gc, importlib.util, json, os, sys
import psutil

def peak_rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))

spec = importlib.util.spec_from_file_location("slipstream", os.path.join(sys.argv[1], "__init__.py"),
                                              submodule_search_locations=[sys.argv[1]])
pkg = importlib.util.module_from_spec(spec); sys.modules["slipstream"] = pkg; spec.loader.exec_module(pkg)
import torch
from slipstream.models.wan.config import tiny
from slipstream.models.wan.dit import WanDiT
WanDiT.build_meta(tiny())                      # import and warm everything the load touches
gc.collect()
with open("/proc/self/clear_refs", "w") as f:   # "5" resets the high-water mark to the current RSS
    f.write("5")
before = psutil.Process().memory_info().rss
model = WanDiT.from_file(sys.argv[2], dtype=getattr(torch, sys.argv[3]))
weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
print(json.dumps({"dtype": sys.argv[3], "before": before, "peak": peak_rss(), "weights": weights}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_peak_rss_during_load_is_at_most_1_25x_the_weights(tmp_path):
    path = tmp_path / "mid.safetensors"
    save_file(random_state_dict(MID), str(path))
    # One fresh process per dtype (a second load in the same process reuses freed heap and
    # under-reports); run side by side to pay the torch import once in wall time.
    dtypes = ["float32", "bfloat16"]
    procs = [subprocess.Popen([sys.executable, "-c", MEASURE, str(REPO), str(path), d], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for d in dtypes]
    rows = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        rows.append(json.loads(out.strip().splitlines()[-1]))
    assert [r["dtype"] for r in rows] == dtypes
    params = sum(math.prod(s) for s in WanDiT.expected_shapes(MID).values())
    for r in rows:
        assert r["weights"] == params * getattr(torch, r["dtype"]).itemsize
        growth = r["peak"] - r["before"]
        assert growth <= 1.25 * r["weights"], (
            f"load grew RSS by {growth / 2**20:.0f} MiB for {r['weights'] / 2**20:.0f} MiB of {r['dtype']} weights")
