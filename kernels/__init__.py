"""The runtime core every family stands on, not only compute kernels.

What lives here is what a loader or sampler of any model family needs at run time, with no
knowledge of a particular model and no import of anything else of ours (tests/test_import_boundary.py):

- quantized layers: int8 W8A8 (int8.py, the GEMM backends int8_gemm / int8_fused / int8_onednn /
  int8_kitchen, ConvRot's hadamard.py, the layer swap quant_layer.py), fp8 storage and matmul
  (fp8.py), the one cast-on-the-fly Linear every family's float layers are (cast_linear.py),
  GGUF dequantization (gguf_dequant.py, gguf_linear.py);
- memory: block swapping (blockswap*.py), the keyed system-RAM copies of models (dram.py),
  system-memory facts (sysmem.py);
- choices by capability: attention backends (attention.py) and dtypes/devices (precision.py).

Models (models/) build architectures from these; nodes (nodes/) only wire them up.
"""
