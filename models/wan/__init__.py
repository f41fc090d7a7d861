"""Wan 2.1 video: DiT, VAE, umT5, CLIP vision, LoRA, sampling and pipeline (pure torch)."""
