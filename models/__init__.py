"""The model families in plain torch, one folder each (wan, anima, audio, mia, video), plus what they share.

Nothing here imports ComfyUI or the host: a family builds its architecture from kernels/ and
reads its own files, so the same code runs inside ComfyUI, in the standalone runner and in tests.
Shared pieces sit once in common/ (layers, low-RAM loading, LoRA formulas); the loose modules are
the checkpoint readers and the INT8 / GGUF loaders that serve several families.
"""
