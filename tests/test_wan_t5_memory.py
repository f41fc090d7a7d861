"""Loading converts tensor by tensor: peak RSS stays near the loaded weights, not file + weights.

Measured in a fresh interpreter (VmHWM is a per-process high-water mark) on a synthetic umT5
whose tensors are all small, so the one in-flight tensor does not blur the measurement.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from safetensors.torch import save_file
from slipstream.models.wan import t5 as T
from slipstream.models.wan.demo_assets import seeded_state_dict

REPO = Path(__file__).resolve().parent.parent
CONFIG = T.UMT5Config(vocab_size=1024, dim=512, dim_attn=512, dim_ffn=2048, num_heads=8, num_layers=8)

_CHILD = textwrap.dedent("""
    import json, sys, types
    package = types.ModuleType("slipstream")  # the package without its node registry: models only
    package.__path__ = [sys.argv[1]]
    sys.modules["slipstream"] = package
    import torch
    from slipstream.models.wan.t5 import UMT5Encoder

    def hwm():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM"):
                return int(line.split()[1]) * 1024
    # Warm up what any first load pays once (numpy for the reads, the meta-device init machinery,
    # which imports sympy on first use), so the measurement is the weights' own memory.
    torch.ones(1).numpy()
    with torch.device("meta"):
        UMT5Encoder.__init__  # noqa: B018
        torch.nn.Embedding(2, 2), torch.nn.Linear(2, 2)
    before = hwm()
    enc = UMT5Encoder.from_file(sys.argv[2], dtype=getattr(torch, sys.argv[3]))
    weights = sum(p.numel() * p.element_size() for p in enc.parameters())
    print(json.dumps({"peak": hwm() - before, "weights": weights}))
""")


@pytest.fixture(scope="module")
def fp32_file(tmp_path_factory) -> Path:
    sd = seeded_state_dict(lambda: T.UMT5Encoder(CONFIG), 0, lambda name, shape, noise: noise * 0.02)
    path = tmp_path_factory.mktemp("umt5") / "umt5_fp32.safetensors"
    save_file(sd, str(path))
    return path


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="VmHWM is Linux-only")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_peak_rss_during_load_is_close_to_the_weights(fp32_file, dtype):
    path = fp32_file
    out = subprocess.run([sys.executable, "-c", _CHILD, str(REPO), str(path), dtype],
                         capture_output=True, text=True, timeout=120, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    # fp32 file -> bf16 model: a memory-mapped read would peak at file (2x) + weights = 3x.
    assert result["peak"] <= 1.25 * result["weights"], result
